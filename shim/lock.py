"""The per-VM lock every entry point takes: two operations on one VM never overlap.

A ``flock`` on ``/run/cloudstack-nasbackup-shim/lock/<vm>.lock``: the kernel releases it
when the holder dies, even by SIGKILL, so a crashed run never leaves the VM locked.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType

from shim.errors import InputError, LockBusy
from shim.runtime import LOCK_DIR

log = logging.getLogger(__name__)

__all__ = ["LOCK_DIR", "VmLock", "validate_vm_name"]


def validate_vm_name(name: str) -> None:
    """Refuse a VM name that could not be a domain name or would escape the lock directory."""
    if not name:
        raise InputError("missing VM name (-v)")
    if name.startswith("-") or "/" in name or name in (".", ".."):
        raise InputError(f"invalid VM name: {name!r}")
    if any(ord(c) < 32 for c in name) or len(name) > 255:
        raise InputError("invalid VM name: control characters or too long")


class VmLock:
    """An exclusive, non-blocking lock on one VM; a second taker fails at once."""

    def __init__(self, vm_name: str, *, lock_dir: Path | None = None) -> None:
        validate_vm_name(vm_name)
        self.vm_name = vm_name
        self.path = (lock_dir or LOCK_DIR) / f"{vm_name}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockBusy` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockBusy(
                    f"another operation on VM {self.vm_name} is in progress (pid {holder})"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        log.debug("locked %s", self.path)

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
