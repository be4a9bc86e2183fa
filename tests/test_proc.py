"""The subprocess helper, its cancellation, and the exit-code mapping."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shim import cancel, proc
from shim.errors import (
    EXIT_CLEANUP_FAILED,
    EXIT_ERROR,
    Aborted,
    CleanupFailed,
    CommandFailed,
    InputError,
    exit_code_for,
)

ROOT = Path(__file__).resolve().parents[1]


def test_output_is_captured_and_failures_raise() -> None:
    assert proc.run(["echo", "hi"]).stdout == "hi\n"
    with pytest.raises(CommandFailed, match="exit code 3"):
        proc.run(["sh", "-c", "echo oops >&2; exit 3"])
    assert proc.run(["false"], check=False).returncode == 1


def test_timeout_and_missing_program() -> None:
    with pytest.raises(CommandFailed, match="timed out"):
        proc.run(["sleep", "5"], timeout=0.2)
    with pytest.raises(CommandFailed, match="not found"):
        proc.run(["/nonexistent/program"])


def test_secrets_are_masked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(CommandFailed) as info:
        proc.run(["sh", "-c", "echo bad s3cret >&2; exit 1", "s3cret"], secrets=["s3cret"])
    assert "s3cret" not in str(info.value) and "s3cret" not in caplog.text
    assert "***" in caplog.text


def test_exit_codes_are_chosen_in_one_place() -> None:
    assert exit_code_for(InputError("x")) == EXIT_ERROR == 1
    assert exit_code_for(CleanupFailed("x")) == EXIT_CLEANUP_FAILED == 20
    assert exit_code_for(ValueError("unexpected")) == 1


def test_a_cancelled_token_kills_the_child_promptly_and_only_once() -> None:
    token = cancel.CancelToken()
    threading.Timer(0.3, token.cancel, args=("timed out after 1 s",)).start()
    started = time.monotonic()
    with cancel.bound(token), pytest.raises(cancel.Cancelled, match="sleep stopped: timed out"):
        proc.run(["sleep", "30"])
    assert time.monotonic() - started < 3
    # Delivered once: the cleanup after the stop runs its programs undisturbed.
    with cancel.bound(token):
        assert proc.run(["echo", "cleanup"]).stdout == "cleanup\n"
    assert cancel.current() is None


def test_a_token_cancelled_between_programs_stops_the_next_one() -> None:
    token = cancel.CancelToken()
    token.cancel("aborted")
    with cancel.bound(token), pytest.raises(cancel.Cancelled) as info:
        proc.run(["true"])
    # A stop, never a failed program: no handler of failures can take it for one.
    assert isinstance(info.value, Aborted) and not isinstance(info.value, CommandFailed)


def _sleepers(marker: str) -> list[int]:
    """Pids of the ``sleep`` children a test started, found by their unique argument."""
    return proc.processes_naming(marker)


def test_run_many_runs_side_by_side_and_keeps_the_order() -> None:
    started = time.monotonic()
    results = proc.run_many(
        [["sh", "-c", f"sleep 0.3; echo {k}"] for k in range(4)], at_once=4, check=False
    )
    assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
    assert time.monotonic() - started < 1.0  # four 0.3 s programs, not 1.2 s in a row
    failed = proc.run_many([["true"], ["sh", "-c", "echo bad >&2; exit 3"]], at_once=1,
                           check=False)  # fmt: skip
    assert [(r.returncode, r.stderr) for r in failed] == [(0, ""), (3, "bad\n")]


@pytest.mark.parametrize("how", ["cancelled", "on_poll raised", "a sibling failed"])
def test_run_many_leaves_no_child_when_stopped(how: str) -> None:
    marker = f"31.{time.monotonic_ns() % 1000000}"  # a sleep length no other process has
    argvs = [["sleep", marker] for _ in range(3)]
    token = cancel.CancelToken()
    polls: list[float] = []

    def on_poll(pids: list[int]) -> None:
        assert pids
        polls.append(time.monotonic())
        if how == "on_poll raised" and len(polls) > 10:
            raise InputError("the watch gave up")

    if how == "cancelled":
        threading.Timer(0.3, token.cancel, args=("aborted",)).start()
    if how == "a sibling failed":
        argvs.insert(1, ["sh", "-c", "sleep 0.2; exit 1"])
    started = time.monotonic()
    with cancel.bound(token), pytest.raises((Aborted, InputError, CommandFailed)):
        proc.run_many(argvs, at_once=4, on_poll=on_poll)
    assert time.monotonic() - started < 3
    assert _sleepers(marker) == []


def test_a_program_given_the_nas_files_reaches_no_network(tmp_path: Path) -> None:
    # Should a NAS file change between the gate's look and qemu-img's open (to name an
    # nbd server), the program that reads it has no network to reach it through.
    import json
    import socket

    from shim import qemu_img

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    connections: list[object] = []

    def serve() -> None:  # counts each connection and hangs up: no client waits on it
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connections.append(connection)
            connection.close()

    server = {"type": "inet", "host": "127.0.0.1", "port": str(listener.getsockname()[1])}
    nbd = "json:" + json.dumps({"driver": "raw", "file": {"driver": "nbd", "server": server}})
    (tmp_path / "any").write_bytes(b"x")
    threading.Thread(target=serve, daemon=True).start()
    with open(tmp_path / "any", "rb") as fh, listener:
        with pytest.raises(CommandFailed):
            qemu_img.check(qemu_img.Spec(nbd, (fh.fileno(),)))
        assert connections == []
        # The same program with a network connects: the test sees a connection.
        with pytest.raises(CommandFailed):
            proc.run(["qemu-img", "info", "--output=json", nbd], timeout=10)
        assert len(connections) == 1
        listener.shutdown(socket.SHUT_RDWR)


def test_a_server_that_ends_or_never_serves_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unopenable = ["qemu-nbd", "--socket", str(tmp_path / "s"), str(tmp_path / "missing")]
    with pytest.raises(CommandFailed, match="qemu-nbd"), proc.serving(unopenable, tmp_path / "s"):
        pass
    monkeypatch.setattr(proc, "SERVER_START_SECONDS", 0.2)
    silent = ["python3", "-c", "import time; time.sleep(30)", str(tmp_path)]
    with (
        pytest.raises(CommandFailed, match=r"not serving in 0\.2 s"),
        proc.serving(silent, tmp_path / "never"),
    ):
        pass
    assert not proc.processes_naming(str(tmp_path))


def test_a_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A run killed while a server serves (the agent's timeout) leaves no server holding
    the NAS's files: the kernel kills it with its parent."""
    image, sock = tmp_path / "disk.raw", tmp_path / "nbd.sock"
    image.write_bytes(bytes(1024 * 1024))
    server = ["qemu-nbd", "--persistent", "-f", "raw", f"--socket={sock}", str(image)]
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom shim import proc\n"
        f"with proc.serving({server!r}, Path({str(sock)!r})):\n"
        "    print('serving', flush=True)\n    time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=ROOT, text=True
    )
    try:
        assert parent.stdout is not None and parent.stdout.readline() == "serving\n"
        assert proc.processes_naming(str(sock))
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 5
    while proc.processes_naming(str(sock)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not proc.processes_naming(str(sock))
