"""``-o delete``: remove one backup directory, never one another backup still needs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from shim.backupdir import remove_tree, sweep_dead_work
from shim.chain import dependants
from shim.errors import BackupFailed, InputError
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
    obviously dead ``.<name>.deleting``, never a half-emptied backup.
    """
    DeleteRequest(repository, path).validate()
    vm = Path(path).parts[0]
    with VmLock(vm), MountSession(repository) as session:
        directory = session.path(path, what="backup path")
        for dead in sweep_dead_work(Path(os.path.realpath(session.root)), vm):
            log.warning("removed %s, left by a run that died", dead)
        if not directory.exists():
            log.info("backup %s does not exist: nothing to delete", path)
            return
        if not directory.is_dir():
            raise InputError(f"backup path {path} is not a directory")
        needed_by = dependants(directory)
        if needed_by:
            names = ", ".join(f"{f.parent.name}/{f.name}" for f in needed_by)
            raise BackupFailed(f"backup {path} is the parent of {names}: refusing to delete it")
        doomed = directory.with_name(f".{directory.name}.deleting")
        remove_tree(doomed)  # what an interrupted earlier delete left
        directory.rename(doomed)
        remove_tree(doomed)
        log.info("deleted backup %s", path)
