"""``-o rebase`` (seed generation): re-point a backup onto another, content preserved.

Used to repair a chain before deleting a middle backup: the child is rebased onto the
deleted backup's parent with qemu-img's safe rebase, which copies into the child what the
removed layer held and only then rewrites the backing pointer. Interrupted at any point,
the child still reads exactly as before. When the new backing is in the child's current
chain, qemu-img reads only the clusters allocated in the removed layers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from shim import proc, qemu_img
from shim.backupdir import rewrite_manifest
from shim.chain import backup_files, parse_backup_file_name, relative_backing, vm_dir_of
from shim.errors import InputError
from shim.lock import VmLock
from shim.manifest import UNSEALED, checksums, checksums_at_backup, read_manifest
from shim.nas import MountSession, Repository
from shim.request import RebaseRequest

log = logging.getLogger(__name__)


def rebase_backup(repository: Repository, target: str, new_backing: str) -> None:
    """Rebase ``target`` onto ``new_backing`` (both mount-relative, one VM's backups).

    Two backup directories: every disk file they share by role and volume id. Two files:
    that file. The target's manifest is updated (its parent and checksums).
    """
    RebaseRequest(repository, target, new_backing).validate()
    with VmLock(vm_dir_of(target)), MountSession(repository) as session:
        top = session.path(target, what="rebase target")
        base = session.path(new_backing, what="rebase new backing")
        pairs = _pairs(top, base)
        for file, backing in pairs:
            chain = {os.path.realpath(i.filename) for i in qemu_img.chain(backing)}
            if os.path.realpath(file) in chain:
                raise InputError(f"{new_backing} is backed by {target}: that would be a loop")
        for file, backing in pairs:
            # An earlier rebase that was killed may have left leaked clusters: harmless,
            # but verify counts them; repairing leaks only ever frees unreferenced space.
            if qemu_img.check(file).leaks:
                proc.run(["qemu-img", "check", "-q", "-r", "leaks", "-f", "qcow2", str(file)])
            relative = relative_backing(backing, file.parent)
            log.info("rebasing %s onto %s", file, relative)
            proc.run(
                ["qemu-img", "rebase", "-f", "qcow2", "-F", "qcow2", "-b", relative, str(file)]
            )
        _update_manifest(top if top.is_dir() else top.parent, [f for f, _ in pairs])


def _pairs(top: Path, base: Path) -> list[tuple[Path, Path]]:
    if top.is_dir() and base.is_dir():
        pairs = [(f, base / f.name) for f in backup_files(top) if (base / f.name).is_file()]
        if not pairs:
            raise InputError(f"{top.name} and {base.name} share no disk")
        return pairs
    if top.is_file() and base.is_file():
        if not (parse_backup_file_name(top.name) and parse_backup_file_name(base.name)):
            raise InputError("rebase files must be backup files (root.<id>.qcow2, ...)")
        return [(top, base)]
    raise InputError(
        "--rebase-target and --rebase-new-backing must be two existing backup "
        "directories or two existing backup files"
    )


def _update_manifest(directory: Path, rebased: list[Path]) -> None:
    manifest = read_manifest(directory)
    if manifest is None:
        return
    # A rebased file changed: its checksum is computed again, or left to the next verify.
    if checksums_at_backup():
        digests = checksums(rebased, manifest.checksum_algorithm)
    else:
        digests = dict.fromkeys(rebased, UNSEALED)
    names = {f.name: f for f in rebased}
    disks = []
    parent = manifest.parent
    for record in manifest.disks:
        file = names.get(record.file)
        if file is None:
            disks.append(record)
            continue
        backing = qemu_img.info(file).backing_filename
        parent = Path(backing).parent.name if backing else None
        disks.append(
            dataclasses.replace(
                record, checksum=digests[file], stored_size=file.stat().st_size, backing=backing
            )
        )
    rewrite_manifest(directory, dataclasses.replace(manifest, disks=disks, parent=parent))
