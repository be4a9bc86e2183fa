"""``-o verify``: prove a backup and its whole chain sound, reading only metadata and hashes.

Every file of the backup and of its backing chain passes the gate (:mod:`shim.gate`: a
regular file inside the VM's directory, a qcow2 header that says nothing it may not, a
backing link relative, qcow2, inside the VM's directory and not looping back) and
``qemu-img check``; every file's size, and its checksum, equals what its directory's
manifest recorded. A directory without a manifest is an incomplete backup. stdout lists each
file verified; the first problem fails the operation (all of them are logged). The VM's
lock is held throughout: no backup, delete or rebase of the VM changes the chain under it.

A file whose checksum its backup left to the first verify (:data:`shim.manifest.UNSEALED`)
has only its size and structure to compare; its checksum is computed and recorded
("sealed") when everything verified, if the file did not change meanwhile; a later verify
then compares against it.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from shim import gate, qemu_img
from shim.backupdir import rewrite_manifest
from shim.chain import backup_files
from shim.errors import BackupFailed, CommandFailed
from shim.gate import Layer, Refused, VmDirectory, split_vm
from shim.lock import VmLock
from shim.manifest import UNSEALED, Manifest, checksums
from shim.nas import MountSession, Repository

log = logging.getLogger(__name__)


def verify_backup(repository: Repository, path: str) -> list[str]:
    """Verify backup ``path``; return one ``ok <file>`` line per file, or raise."""
    vm, backup = split_vm(path)
    with VmLock(vm), MountSession(repository) as session:
        vm_dir = session.vm_directory(vm)
        if vm_dir.kind(backup) != "directory":
            raise BackupFailed(f"backup {path} does not exist")
        problems: list[str] = []
        checked: dict[tuple[int, int], Layer] = {}
        tops = backup_files(vm_dir, backup)
        for name in tops:
            _walk_chain(vm_dir, f"{backup}/{name}", problems, checked)
        if not tops:
            problems.append(f"{path} holds no backup file")
        unsealed = _check_digests(vm_dir, list(checked.values()), problems)
        for problem in problems:
            log.error("verify %s: %s", path, problem)
        if problems:
            more = f" (+{len(problems) - 1} more in the log)" if len(problems) > 1 else ""
            raise BackupFailed(f"verify failed: {problems[0]}{more}")
        _seal(vm_dir, unsealed)
        return [f"ok {layer.shown}" for layer in checked.values()]


def _walk_chain(
    vm_dir: VmDirectory,
    top: str,
    problems: list[str],
    checked: dict[tuple[int, int], Layer],
) -> None:
    """Gate and check each layer of ``top``'s chain until one fails or the chain ends."""
    try:
        for layer in vm_dir.walk(top):
            if layer.identity in checked:
                return  # the rest of the chain was walked from another top
            try:
                result = qemu_img.check(gate.alone(layer))  # the walk opens each backing file
            except CommandFailed as exc:
                problems.append(f"{layer.shown}: {exc}")
                return
            if not result.clean:
                problems.append(
                    f"{layer.shown}: qemu-img check found {result.corruptions} corruption(s), "
                    f"{result.leaks} leak(s), {result.check_errors} error(s)"
                )
            checked[layer.identity] = layer
    except Refused as exc:
        problems.append(str(exc))


@dataclasses.dataclass(frozen=True)
class _Computed:
    """A checksum computed for a file whose manifest had none, and the file as it was."""

    digest: str
    size: int
    mtime_ns: int


def _check_digests(
    vm_dir: VmDirectory, layers: list[Layer], problems: list[str]
) -> dict[Layer, _Computed]:
    """Compare each file's size and checksum with its manifest's; return those to seal.
    A file whose size differs is not read at all (a file of 1 TB where the manifest says a
    few MiB costs nothing to refuse)."""
    manifests: dict[str, Manifest | None] = {}
    for directory in dict.fromkeys(layer.directory for layer in layers):
        try:
            manifests[directory] = vm_dir.manifest(directory)
        except Refused as exc:
            problems.append(str(exc))
            manifests[directory] = None
            continue
        if manifests[directory] is None:
            problems.append(f"{vm_dir.shown(directory)} has no manifest: an incomplete backup")
    to_read: dict[str, list[Layer]] = {}
    for layer in layers:
        manifest = manifests.get(layer.directory)
        if manifest is None:
            continue
        record = {d.file: d for d in manifest.disks}.get(layer.name)
        if record is None:
            problems.append(f"{layer.shown} is not in its manifest")
        elif layer.size != record.stored_size:
            # Checked for every file, sealed or not: a file cut short on the NAS before
            # its first verify must not have its damage sealed as its checksum.
            problems.append(
                f"{layer.shown} holds {layer.size} bytes, its manifest {record.stored_size}"
            )
        else:
            to_read.setdefault(manifest.checksum_algorithm, []).append(layer)
    unsealed: dict[Layer, _Computed] = {}
    for algorithm, group in to_read.items():
        digests = checksums(
            [layer.fd_path for layer in group], algorithm, pass_fds=[layer.fd for layer in group]
        )
        for layer in group:
            manifest = manifests[layer.directory]
            assert manifest is not None  # noqa: S101 - grouped above
            record = {d.file: d for d in manifest.disks}[layer.name]
            digest = digests[layer.fd_path]
            if record.checksum == UNSEALED:
                st = os.fstat(layer.fd)
                unsealed[layer] = _Computed(digest, st.st_size, st.st_mtime_ns)
            elif record.checksum != digest:
                problems.append(f"{layer.shown}: checksum differs from the manifest")
    return unsealed


def _seal(vm_dir: VmDirectory, computed: dict[Layer, _Computed]) -> None:
    """Record the checksums this verify computed for files that had none. Never fails the
    verify: a read-only repository leaves them to the next one."""
    try:
        for directory in dict.fromkeys(layer.directory for layer in computed):
            _seal_directory(vm_dir, directory, computed)
    except (OSError, Refused) as exc:
        log.warning("checksums not recorded, the next verify records them: %s", exc)


def _seal_directory(vm_dir: VmDirectory, directory: str, computed: dict[Layer, _Computed]) -> None:
    manifest = vm_dir.manifest(directory)
    if manifest is None:
        return
    known = {
        layer.name: (layer, c) for layer, c in computed.items() if layer.directory == directory
    }
    records, sealed = [], []
    for record in manifest.disks:
        found = known.get(record.file)
        if found is not None and record.checksum == UNSEALED:
            layer, value = found
            st = os.fstat(layer.fd)
            if (st.st_size, st.st_mtime_ns) == (value.size, value.mtime_ns):  # not rewritten
                records.append(dataclasses.replace(record, checksum=value.digest))
                sealed.append(record.file)
                continue
        records.append(record)
    if sealed:
        rewrite_manifest(vm_dir, directory, dataclasses.replace(manifest, disks=records))
        log.info("recorded the checksums of %s/%s", vm_dir.shown(directory), ", ".join(sealed))
