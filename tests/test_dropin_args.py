"""The drop-in's argv contract: what it refuses, with which words, touching nothing."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from pathlib import Path

import pytest

from shim.cli import parse, request_for
from shim.request import BackupRequest
from tests.lab import Lab, MiB
from tests.lab.leaks import leaks
from tests.lab.system import mount_points
from tests.support import FIXTURES, GENERATIONS, build_argv, repo_values, run_dropin

INVALID = json.loads((FIXTURES / "argv" / "invalid.json").read_text())["cases"]
REPO_ARGS = ["-t", "none", "-s", "/nonexistent-nas", "-m", "bind"]


def _expand(argv: list[str]) -> list[str]:
    out: list[str] = []
    for arg in argv:
        out += REPO_ARGS if arg == "{repo}" else [arg]
    return out


def _nothing_mounted() -> bool:
    return not glob.glob(f"{tempfile.gettempdir()}/csbackup.*") and not any(
        m.name.startswith("csbackup.") and m.parent == Path(tempfile.gettempdir())
        for m in mount_points()
    )


@pytest.mark.parametrize("case", INVALID, ids=[" ".join(c["argv"])[:60] for c in INVALID])
def test_invalid_argv_is_refused_before_anything(case: dict, tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    run = run_dropin(_expand(case["argv"]), log_file=log)
    assert run.returncode == 1
    first = run.stdout.splitlines()[0] if run.stdout else ""
    assert first.startswith(case["stdout"]), run.stdout
    assert ("Usage: nasbackup.sh" in run.stdout) is bool(case.get("usage"))
    assert run.stderr == ""
    assert _nothing_mounted()
    assert not log.exists()  # refused before even the log is opened


def test_every_generation_argv_parses_with_empty_values() -> None:
    values = {
        "operation": "backup",
        "vm": "i-2-3-VM",
        "type": "nfs",
        "address": "10.0.0.1:/b",
        "options": "",
        "path": "i-2-3-VM/t",
        "quiesce": "false",
        "disks": "",
    }
    for generation in [g for g in GENERATIONS if not g.startswith(("_", "other"))]:
        args = parse(build_argv(generation, values))
        assert args.get("mount") == ""
        assert args.text("vm") == "i-2-3-VM"
        request = request_for(args)
        assert isinstance(request, BackupRequest) and request.repository.mount_timeout is None
        # Each generation's other operations (the downstream one has its own, with -w).
        for operation in ("delete", "stats", "rebase"):
            argv = build_argv(generation, {**values, "operation": operation}, operation)
            assert parse(argv).text("operation") == operation
            assert ("-w" in argv) is (generation == "downstream")


@pytest.mark.parametrize(
    ("extra", "compress", "bandwidth"),
    [
        ([], None, None),
        (["-c"], True, None),
        (["--compress", "true", "-b", "50"], True, 50),
        (["-c", "false", "--bandwidth", "0"], False, 0),
        (["-b", ""], None, None),
        (["-c", "-q", "true"], True, None),
    ],
)
def test_the_proposal_s_c_and_b(
    extra: list[str], compress: bool | None, bandwidth: int | None
) -> None:
    """apache/cloudstack PR 12898's flags: ``-c`` takes no value (``true``/``false`` after it
    is its value), ``-b`` MiB/s (0: no cap; empty: the host setting)."""
    argv = ["-o", "backup", "-v", "i-2-3-VM", *REPO_ARGS, "-p", "i-2-3-VM/t", *extra]
    request = request_for(parse(argv))
    assert isinstance(request, BackupRequest)
    assert (request.compress, request.bandwidth_mib) == (compress, bandwidth)


def test_downstream_generation_parses_with_w_and_u() -> None:
    values = {
        "operation": "backup",
        "vm": "i-2-3-VM",
        "type": "nfs",
        "address": "10.0.0.1:/b",
        "path": "i-2-3-VM/t",
        "quiesce": "false",
        "disks": "/mnt/p/v1,/mnt/p/v2",
        "mount_timeout": "0",
        "volume_ids": "U1,U2",
    }
    request = request_for(parse(build_argv("downstream", values)))
    assert isinstance(request, BackupRequest)
    assert request.repository.mount_timeout == 0 and request.volume_ids == ("U1", "U2")
    for operation in ("delete", "stats", "rebase", "restore", "verify"):
        extra = {"rebase_target": "i-2-3-VM/t", "rebase_new_backing": "i-2-3-VM/s",
                 "restore_paths": "/mnt/p/v1", "mount_timeout": "15"}  # fmt: skip
        argv = build_argv("downstream", {**values, **extra, "operation": operation}, operation)
        assert request_for(parse(argv)).repository.mount_timeout == 15


@pytest.mark.live_backup
@pytest.mark.lab
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-p", "../../x"], "may not contain '..'"),
        (["-p", "/etc/cron.d/x"], "must be relative"),
        (["-p", "escape/x"], "is not a backup of VM"),
        (
            [
                "-p",
                "VM/t",
                "-M",
                "incremental",
                "--bitmap-new",
                "b-2",
                "--bitmap-parent",
                "b-1",
                "--parent-paths",
                "../../../etc/passwd",
            ],
            "may not contain '..'",
        ),
        (
            [
                "-p",
                "VM/t",
                "-M",
                "incremental",
                "--bitmap-new",
                "b-2",
                "--bitmap-parent",
                "b-1",
                "--parent-path",
                "escape",
            ],
            "not inside the VM's directory",
        ),
        (
            [
                "-p",
                "VM/t",
                "-M",
                "incremental",
                "--bitmap-new",
                "b-2",
                "--bitmap-parent",
                "b-1",
                "--parent-paths",
                "other-VM/t0/root.x.qcow2",
            ],
            "not inside the VM's directory",
        ),
    ],
)
def test_paths_leaving_the_repository_are_refused(
    lab: Lab, tmp_path: Path, extra: list[str], message: str
) -> None:
    vm = lab.create_vm(disks=(8 * MiB,))
    repo = lab.repository()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, Path(repo.address) / "escape")
    extra = [
        a.replace("VM/", f"{vm.name}/") if a.startswith(("VM/", "other")) else a for a in extra
    ]
    values = repo_values(repo)
    argv = [
        "-o",
        "backup",
        "-v",
        vm.name,
        "-t",
        values["type"],
        "-s",
        values["address"],
        "-m",
        values["options"],
        "-q",
        "false",
        "-d",
        "",
        *extra,
    ]
    if "-M" not in extra:
        argv += ["-M", "full", "--bitmap-new", "b-2"]
    run = run_dropin(argv, log_file=tmp_path / "agent.log")
    assert run.returncode == 1
    assert message in run.stdout and len(run.stdout.splitlines()) == 1
    assert sorted(os.listdir(repo.address)) == ["escape"]
    assert list(outside.iterdir()) == []
    assert vm.checkpoints() == []
    assert leaks(lab) == []
