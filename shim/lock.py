"""The per-VM lock every entry point takes: two operations on one VM never overlap.

A ``flock`` on ``/run/cloudstack-nasbackup-shim/lock/<vm>.lock``: the kernel releases it
when the holder dies, even by SIGKILL, so a crashed run never leaves the VM locked.

A second operation on a locked VM waits for it, a bounded time (``NASBACKUP_SHIM_LOCK_WAIT``
seconds, default :data:`DEFAULT_LOCK_WAIT_SECONDS`), then fails naming the holder: a
retention delete that overlaps a backup of the same VM then runs after it instead of
failing. The wait polls (a blocking ``flock`` could be neither bounded nor cancelled) and
stops at once when the operation is cancelled (:mod:`shim.cancel`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from pathlib import Path
from types import TracebackType

from shim import cancel, settings
from shim.errors import InputError, LockBusy
from shim.runtime import LOCK_DIR

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LOCK_WAIT_SECONDS",
    "LOCK_DIR",
    "LOCK_WAIT_ENV",
    "VmLock",
    "lock_wait_seconds",
    "validate_vm_name",
]

LOCK_WAIT_ENV = settings.LOCK_WAIT.name
"""Seconds a second operation on a VM waits for the first one's lock (0: fail at once)."""
DEFAULT_LOCK_WAIT_SECONDS = float(settings.LOCK_WAIT.default)
"""Long enough for a delete or stats to outwait a short operation, far below the agent's
command timeout."""
_POLL_SECONDS = 0.2
"""How often a busy lock is tried again (and the cancellation token looked at)."""


def lock_wait_seconds() -> float:
    """The configured lock wait: ``NASBACKUP_SHIM_LOCK_WAIT``, else the default."""
    text = settings.value(settings.LOCK_WAIT)
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        log.warning(
            "%s=%r is not a number of seconds: waiting %g s",
            LOCK_WAIT_ENV,
            text,
            DEFAULT_LOCK_WAIT_SECONDS,
        )
        return DEFAULT_LOCK_WAIT_SECONDS
    return seconds


def validate_vm_name(name: str) -> None:
    """Refuse a VM name that could not be a domain name or would escape the lock directory."""
    if not name:
        raise InputError("missing VM name (-v)")
    if name.startswith("-") or "/" in name or name in (".", ".."):
        raise InputError(f"invalid VM name: {name!r}")
    if any(ord(c) < 32 for c in name) or len(name) > 255:
        raise InputError("invalid VM name: control characters or too long")


class VmLock:
    """An exclusive lock on one VM; a second taker waits ``wait`` seconds, then fails.

    ``wait`` defaults to :func:`lock_wait_seconds` (the environment), read when the lock
    is taken.
    """

    def __init__(
        self, vm_name: str, *, lock_dir: Path | None = None, wait: float | None = None
    ) -> None:
        validate_vm_name(vm_name)
        self.vm_name = vm_name
        self.path = (lock_dir or LOCK_DIR) / f"{vm_name}.lock"
        self.wait = wait
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, waiting for a holder up to the configured time; else raise
        :class:`LockBusy` naming the holder (:class:`~shim.cancel.Cancelled` when cancelled)."""
        wait = lock_wait_seconds() if self.wait is None else self.wait
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._wait_for(fd, wait)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        log.debug("locked %s", self.path)

    def _wait_for(self, fd: int, wait: float) -> None:
        deadline = time.monotonic() + wait
        token = cancel.current()
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            else:
                if waiting:
                    log.info("got the lock of VM %s", self.vm_name)
                return
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockBusy(
                    f"another operation on VM {self.vm_name} is in progress (pid {holder})"
                )
            if not waiting:
                log.info(
                    "VM %s is locked by pid %s: waiting up to %g s", self.vm_name, holder, wait
                )
                waiting = True
            # The token's wait is the sleep: a cancelled operation stops waiting at once.
            step = min(_POLL_SECONDS, remaining)
            if token is not None and not token.cancelled:
                token.wait(step)
            else:
                time.sleep(step)
            if token is not None and token.take():
                raise cancel.Cancelled([f"waiting for the lock of VM {self.vm_name}"], token.reason)

    def release(self) -> None:
        """Release the lock (the file stays: removing it would race with a new taker)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> VmLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
