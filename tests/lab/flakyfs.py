"""A NAS that fails on command: a FUSE passthrough whose writes fail, slow down or hang.

For the fault suite only (these kernels have no NFS client and no device-mapper): the
lab exports a directory through this filesystem, and flag files in the backing directory
(written there, never through the export) change how it behaves:

* ``.fail-writes``: every later write and fsync fails with EIO, as a dying NAS would.
* ``.fail-fsync``: every later fsync fails with EIO while writes succeed, as storage whose
  write cache is lost before it reaches the disks.
* ``.slow-writes`` holding a number of seconds: every write sleeps that long first, as a
  NAS on a saturated link would.
* ``.full``: every later write and fsync fails with ENOSPC, as a NAS that filled up;
  a write already waiting (slowed or throttled) fails too.
* ``.rate`` holding bytes per second: writes are throttled to that rate in all (a shared
  timeline: concurrent writes queue behind each other), as a NAS behind a slow link.
* ``.hang-lookups``: while it exists, looking up any path under a directory named
  ``hang`` blocks, as on an NFS server that stopped answering; ``mount -o bind
  EXPORT/hang DIR`` then hangs in the kernel's path lookup. Like a hard NFS mount, the
  wait ends when the waiting process is killed (FUSE's interrupt).

With ``--count`` (for the benchmarks) it counts the bytes read and written through it:
each time a file is released (closed) it writes ``{"read": N, "written": M}`` to
``.counters`` in the backing directory; and the kernel caches no file data (``direct_io``),
so that a read-back of what was just written cannot hide in the page cache.

Run as ``python -m tests.lab.flakyfs BACKING MOUNTPOINT [--count]`` (foreground); unmount
to stop.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

try:
    import fuse
    from fuse import FUSE, FuseOSError, Operations
except ImportError:  # Debian's python3-fusepy (the package's test runs with it) renames it
    import fusepy as fuse
    from fusepy import FUSE, FuseOSError, Operations

FAIL_FLAG = ".fail-writes"
FAIL_FSYNC_FLAG = ".fail-fsync"
SLOW_FLAG = ".slow-writes"
FULL_FLAG = ".full"
RATE_FLAG = ".rate"
HANG_FLAG = ".hang-lookups"
COUNTERS = ".counters"
HANG_DIR = "hang"
"""Lookups of this directory, and of anything under it, hang while ``HANG_FLAG`` exists."""
_HANG_POLL_SECONDS = 0.1


class FlakyPassthrough(Operations):  # type: ignore[misc]
    """Every operation passes through to ``root``; writes fail or slow down, and lookups
    under ``hang`` block, while the flags say so."""

    def __init__(self, root: str, *, count: bool = False) -> None:
        self.root = os.path.realpath(root)
        self.count = count
        self.flag = os.path.join(self.root, FAIL_FLAG)
        self.fail_fsync_flag = os.path.join(self.root, FAIL_FSYNC_FLAG)
        self.slow_flag = os.path.join(self.root, SLOW_FLAG)
        self.hang_flag = os.path.join(self.root, HANG_FLAG)
        self.full_flag = os.path.join(self.root, FULL_FLAG)
        self.rate_flag = os.path.join(self.root, RATE_FLAG)
        self._rate_lock = threading.Lock()
        self._line_free_at = 0.0
        self._count_lock = threading.Lock()
        self.bytes_read = 0
        self.bytes_written = 0

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _failing(self) -> bool:
        return os.path.exists(self.flag)

    def _write_delay(self) -> float:
        try:
            with open(self.slow_flag, encoding="ascii") as flag:
                return max(0.0, float(flag.read().strip() or 0))
        except (OSError, ValueError):
            return 0.0

    def _full(self) -> None:
        if os.path.exists(self.full_flag):
            raise FuseOSError(errno.ENOSPC)

    def _throttle(self, size: int) -> None:
        try:
            with open(self.rate_flag, encoding="ascii") as flag:
                rate = float(flag.read().strip() or 0)
        except (OSError, ValueError):
            return
        if rate <= 0:
            return
        with self._rate_lock:
            now = time.monotonic()
            self._line_free_at = max(self._line_free_at, now) + size / rate
            done_at = self._line_free_at
        time.sleep(max(0.0, done_at - now))

    def _hang_if_asked(self, path: str) -> None:
        if HANG_DIR not in path.strip("/").split("/"):
            return
        while os.path.exists(self.hang_flag):
            if _interrupted():
                raise FuseOSError(errno.EINTR)  # the waiting process was killed
            time.sleep(_HANG_POLL_SECONDS)

    def __call__(self, op: str, *args: Any) -> Any:
        try:
            return super().__call__(op, *args)
        except OSError as exc:
            raise FuseOSError(exc.errno or errno.EIO) from None

    # -- metadata ---------------------------------------------------------------------------
    def access(self, path: str, amode: int) -> None:
        if not os.access(self._path(path), amode):
            raise FuseOSError(errno.EACCES)

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        self._hang_if_asked(path)
        st = os.lstat(self._path(path))
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink",
                "st_size", "st_uid", "st_blocks")  # fmt: skip
        return {key: getattr(st, key) for key in keys}

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self._path(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                "f_files", "f_flag", "f_frsize", "f_namemax")  # fmt: skip
        return {key: getattr(st, key) for key in keys}

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._path(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._path(path), uid, gid)

    def utimens(self, path: str, times: tuple[float, float] | None = None) -> None:
        os.utime(self._path(path), times)

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._path(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._path(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._path(path))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._path(old), self._path(new))

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    def symlink(self, target: str, source: str) -> None:
        os.symlink(source, self._path(target))

    # -- data -------------------------------------------------------------------------------
    def open(self, path: str, flags: int) -> int:
        return os.open(self._path(path), flags & ~os.O_DIRECT)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        return os.open(self._path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        data = os.pread(fh, size, offset)
        with self._count_lock:
            self.bytes_read += len(data)
        return data

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        if self._failing():
            raise FuseOSError(errno.EIO)
        self._full()
        delay = self._write_delay()
        if delay:
            time.sleep(delay)
        self._throttle(len(data))
        self._full()
        written = os.pwrite(fh, data, offset)
        with self._count_lock:
            self.bytes_written += written
        return written

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        if self._failing():
            raise FuseOSError(errno.EIO)
        os.truncate(self._path(path), length)

    def flush(self, path: str, fh: int) -> None:
        if self._failing():
            raise FuseOSError(errno.EIO)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        if self._failing() or os.path.exists(self.fail_fsync_flag):
            raise FuseOSError(errno.EIO)
        self._full()
        os.fsync(fh)

    def release(self, path: str, fh: int) -> None:
        os.close(fh)
        if not self.count:
            return
        with self._count_lock:
            counts = {"read": self.bytes_read, "written": self.bytes_written}
        tmp = os.path.join(self.root, f"{COUNTERS}.tmp")
        with open(tmp, "w", encoding="ascii") as out:
            json.dump(counts, out)
        os.replace(tmp, os.path.join(self.root, COUNTERS))


def _interrupted() -> bool:
    # The kernel sends FUSE an interrupt for a request whose process got a signal (a
    # SIGKILL included); libfuse notes it on the request this thread serves.
    return bool(fuse._libfuse.fuse_interrupted())  # fusepy does not wrap it


def main(argv: list[str]) -> int:
    """``python -m tests.lab.flakyfs BACKING MOUNTPOINT [--count]``: serve until unmounted."""
    backing, mountpoint, *flags = argv
    count = "--count" in flags
    Path(mountpoint).mkdir(parents=True, exist_ok=True)
    # hard_remove: an unlink removes at once. Without it libfuse renames a file it still
    # believes open to .fuse_hiddenXXXX, and the kernel sends the close of a killed
    # process's file asynchronously: an rm -rf right after the kill then found the
    # directory "not empty" (a lab artifact: NFS has closed the files of a reaped process).
    # --big-writes: 128 KiB writes where the kernel's default is 4 KiB (the benchmarks' NAS
    # then keeps up with a 1 GbE link; the tests' timings assume 4 KiB writes).
    big = {"big_writes": True, "max_write": 128 * 1024} if "--big-writes" in flags else {}
    FUSE(FlakyPassthrough(backing, count=count), mountpoint, foreground=True, nothreads=False,
         allow_other=True, fsname="flakynas", direct_io=count, hard_remove=True, **big)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
