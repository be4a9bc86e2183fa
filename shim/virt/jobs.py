"""Push backup jobs: begin, await completion by event, read the completed statistics.

Completion is signalled by libvirt's job-completed event; a domain that stops or crashes,
or a connection that closes (libvirtd restarted), ends the wait too. Nothing polls. The
job's files are touched only after :meth:`BackupJob.wait` returns: it waits for libvirt to
finish with the targets before it reads the completed statistics.

A job whose end libvirt never confirmed (libvirtd restarted under it, or the run died) is
marked in the runtime directory; :func:`recover_interrupted_job` clears up after it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from shim.errors import BackupFailed, VirtError
from shim.runtime import JOB_MARKERS
from shim.versions import PUSH_CAP_REFUSED_BY
from shim.virt.connection import is_alive
from shim.virt.host import libvirt_version, qemu_monitor

log = logging.getLogger(__name__)

_ABORT_GRACE_SECONDS = 60


@dataclass(frozen=True)
class JobStats:
    """libvirt's typed job parameters (``time_elapsed``, ``disk_processed``, ...)."""

    params: dict[str, Any]

    @property
    def elapsed_ms(self) -> int:
        """Wall time of the job in milliseconds, as libvirt measured it."""
        return int(self.params.get("time_elapsed", 0))

    @property
    def processed(self) -> int:
        """Bytes copied so far."""
        return int(self.params.get("disk_processed", 0))

    @property
    def total(self) -> int:
        """Bytes the job will copy in all."""
        return int(self.params.get("disk_total", 0))


class JobMarker:
    """Present while a backup job of the VM runs and libvirt has not confirmed its end.

    Why it exists: libvirt 9.0 forgets a backup's block jobs that end while libvirtd is
    down, and with them the temporary bitmaps (``backup-<target>``) it merged into QEMU for
    an incremental; the next incremental backupBegin then fails on the leftover bitmap and
    libvirtd crashes in its error path (measured on this stack). A marker left behind tells
    the next run that such leftovers may exist; a clean run never needs to look.
    """

    def __init__(self, vm: str, directory: Path | None = None) -> None:
        self.path = (directory or JOB_MARKERS) / vm

    @property
    def present(self) -> bool:
        """Whether a job of this VM began and its end was never confirmed."""
        return self.path.exists()

    def set(self) -> None:
        """Record that a job is about to begin."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.write_text(f"{os.getpid()}\n", encoding="ascii")

    def clear(self) -> None:
        """Record that libvirt has confirmed the job's end (or that its leftovers are gone)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class _Outcome:
    finished: threading.Event = field(default_factory=threading.Event)
    params: dict[str, Any] | None = None
    ended_by: str | None = None
    io_error_pause: bool = False
    paused: threading.Event = field(default_factory=threading.Event)


