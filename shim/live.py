"""Backups of a running VM: libvirt's backup job, in push mode (QEMU writes the targets on
the NAS) or pull mode (the shim copies from libvirt's NBD export through a local scratch:
:mod:`shim.pull`).

Both share everything but the transfer: the checks before anything changes, the plan, the
checkpoint, quiescing, the job, and the cleanup after a failure: the job aborted, the new
checkpoint deleted, a VM this run got paused resumed, the partial directory removed.
Earlier backups are only ever read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path

import libvirt
from lxml import etree

from shim.backupdir import PARTIAL_SUFFIX
from shim.chain import Parents
from shim.compat import strict_zip
from shim.contract import BackupOutcome
from shim.errors import BackupFailed, CleanupFailed, CommandFailed, ShimError, VirtError
from shim.method import BackupMethod
from shim.nas import MountSession
from shim.plan import BackupPlan, plan_backup
from shim.pull import SCRATCH_SUFFIX, DiskCopy, ExportCopier, Scratch, dirty_extents
from shim.request import BackupRequest, check_volume_id_count
from shim.storage_daemon import QmpError
from shim.targets import Targets
from shim.virt import checkpoints, host
from shim.virt.connection import is_alive, reconnect
from shim.virt.disks import DomainDisk, parse_disks
from shim.virt.jobs import (
    BackupJob,
    JobObserver,
    JobStats,
    is_active,
    job_running,
    recover_interrupted_job,
)

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 60
"""How long a failed backup waits for a restarting libvirtd before it gives up cleaning."""
RELEASE_GRACE_SECONDS = 5.0
"""How long a failed job's targets may stay open in QEMU before they are taken for stuck
(libvirt closes an aborted job's targets a moment after the abort returns)."""
_GUARD_POLL_SECONDS = 0.02
"""How often pull mode's pause guard looks whether the copy is over (the backup's end waits
for it)."""
_JOB_END_EVENT_SECONDS = 2.0
"""How long a failed copy waits for libvirt to say the job ended (the VM died, say): the
copy sees the export vanish first."""


def named_disks(disks: list[DomainDisk], volume_ids: Sequence[str]) -> list[DomainDisk]:
    """``disks`` with the ids ``-u`` gives (disk order) as their volume ids, which name
    their files and find their parents; unchanged without ``-u``. A count that does not
    match the domain's disks is refused here, before anything is written or created."""
    if not volume_ids:
        return disks
    check_volume_id_count(volume_ids, len(disks), "disks in the domain")
    return [
        dataclasses.replace(disk, volume_id=volume_id)
        for disk, volume_id in strict_zip(disks, volume_ids)
    ]


class LiveBackup(BackupMethod):
    """A backup of a running VM by a libvirt backup job; the subclasses move the data."""

    def __init__(
        self,
        conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        request: BackupRequest,
        session: MountSession,
        targets: Targets,
        *,
        on_job: JobObserver | None = None,
    ) -> None:
        super().__init__(request, session, targets)
        self.conn = conn
        self.dom = dom
        self.on_job = on_job
        self.headers: dict[str, list[str]] = {}
        self.paused_before = False

    # -- what push and pull mode do differently ---------------------------------------------
    @abstractmethod
    def _job_xml(self, disks: list[DomainDisk], plan: BackupPlan) -> etree._Element:
        """The ``<domainbackup>`` element, each disk with its target or scratch."""

    @abstractmethod
    def _transfer(self, job: BackupJob, disks: list[DomainDisk], plan: BackupPlan) -> JobStats:
        """Move the data once the job has begun; return the job's final statistics."""

    mode = ""
    """How the data moves, for the log."""
    begin_flags = 0
    """libvirt's backupBegin flags."""

    def _prepare(self) -> None:
        """Get ready for the job, once no job of a dead run is left."""

    def _finish(self) -> None:
        """Remove what the method set up, on every path."""

    def run(self) -> BackupOutcome:
        """Check, plan, back up, and publish the directory; clean up after any failure."""
        disks = named_disks(parse_disks(self.dom.XMLDesc()), self.request.volume_ids)
        if not disks:
            raise BackupFailed(f"VM {self.request.vm} has no disks")
        stuck = host.files_held_open(self.dom, PARTIAL_SUFFIX + "/")
        if stuck and not job_running(self.dom):
            # A target held with no job to hold it (a run killed mid-job leaves a job, which
            # recover_interrupted_job aborts): see _stuck_target_problem. Checked before
            # anything asks QEMU about its block nodes.
            raise BackupFailed(
                f"QEMU of {self.request.vm} still holds {stuck[0]} of an earlier failed backup "
                "open; stop and start the VM before backing it up (a backup now would crash it)"
            )
        # Every check of the request against the repository comes before anything changes
        # in libvirt: a refused request (a retry of a backup that succeeded) must leave the
        # VM's checkpoint, the next backup's parent, where it is.
        self.directory.check()
        parents = self.read_parents(disks)
        recover_interrupted_job(self.conn, self.dom, [d.target for d in disks])
        self._prepare()
        self.paused_before = host.is_paused(self.dom)
        # The images' bitmap directories, read once: kept up to date as bitmaps are removed
        # (bitmaps this QEMU creates reach the header only when it stops).
        self.headers = checkpoints.header_bitmaps(disks)
        job: BackupJob | None = None
        plan = BackupPlan()
        try:
            plan = self._plan(disks, parents)
            self.directory.prepare()
            for disk in disks:
                self.sizes[disk.target] = self.dom.blockInfo(disk.target)[0]
                self.create_target(disk, plan)
            with BackupJob(self.conn, self.dom) as job:
                if self.on_job:
                    self.on_job(job)
                self._begin(job, disks, plan)
                stats = self._transfer(job, disks, plan)
            self._resparsify(disks)
            for name, text in host.describe(self.dom).items():
                self.directory.write_file(name, text)
            files = self.publish(disks, plan, bitmap=plan.checkpoint)
        except BaseException as exc:
            self._cleanup(disks, plan, job, exc)
            raise
        finally:
            self._finish()
        self._housekeep(disks, plan)
        outcome = self.directory.outcome(
            files,
            bitmap_created=plan.checkpoint,
            incremental_fallback=plan.fallback,
            job_stats=stats.params,
        )
        log.info(
            "backup of %s done: %s, %d bytes, %d ms",
            self.request.vm,
            plan.describe(),
            outcome.size,
            stats.elapsed_ms,
        )
        return outcome

    # -- steps ------------------------------------------------------------------------------
    def _plan(self, disks: list[DomainDisk], parents: Parents | None) -> BackupPlan:
        plan = plan_backup(
            self.request,
            disks,
            parents,
            lambda parent, files: self._redefine_parent(parent, files, disks),
        )
        if plan.checkpoint:
            # A retry may reuse the name of a checkpoint a failed run could not remove.
            problems = checkpoints.discard(self.dom, disks, plan.checkpoint, self.headers)
            if problems:
                raise BackupFailed(
                    f"stale checkpoint {plan.checkpoint} cannot be removed: {problems[0]}"
                )
        return plan

    def _redefine_parent(
        self, parent: str, files: dict[str, Path], disks: list[DomainDisk]
    ) -> str | None:
        """Always redefine, even when libvirt lists it: a checkpoint that survived a QEMU
        crash in libvirt's metadata has inconsistent bitmaps; validation says so. Its
        carriers are the disks with a parent file (all of them carry bitmaps)."""
        targets = [d.target for d in disks]
        try:
            checkpoints.redefine(self.dom, parent, files, targets, validate=True)
        except VirtError as exc:
            return f"parent checkpoint {parent}: {exc}"
        return None

    def _begin(self, job: BackupJob, disks: list[DomainDisk], plan: BackupPlan) -> None:
        checkpoint_xml = None
        if plan.checkpoint:
            # libvirt refuses the whole checkpoint when one disk named as a bitmap carrier
            # cannot carry one: the others take checkpoint='no' (and backupmode='full').
            carriers = [d.target for d in disks if d.carries_bitmaps]
            targets = [d.target for d in disks]
            checkpoint_xml = checkpoints.checkpoint_xml(plan.checkpoint, carriers, targets)
        # Thawed on every path: a signal (the agent's timeout) may land while the agent is
        # freezing, after it froze and before freeze() returned; a guest's qemu-ga never
        # thaws on its own. Only an agent that answered it could not freeze is left alone.
        maybe_frozen = False
        try:
            if self.request.quiesce:
                maybe_frozen = True
                maybe_frozen = host.freeze(self.dom)
            job.begin(
                etree.tostring(self._job_xml(disks, plan), encoding="unicode"),
                checkpoint_xml,
                self.begin_flags,
            )
        finally:
            if maybe_frozen:
                host.thaw(self.dom)
        log.info(
            "backup job of %s started (%s, %s, %s)",
            self.request.vm, plan.describe(), self.mode, self.targets.describe(),
        )  # fmt: skip

    def _resparsify(self, disks: list[DomainDisk]) -> None:
        """Rewrite the full copy of each raw block device sparse, as upstream does.

        QEMU sees a block device (LINSTOR/DRBD) as all data, so its backup holds every
        zero it read; ``qemu-img convert`` skips zero clusters and keeps the data
        identical (``SourceKind.resparsify``).
        """
        for disk in disks:
            if not disk.kind.resparsify:  # never a parent's: copied in full every time
                continue
            target = self.directory.work / disk.backup_name
            sparse = target.with_name(target.name + ".sparse")
            self.convert_into(target, sparse)
            os.replace(sparse, target)
            log.info("re-sparsified the copy of %s", disk.source)

    def _housekeep(self, disks: list[DomainDisk], plan: BackupPlan) -> None:
        """Retire every checkpoint but the new one. The backup is published: a failure here
        is a warning, never a failed backup, and the next run's housekeeping finishes it."""
        if not plan.checkpoint:
            return
        try:
            warnings = checkpoints.retire_all_except(self.dom, disks, plan.checkpoint, self.headers)
        except (ShimError, libvirt.libvirtError) as exc:
            log.warning("housekeeping: %s", exc)
            warnings = [str(exc)]
        if warnings:
            log.warning(
                "the backup succeeded; stale checkpoints may remain: the next backup retires them"
            )

    def _cleanup(
        self, disks: list[DomainDisk], plan: BackupPlan, job: BackupJob | None, error: BaseException
    ) -> None:
        log.error("backup of %s failed: %s", self.request.vm, error)
        problems: list[str] = []
        stuck: list[str] = []
        if self._reconnect_if_lost(problems):
            try:
                # After a lost connection the job may still run (nobody will wait for it),
                # or have left libvirt's temporary bitmaps behind.
                recover_interrupted_job(self.conn, self.dom, [d.target for d in disks])
            except VirtError as exc:
                problems.append(str(exc))
            if (
                not self.paused_before
                and host.is_paused(self.dom)
                and ((job is not None and job.io_error_pause) or host.paused_by_io_error(self.dom))
            ):
                # Push mode copies before a guest write: a failing NAS pauses the guest.
                try:
                    self.dom.resume()
                    log.info("resumed %s, paused by an I/O error of the backup", self.request.vm)
                except libvirt.libvirtError as exc:
                    problems.append(f"cannot resume the VM: {exc.get_error_message()}")
            stuck = host.files_still_held(
                self.dom, f"{self.directory.work}/", RELEASE_GRACE_SECONDS
            )
            if stuck:
                problems.append(self._stuck_target_problem(stuck, plan.checkpoint))
            elif plan.checkpoint:
                problems += self._delete_orphan_checkpoint(plan.checkpoint)
        try:
            self.directory.discard()
        except OSError as exc:
            if stuck:
                problems.append(f"{self.directory.work} stays until QEMU lets go of it")
            else:
                problems.append(f"cannot remove {self.directory.work}: {exc.strerror}")
        if problems:
            for problem in problems:
                log.error("cleanup: %s", problem)
            raise CleanupFailed("; ".join(problems)) from (
                error if isinstance(error, ShimError) else None
            )

    def _stuck_target_problem(self, stuck: list[str], checkpoint: str | None) -> str:
        """What to tell the operator when QEMU kept a target open after the job ended.

        Measured with QEMU 7.2 (Debian 12): when a guest write fails in the job's
        copy-before-write filter (the NAS is full) and the job fails, about one time in ten
        the filter stays in QEMU's block graph without its source, holding the target open
        (libvirt's blockdev-del of the target answers "in use"). The next command that lists
        the block nodes (libvirt's checkpoint delete, backupBegin, block stats) makes QEMU
        dereference the missing source and die. So nothing here asks QEMU anything more:
        the VM stays up, its checkpoint stays, and the operator restarts the VM (a new QEMU)
        when convenient; the next backup refuses to start until then.
        """
        names = ", ".join(Path(path).name for path in stuck)
        left = f"; its checkpoint {checkpoint} is left for the next backup" if checkpoint else ""
        return (
            f"QEMU still holds {names} open after the failed job (QEMU leaves the job's "
            "copy-before-write filter behind when a guest write failed in it): stop and "
            f"start the VM before its next backup, as listing its disks now would crash it{left}"
        )

    def _reconnect_if_lost(self, problems: list[str]) -> bool:
        """Make ``conn`` and ``dom`` usable again after libvirtd restarted; False when the
        domain is gone (a transient domain that stopped takes its checkpoints with it)."""
        if not is_alive(self.conn):
            log.warning("the connection to libvirt was lost: reconnecting to clean up")
            try:
                conn = reconnect(RECONNECT_SECONDS)
            except VirtError as exc:
                problems.append(f"cannot reach libvirt again to clean up: {exc}")
                return False
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.close()
            self.conn = conn
            try:
                self.dom = conn.lookupByUUIDString(self.dom.UUIDString())
            except libvirt.libvirtError:
                return False
        return is_active(self.dom)

    def _delete_orphan_checkpoint(self, name: str) -> list[str]:
        # The checkpoint exists from the job's start: it must never become the next parent.
        try:
            names = [c.name for c in checkpoints.listed(self.dom)]
        except VirtError as exc:
            return [f"cannot list the checkpoints: {exc}"]
        if name not in names:
            return []
        try:
            checkpoints.delete(self.dom, name)
            log.info("deleted the new checkpoint %s of the failed backup", name)
        except VirtError as exc:
            try:
                checkpoints.delete(self.dom, name, metadata_only=True)
            except VirtError:
                return [f"cannot delete checkpoint {name}: {exc}"]
        return []


class PushBackup(LiveBackup):
    """QEMU writes each disk's target on the NAS, copying an area before a guest write may
    change it: the simplest path, and the guest's writes wait on the NAS."""

    mode = "push"
    begin_flags = libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL

    def _job_xml(self, disks: list[DomainDisk], plan: BackupPlan) -> etree._Element:
        backup = _domainbackup("push", disks, plan)
        for el, disk in strict_zip(backup.iterfind("disks/disk"), disks):
            etree.SubElement(el, "target", file=str(self.directory.work / disk.backup_name))
            etree.SubElement(el, "driver", type="qcow2")
        return backup

    def _transfer(self, job: BackupJob, disks: list[DomainDisk], plan: BackupPlan) -> JobStats:
        rate = self.targets.share(len(disks))
        if rate is not None:
            job.cap_rate([d.target for d in disks], rate)
        return job.wait()


class PullBackup(LiveBackup):
    """libvirt keeps each disk's view with copy-before-write into a scratch image on local
    storage and exports it over NBD; a storage daemon copies to the NAS at its own pace."""

    mode = "pull"

    def __init__(
        self,
        conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        request: BackupRequest,
        session: MountSession,
        targets: Targets,
        *,
        scratch: Scratch,
        on_job: JobObserver | None = None,
    ) -> None:
        super().__init__(conn, dom, request, session, targets, on_job=on_job)
        self.scratch = scratch
        self.mode = f"pull through {scratch.dir}"

    def _prepare(self) -> None:
        self.scratch.prepare()  # no job runs now: what is there is a dead run's

    def _job_xml(self, disks: list[DomainDisk], plan: BackupPlan) -> etree._Element:
        backup = _domainbackup("pull", disks, plan)
        server = etree.Element("server", transport="unix", socket=str(self.scratch.socket))
        backup.insert(len(backup) - 1, server)  # before <disks>
        for el, disk in strict_zip(backup.iterfind("disks/disk"), disks):
            # libvirt creates it (sparse qcow2) and removes it when the job ends.
            etree.SubElement(el, "scratch", file=str(self.scratch.image(disk.target)))
            etree.SubElement(el, "driver", type="qcow2")
        return backup

    def _transfer(self, job: BackupJob, disks: list[DomainDisk], plan: BackupPlan) -> JobStats:
        """Copy each disk from libvirt's NBD export to its target, then end the job."""
        scratch = self.scratch
        started = time.monotonic()
        exports = _exports(self.dom.backupGetXMLDesc())
        copies = []
        for disk in disks:
            export, bitmap = exports[disk.target]
            incremental = plan.incremental_from is not None and disk.target in plan.parents
            if incremental and not bitmap:
                raise BackupFailed(f"libvirt exports no dirty bitmap for {disk.target}")
            extents = dirty_extents(scratch.socket, export, bitmap) if incremental else None
            target = self.directory.work / disk.backup_name
            selection = scratch.selection(disk.target) if incremental else None
            node = self.target_node(disk, plan, disk.target) if incremental else None
            copies.append(DiskCopy(export, target, extents, selection, node))
        sizes = [self.sizes[d.target] for d in disks]
        copier = ExportCopier(scratch.socket, copies, sizes, self.targets, job.report_progress)
        copied = threading.Event()
        guard = threading.Thread(
            target=self._release_paused_guest, args=(job, copied), name="pause-guard", daemon=True
        )
        guard.start()
        paused = (
            f"the VM was paused by an I/O error during the backup (is the scratch directory "
            f"{scratch.root} full?): the backup was stopped, the VM resumed"
        )
        try:
            copier.run()
        except (QmpError, CommandFailed) as exc:
            # The export vanished under the copy: say why the job ended, if it did.
            if job.io_error_pause:
                raise BackupFailed(paused) from exc
            raise BackupFailed(
                job.ended_early(wait=_JOB_END_EVENT_SECONDS)
                or f"copying from the export failed: {exc}"
            ) from exc
        finally:
            copied.set()
            guard.join()
        if job.io_error_pause:  # the guard ended the job as the copy finished
            raise BackupFailed(paused)
        ended = job.end().params
        if job.io_error_pause and not self.paused_before and host.paused_by_io_error(self.dom):
            # Paused after the copy was complete, before the job ended: the backup is whole,
            # and with the job gone the guest's write no longer meets the scratch.
            self.dom.resume()
            log.warning("resumed %s, paused by a full scratch directory as the job ended",
                        self.request.vm)  # fmt: skip
        # libvirt reports a pull job it was told to end as cancelled; what happened is a
        # completed backup of these bytes, and stdout says so as push mode's does.
        return JobStats({
            "type": libvirt.VIR_DOMAIN_JOB_COMPLETED,
            "operation": libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP,
            "time_elapsed": int((time.monotonic() - started) * 1000),
            "disk_processed": copier.done, "disk_remaining": 0, "disk_total": copier.total,
            **{key: ended[key] for key in ("disk_temp_used", "disk_temp_total") if key in ended},
        })  # fmt: skip

    def _release_paused_guest(self, job: BackupJob, copied: threading.Event) -> None:
        """Pull mode's promise, kept in its own thread: a guest write never waits on the
        backup. libvirt 9.0's scratch node stops the guest's write when it cannot hold the
        old data (its disk is full; QEMU then pauses the VM): the job is ended at once,
        which removes the copy-before-write, and the VM resumed, its write retried."""
        while not copied.is_set():
            if not job.wait_io_error_pause(_GUARD_POLL_SECONDS):
                continue
            log.error("%s paused on an I/O error during a pull backup: ending the job",
                      self.request.vm)  # fmt: skip
            try:
                self.dom.abortJob()
                if not self.paused_before:
                    self.dom.resume()
                    log.info("resumed %s", self.request.vm)
            except libvirt.libvirtError as exc:
                log.warning("releasing the paused VM: %s", exc.get_error_message())
            return

    def _finish(self) -> None:
        # libvirt removed its scratch images with the job; the socket and directory are ours.
        left = [n for n in self.scratch.remove() if n.endswith(SCRATCH_SUFFIX)]
        if left:
            log.warning("removed scratch files libvirt left: %s", ", ".join(left))


def _domainbackup(mode: str, disks: list[DomainDisk], plan: BackupPlan) -> etree._Element:
    """The ``<domainbackup>`` both modes start from: each disk's element, no target yet."""
    backup = etree.Element("domainbackup", mode=mode)
    if plan.incremental_from:
        etree.SubElement(backup, "incremental").text = plan.incremental_from
    disks_el = etree.SubElement(backup, "disks")
    for disk in disks:
        el = etree.SubElement(disks_el, "disk", name=disk.target, backup="yes", type="file")
        if plan.incremental_from and disk.target not in plan.parents:
            el.set("backupmode", "full")
    return backup


def _exports(backup_xml: str) -> dict[str, tuple[str, str]]:
    """Disk target -> (NBD export name, dirty bitmap name or "") of a running pull job."""
    exports = {}
    for disk in etree.fromstring(backup_xml.encode()).iterfind("disks/disk"):
        if disk.get("backup") == "yes":
            name = disk.get("name", "")
            exports[name] = (disk.get("exportname") or name, disk.get("exportbitmap") or "")
    return exports
