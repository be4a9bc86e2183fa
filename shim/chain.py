"""Backup chains on the NAS: file names, parents of each disk, backing links, dependants.

A backup directory ``<vm>/<timestamp>/`` holds ``root.<volId>.qcow2`` and
``datadisk.<volId>.qcow2``; an incremental file's backing is its own disk's parent file,
by a path relative to the incremental's directory, with backing format qcow2, so that the
NAS can be mounted anywhere and the Java restore (``qemu-img convert``) follows it. Every
file is read through the gate (:mod:`shim.gate`).
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shim import gate, qemu_img
from shim.errors import CommandFailed, InputError
from shim.gate import Chain, Damaged, VmDirectory, split_vm
from shim.manifest import checkpoint_mismatch
from shim.nas import MountSession, validate_relative
from shim.virt.disks import DomainDisk

_BACKUP_FILE = re.compile(r"(?P<role>root|datadisk)\.(?P<volume_id>.+)\.qcow2")


def parse_backup_file_name(name: str) -> tuple[str, str] | None:
    """``(role, volume id)`` of a backup file name, None when it is not one."""
    match = _BACKUP_FILE.fullmatch(name)
    return (match.group("role"), match.group("volume_id")) if match else None


@dataclass
class Parents:
    """Each disk's parent file, and why an incremental is impossible (if it is)."""

    files: dict[str, Path] = field(default_factory=dict)
    """Disk target -> its parent backup file; disks absent here are new since (full)."""
    chains: dict[str, Chain] = field(default_factory=dict)
    """Disk target -> its parent file's whole chain, as the gate walked it."""
    problems: list[str] = field(default_factory=list)
    """Reasons to fall back to a full backup (a named parent that is missing or unusable)."""


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
    A path that leaves the VM's directory is bad input, and a parent the gate refuses (a
    link, a backing name that leads elsewhere) is a refusal: both raise. A parent that is
    named but missing, damaged or failing ``qemu-img check`` is a reason to fall back to a
    full, and so is a parent directory whose manifest records a checkpoint other than
    ``bitmap_parent`` (the incremental would copy the changes since that checkpoint on
    top of another backup: a chain that restores to data the VM never held).
    """
    vm_dir = session.vm_directory(split_vm(backup_path)[0])
    by_key: dict[tuple[str, str], str] = {}
    parents = Parents()
    if parent_paths:
        by_key = _named_parents(vm_dir, parent_paths)
    elif parent_path:
        directory = _parent_directory(vm_dir, parent_path)
        if directory is None:
            parents.problems.append(f"parent backup directory {parent_path} does not exist")
            return parents
        for disk in disks:
            candidate = f"{directory}/{disk.backup_name}"
            if vm_dir.kind(candidate) is not None:
                by_key[(disk.role, disk.volume_id)] = candidate
    for disk in disks:
        parent = by_key.get((disk.role, disk.volume_id))
        if parent is None:
            continue  # a disk attached since the parent: backed up full in the same job
        chain, problem = _usable(vm_dir, parent)
        if chain is None:
            parents.problems.append(f"parent of {disk.target}: {problem}")
        else:
            parents.files[disk.target] = vm_dir.path / parent
            parents.chains[disk.target] = chain
    if bitmap_parent is not None:
        parents.problems += _checkpoint_problems(vm_dir, parents.files.values(), bitmap_parent)
    return parents


def _named_parents(vm_dir: VmDirectory, parent_paths: Sequence[str]) -> dict[tuple[str, str], str]:
    """Each ``--parent-paths`` file by its (role, volume id), relative to the VM's
    directory; a path through a link, or naming no backup file, is refused."""
    by_key = {}
    for given in parent_paths:
        relative = _inside_vm_dir(vm_dir, given)
        vm_dir.kind(relative)  # a path through a link is refused before anything
        key = parse_backup_file_name(posixpath.basename(relative))
        if key is None:
            raise InputError(f"parent path does not name a backup file: {given}")
        by_key[key] = relative
    return by_key


def _parent_directory(vm_dir: VmDirectory, parent_path: str) -> str | None:
    """The seed's ``--parent-path`` (the parent directory, or the root disk's file in it) as
    the directory relative to the VM's; None when there is none."""
    relative = _inside_vm_dir(vm_dir, parent_path)
    named = parse_backup_file_name(posixpath.basename(relative))
    named_file = vm_dir.kind(relative) == "file" or named
    directory = posixpath.dirname(relative) if named_file else relative
    if not directory or vm_dir.kind(directory) != "directory":
        return None
    return directory


