"""``-o delete``: remove one backup directory, never one another backup still needs."""

from __future__ import annotations

import logging
import os

from shim.backupdir import sweep_dead_work
from shim.chain import dependants
from shim.errors import BackupFailed, InputError
from shim.gate import split_vm
from shim.lock import VmLock
from shim.nas import MountSession, Repository
from shim.request import DeleteRequest

log = logging.getLogger(__name__)


def delete_backup(repository: Repository, path: str) -> None:
    """Remove the backup directory ``path`` (mount-relative); a missing one is success.

    Refused, naming them, while other backups of the VM have a backing file inside it: the
    final management server deletes leaf-first and the seed generation rebases first, so a
    correct caller never meets the refusal, and a wrong one never breaks a chain. The
    directory is renamed aside before it is removed: an interrupted delete leaves an
    obviously dead ``.<name>.deleting``, never a half-emptied backup. Everything is reached
    through the gate: a link is never followed, a special file never opened.
    """
    DeleteRequest(repository, path).validate()
    vm, backup = split_vm(path)
    with VmLock(vm), MountSession(repository) as session:
        vm_dir = session.vm_directory(vm)
        for dead in sweep_dead_work(vm_dir):
            log.warning("removed %s, left by a run that died", dead)
        kind = vm_dir.kind(backup)
        if kind is None:
            log.info("backup %s does not exist: nothing to delete", path)
            return
        if kind != "directory":
            raise InputError(f"backup path {path} is not a directory")
        needed_by = dependants(vm_dir, backup)
        if needed_by:
            names = ", ".join(needed_by)
            raise BackupFailed(f"backup {path} is the parent of {names}: refusing to delete it")
        doomed = f".{backup}.deleting"
        if vm_dir.kind(doomed) == "directory":
            vm_dir.remove_tree(doomed)  # what an interrupted earlier delete left
        os.rename(backup, doomed, src_dir_fd=vm_dir.fd, dst_dir_fd=vm_dir.fd)
        vm_dir.remove_tree(doomed)
        log.info("deleted backup %s", path)
