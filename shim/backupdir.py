"""One backup directory's life: written aside, made durable, published by a rename, or
removed; and the filesystem helpers that life needs (fsync, removal, sweeping the work of
runs that died, sizes as ``du`` counts them).

A backup is written into ``<path>.partial`` and renamed to ``<path>`` only once its files
are complete, fsynced and its manifest written; nothing ever points into a partial
directory, so removing it on failure touches no other backup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from shim.chain import relative_backing, vm_dir_of
from shim.contract import BackupOutcome
from shim.errors import InputError
from shim.manifest import (
    MANIFEST,
    DiskFile,
    Manifest,
    checksum_algorithm,
    checksums_at_backup,
    disk_records,
    write_manifest,
)
from shim.nas import MountSession
from shim.redact import public_source
from shim.virt.disks import DomainDisk

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


class BackupDirectory:
    """The directory a backup request names, inside the mounted repository."""

    def __init__(self, session: MountSession, relative: str) -> None:
        self.relative = relative
        self.final = session.path(relative, what="backup path")
        self._root = Path(os.path.realpath(session.root))
        self.work = partial_dir(self.final)
        self._created_parent: Path | None = None

    def check(self) -> None:
        """Refuse a path that already holds a backup. Changes nothing, so that it can run
        before anything else is touched (a refused retry must leave no trace)."""
        if self.final.exists() and (not self.final.is_dir() or any(self.final.iterdir())):
            raise InputError(f"backup path {self.relative} already exists")

    def prepare(self) -> None:
        """Refuse to overwrite a backup; clear a partial left by a killed run; create."""
        self.check()
        # Runs killed before they could clean up; we hold the VM's lock (the request's
        # path starts with its name), so they are dead.
        for dead in sweep_dead_work(self._root, vm_dir_of(self.relative)):
            log.warning("removed %s, left by a run that died", dead)
        if not self.final.parent.exists():
            self._created_parent = self.final.parent
        self.work.mkdir(parents=True)

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
            disks=disk_records(self.work, files, algorithm, read_back=checksums_at_backup()),
            checksum_algorithm=algorithm,
        )
        write_manifest(self.work, manifest)
        fsync_tree(self.work)  # the disk files, the manifest, and the directory's entries
        if self.final.exists():
            self.final.rmdir()  # an empty directory someone prepared
        os.rename(self.work, self.final)
        fsync_dir(self.final.parent)
        names = sorted(p.name for p in self.final.iterdir() if p.name != MANIFEST)
        return [*names, MANIFEST]

    def discard(self) -> None:
        """Remove the partial directory (the published one is never touched), and the VM's
        directory if this run created it and it is still empty."""
        remove_tree(self.work)
        if self._created_parent is not None:
            with contextlib.suppress(OSError):
                self._created_parent.rmdir()

    def outcome(
        self,
        files: list[str],
        *,
        bitmap_created: str | None,
        incremental_fallback: bool,
        job_stats: dict[str, object] | None = None,
    ) -> BackupOutcome:
        """What the published backup reports."""
        return BackupOutcome(
            size=directory_size(self.final),
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


def rewrite_manifest(directory: Path, manifest: Manifest) -> None:
    """Replace the manifest of a published backup durably (after a rebase)."""
    write_manifest(directory, manifest)
    fsync_dir(directory)


def partial_dir(final: Path) -> Path:
    """Where a backup is written before it is complete (renamed to ``final`` on success)."""
    return final.with_name(final.name + PARTIAL_SUFFIX)


def directory_size(path: Path) -> int:
    """Bytes under ``path`` as ``du -sb`` counts them (apparent sizes, the directory's own
    entry included, hard links once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total + os.lstat(path).st_size


def remove_tree(path: Path) -> None:
    """Remove a directory this run created (never follows symlinks out of it)."""
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def fsync_tree(path: Path) -> None:
    """Make every file under ``path`` and the directory entries durable."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that entries created or renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep_dead_work(root: Path, vm: str) -> list[Path]:
    """Remove the ``*.partial`` and ``.*.deleting`` directories of runs that died, in the
    directory of VM ``vm`` under the repository's ``root``.

    Call only while holding ``vm``'s lock: then no living run owns any of them. Only the
    directory named after that VM is swept, and not when it is a symlink: one that leads
    into another VM's directory would make this run remove a backup in progress there,
    under a lock that does not protect it.
    """
    removed: list[Path] = []
    vm_dir = root / vm
    if vm_dir.is_symlink() or not vm_dir.is_dir():
        return removed
    for entry in vm_dir.iterdir():
        dead = entry.name.endswith(PARTIAL_SUFFIX) or (
            entry.name.startswith(".") and entry.name.endswith(".deleting")
        )
        if dead and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
            removed.append(entry)
    return removed
