"""``-o verify``: prove a backup and its whole chain sound, reading only metadata and hashes.

Every file of the backup and of its backing chain: ``qemu-img check`` clean; every backing
link relative, qcow2, and resolving inside the VM's directory; every file's size, and its
checksum, equal to what its directory's manifest recorded. A directory without a manifest
is an incomplete backup. stdout lists each file verified; the first problem fails the
operation (all of them are logged).

A file whose checksum its backup left to the first verify (:data:`shim.manifest.UNSEALED`)
has only its size and structure to compare; its checksum is computed and recorded
("sealed") when everything verified, if the VM's lock is free at once and the file did not
change meanwhile; a later verify then compares against it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from shim import qemu_img
from shim.backupdir import rewrite_manifest
from shim.cancel import Cancelled
from shim.chain import backup_files, vm_dir_of
from shim.errors import BackupFailed, CommandFailed, LockBusy
from shim.lock import VmLock
from shim.manifest import UNSEALED, Manifest, checksums, read_manifest
from shim.nas import MountSession, Repository

log = logging.getLogger(__name__)


def verify_backup(repository: Repository, path: str) -> list[str]:
    """Verify backup ``path``; return one ``ok <file>`` line per file, or raise."""
    with MountSession(repository) as session:
        directory = session.path(path, what="backup path")
        if not directory.is_dir():
            raise BackupFailed(f"backup {path} does not exist")
        vm_root = Path(os.path.realpath(session.root / vm_dir_of(path)))
        problems: list[str] = []
        checked: dict[Path, None] = {}
        for top in backup_files(directory):
            _walk_chain(top, vm_root, problems, checked)
        if not backup_files(directory):
            problems.append(f"{path} holds no backup file")
        unsealed = _check_digests(list(checked), problems)
        for problem in problems:
            log.error("verify %s: %s", path, problem)
        if problems:
            more = f" (+{len(problems) - 1} more in the log)" if len(problems) > 1 else ""
            raise BackupFailed(f"verify failed: {problems[0]}{more}")
        _seal(vm_dir_of(path), unsealed)
        return [f"ok {file.relative_to(session.root.resolve())}" for file in checked]


def _walk_chain(top: Path, vm_root: Path, problems: list[str], checked: dict[Path, None]) -> None:
    file = Path(os.path.realpath(top))
    walked: set[Path] = set()
    while True:
        walked.add(file)
        name = _shown(file, vm_root)
        if vm_root not in file.parents:
            problems.append(f"{name} is outside the VM's directory")
            return
        try:
            info = qemu_img.info(file, fmt="qcow2")
            result = qemu_img.check(file, chain=False)  # the walk opens each backing file
        except Cancelled:
            raise  # stopped: verifying on would run every later check undisturbed
        except CommandFailed as exc:
            problems.append(f"{name}: {exc}")
            return
        if not result.clean:
            problems.append(
                f"{name}: qemu-img check found {result.corruptions} corruption(s), "
                f"{result.leaks} leak(s), {result.check_errors} error(s)"
            )
        checked.setdefault(file, None)
        backing = info.backing_filename
        if backing is None:
            return
        if os.path.isabs(backing):
            problems.append(f"{name} has an absolute backing path {backing}")
        if info.backing_format != "qcow2":
            problems.append(f"{name}: backing format is {info.backing_format}, not qcow2")
        parent = Path(os.path.realpath(file.parent / backing))
        if not parent.is_file():
            problems.append(f"{name}: backing file {backing} is missing")
            return
        if parent in walked:
            # QEMU cannot open such a chain; the checks open one file each, so say it here.
            problems.append(f"{name}: backing chain loops back to {_shown(parent, vm_root)}")
            return
        if parent in checked:
            return
        file = parent


@dataclasses.dataclass(frozen=True)
class _Computed:
    """A checksum computed for a file whose manifest had none, and the file as it was."""

    digest: str
    size: int
    mtime_ns: int


def _check_digests(files: list[Path], problems: list[str]) -> dict[Path, _Computed]:
    """Compare each file's checksum with its manifest's; return those to seal."""
    stats = {file: os.stat(file) for file in files}
    manifests: dict[Path, Manifest | None] = {}
    for directory in dict.fromkeys(f.parent for f in files):
        try:
            manifests[directory] = read_manifest(directory)
        except ValueError as exc:
            problems.append(f"{directory.name}/manifest.json is unreadable: {exc}")
            manifests[directory] = None
            continue
        if manifests[directory] is None:
            problems.append(f"{directory.name} has no manifest: an incomplete backup")
    by_algorithm: dict[str, list[Path]] = {}
    for file in files:
        manifest = manifests.get(file.parent)
        if manifest is not None:
            by_algorithm.setdefault(manifest.checksum_algorithm, []).append(file)
    digests: dict[Path, str] = {}
    for algorithm, group in by_algorithm.items():
        try:
            digests.update(checksums(group, algorithm))
        except ValueError as exc:
            problems.append(f"{group[0].parent.name}/manifest.json: {exc}")
    unsealed: dict[Path, _Computed] = {}
    for file, digest in digests.items():
        manifest = manifests[file.parent]
        assert manifest is not None  # noqa: S101 - grouped above
        record = {d.file: d for d in manifest.disks}.get(file.name)
        name = f"{file.parent.name}/{file.name}"
        if record is None:
            problems.append(f"{name} is not in its manifest")
        elif stats[file].st_size != record.stored_size:
            # Checked for every file, sealed or not: a file cut short on the NAS before
            # its first verify must not have its damage sealed as its checksum.
            problems.append(
                f"{name} holds {stats[file].st_size} bytes, its manifest {record.stored_size}"
            )
        elif record.checksum == UNSEALED:
            unsealed[file] = _Computed(digest, stats[file].st_size, stats[file].st_mtime_ns)
        elif record.checksum != digest:
            problems.append(f"{name}: checksum differs from the manifest")
    return unsealed


def _seal(vm: str, computed: dict[Path, _Computed]) -> None:
    """Record the checksums this verify computed for files that had none. Never fails the
    verify: a busy VM or a read-only repository leaves them to the next one."""
    if not computed:
        return
    try:
        # At once or not at all: a verify that passed must not wait on a backup of the VM.
        with VmLock(vm, wait=0):
            for directory in dict.fromkeys(f.parent for f in computed):
                _seal_directory(directory, computed)
    except (LockBusy, OSError, ValueError) as exc:
        log.warning("checksums not recorded, the next verify records them: %s", exc)


def _seal_directory(directory: Path, computed: dict[Path, _Computed]) -> None:
    manifest = read_manifest(directory)
    if manifest is None:
        return
    records, sealed = [], []
    for record in manifest.disks:
        file = directory / record.file
        known = computed.get(file)
        if known is not None and record.checksum == UNSEALED:
            st = os.stat(file)
            if (st.st_size, st.st_mtime_ns) == (known.size, known.mtime_ns):  # not rebased since
                records.append(dataclasses.replace(record, checksum=known.digest))
                sealed.append(record.file)
                continue
        records.append(record)
    if sealed:
        rewrite_manifest(directory, dataclasses.replace(manifest, disks=records))
        log.info("recorded the checksums of %s/%s", directory.name, ", ".join(sealed))


def _shown(file: Path, vm_root: Path) -> str:
    try:
        return str(file.relative_to(vm_root.parent))
    except ValueError:
        return str(file)
