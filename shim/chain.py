"""Backup chains on the NAS: file names, parents of each disk, backing links, dependants.

A backup directory ``<vm>/<timestamp>/`` holds ``root.<volId>.qcow2`` and
``datadisk.<volId>.qcow2``; an incremental file's backing is its own disk's parent file,
by a path relative to the incremental's directory, with backing format qcow2, so that the
NAS can be mounted anywhere and the Java restore (``qemu-img convert``) follows it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shim import qemu_img
from shim.errors import CommandFailed, InputError
from shim.nas import MountSession
from shim.virt.disks import DomainDisk

_BACKUP_FILE = re.compile(r"^(?P<role>root|datadisk)\.(?P<volume_id>.+)\.qcow2$")


def parse_backup_file_name(name: str) -> tuple[str, str] | None:
    """``(role, volume id)`` of a backup file name, None when it is not one."""
    match = _BACKUP_FILE.match(name)
    return (match.group("role"), match.group("volume_id")) if match else None


@dataclass
class Parents:
    """Each disk's parent file, and why an incremental is impossible (if it is)."""

    files: dict[str, Path] = field(default_factory=dict)
    """Disk target -> its parent backup file; disks absent here are new since (full)."""
    problems: list[str] = field(default_factory=list)
    """Reasons to fall back to a full backup (a named parent that is missing or unusable)."""


def vm_dir_of(relative: str) -> str:
    """The VM directory (first component) of a mount-relative backup path."""
    return Path(relative).parts[0]


def resolve_parents(
    session: MountSession,
    disks: Sequence[DomainDisk],
    backup_path: str,
    *,
    parent_paths: Sequence[str] = (),
    parent_path: str | None = None,
    bitmap_parent: str | None = None,
) -> Parents:
    """Match each disk to its parent file by role and volume id.

    ``parent_paths`` (one file per disk, merged generation) or ``parent_path`` (the seed's
    single value: the parent directory, or the root disk's file whose directory serves).
    A path that leaves the repository or the VM's directory is bad input and raises; a
    parent that is named but missing or not a qcow2 is a reason to fall back to a full,
    and so is a parent directory whose manifest records a checkpoint other than
    ``bitmap_parent`` (the incremental would copy the changes since that checkpoint on
    top of another backup: a chain that restores to data the VM never held).
    """
    vm_dir = vm_dir_of(backup_path)
    by_key: dict[tuple[str, str], Path] = {}
    parents = Parents()
    if parent_paths:
        for given in parent_paths:
            path = _inside_vm_dir(session, given, vm_dir)
            key = parse_backup_file_name(path.name)
            if key is None:
                raise InputError(f"parent path does not name a backup file: {given}")
            by_key[key] = path
    elif parent_path:
        path = _inside_vm_dir(session, parent_path, vm_dir)
        directory = path.parent if (path.is_file() or parse_backup_file_name(path.name)) else path
        if not directory.is_dir():
            parents.problems.append(f"parent backup directory {parent_path} does not exist")
            return parents
        for disk in disks:
            candidate = directory / disk.backup_name
            if candidate.exists():
                by_key[(disk.role, disk.volume_id)] = candidate
    for disk in disks:
        parent = by_key.get((disk.role, disk.volume_id))
        if parent is None:
            continue  # a disk attached since the parent: backed up full in the same job
        problem = _unusable(parent)
        if problem:
            parents.problems.append(f"parent of {disk.target}: {problem}")
        else:
            parents.files[disk.target] = parent
    if bitmap_parent is not None:
        parents.problems += _checkpoint_problems(parents.files.values(), bitmap_parent)
    return parents


def _checkpoint_problems(files: Iterable[Path], bitmap_parent: str) -> list[str]:
    """Each parent directory whose manifest says it did not create ``bitmap_parent``."""
    from shim.manifest import checkpoint_mismatch  # noqa: PLC0415 - manifest imports chain

    found = (checkpoint_mismatch(d, bitmap_parent) for d in sorted({f.parent for f in files}))
    return [problem for problem in found if problem]


def _inside_vm_dir(session: MountSession, given: str, vm_dir: str) -> Path:
    path = session.path(given, what="parent path")
    vm_root = Path(os.path.realpath(session.root / vm_dir))
    if vm_root not in path.parents:
        raise InputError(f"parent path {given} is not inside the VM's directory {vm_dir}")
    return path


def _unusable(parent: Path) -> str | None:
    if not parent.is_file():
        return f"{parent.name} is missing"
    if not is_qcow2(parent):
        return f"{parent.name} is not a qcow2 image"
    # Metadata only (refcounts, tables): a corrupted parent must not get children.
    try:
        result = qemu_img.check(parent)
    except CommandFailed as exc:
        return f"{parent.name} cannot be checked: {exc}"
    if result.corruptions or result.check_errors:
        return f"{parent.name} is corrupted ({result.corruptions} corruption(s))"
    return None


def relative_backing(parent: Path, directory: Path) -> str:
    """The backing path to store in a file of ``directory``: relative to that directory."""
    return os.path.relpath(parent, directory)


_QCOW2_MAGIC = b"QFI\xfb"


def is_qcow2(path: Path) -> bool:
    """Whether the file starts with the qcow2 magic (read directly: no subprocess)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == _QCOW2_MAGIC
    except OSError:
        return False


def backing_of(path: Path) -> str | None:
    """The backing file name stored in a qcow2 header (None for none, or not a qcow2).

    Read straight from the header (magic, version, backing offset and length): listing the
    dependants of a backup touches every file of the VM, one subprocess each would be slow.
    """
    try:
        with open(path, "rb") as fh:
            header = fh.read(20)
            if len(header) < 20 or header[:4] != _QCOW2_MAGIC:
                return None
            offset = int.from_bytes(header[8:16], "big")
            length = int.from_bytes(header[16:20], "big")
            if offset == 0 or length == 0 or length > 4096:
                return None
            fh.seek(offset)
            return fh.read(length).decode("utf-8", errors="replace")
    except OSError:
        return None


def backup_files(directory: Path) -> list[Path]:
    """The disk files of a backup directory, root first, then data disks by name."""
    found = [p for p in directory.iterdir() if parse_backup_file_name(p.name) and p.is_file()]
    return sorted(found, key=lambda p: (not p.name.startswith("root."), p.name))


def dependants(directory: Path) -> list[Path]:
    """Files in the other backups of the same VM whose backing file lies in ``directory``."""
    target = os.path.realpath(directory) + os.sep
    found = []
    for sibling in sorted(directory.parent.iterdir()):
        if sibling == directory or not sibling.is_dir() or sibling.is_symlink():
            continue
        for file in sibling.iterdir():
            backing = backing_of(file) if file.suffix == ".qcow2" else None
            if backing and os.path.realpath(sibling / backing).startswith(target):
                found.append(file)
    return found
