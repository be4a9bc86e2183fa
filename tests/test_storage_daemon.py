"""qemu-storage-daemon never waited for forever: start, QMP answers, block jobs, abort.

A small Python program stands in for the daemon (``storage_daemon.BINARY``) and misbehaves
on command; the real daemon, stopped with SIGSTOP, is a hung one for real, holding an
image lock. The bounds are shortened here; the module's own are generous.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import cancel, storage_daemon
from shim.errors import CommandFailed, LockBusy
from shim.lock import VmLock
from shim.storage_daemon import DaemonHung, StorageDaemon, blockdev_file, blockdev_qcow2

FAKE = """
import json, os, socket, sys, time

mode = os.environ["FAKE_QSD_MODE"]
path = next(a for a in sys.argv if a.startswith("socket,path=")).split(",")[1][5:]
if mode == "silent":
    time.sleep(3600)
if mode == "noisy":
    for _ in range(256):  # 1 MiB: far more than a pipe holds
        sys.stderr.write("x" * 4095 + "\\n")
    sys.stderr.flush()
if mode == "exits":
    sys.stderr.write("Failed to get \\"write\\" lock\\n")
    sys.exit(1)
sock = socket.socket(socket.AF_UNIX)
sock.connect(path)
out = sock.makefile("w")
def send(message):
    out.write(json.dumps(message) + "\\n")
    out.flush()
send({"QMP": {"version": {}, "capabilities": []}})
if mode == "mute":
    time.sleep(3600)
progress = 0
for line in sock.makefile("r"):
    execute = json.loads(line)["execute"]
    if execute == "query-jobs":
        if mode == "hang-query":
            time.sleep(3600)
        if mode == "moving":
            progress += 1
        send({"return": [{"id": "src0-job", "status": "running", "current-progress": progress,
                          "total-progress": 100}]})
    elif execute == "job-cancel":
        send({"return": {}})
        send({"event": "BLOCK_JOB_CANCELLED", "data": {"device": "src0-job"}})
    elif execute == "quit":
        send({"return": {}})
        sys.exit(0)
    else:
        send({"return": {}})
"""


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The stand-in daemon, and bounds of about a second."""
    program = tmp_path / "fake-qsd"
    program.write_text(f"#!{sys.executable}\n{FAKE}")
    program.chmod(0o755)
    monkeypatch.setattr(storage_daemon, "BINARY", str(program))
    monkeypatch.setattr(storage_daemon, "START_TIMEOUT_SECONDS", 1.0)
    monkeypatch.setattr(storage_daemon, "QMP_TIMEOUT_SECONDS", 1.0)
    monkeypatch.setattr(storage_daemon, "JOB_PROGRESS_SECONDS", 0.2)
    monkeypatch.setattr(storage_daemon, "JOB_STALL_SECONDS", 1.0)
    monkeypatch.setattr(storage_daemon, "CANCEL_TIMEOUT_SECONDS", 1.0)
    yield


def _mode(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setenv("FAKE_QSD_MODE", mode)


def _gone(daemon: StorageDaemon) -> bool:
    """Whether the daemon's process is dead and reaped, and its directory removed."""
    assert daemon.pid is not None
    try:
        os.kill(daemon.pid, 0)
    except ProcessLookupError:
        return not daemon._dir.exists()
    return False


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("silent", "qemu-storage-daemon did not connect its monitor within 1 s"),
        ("mute", "qemu-storage-daemon did not answer qmp_capabilities within 1 s"),
    ],
)
def test_a_daemon_that_never_answers_fails_bounded_and_is_killed(
    fake: None, monkeypatch: pytest.MonkeyPatch, mode: str, message: str
) -> None:
    _mode(monkeypatch, mode)
    daemon = StorageDaemon([])
    started = time.monotonic()
    with pytest.raises(DaemonHung) as info:
        daemon.__enter__()
    assert str(info.value) == message
    assert time.monotonic() - started < 5
    assert _gone(daemon)


