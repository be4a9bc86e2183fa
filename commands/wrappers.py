"""What each Java wrapper of the KVM agent builds from a run, by CloudStack generation.

The agent never forwards the script's stdout as it is: each ``Libvirt*CommandWrapper``
turns the exit code and stdout into an answer object (contract §7). These functions do
the same, literally, so that an answer over the socket is field for field the one that
generation's agent would have sent for the same run — including for a run that timed
out (``Script`` then reports exit -1 and stdout ``timeout``), and including what Java
would throw on (a non-integer where it sums or reads a size).

Which generation a command belongs to is :class:`Generation`; the service is told (per
request, or by its configuration) or infers it from the fields only one generation sends.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

from shim.contract import FALLBACK_MARKER

TIMEOUT_EXIT = -1
"""What the agent's ``Script`` reports as the exit code of a run past its timeout."""
TIMEOUT_STDOUT = "timeout"
"""What the agent's ``Script`` reports as the output of a run past its timeout."""
CLEANUP_FAILED_EXIT = 20

_SEED_MARKERS = ("BITMAP_CREATED=", "BITMAP_RECREATED=", "INCREMENTAL_FALLBACK=")
PARENT_BITMAP_DELETED_MARKER = "PARENT_BITMAP_DELETED=true"
"""A line the merged wrapper strips and reports (``parentBitmapDeleted``); this shim never
prints it (it retires the parent bitmap through libvirt, which needs no word of it)."""


class Generation(str, enum.Enum):
    """A CloudStack generation whose agent wrappers this service answers as (contract §1)."""

    V4_20_0 = "4.20.0"
    V4_20_X = "4.20.x"
    V4_21 = "4.21"
    SEED = "seed"
    """PR 13074 as first reviewed: markers parsed by prefix, ``parentPath``."""
    MERGED = "merged"
    """Merged PR 13074 / the 4.22 backport: ``parentPaths``, ``bitmapCreated = bitmapNew``."""

    @property
    def sets_needs_cleanup(self) -> bool:
        """Whether this generation's ``BackupAnswer`` has ``needsCleanup`` (4.20.0's and
        4.20.x's have no such field: exit 20 is a plain failure there)."""
        return self not in (Generation.V4_20_0, Generation.V4_20_X)

    @property
    def stats_in_bytes(self) -> bool:
        """Whether this generation's stats wrapper multiplies ``df``'s 1 KiB blocks by 1024
        (4.20.0's stores them as ``df`` printed them)."""
        return self is not Generation.V4_20_0


DEFAULT_GENERATION = Generation.MERGED


@dataclass(frozen=True)
class BackupFields:
    """The fields a TakeBackupCommand wrapper sets, before they become a BackupAnswer."""

    result: bool
    details: str | None
    size: int | None = None
    needs_cleanup: bool | None = None
    bitmap_created: str | None = None
    bitmap_recreated: str | None = None
    incremental_fallback: bool | None = None
    parent_bitmap_deleted: bool | None = None


@dataclass(frozen=True)
class StatsFields:
    """The fields the stats wrapper sets: sizes in bytes (4.20.0: KiB), 0 on failure
    (Java's defaults); ``result`` false whatever happened (see :func:`stats_answer`)."""

    result: bool
    details: str | None
    total_size: int = 0
    used_size: int = 0


class JavaParseError(ValueError):
    """Where the Java wrapper would throw (``NumberFormatException``) on this stdout."""


def java_trim(text: str) -> str:
    """``String.trim()``: strips every character up to U+0020 from both ends."""
    start, end = 0, len(text)
    while start < end and text[start] <= " ":
        start += 1
    while end > start and text[end - 1] <= " ":
        end -= 1
    return text[start:end]


def java_split_lines(text: str) -> list[str]:
    """``text.split("\\n")``: trailing empty strings removed, as Java's split does."""
    parts = text.split("\n")
    while parts and parts[-1] == "":
        parts.pop()
    return parts or [""]


_JAVA_LONG = re.compile(r"^[+-]?[0-9]+$")


def parse_long(text: str) -> int:
    """``Long.parseLong``: an optionally signed run of ASCII digits, nothing else."""
    if not _JAVA_LONG.match(text):
        raise JavaParseError(f'java.lang.NumberFormatException: For input string: "{text}"')
    value = int(text)
    if not -(2**63) <= value < 2**63:
        raise JavaParseError(f'java.lang.NumberFormatException: For input string: "{text}"')
    return value


def backup_size(text: str, *, disk_paths_given: bool) -> int:
    """The size a wrapper reads (contract §2): the last line, or the sum of every line's
    first token when disk paths were passed (``-d``)."""
    lines = java_split_lines(text)
    if not disk_paths_given:
        return parse_long(java_trim(lines[-1]))
    return sum(parse_long(java_trim(line.split(" ")[0])) for line in lines)


def take_backup_answer(
    generation: Generation,
    exit_code: int,
    stdout: str,
    *,
    disk_paths_given: bool,
    bitmap_new: str | None,
) -> BackupFields:
    """What ``LibvirtTakeBackupCommandWrapper`` of ``generation`` builds from a run.

    A stdout the wrapper cannot parse raises :class:`JavaParseError`: for Java that is an
    exception out of the wrapper, and for this project a broken contract.
    """
    if exit_code != 0:
        return BackupFields(
            result=False,
            details=java_trim(stdout),
            needs_cleanup=(
                True if exit_code == CLEANUP_FAILED_EXIT and generation.sets_needs_cleanup else None
            ),
        )
    if generation is Generation.MERGED:
        # Both marker lines go; bitmapCreated is the command's, whatever stdout says.
        markers = (FALLBACK_MARKER, PARENT_BITMAP_DELETED_MARKER)
        kept = [line for line in stdout.split("\n") if not any(m in line for m in markers)]
        details = java_trim("\n".join(kept))
        return BackupFields(
            result=True,
            details=details,
            size=backup_size(details, disk_paths_given=disk_paths_given),
            bitmap_created=bitmap_new,
            incremental_fallback=FALLBACK_MARKER in stdout,
            parent_bitmap_deleted=PARENT_BITMAP_DELETED_MARKER in stdout,
        )
    trimmed = java_trim(stdout)
    if generation is Generation.SEED:
        created = recreated = None
        fallback = False
        filtered = []
        for line in trimmed.split("\n"):
            marker = java_trim(line)
            if marker.startswith(_SEED_MARKERS[0]):
                created = marker.removeprefix(_SEED_MARKERS[0])
            elif marker.startswith(_SEED_MARKERS[1]):
                recreated = marker.removeprefix(_SEED_MARKERS[1])
            elif marker.startswith(_SEED_MARKERS[2]):
                fallback = True
            else:
                filtered.append(line)
        return BackupFields(
            result=True,
            details=trimmed,
            size=backup_size(java_trim("\n".join(filtered)), disk_paths_given=disk_paths_given),
            bitmap_created=created,
            bitmap_recreated=recreated,
            incremental_fallback=fallback,
        )
    return BackupFields(
        result=True,
        details=trimmed,
        size=backup_size(trimmed, disk_paths_given=disk_paths_given),
    )


def script_answer(exit_code: int, stdout: str) -> tuple[bool, str | None]:
    """``result`` and ``details`` of the delete and rebase wrappers: null details on success,
    the untrimmed stdout on failure."""
    return (True, None) if exit_code == 0 else (False, stdout)


def stats_answer(generation: Generation, exit_code: int, stdout: str) -> StatsFields:
    """What the stats wrapper builds: tokens 1 and 2 of stdout split on white space, times
    1024 (4.20.0: as they are). Its answer says ``result`` false on success too: the wrapper
    builds it with ``false`` either way, and the provider reads only the sizes."""
    if exit_code != 0:
        return StatsFields(result=False, details=stdout)
    tokens = re.split(r"\s+", stdout)
    if len(tokens) < 3:
        raise JavaParseError("java.lang.ArrayIndexOutOfBoundsException")
    unit = 1024 if generation.stats_in_bytes else 1
    return StatsFields(
        result=False,
        details=stdout,
        total_size=parse_long(tokens[1]) * unit,
        used_size=parse_long(tokens[2]) * unit,
    )


def infer_generation(fields: Sequence[str]) -> Generation | None:
    """The generation that alone sends one of these wire fields, if any."""
    if "parentPath" in fields:
        return Generation.SEED
    if "parentPaths" in fields or "backupFiles" in fields:
        return Generation.MERGED
    return None
