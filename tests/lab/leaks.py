"""What a failed or finished operation may have left behind: the lab's leak detector."""

from __future__ import annotations

import fcntl
import glob
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from shim.lock import LOCK_DIR
from shim.proc import processes_naming
from shim.pull import scratch_setting
from shim.virt.jobs import JobMarker
from tests.lab import system
from tests.lab.lab import Lab


def held_locks(vm_names: Iterable[str], lock_dir: Path = LOCK_DIR) -> list[str]:
    """The locks of these VMs that someone still holds."""
    held = []
    for path in [lock_dir / f"{name}.lock" for name in vm_names]:
        if not path.exists():
            continue
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

    Mounts and directories named ``csbackup.*`` in the temporary directory, paused lab VMs,
    held locks and unconfirmed job markers of lab VMs, partial backup directories in the
    lab's repositories, shim processes this process started that still run, and in pull
    mode the VMs' scratch directories and storage daemons using them. All scoped
    to this process and lab, so that two test runs on one host do not see each other's work
    as leaks.
    """
    tmp = Path(tempfile.gettempdir())
    found = [
        f"mount {m}"
        for m in system.mount_points()
        if m.parent == tmp and m.name.startswith("csbackup.")
    ]
    found += [f"directory {d}" for d in glob.glob(f"{tmp}/csbackup.*")]
    found += [f"paused VM {vm.name}" for vm in lab.vms if vm.is_paused()]
    found += [f"held lock {name}" for name in held_locks(vm.name for vm in lab.vms)]
    found += [f"partial directory {p}" for p in glob.glob(f"{lab.dir}/nas-*/*/*.partial")]
    found += [f"job marker {vm.name}" for vm in lab.vms if JobMarker(vm.name).present]
    found += [f"process {pid}" for pid in system.descendants_running("shim.cli")]
    scratch = scratch_setting()
    if scratch:  # pull mode: the VMs' scratch directories, and daemons copying from them
        found += [f"scratch {p}" for vm in lab.vms for p in glob.glob(f"{scratch}/{vm.name}")]
        found += [
            f"process {pid} ({_command(pid)}) using {scratch}" for pid in processes_naming(scratch)
        ]
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:300]
    except OSError:
        return "gone"
