"""Every host setting of the shim, in one table, and where each is read from.

The KVM agent runs the drop-in with the agent's own environment, which an operator should
not have to edit to configure a backup tool. So a setting is taken from the environment,
else from the host's settings file ``/etc/default/cloudstack-nasbackup`` (``NAME=value``
lines, ``#`` comments; the socket service's systemd ``EnvironmentFile=``), else its
default. The file is trusted only when root owns it and nobody else can write it; an
unsafe or unreadable file, and names it does not know, are reported and ignored.
"""

from __future__ import annotations

import os
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

SETTINGS_FILE = Path("/etc/default/cloudstack-nasbackup")
SETTINGS_FILE_ENV = "NASBACKUP_SHIM_SETTINGS_FILE"
"""Names another settings file (the tests' way to reach :func:`load`)."""
_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class Setting:
    """One setting: its name, its default and what it does (the README's table)."""

    name: str
    default: str
    meaning: str


LOG = Setting(
    "NASBACKUP_SHIM_LOG",
    "/var/log/cloudstack/agent/agent.log",
    "the log file, appended to (the agent's own log by default)",
)
LOCK_WAIT = Setting(
    "NASBACKUP_SHIM_LOCK_WAIT",
    "60",
    "seconds a second operation on a VM waits for the first one (0: fail at once)",
)
CHECKSUM = Setting(
    "NASBACKUP_SHIM_CHECKSUM",
    "cksum",
    "the checksum new backups record: cksum (POSIX CRC-32) or sha256",
)
CHECKSUM_AT = Setting(
    "NASBACKUP_SHIM_CHECKSUM_AT",
    "verify",
    "when checksums are computed: verify (the first -o verify of a backup) or backup",
)
SCRATCH_DIR = Setting(
    "NASBACKUP_SHIM_SCRATCH_DIR",
    "",
    "a local directory: running VMs are then backed up in pull mode, scratch images there "
    "(unless the method is push)",
)
METHOD = Setting(
    "NASBACKUP_SHIM_METHOD",
    "auto",
    "how running VMs are backed up: auto (pull for fulls and for compressed or capped "
    "backups, push for incrementals; pull for all when a scratch directory is set), push, "
    "or pull",
)
COMPRESS = Setting(
    "NASBACKUP_SHIM_COMPRESS",
    "false",
    "true: backups are compressed qcow2, zstd where this host's QEMU writes it, else zlib, as "
    "with -c (running VMs then in pull mode); zlib: zlib always (restores on Debian 11)",
)
BANDWIDTH = Setting(
    "NASBACKUP_SHIM_BANDWIDTH",
    "0",
    "a cap on what each backup writes, in MiB/s (0: none), as -b gives it for one run",
)
DISK_PATH_MARKERS = Setting(
    "NASBACKUP_SHIM_DISK_PATH_MARKERS",
    "false",
    "true: markers for stopped VMs' backups too (a seed-generation management server)",
)
SERVE_ARGS = Setting(
    "NASBACKUP_SHIM_SERVE_ARGS",
    "",
    "the socket service's options, which its systemd unit passes to cloudstack-nasbackup-serve",
)
TABLE: tuple[Setting, ...] = (
    LOG, LOCK_WAIT, CHECKSUM, CHECKSUM_AT, SCRATCH_DIR, METHOD, COMPRESS, BANDWIDTH,
    DISK_PATH_MARKERS, SERVE_ARGS,
)  # fmt: skip
KNOWN = frozenset(s.name for s in TABLE)


def value(setting: Setting) -> str:
    """The setting's value: the environment's (with the settings file's loaded into it),
    else its default; an empty value counts as unset."""
    return os.environ.get(setting.name, "").strip() or setting.default


def settings_file() -> Path:
    """The settings file this process reads."""
    return Path(os.environ.get(SETTINGS_FILE_ENV) or SETTINGS_FILE)


def _parse(text: str) -> tuple[dict[str, str], list[str]]:
    values: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if not sep or name not in KNOWN:
            problems.append(f"line {number}: not a setting of the shim: {name or raw!r}")
            continue
        values[name] = value
    return values, problems


def load(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Put the settings file's values into the environment where it has none; returns the
    problems found, for the log (which may itself be configured here, so it is not open yet).
    """
    env = os.environ if environ is None else environ
    path = settings_file()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except OSError as exc:
        return [f"settings file {path} ignored: {exc.strerror}"]
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return [f"settings file {path} ignored: not a regular file"]
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return [f"settings file {path} ignored: not root's alone (owner or mode)"]
        data = os.read(fd, _MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_BYTES:
        return [f"settings file {path} ignored: larger than {_MAX_BYTES} bytes"]
    values, problems = _parse(data.decode("utf-8", errors="replace"))
    for name, value in values.items():
        env.setdefault(name, value)
    return [f"settings file {path}: {p}" for p in problems]
