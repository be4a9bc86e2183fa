"""The per-VM lock: a second taker waits, a bounded and configurable time, then fails."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shim import cancel
from shim.errors import LockBusy
from shim.lock import DEFAULT_LOCK_WAIT_SECONDS, LOCK_WAIT_ENV, VmLock, lock_wait_seconds

VM = "i-2-42-VM"

HOLDER = """
import sys, time
from pathlib import Path
from shim.lock import VmLock
with VmLock(sys.argv[1], lock_dir=Path(sys.argv[2]), wait=0):
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def _holder(tmp_path: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding the VM's lock for ``seconds``, once it said so."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, VM, str(tmp_path), str(seconds)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


def test_a_holder_that_releases_within_the_wait_hands_the_lock_over(tmp_path: Path) -> None:
    holder = _holder(tmp_path, 1.0)
    started = time.monotonic()
    with VmLock(VM, lock_dir=tmp_path, wait=30) as lock:
        took = time.monotonic() - started
        assert (tmp_path / f"{VM}.lock").read_text() == f"{os.getpid()}\n"
        assert lock.vm_name == VM
    assert 0.5 <= took < 5  # waited for the holder, then took it at once
    assert holder.wait(timeout=10) == 0


def test_a_holder_that_never_releases_fails_the_waiter_after_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = _holder(tmp_path, 60)
    try:
        monkeypatch.setenv(LOCK_WAIT_ENV, "1.5")
        started = time.monotonic()
        with pytest.raises(LockBusy) as info:
            VmLock(VM, lock_dir=tmp_path).acquire()
        took = time.monotonic() - started
        assert str(info.value) == (
            f"another operation on VM {VM} is in progress (pid {holder.pid})"
        )
        assert 1.5 <= took < 3
        # Zero: the old behaviour, failing at once.
        started = time.monotonic()
        with pytest.raises(LockBusy):
            VmLock(VM, lock_dir=tmp_path, wait=0).acquire()
        assert time.monotonic() - started < 0.5
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_in_another_thread_and_the_lock_file_descriptor(tmp_path: Path) -> None:
    first = VmLock(VM, lock_dir=tmp_path, wait=0)
    first.acquire()
    threading.Timer(1.0, first.release).start()
    started = time.monotonic()
    second = VmLock(VM, lock_dir=tmp_path, wait=10)
    second.acquire()
    assert 0.8 <= time.monotonic() - started < 5
    second.release()
    fds = len(os.listdir("/proc/self/fd"))
    with VmLock(VM, lock_dir=tmp_path, wait=0), pytest.raises(LockBusy):
        VmLock(VM, lock_dir=tmp_path, wait=0.3).acquire()
    assert len(os.listdir("/proc/self/fd")) == fds  # a failed wait closes its descriptor


def test_a_cancelled_operation_stops_waiting_at_once(tmp_path: Path) -> None:
    token = cancel.CancelToken()
    threading.Timer(0.5, token.cancel, args=("aborted",)).start()
    with VmLock(VM, lock_dir=tmp_path, wait=0):
        started = time.monotonic()
        with cancel.bound(token), pytest.raises(cancel.Cancelled) as info:
            VmLock(VM, lock_dir=tmp_path, wait=60).acquire()
    assert str(info.value) == f"waiting for the lock of VM {VM} stopped: aborted"
    assert time.monotonic() - started < 1.5


def test_the_wait_is_configured_by_the_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(LOCK_WAIT_ENV, raising=False)
    assert lock_wait_seconds() == DEFAULT_LOCK_WAIT_SECONDS == 60
    monkeypatch.setenv(LOCK_WAIT_ENV, "2.5")
    assert lock_wait_seconds() == 2.5
    monkeypatch.setenv(LOCK_WAIT_ENV, "0")
    assert lock_wait_seconds() == 0
    caplog.set_level(logging.WARNING, logger="shim")
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv(LOCK_WAIT_ENV, bad)
        assert lock_wait_seconds() == DEFAULT_LOCK_WAIT_SECONDS
    assert "is not a number of seconds" in caplog.text