class BackupJob:
    """One backup job of one domain: push, from :meth:`begin` to :meth:`wait`; pull, from
    :meth:`begin` to :meth:`end` once its client has copied the export.

    Use it as a context manager: leaving the block unregisters the event callbacks, and
    leaving it with an exception while the job still runs aborts the job first.
    """

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain) -> None:
        self.conn = conn
        self.dom = dom
        self._marker = JobMarker(dom.name())
        self._outcome = _Outcome()
        self._abort_requested = False
        self._callbacks: list[int] = []
        self._close_registered = False
        self._running = False
        self._copied: tuple[int, int] | None = None

    # -- events -----------------------------------------------------------------------------
    def _on_job_completed(self, _c: object, _d: object, params: dict[str, Any], _o: object) -> None:
        if params.get("operation") not in (None, libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP):
            return
        self._outcome.params = dict(params)
        self._finish("job-completed")

    def _on_lifecycle(self, _c: object, _d: object, event: int, detail: int, _o: object) -> None:
        if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED):
            self._finish("domain-stopped")
        elif (
            event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED
            and detail == libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR
        ):
            # Push mode copies before a guest write: a failing target can pause the guest
            # (pull mode: a full scratch directory).
            self._outcome.io_error_pause = True
            self._outcome.paused.set()

    def _on_close(self, _conn: object, reason: int, _o: object) -> None:
        self._finish(f"connection-closed:{reason}")

    def _finish(self, why: str) -> None:
        if self._outcome.ended_by is None:
            self._outcome.ended_by = why
        self._outcome.finished.set()

    def __enter__(self) -> BackupJob:
        self._callbacks.append(
            self.conn.domainEventRegisterAny(
                self.dom, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job_completed, None
            )
        )
        self._callbacks.append(
            self.conn.domainEventRegisterAny(
                self.dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            )
        )
        try:
            self.conn.registerCloseCallback(self._on_close, None)
            self._close_registered = True
        except libvirt.libvirtError:
            log.debug("close callback already registered on this connection")
        return self

    def __exit__(self, exc_type: object, exc: object, _tb: object) -> None:
        try:
            if exc is not None and self._running:
                self.abort()
        finally:
            for callback_id in self._callbacks:
                with contextlib.suppress(libvirt.libvirtError):
                    self.conn.domainEventDeregisterAny(callback_id)
            if self._close_registered:
                with contextlib.suppress(libvirt.libvirtError):
                    self.conn.unregisterCloseCallback()

    # -- the job ----------------------------------------------------------------------------
    @property
    def io_error_pause(self) -> bool:
        """Whether the guest was paused by an I/O error while this job ran."""
        return self._outcome.io_error_pause

    def begin(self, backup_xml: str, checkpoint_xml: str | None = None, flags: int = 0) -> None:
        """Start the push backup (and create the checkpoint with it, atomically).

        An :meth:`abort` that came first (from another thread) stops it here, or at once
        after it started if it came while the job was starting.
        """
        if self._abort_requested:
            raise BackupFailed("the backup was aborted before it began")
        log.debug("backupBegin flags=%d\n%s\n%s", flags, backup_xml, checkpoint_xml or "")
        self._marker.set()
        try:
            self.dom.backupBegin(backup_xml, checkpoint_xml, flags)
        except libvirt.libvirtError as exc:
            if is_alive(self.conn):
                self._marker.clear()  # libvirt rolled the start back itself
            raise BackupFailed(f"backup could not start: {exc.get_error_message()}") from None
        self._running = True
        if self._abort_requested:
            self.abort()

    def cap_rate(self, targets: Sequence[str], rate: int) -> None:
        """Cap each disk's copy at ``rate`` bytes per second, once the job runs (libvirt's
        backup API takes no speed; before :data:`~shim.versions.PUSH_CAP_REFUSED_BY`, its
        block job API reaches the backup's own jobs). What was in flight before it applies,
        up to 64 MiB, went at full speed. A copy left uncapped is logged, never failed."""
        version = libvirt_version(self.conn)
        if version >= PUSH_CAP_REFUSED_BY:
            log.warning(
                "libvirt %d.%d refuses a speed for a push backup's jobs: this backup is not "
                "capped (pull mode caps it)", *version[:2],
            )  # fmt: skip
            return
        flags = libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES
        for target in targets:
            try:
                self.dom.blockJobSetSpeed(target, rate, flags)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                    # Its job ended already (nothing to copy: QEMU 8.2 ends it in begin).
                    log.debug("no job to cap on %s: %s", target, exc.get_error_message())
                    continue
                log.warning(
                    "the copy of %s runs without its cap: %s", target, exc.get_error_message()
                )

    def wait(self) -> JobStats:
        """Block until the job ends; return the completed statistics or raise BackupFailed."""
        self._outcome.finished.wait()
        self._running = False
        self._confirm_end()
        outcome = self._outcome
        if outcome.params is None:
            raise BackupFailed(_ended_reason(outcome.ended_by))
        if not outcome.params.get("success", True):
            # A failed job detaches its targets too: nothing may touch the domain's block
            # nodes (a checkpoint deleted, say) until that has ended.
            with contextlib.suppress(libvirt.libvirtError):
                self._barrier()
            if outcome.params.get("errmsg"):
                raise BackupFailed(f"backup job failed: {outcome.params['errmsg']}")
            if not is_active(self.dom):
                raise BackupFailed(_ended_reason("domain-stopped"))
            raise BackupFailed("the backup job failed")
        try:
            self._barrier()
            params = self.dom.jobStats(
                libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
            )
        except libvirt.libvirtError as exc:
            raise BackupFailed(
                f"cannot read the completed job: {exc.get_error_message()}"
            ) from None
        return JobStats({**outcome.params, **params})

    def wait_io_error_pause(self, timeout: float) -> bool:
        """Whether the guest has been paused by an I/O error, waiting up to ``timeout``."""
        return self._outcome.paused.wait(timeout)

    def ended_early(self, wait: float = 0.0) -> str | None:
        """Why the job ended under its client (a pull-mode job ends only when told to:
        the VM stopped, someone aborted it, libvirt went away); None while it runs, after
        ``wait`` seconds for libvirt's event (a copy may fail first, when the VM dies)."""
        if not self._outcome.finished.wait(wait):
            # No event (yet): libvirt itself says whether the VM is gone.
            return _ended_reason("domain-stopped") if _gone(self.dom) else None
        if self._outcome.params is not None:
            errmsg = self._outcome.params.get("errmsg")
            if errmsg:
                return f"backup job failed: {errmsg}"
            if _gone(self.dom):
                return _ended_reason("domain-stopped")
            return "the backup job was aborted"
        return _ended_reason(self._outcome.ended_by)

    def end(self) -> JobStats:
        """End a pull-mode job whose client has copied everything (libvirt ends a pull job
        when asked to abort it; its checkpoint stays) and return libvirt's statistics."""
        early = self.ended_early()
        if early is not None:
            raise BackupFailed(early)
        try:
            self.dom.abortJob()
        except libvirt.libvirtError as exc:
            raise BackupFailed(f"cannot end the backup job: {exc.get_error_message()}") from None
        if not self._outcome.finished.wait(_ABORT_GRACE_SECONDS):
            raise BackupFailed(f"libvirt did not end the backup job in {_ABORT_GRACE_SECONDS} s")
        self._running = False
        with contextlib.suppress(libvirt.libvirtError):
            self._barrier()  # the scratch images are closed and removed
        self._confirm_end()
        if self._outcome.params is None:
            raise BackupFailed(_ended_reason(self._outcome.ended_by))
        return JobStats(dict(self._outcome.params))

    def report_progress(self, done: int, total: int) -> None:
        """The copy's own progress, for a job whose copy libvirt does not see (pull mode)."""
        self._copied = (done, total)

    def adopt(self) -> None:
        """Take over a job that already runs (so that :meth:`abort` and :meth:`wait` work)."""
        self._running = True

    def progress(self) -> JobStats:
        """The running job's statistics (bytes processed and total), for progress reports."""
        if self._copied is not None:
            return JobStats({"disk_processed": self._copied[0], "disk_total": self._copied[1]})
        try:
            return JobStats(self.dom.jobStats())
        except libvirt.libvirtError as exc:
            raise VirtError(f"cannot read job statistics: {exc.get_error_message()}") from None

    def abort(self) -> None:
        """Abort the job if it runs and wait (bounded) for libvirt to confirm; before the
        job began, make :meth:`begin` refuse to begin it. Safe from any thread."""
        self._abort_requested = True
        if not self._running:
            return
        log.info("aborting the backup job of %s", self.dom.name())
        try:
            self.dom.abortJob()
        except libvirt.libvirtError as exc:
            log.warning("abortJob: %s", exc.get_error_message())
        if not self._outcome.finished.wait(_ABORT_GRACE_SECONDS):
            log.warning("no job-completed event %d s after the abort", _ABORT_GRACE_SECONDS)
        else:
            with contextlib.suppress(libvirt.libvirtError):
                self._barrier()
            self._confirm_end()
        self._running = False

    def _confirm_end(self) -> None:
        # libvirt's job-completed event comes after it removed its temporary bitmaps; a
        # stopped QEMU took them along. A lost connection confirms nothing.
        if self._outcome.params is not None or self._outcome.ended_by == "domain-stopped":
            self._marker.clear()

    def _barrier(self) -> None:
        # The job-completed event is emitted while libvirt still holds the domain's job to
        # detach the targets (measured: ~1 s for a 1 GiB target). Asking for the current job
        # waits for that job to end, i.e. until QEMU has released the files. The completed
        # statistics alone are answered at once and are no barrier.
        self.dom.jobStats()


