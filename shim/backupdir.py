"""One backup directory's life: written aside, made durable, published by a rename, or
removed; and the filesystem helpers that life needs (fsync, removal, sweeping the work of
runs that died, sizes as ``du`` counts them).

A backup is written into ``<path>.partial`` and renamed to ``<path>`` only once its files
are complete, fsynced and its manifest written; nothing ever points into a partial
directory, so removing it on failure touches no other backup. The VM's directory is reached
through the gate (:class:`shim.gate.VmDirectory`): never through a link, and the
directories, the manifest and the rename are made relative to its descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from shim import proc
from shim.chain import relative_backing
from shim.contract import BackupOutcome
from shim.errors import InputError, ShimError
from shim.gate import VmDirectory, split_vm
from shim.manifest import (
    MANIFEST,
    DiskFile,
    Manifest,
    checksum_algorithm,
    checksums,
    checksums_at_backup,
    disk_records,
    write_manifest,
    write_new,
)
from shim.nas import MountSession
from shim.redact import public_source
from shim.virt.disks import DomainDisk

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
DU_TIMEOUT = 120
"""Seconds for measuring a published backup (a handful of files, on a NAS that may be slow)."""


class BackupDirectory:
    """The directory a backup request names (``<vm>/<name>``), inside the mounted
    repository."""

    def __init__(self, session: MountSession, relative: str) -> None:
        self.relative = relative
        vm, self.name = split_vm(relative)
        self.vm_dir = session.vm_directory(vm)
        self.final = self.vm_dir.path / self.name
        self.work = partial_dir(self.final)
        self._created_vm_dir = False
        self.size: int | None = None
        """The published directory's size (``du -sb``), measured by :meth:`publish`."""

    def check(self) -> None:
        """Refuse a path that already holds a backup (or anything but an empty directory,
        or a path through a link). Changes nothing, so that it can run before anything
        else is touched (a refused retry must leave no trace)."""
        kind = self.vm_dir.kind(self.name)
        if kind == "file" or (kind == "directory" and self.vm_dir.names(self.name)):
            raise InputError(f"backup path {self.relative} already exists")

    def prepare(self) -> None:
        """Refuse to overwrite a backup; clear a partial left by a killed run; create."""
        self.check()
        # Runs killed before they could clean up; we hold the VM's lock (the request's
        # path starts with its name), so they are dead.
        for dead in sweep_dead_work(self.vm_dir):
            log.warning("removed %s, left by a run that died", dead)
        self._created_vm_dir = self.vm_dir.create()
        os.mkdir(self.work.name, mode=0o755, dir_fd=self.vm_dir.fd)

    def write_file(self, name: str, text: str) -> None:
        """Write a new file ``name`` of the backup (a description of the domain), made
        here and never through a link that something else placed there."""
        work_fd = self.vm_dir.open_directory(self.work.name)
        try:
            with write_new(work_fd, name) as fh:
                fh.write(text)
        finally:
            os.close(work_fd)

    def publish(
        self,
        *,
        vm: str,
        requested_mode: str,
        offline: bool,
        checkpoint: str | None,
        bitmap: str | None,
        parents: dict[str, Path],
        fallback: bool,
        disks: Sequence[DomainDisk],
        sizes: dict[str, int],
    ) -> list[str]:
        """Write the manifest last, make everything durable, rename into place.

        ``checkpoint`` is the one created (it makes the mode ``full``), ``bitmap`` the one
        the manifest records (None where not every disk could carry it); ``parents`` maps
        disk targets to their parent files, ``sizes`` to their virtual sizes. Returns the
        names of the files written, the manifest last.
        """
        mode = "incremental" if parents else ("full" if checkpoint else requested_mode)
        algorithm = checksum_algorithm()
        # The files QEMU wrote, read back through the gate: whatever was swapped in for one
        # meanwhile (a link, a FIFO) is refused, never read or waited on.
        written = [self.vm_dir.image(f"{self.work.name}/{d.backup_name}") for d in disks]
        digests = None
        if checksums_at_backup():
            found = checksums([w.fd_path for w in written], algorithm,
                              pass_fds=[w.fd for w in written])  # fmt: skip
            digests = [found[w.fd_path] for w in written]
        files = [
            DiskFile(
                d.role, d.volume_id, d.backup_name, public_source(d.source), sizes[d.target],
                relative_backing(parents[d.target], self.final) if d.target in parents else None,
            )
            for d in disks
        ]  # fmt: skip
        manifest = Manifest(
            vm=vm,
            mode=mode,
            offline=offline,
            bitmap=bitmap,
            parent=parent_dir_name(parents),
            fallback=fallback,
            disks=disk_records(files, [w.size for w in written], digests),
            checksum_algorithm=algorithm,
        )
        work_fd = self.vm_dir.open_directory(self.work.name)
        try:
            write_manifest(work_fd, manifest)
        finally:
            os.close(work_fd)
        fsync_tree(self.work)  # the disk files, the manifest, and the directory's entries
        # Measured before the rename (which changes no size in it): a stop here still finds
        # the work directory to remove, and a published backup is never measured again.
        vm_fd = self.vm_dir.fd
        self.size = directory_size(self.vm_dir.anchored(self.work.name), pass_fds=[vm_fd])
        if self.vm_dir.kind(self.name) == "directory":
            os.rmdir(self.name, dir_fd=vm_fd)  # an empty directory someone prepared
        os.rename(self.work.name, self.name, src_dir_fd=vm_fd, dst_dir_fd=vm_fd)
        fsync_dir(vm_fd)
        names = [n for n in self.vm_dir.names(self.name) if n != MANIFEST]
        return [*names, MANIFEST]

    def discard(self) -> None:
        """Remove the partial directory (the published one is never touched), and the VM's
        directory if this run created it and it is still empty."""
        try:
            if self.vm_dir.kind(self.work.name) is not None:
                self.vm_dir.remove_tree(self.work.name)
        except ShimError as exc:  # a link planted there, rm failing: left to the next sweep
            raise OSError(errno.EIO, f"cannot remove {self.work}: {exc}") from exc
        if self._created_vm_dir:
            with contextlib.suppress(OSError):
                self.vm_dir.path.rmdir()

    def outcome(
        self,
        files: list[str],
        *,
        bitmap_created: str | None,
        incremental_fallback: bool,
        job_stats: dict[str, object] | None = None,
    ) -> BackupOutcome:
        """What the published backup reports."""
        if self.size is None:
            raise RuntimeError("outcome() before publish()")
        return BackupOutcome(
            size=self.size,
            file_sizes=[os.lstat(self.final / name).st_size for name in files],
            files=files,
            bitmap_created=bitmap_created,
            incremental_fallback=incremental_fallback,
            job_stats=job_stats,
        )