def _checkpoint_problems(
    vm_dir: VmDirectory, files: Iterable[Path], bitmap_parent: str
) -> list[str]:
    """Each parent directory whose manifest says it did not create ``bitmap_parent``."""
    problems = []
    for name in sorted({f.parent.name for f in files}):
        try:
            manifest = vm_dir.manifest(name)
        except Damaged as exc:
            problems.append(str(exc))
            continue
        problem = checkpoint_mismatch(manifest, name, bitmap_parent)
        if problem:
            problems.append(problem)
    return problems


def _inside_vm_dir(vm_dir: VmDirectory, given: str) -> str:
    """``given`` (mount-relative) relative to the VM's directory, or refused."""
    validate_relative(given, "parent path")
    vm, rest = split_vm(given)
    if vm != vm_dir.vm or not rest:
        raise InputError(f"parent path {given} is not inside the VM's directory {vm_dir.vm}")
    return rest


def _usable(vm_dir: VmDirectory, parent: str) -> tuple[Chain | None, str]:
    """The parent file's chain when it can carry a child, else None and why not. A refusal
    of the gate that is not mere damage raises."""
    name = posixpath.basename(parent)
    try:
        chain = vm_dir.chain(parent)
    except FileNotFoundError:
        return None, f"{name} is missing"
    except Damaged as exc:
        return None, str(exc)
    # Metadata only (refcounts, tables): a corrupted parent must not get children.
    try:
        result = qemu_img.check(gate.alone(chain.top))
    except CommandFailed as exc:
        return None, f"{name} cannot be checked: {exc}"
    if result.corruptions or result.check_errors:
        return None, f"{name} is corrupted ({result.corruptions} corruption(s))"
    return chain, ""


def relative_backing(parent: Path, directory: Path) -> str:
    """The backing path to store in a file of ``directory``: relative to that directory."""
    return os.path.relpath(parent, directory)


def backup_files(vm_dir: VmDirectory, backup: str) -> list[str]:
    """The names of the disk files of backup directory ``backup``, root first, then data
    disks by name (not yet opened: the gate refuses what is not a regular file then)."""
    found = [n for n in vm_dir.names(backup) if parse_backup_file_name(n)]
    return sorted(found, key=lambda n: (not n.startswith("root."), n))


def dependants(vm_dir: VmDirectory, backup: str) -> list[str]:
    """Files (``<backup>/<file>``) in the VM's other backups whose backing file lies in
    ``backup``. Only gated regular qcow2 files are looked at; a link or a special file is
    nobody's parent and nobody's child."""
    found = []
    for sibling in vm_dir.names():
        if sibling == backup:
            continue
        try:
            if vm_dir.kind(sibling) != "directory":
                continue
            names = vm_dir.names(sibling)
        except InputError:
            continue
        for name in names:
            if not name.endswith(".qcow2"):
                continue
            header = vm_dir.header_of(f"{sibling}/{name}")
            backing = header.backing_name if header is not None else None
            if backing is None or gate.backing_rule(backing) is not None:
                continue
            resolved = posixpath.normpath(posixpath.join(sibling, backing))
            if resolved.startswith(backup + "/"):
                found.append(f"{sibling}/{name}")
    return found