JobObserver = Callable[[BackupJob], None]
"""Called with the libvirt job once it exists (progress, abort)."""


def recover_interrupted_job(
    conn: libvirt.virConnect, dom: libvirt.virDomain, targets: Iterable[str]
) -> None:
    """Clear up after a backup job of this VM that no living run waits for: abort it if it
    still runs and, when libvirt never confirmed its end, remove the temporary bitmaps it
    may have left in QEMU. Call only while holding the VM's lock; VirtError if it cannot.
    """
    marker = JobMarker(dom.name())
    interrupted = marker.present  # read first: the abort below confirms an end of its own
    abort_stale_job(conn, dom)
    if not interrupted:
        return
    if is_active(dom):
        removed = drop_orphan_job_bitmaps(dom, targets)
        if removed:
            log.warning(
                "removed temporary bitmaps libvirt left from an interrupted backup job: %s",
                ", ".join(removed),
            )
    marker.clear()


def drop_orphan_job_bitmaps(dom: libvirt.virDomain, targets: Iterable[str]) -> list[str]:
    """Remove libvirt's temporary backup bitmaps (``backup-<target>``, never persistent)
    from the running QEMU; only while no backup job runs. Returns what was removed.

    libvirt has no API for this: it goes through QEMU's monitor, which taints the domain,
    hence only after an interrupted job.
    """
    names = {f"backup-{target}" for target in targets}
    removed = []
    for node in qemu_monitor(dom, "query-named-block-nodes", flat=True):
        for bitmap in node.get("dirty-bitmaps", []):
            if bitmap.get("name") in names and not bitmap.get("persistent"):
                if bitmap.get("busy"):
                    raise VirtError(f"bitmap {bitmap['name']} is in use by a block job")
                where = {"node": node["node-name"], "name": bitmap["name"]}
                qemu_monitor(dom, "block-dirty-bitmap-remove", **where)
                removed.append(f"{bitmap['name']} ({node['node-name']})")
    return removed