def parent_dir_name(parents: dict[str, Path]) -> str | None:
    """The parent backup's directory name, from any disk's parent file."""
    for parent in parents.values():
        return parent.parent.name
    return None


def rewrite_manifest(vm_dir: VmDirectory, backup: str, manifest: Manifest) -> None:
    """Replace the manifest of the published backup ``backup`` durably (after a rebase,
    or a verify recording checksums)."""
    fd = vm_dir.open_directory(backup)
    try:
        write_manifest(fd, manifest)
        fsync_dir(fd)
    finally:
        os.close(fd)


def partial_dir(final: Path) -> Path:
    """Where a backup is written before it is complete (renamed to ``final`` on success)."""
    return final.with_name(final.name + PARTIAL_SUFFIX)


def directory_size(path: str | Path, *, pass_fds: Sequence[int] = ()) -> int:
    """Bytes under ``path`` as the host's own ``nasbackup.sh`` reports them: its ``du -sb``.

    The host's du, not a rule written here: since coreutils 9.2 ``--apparent-size`` counts
    only regular files and links (directories no longer), so the same directory measures
    9525 bytes on Debian 12 and 1333 on Debian 13, and the drop-in must print what the
    script would print on this host."""
    du = proc.run(["du", "-sb", "--", str(path)], timeout=DU_TIMEOUT, pass_fds=pass_fds)
    return int(du.stdout.split()[0])


def fsync_tree(path: Path) -> None:
    """Make every file under ``path`` and the directory entries durable."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            # Non-blocking and checked: what a NAS's owner swapped in meanwhile (a FIFO, a
            # device) is refused, never waited on.
            fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise InputError(f"{root}/{name} is no longer a regular file")
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(directory: Path | int) -> None:
    """fsync a directory (a path, or an open descriptor), so that entries created or
    renamed in it survive a crash."""
    if isinstance(directory, int):
        os.fsync(directory)
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep_dead_work(vm_dir: VmDirectory) -> list[Path]:
    """Remove the ``*.partial`` and ``.*.deleting`` directories of runs that died, in the
    VM's directory ``vm_dir``.

    Call only while holding that VM's lock: then no living run owns any of them. The VM's
    directory and each entry are reached through the gate (no link is followed): a link
    into another VM's directory would make this run remove a backup in progress there,
    under a lock that does not protect it.
    """
    removed: list[Path] = []
    if not vm_dir.exists():
        return removed
    for name in vm_dir.names():
        dead = name.endswith(PARTIAL_SUFFIX) or (
            name.startswith(".") and name.endswith(".deleting")
        )
        if dead and _is_directory(vm_dir, name):
            vm_dir.remove_tree(name)
            removed.append(vm_dir.path / name)
    return removed


def _is_directory(vm_dir: VmDirectory, name: str) -> bool:
    try:
        return vm_dir.kind(name) == "directory"
    except InputError:  # a link or a special file: not ours, left where it is
        return False
