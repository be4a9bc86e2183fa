"""``-o verify``: prove a backup and its whole chain sound, reading only metadata and hashes.

Every file of the backup and of its backing chain: ``qemu-img check`` clean; every backing
link relative, qcow2, and resolving inside the VM's directory; every file's checksum equal
to the one its directory's manifest recorded. A directory without a manifest is an
incomplete backup. stdout lists each file verified; the first problem fails the operation
(all of them are logged).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from shim import qemu_img
from shim.cancel import Cancelled
from shim.chain import backup_files, vm_dir_of
from shim.errors import BackupFailed, CommandFailed
from shim.manifest import Manifest, checksums, read_manifest
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
        _check_digests(list(checked), problems)
        for problem in problems:
            log.error("verify %s: %s", path, problem)
        if problems:
            more = f" (+{len(problems) - 1} more in the log)" if len(problems) > 1 else ""
            raise BackupFailed(f"verify failed: {problems[0]}{more}")
        return [f"ok {file.relative_to(session.root.resolve())}" for file in checked]


def _walk_chain(top: Path, vm_root: Path, problems: list[str], checked: dict[Path, None]) -> None:
    file = Path(os.path.realpath(top))
    while True:
        name = _shown(file, vm_root)
        if vm_root not in file.parents:
            problems.append(f"{name} is outside the VM's directory")
            return
        try:
            info = qemu_img.info(file, fmt="qcow2")
            result = qemu_img.check(file)
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
        if parent in checked:
            return
        file = parent


def _check_digests(files: list[Path], problems: list[str]) -> None:
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
    for file, digest in digests.items():
        manifest = manifests[file.parent]
        assert manifest is not None  # noqa: S101 - grouped above
        recorded = {d.file: d.checksum for d in manifest.disks}.get(file.name)
        if recorded is None:
            problems.append(f"{file.parent.name}/{file.name} is not in its manifest")
        elif recorded != digest:
            problems.append(f"{file.parent.name}/{file.name}: checksum differs from the manifest")


def _shown(file: Path, vm_root: Path) -> str:
    try:
        return str(file.relative_to(vm_root.parent))
    except ValueError:
        return str(file)