def is_active(dom: libvirt.virDomain) -> bool:
    """Whether the domain still runs (False once a transient domain is gone)."""
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def _gone(dom: libvirt.virDomain) -> bool:
    """Whether libvirt answers that the domain no longer runs (an error other than "no
    such domain", a lost connection say, says nothing)."""
    try:
        return not dom.isActive()
    except libvirt.libvirtError as exc:
        return bool(exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN)


def _ended_reason(ended_by: str | None) -> str:
    if ended_by == "domain-stopped":
        return "the VM stopped during the backup"
    if ended_by and ended_by.startswith("connection-closed"):
        return "the connection to libvirt was lost during the backup"
    return "the backup job ended without a result"


def job_running(dom: libvirt.virDomain) -> bool:
    """Whether libvirt reports a job of any kind on the domain (a monitor query at most
    about the job itself, never about the block nodes)."""
    try:
        current = dom.jobStats()
    except libvirt.libvirtError as exc:
        raise VirtError(f"cannot read the VM's jobs: {exc.get_error_message()}") from None
    return bool(current.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE)


def abort_stale_job(conn: libvirt.virConnect, dom: libvirt.virDomain) -> bool:
    """Abort a backup job nobody is waiting for (its run died); True if there was one.

    Call only while holding the VM's lock: then no living run of the shim owns the job. A
    job of another kind (a migration, say) is not ours to abort: VirtError.
    """
    try:
        current = dom.jobStats()
    except libvirt.libvirtError as exc:
        raise VirtError(f"cannot read the VM's jobs: {exc.get_error_message()}") from None
    if current.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return False
    if current.get("operation") != libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP:
        raise VirtError(f"the VM has another job running (operation {current.get('operation')})")
    log.warning("aborting a backup job left running by a run that died")
    with BackupJob(conn, dom) as job:
        job.adopt()
        job.abort()
    return True
