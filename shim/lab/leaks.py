"""What a failed or finished operation may have left behind: the lab's leak detector."""

from __future__ import annotations

import fcntl
import glob
import os
from pathlib import Path

from shim.lab import system
from shim.lab.lab import Lab
from shim.lock import LOCK_DIR


def held_locks(lock_dir: Path = LOCK_DIR) -> list[str]:
    """VM lock files someone still holds."""
    held = []
    for path in sorted(lock_dir.glob("*.lock")) if lock_dir.is_dir() else []:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            held.append(path.name)
        finally:
            os.close(fd)
    return held


def leaks(lab: Lab) -> list[str]:
    """Everything an operation of the shim must not leave behind, as readable lines.

    Mounts and directories named ``csbackup.*``, paused lab VMs, held VM locks, partial
    backup directories in the lab's repositories, and shim processes still running.
    """
    found = [f"mount {m}" for m in system.mount_points() if m.name.startswith("csbackup.")]
    found += [f"directory {d}" for d in glob.glob("/tmp/csbackup.*")]
    found += [f"paused VM {vm.name}" for vm in lab.vms if vm.is_paused()]
    found += [f"held lock {name}" for name in held_locks()]
    found += [f"partial directory {p}" for p in glob.glob(f"{lab.dir}/nas-*/*/*.partial")]
    found += [f"process {pid}" for pid in system.processes_running("shim.cli")]
    return found
