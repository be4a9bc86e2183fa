"""Where the shim keeps its runtime state: locks, the registry of its mounts, and markers of
the backup jobs whose end libvirt has not yet confirmed.

Everything lives under ``/run/cloudstack-nasbackup-shim`` (``NASBACKUP_SHIM_RUN_DIR``
overrides it): a tmpfs on real hosts, so nothing survives a reboot that should not.
"""

from __future__ import annotations

import os
from pathlib import Path

RUN_DIR = Path(os.environ.get("NASBACKUP_SHIM_RUN_DIR", "/run/cloudstack-nasbackup-shim"))
LOCK_DIR = RUN_DIR / "lock"
MOUNT_REGISTRY = RUN_DIR / "mounts"
JOB_MARKERS = RUN_DIR / "jobs"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and has not exited (a zombie has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which may hold spaces and parentheses.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
