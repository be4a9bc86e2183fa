"""The command line's error boundary: one line on stdout, exit 0, 1 or 20, nothing else."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shim import cli, operations
from shim.errors import BackupFailed, CleanupFailed
from shim.operations import Result


def _main_with(monkeypatch: pytest.MonkeyPatch, tmp_path: object, runner: Callable[[], str]) -> int:
    monkeypatch.setenv("NASBACKUP_SHIM_LOG", f"{tmp_path}/agent.log")
    monkeypatch.setattr(cli, "request_for", lambda _args: object())
    monkeypatch.setattr(operations, "run", lambda _request: Result(runner()))
    return cli.main(["-o", "backup"])


def _raise(error: Exception) -> Callable[[], str]:
    def runner() -> str:
        raise error

    return runner


def test_cleanup_failure_exits_20_with_the_contract_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _main_with(monkeypatch, tmp_path, _raise(CleanupFailed("cannot unmount /tmp/x")))
    assert code == 20
    assert capsys.readouterr().out == "Backup cleanup failed\n"


def test_handled_failure_is_one_line_exit_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _main_with(monkeypatch, tmp_path, _raise(BackupFailed("backup job failed:\nENOSPC")))
    assert code == 1
    assert capsys.readouterr().out == "backup job failed: ENOSPC\n"


def test_a_bug_is_still_one_line_exit_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _main_with(monkeypatch, tmp_path, _raise(KeyError("oops")))
    out = capsys.readouterr()
    assert code == 1
    assert out.out.startswith("internal error: KeyError") and out.out.count("\n") == 1
    assert "Traceback" not in out.out + out.err


def test_success_prints_exactly_the_runner_text(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _main_with(monkeypatch, tmp_path, lambda: "BITMAP_CREATED=b\n42\n") == 0
    assert capsys.readouterr().out == "BITMAP_CREATED=b\n42\n"
