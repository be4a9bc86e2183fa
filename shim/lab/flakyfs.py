"""A NAS that fails on command: a FUSE passthrough whose writes turn into EIO.

For the fault suite only (these kernels have no NFS client and no device-mapper): the
lab exports a directory through this filesystem; creating the file ``.fail-writes`` in the
backing directory makes every later write and fsync fail with EIO, as a dying NAS would.
Run as ``python -m shim.lab.flakyfs BACKING MOUNTPOINT`` (foreground); unmount to stop.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

from fuse import FUSE, FuseOSError, Operations

FAIL_FLAG = ".fail-writes"


class FlakyPassthrough(Operations):  # type: ignore[misc]
    """Every operation passes through to ``root``; writes fail while the flag exists."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.flag = os.path.join(self.root, FAIL_FLAG)

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _failing(self) -> bool:
        return os.path.exists(self.flag)

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
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        if self._failing():
            raise FuseOSError(errno.EIO)
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        if self._failing():
            raise FuseOSError(errno.EIO)
        os.truncate(self._path(path), length)

    def flush(self, path: str, fh: int) -> None:
        if self._failing():
            raise FuseOSError(errno.EIO)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        if self._failing():
            raise FuseOSError(errno.EIO)
        os.fsync(fh)

    def release(self, path: str, fh: int) -> None:
        os.close(fh)


def main(argv: list[str]) -> int:
    """``python -m shim.lab.flakyfs BACKING MOUNTPOINT``: serve until unmounted."""
    backing, mountpoint = argv
    Path(mountpoint).mkdir(parents=True, exist_ok=True)
    FUSE(FlakyPassthrough(backing), mountpoint, foreground=True, nothreads=False,
         allow_other=True, fsname="flakynas")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
