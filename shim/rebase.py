"""``-o rebase`` (seed generation): re-point a backup onto another, content preserved.

Used to repair a chain before deleting a middle backup: the child is rebased onto the
deleted backup's parent with qemu-img's safe rebase, which copies into the child what the
removed layer held and only then rewrites the backing pointer. Interrupted at any point,
the child still reads exactly as before. When the new backing is in the child's current
chain, qemu-img reads only the clusters allocated in the removed layers.

Both chains pass the gate first (:mod:`shim.gate`). qemu-img must store a relative backing
name, so it is given the child by a path that starts at the VM directory's descriptor the
gate holds (:meth:`~shim.gate.VmDirectory.anchored`): every name it resolves from there is
one the gate has walked.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath

from shim import gate, qemu_img
from shim.backupdir import rewrite_manifest
from shim.chain import backup_files, parse_backup_file_name
from shim.compat import strict_zip
from shim.errors import InputError
from shim.gate import Layer, VmDirectory, split_vm
from shim.lock import VmLock
from shim.manifest import UNSEALED, checksums, checksums_at_backup
from shim.nas import MountSession, Repository
from shim.request import RebaseRequest

log = logging.getLogger(__name__)


def rebase_backup(repository: Repository, target: str, new_backing: str) -> None:
    """Rebase ``target`` onto ``new_backing`` (both mount-relative, one VM's backups).

    Two backup directories: every disk file they share by role and volume id. Two files:
    that file. The target's manifest is updated (its parent and checksums).
    """
    RebaseRequest(repository, target, new_backing).validate()
    vm, top = split_vm(target)
    base = split_vm(new_backing)[1]
    with VmLock(vm), MountSession(repository) as session:
        vm_dir = session.vm_directory(vm)
        pairs = _pairs(vm_dir, top, base)
        rebased: list[tuple[Layer, str]] = []
        chains = [(vm_dir.chain(file), vm_dir.chain(backing)) for file, backing in pairs]
        for (child, below), (_file, _backing) in strict_zip(chains, pairs):
            if child.top.identity in {layer.identity for layer in below.layers}:
                raise InputError(f"{new_backing} is backed by {target}: that would be a loop")
        for (child, _below), (file, backing) in strict_zip(chains, pairs):
            layer = child.top
            # An earlier rebase that was killed may have left leaked clusters: harmless,
            # but verify counts them; repairing leaks only ever frees unreferenced space.
            if qemu_img.check(gate.alone(layer)).leaks:
                qemu_img.repair_leaks(gate.alone(layer))
            relative = posixpath.relpath(backing, posixpath.dirname(file))
            log.info("rebasing %s onto %s", layer.shown, relative)
            qemu_img.rebase(vm_dir.anchored(file), relative, pass_fds=(vm_dir.fd,))
            rebased.append((layer, relative))
        _update_manifest(vm_dir, rebased[0][0].directory, rebased)


def _pairs(vm_dir: VmDirectory, top: str, base: str) -> list[tuple[str, str]]:
    kinds = (vm_dir.kind(top), vm_dir.kind(base)) if top and base else ()
    if kinds == ("directory", "directory"):
        pairs = [
            (f"{top}/{name}", f"{base}/{name}")
            for name in backup_files(vm_dir, top)
            if vm_dir.kind(f"{base}/{name}") == "file"
        ]
        if not pairs:
            raise InputError(f"{top} and {base} share no disk")
        return pairs
    if kinds == ("file", "file"):
        names = (posixpath.basename(top), posixpath.basename(base))
        if not all(parse_backup_file_name(name) for name in names):
            raise InputError("rebase files must be backup files (root.<id>.qcow2, ...)")
        return [(top, base)]
    raise InputError(
        "--rebase-target and --rebase-new-backing must be two existing backup "
        "directories or two existing backup files"
    )


def _update_manifest(vm_dir: VmDirectory, directory: str, rebased: list[tuple[Layer, str]]) -> None:
    manifest = vm_dir.manifest(directory)
    if manifest is None:
        return
    # A rebased file changed: its checksum is computed again, or left to the next verify.
    layers = [layer for layer, _ in rebased]
    if checksums_at_backup():
        found = checksums(
            [layer.fd_path for layer in layers],
            manifest.checksum_algorithm,
            pass_fds=[layer.fd for layer in layers],
        )
        digests = {layer.name: found[layer.fd_path] for layer in layers}
    else:
        digests = {layer.name: UNSEALED for layer in layers}
    changed = {layer.name: (layer, relative) for layer, relative in rebased}
    disks = []
    parent = manifest.parent
    for record in manifest.disks:
        if record.file not in changed:
            disks.append(record)
            continue
        layer, backing = changed[record.file]
        parent = posixpath.basename(posixpath.dirname(backing)) or None
        disks.append(
            dataclasses.replace(
                record,
                checksum=digests[record.file],
                stored_size=os.fstat(layer.fd).st_size,
                backing=backing,
            )
        )
    rewrite_manifest(vm_dir, directory, dataclasses.replace(manifest, disks=disks, parent=parent))
