"""What the lab reads off the host: mount points, QEMU's pid, the emulator."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from shim.nas import mount_points
from shim.runtime import pid_alive

__all__ = ["mount_points", "pid_alive"]

QEMU_PID_DIR = Path("/run/libvirt/qemu")


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below ``directory``, deepest (last mounted) first."""
    prefix = str(directory).rstrip("/") + "/"
    found = [m for m in mount_points() if str(m) == str(directory) or str(m).startswith(prefix)]
    return list(reversed(found))


def qemu_pid(domain_name: str) -> int:
    """The pid of a running domain's QEMU process, from libvirt's pid file."""
    return int((QEMU_PID_DIR / f"{domain_name}.pid").read_text().strip())


def emulator() -> str:
    """The x86_64 system emulator libvirt should run."""
    found = shutil.which("qemu-system-x86_64")
    if not found:
        raise FileNotFoundError("qemu-system-x86_64 is not installed (run scripts/setup-host)")
    return found


def _parent_of(pid: int) -> int:
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return 0
    # The command name may hold spaces and parentheses: the fields follow the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants_running(needle: str) -> list[int]:
    """Pids of this process's descendants whose command line contains ``needle``."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmdline = Path("/proc", entry, "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if needle.encode() not in cmdline:
            continue
        ancestor = int(entry)
        while ancestor > 1:
            ancestor = _parent_of(ancestor)
            if ancestor == me:
                pids.append(int(entry))
                break
    return pids


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """``name=value`` in this process's environment (which the programs it starts inherit)
    for the block; the earlier value, or none, afterwards."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved
