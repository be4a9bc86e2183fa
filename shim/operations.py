"""The operations every entry point runs: a typed request in, the drop-in's stdout out.

The drop-in (:mod:`shim.cli`) and the socket service both build one of the requests
below and call :func:`run`; neither implements an operation itself. A :class:`Result`
carries the exact stdout the drop-in prints (the socket's ``details``) and the facts
behind it (what a Java wrapper would have derived from that stdout). Failures are
:class:`~shim.errors.ShimError`; their ``exit_code`` says 1 or 20 (cleanup failed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shim import contract
from shim.backup import BackupRequest, JobObserver, take_backup
from shim.contract import BackupOutcome, RestoreOutcome, StorageStats
from shim.nas import Repository
from shim.stats import storage_stats


@dataclass(frozen=True)
class DeleteRequest:
    """DeleteBackupCommand: remove one backup directory (``-o delete -p PATH``)."""

    repository: Repository
    path: str


@dataclass(frozen=True)
class RebaseRequest:
    """RebaseBackupCommand (seed generation): re-point ``target`` onto ``new_backing``,
    content preserved (``-o rebase --rebase-target T --rebase-new-backing B``)."""

    repository: Repository
    target: str
    new_backing: str


@dataclass(frozen=True)
class StatsRequest:
    """GetBackupStorageStatsCommand: the repository's size and use (``-o stats``)."""

    repository: Repository


@dataclass(frozen=True)
class RestoreRequest:
    """RestoreBackupCommand: flatten each disk's chain into its target volume.

    ``backup_files`` name the backup's disk files (mount-relative, or bare names inside
    ``backup_path``), in disk order; ``targets`` are the volumes to write, in the same
    order: file paths, block devices or ``rbd:`` URIs.
    """

    repository: Repository
    backup_path: str
    targets: Sequence[str]
    backup_files: Sequence[str] = ()
    vm: str | None = None


@dataclass(frozen=True)
class VerifyRequest:
    """Check one backup and its chain (``-o verify -p PATH``)."""

    repository: Repository
    path: str


Request = (
    BackupRequest | DeleteRequest | RebaseRequest | StatsRequest | RestoreRequest | VerifyRequest
)


@dataclass(frozen=True)
class Result:
    """An operation's stdout (exactly what the drop-in prints) and its structured facts."""

    stdout: str
    outcome: BackupOutcome | StorageStats | RestoreOutcome | None = None


def validate(request: Request) -> None:
    """Refuse a malformed request before anything is touched (raises UsageError/InputError)."""
    if isinstance(request, BackupRequest):
        request.validate()
    else:
        request.repository.validate()


def run(request: Request, *, on_job: JobObserver | None = None) -> Result:
    """Run one operation to completion; raise a ShimError on failure."""
    validate(request)
    if isinstance(request, BackupRequest):
        outcome = take_backup(request, on_job=on_job)
        text = contract.backup_stdout(outcome, disk_paths_given=bool(request.disk_paths))
        return Result(text, outcome)
    if isinstance(request, StatsRequest):
        stats = storage_stats(request.repository)
        return Result(
            contract.stats_stdout(stats.mount_point, stats.total_kib, stats.used_kib), stats
        )
    raise NotImplementedError(f"{type(request).__name__} is not implemented yet")
