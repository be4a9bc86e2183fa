"""The operations every entry point runs: a typed request in, the drop-in's stdout out.

The drop-in (:mod:`shim.cli`) and the socket service both build one of the requests
below and call :func:`run`; neither implements an operation itself. A :class:`Result`
carries the exact stdout the drop-in prints (the socket's ``details``) and the facts
behind it (what a Java wrapper would have derived from that stdout). Failures are
:class:`~shim.errors.ShimError`; their ``exit_code`` says 1 or 20 (cleanup failed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from shim import contract, settings
from shim.cancel import CancelToken, bound
from shim.contract import BackupOutcome, RestoreOutcome, StorageStats
from shim.errors import StorageFailed
from shim.request import (
    BackupRequest,
    DeleteRequest,
    RebaseRequest,
    RestoreRequest,
    StatsRequest,
    VerifyRequest,
)

if TYPE_CHECKING:
    from shim.backup import JobObserver

__all__ = [
    "BackupRequest",
    "DeleteRequest",
    "RebaseRequest",
    "Request",
    "RestoreRequest",
    "Result",
    "StatsRequest",
    "VerifyRequest",
    "run",
    "validate",
]


DISK_PATH_MARKERS_ENV = settings.DISK_PATH_MARKERS.name
"""Set to ``true`` for a management server of the seed generation, which strips marker
lines before summing: markers are then printed for stopped-VM backups too."""

Request = Union[
    BackupRequest, DeleteRequest, RebaseRequest, StatsRequest, RestoreRequest, VerifyRequest
]


@dataclass(frozen=True)
class Result:
    """An operation's stdout (exactly what the drop-in prints) and its structured facts."""

    stdout: str
    outcome: BackupOutcome | StorageStats | RestoreOutcome | None = None


def validate(request: Request) -> None:
    """Refuse a malformed request before anything is touched (raises UsageError/InputError)."""
    request.validate()


def run(
    request: Request, *, on_job: JobObserver | None = None, cancel: CancelToken | None = None
) -> Result:
    """Run one operation to completion; raise a ShimError on failure.

    ``cancel`` (the socket service's deadline and abort) stops the operation at its next
    safe point: the program it waits for is killed and it fails, after its usual cleanup.

    Each operation's module is imported when it runs: the drop-in starts on every agent
    call, and a delete has no use for libvirt. An OSError escaping an operation (the NAS
    vanished or failed under it) becomes a one-line failure like any other; the operation
    has cleaned up what it could on its way out.
    """
    validate(request)
    try:
        # A thread-local, not an argument threaded through every module: any program the
        # operation runs (shim.proc) is a place where it may stop.
        with bound(cancel):
            return _run(request, on_job)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise StorageFailed(f"storage error: {exc.strerror or exc}{where}") from exc


def _run(request: Request, on_job: JobObserver | None) -> Result:
    if isinstance(request, BackupRequest):
        from shim.backup import take_backup

        outcome = take_backup(request, on_job=on_job)
        text = contract.backup_stdout(
            outcome,
            disk_paths_given=bool(request.disk_paths),
            markers_with_disk_paths=settings.value(settings.DISK_PATH_MARKERS) == "true",
        )
        return Result(text, outcome)
    if isinstance(request, StatsRequest):
        from shim.stats import storage_stats

        stats = storage_stats(request.repository)
        return Result(
            contract.stats_stdout(stats.mount_point, stats.total_kib, stats.used_kib), stats
        )
    if isinstance(request, DeleteRequest):
        from shim.delete import delete_backup

        delete_backup(request.repository, request.path)
        return Result("")
    if isinstance(request, RebaseRequest):
        from shim.rebase import rebase_backup

        rebase_backup(request.repository, request.target, request.new_backing)
        return Result("")
    if isinstance(request, RestoreRequest):
        from shim.restore import restore_backup

        restored = restore_backup(request)
        return Result(contract.restore_stdout(restored), restored)
    from shim.verify import verify_backup

    report = verify_backup(request.repository, request.path)
    return Result("".join(f"{line}\n" for line in report))
