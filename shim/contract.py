"""The one owner of stdout: what the Java agent reads, rendered exactly as it parses it.

Contract §2: for a running-VM backup, marker lines first (``INCREMENTAL_FALLBACK=true``,
``BITMAP_CREATED=<name>``), then the text ``virsh domjobinfo --completed`` prints, then the
backup directory's size in bytes as the very last line; every generation of the Java
parser reads that correctly. When the agent passed disk paths (``-d``) it sums every line,
so stdout is then one integer per file written and nothing else (markers only when the
operator configured a seed-generation manager that strips them). Errors are one line.
Nothing else is ever printed: logs go to the log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from shim.compat import strict_zip
from shim.errors import EXIT_CLEANUP_FAILED
from shim.redact import redact

FALLBACK_MARKER = "INCREMENTAL_FALLBACK=true"
BITMAP_CREATED_PREFIX = "BITMAP_CREATED="
CLEANUP_FAILED = "Backup cleanup failed"

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_JOB_TYPES = {0: "None", 1: "Bounded", 2: "Unbounded", 3: "Completed", 4: "Failed", 5: "Cancelled"}
_OPERATIONS = {
    0: "Unknown", 1: "Start", 2: "Save", 3: "Restore", 4: "Incoming migration",
    5: "Outgoing migration", 6: "Snapshot", 7: "Snapshot revert", 8: "Dump", 9: "Backup",
    10: "Snapshot delete",
}  # fmt: skip


@dataclass(frozen=True)
class BackupOutcome:
    """What a finished backup reports: the facts stdout and a BackupAnswer are made of."""

    size: int
    """Bytes in the backup directory (as ``du -sb`` counts them)."""
    file_sizes: Sequence[int] = ()
    """Bytes of each file written, in the order written."""
    bitmap_created: str | None = None
    """The checkpoint (and bitmap) created for the next incremental, if any."""
    incremental_fallback: bool = False
    """An incremental was asked for and a full was taken instead."""
    job_stats: Mapping[str, object] | None = None
    """libvirt's completed job statistics (running VMs only)."""
    files: Sequence[str] = field(default_factory=tuple)
    """Names of the files written, in the order of ``file_sizes``."""


@dataclass(frozen=True)
class StorageStats:
    """What ``-o stats`` reports: the mount point and sizes in 1 KiB blocks."""

    mount_point: str
    total_kib: int
    used_kib: int


@dataclass(frozen=True)
class RestoreOutcome:
    """The volumes a restore wrote, in disk order, with their virtual sizes."""

    targets: Sequence[str]
    virtual_sizes: Sequence[int]


def pretty_capacity(value: int) -> str:
    """A byte count as virsh prints it: ``128.000 MiB``."""
    amount = float(value)
    unit = 0
    while amount >= 1024 and unit < len(_UNITS) - 1:
        amount /= 1024
        unit += 1
    return f"{amount:.3f} {_UNITS[unit]}"


def _row(label: str, value: str) -> str:
    return f"{label:<17} {value}"


def _int(params: Mapping[str, object], key: str, default: int = 0) -> int:
    value = params.get(key, default)
    return int(value) if isinstance(value, (int, float, str)) else default


def jobinfo_text(params: Mapping[str, object]) -> list[str]:
    """The lines ``virsh domjobinfo --completed`` prints for a finished backup job."""
    lines = [
        _row("Job type:", f"{_JOB_TYPES.get(_int(params, 'type', 3), 'Unknown'):<12}"),
        _row("Operation:", f"{_OPERATIONS.get(_int(params, 'operation', 9), 'Unknown'):<12}"),
    ]
    if "time_elapsed" in params:
        lines.append(_row("Time elapsed:", f"{_int(params, 'time_elapsed'):<12} ms"))
    for key, label in (
        ("disk_processed", "File processed:"),
        ("disk_remaining", "File remaining:"),
        ("disk_total", "File total:"),
        ("disk_temp_used", "Temporary disk space use:"),
        ("disk_temp_total", "Temporary disk space total:"),
    ):
        if key in params:
            lines.append(_row(label, pretty_capacity(_int(params, key))))
    if params.get("errmsg"):
        lines.append(_row("Error message:", str(params["errmsg"])))
    lines.append("")  # virsh ends its report with an empty line
    return lines


def backup_stdout(
    outcome: BackupOutcome, *, disk_paths_given: bool, markers_with_disk_paths: bool = False
) -> str:
    """stdout of a successful backup, for the agent's parser of every generation."""
    markers = []
    if outcome.incremental_fallback:
        markers.append(FALLBACK_MARKER)
    if outcome.bitmap_created:
        markers.append(BITMAP_CREATED_PREFIX + outcome.bitmap_created)
    if disk_paths_given:
        # The caller sums the first token of every line: integers only.
        lines = markers if markers_with_disk_paths else []
        lines += [str(size) for size in outcome.file_sizes]
    else:
        lines = [*markers]
        if outcome.job_stats is not None:
            lines += jobinfo_text(outcome.job_stats)
        lines.append(str(outcome.size))
    return "".join(f"{line}\n" for line in lines)


def stats_stdout(mount_point: str, total_kib: int, used_kib: int) -> str:
    """stdout of ``-o stats``: the mount point, then ``<total> <used>`` in 1 KiB blocks."""
    return f"{mount_point}\n{total_kib} {used_kib}\n"


def error_stdout(message: str) -> str:
    """stdout of a failed operation: one line, which the agent shows the operator (a Ceph
    key inside it masked)."""
    return redact(" ".join(message.split())) + "\n"


def failure_stdout(message: str, exit_code: int) -> str:
    """stdout of an operation that failed with ``exit_code``: exit 20 (cleanup failed)
    always says ``Backup cleanup failed`` (the details are in the log)."""
    return error_stdout(CLEANUP_FAILED if exit_code == EXIT_CLEANUP_FAILED else message)


def restore_stdout(outcome: RestoreOutcome) -> str:
    """stdout of ``-o restore``: one line per volume written, ``<target> <virtual size>``."""
    return "".join(
        f"{target} {size}\n" for target, size in strict_zip(outcome.targets, outcome.virtual_sizes)
    )