def test_a_query_never_answered_fails_naming_it_and_the_exit_kills(
    fake: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _mode(monkeypatch, "hang-query")
    started = time.monotonic()
    with pytest.raises(DaemonHung) as info, StorageDaemon([]) as daemon:
        daemon.wait_jobs(["src0-job"])
    assert str(info.value) == "qemu-storage-daemon did not answer query-jobs within 1 s"
    # One bounded wait, not one per command the cleanup would send (quit, say).
    assert time.monotonic() - started < 5
    assert _gone(daemon)


def test_a_job_without_progress_fails_and_one_with_progress_does_not(
    fake: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _mode(monkeypatch, "stall")
    started = time.monotonic()
    with pytest.raises(DaemonHung) as info, StorageDaemon([]) as daemon:
        daemon.wait_jobs(["src0-job"])
    assert str(info.value) == "qemu-storage-daemon block job src0-job made no progress for 1 s"
    assert time.monotonic() - started < 5
    assert _gone(daemon)
    # A job that moves is waited for, however long: stopped here by the token only.
    _mode(monkeypatch, "moving")
    token = cancel.CancelToken()
    threading.Timer(2.5, token.cancel, args=("aborted",)).start()
    daemon = StorageDaemon([])
    with pytest.raises(cancel.Cancelled, match="stopped: aborted"), cancel.bound(token), daemon:
        daemon.wait_jobs(["src0-job"])
    assert _gone(daemon)


def test_a_cancelled_wait_cancels_the_jobs_and_the_daemon_quits(
    fake: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="shim")
    _mode(monkeypatch, "stall")
    monkeypatch.setattr(storage_daemon, "JOB_STALL_SECONDS", 60.0)
    token = cancel.CancelToken()
    threading.Timer(0.5, token.cancel, args=("aborted",)).start()
    started = time.monotonic()
    daemon = StorageDaemon([])
    with pytest.raises(cancel.Cancelled) as info, cancel.bound(token), daemon:
        daemon.wait_jobs(["src0-job"])
    assert str(info.value) == "qemu-storage-daemon stopped: aborted"
    assert time.monotonic() - started < 2
    assert "cancelling block job(s) src0-job: aborted" in caplog.text
    assert daemon._proc is not None and daemon._proc.returncode == 0  # quit, not killed
    assert _gone(daemon)
    assert not token.take()  # delivered once: the cleanup's programs run undisturbed


def test_its_output_is_drained_and_kept_for_the_error(
    fake: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _mode(monkeypatch, "noisy")  # blocks in its write unless someone reads the pipe
    with StorageDaemon([]) as daemon:
        assert daemon.command("query-jobs")
    assert _gone(daemon)
    _mode(monkeypatch, "exits")
    daemon = StorageDaemon([])
    with pytest.raises(CommandFailed) as info:
        daemon.__enter__()
    assert 'Failed to get "write" lock' in info.value.stderr  # what offline.py looks for
    assert _gone(daemon)


def test_a_hung_real_daemon_releases_the_image_and_vm_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_daemon, "QMP_TIMEOUT_SECONDS", 1.0)
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    blockdevs = [blockdev_file("f0", image), blockdev_qcow2("src0", "f0")]

    def opens() -> bool:  # without -U: refused while a process holds the image's lock
        info = ["qemu-img", "info", str(image)]
        return subprocess.run(info, capture_output=True, check=False).returncode == 0

    vm_lock = VmLock("i-2-9-VM", lock_dir=tmp_path, wait=0)
    daemon = StorageDaemon(blockdevs)
    # The nesting offline backups have: the VM's lock, then the daemon.
    with pytest.raises(DaemonHung, match="did not answer query-jobs within 1 s"), vm_lock, daemon:
        assert not opens()
        with pytest.raises(LockBusy):
            VmLock("i-2-9-VM", lock_dir=tmp_path, wait=0).acquire()
        assert daemon.pid is not None
        os.kill(daemon.pid, signal.SIGSTOP)  # hung for real: it answers nothing
        daemon.wait_jobs(["src0-job"])
    assert _gone(daemon)
    assert opens()  # the image lock died with the process
    with VmLock("i-2-9-VM", lock_dir=tmp_path, wait=0):  # the VM's lock was released
        pass
