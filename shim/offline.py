"""Backups of a stopped VM, from the disk sources the agent passes with ``-d``.

File and block sources are opened by one qemu-storage-daemon for the whole step: its image
locks make a VM that starts meanwhile fail to get its write lock (it is refused, never
corrupted), and one QMP transaction adds the new bitmap (``--bitmap-new``) and starts every
disk's copy at the same instant. A full copies everything (zeroes become sparse, so raw
DRBD output comes out sparse); an incremental copies only the clusters dirty since the
parent bitmap into a qcow2 backed by that disk's parent file, and then retires the parent
bitmap, so the rotation is atomic. ``rbd:`` sources go through ``qemu-img convert``.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

import libvirt

from shim import qemu_img
from shim.chain import Parents
from shim.contract import BackupOutcome
from shim.errors import BackupFailed, CommandFailed, InputError, VirtError
from shim.method import BackupMethod
from shim.nas import MountSession
from shim.plan import BackupPlan, plan_backup, planned_checkpoint
from shim.request import BackupRequest, check_volume_id_count
from shim.storage_daemon import QmpError, StorageDaemon, node_bitmaps
from shim.targets import Targets
from shim.virt import checkpoints
from shim.virt.disks import (
    BLOCK,
    DATADISK,
    FILE,
    NETWORK,
    ROOT,
    DomainDisk,
    parse_disks,
    volume_id_of,
)

log = logging.getLogger(__name__)


def source_disks(
    paths: Sequence[str],
    volume_ids: Sequence[str] = (),
    declared: Mapping[str, str] | None = None,
) -> list[DomainDisk]:
    """The disks named by ``-d``, in order, with their kind and format, named after
    ``volume_ids`` (``-u``, one per path) when given, else after the sources' basenames.

    No format is ever guessed from bytes the guest controls where it can be known
    otherwise: block devices (LINSTOR/DRBD, CLVM) and ``rbd:`` sources are raw by
    construction and never probed; a file takes the format ``declared`` gives it (the
    domain's own XML, by the file's real path), and only a file libvirt no longer
    describes is probed (CloudStack creates file volumes as qcow2). A raw volume whose
    guest wrote a qcow2 header would otherwise be backed up as that inner image, and
    opened for writing to add the bitmap. A qcow2's backing chain must stay in its own
    directory (CloudStack templates live beside the volumes), so that a qcow2 header the
    probe trusted cannot make the backup read another file of the host.
    """
    if volume_ids:
        check_volume_id_count(volume_ids, len(paths), "disk paths (-d)")
    declared = declared or {}
    disks = []
    for index, source in enumerate(paths):
        role = ROOT if index == 0 else DATADISK
        target = f"disk{index}"
        volume_id = volume_ids[index] if volume_ids else volume_id_of(source)
        if source.startswith("rbd:"):
            disks.append(DomainDisk(target, role, NETWORK.name, source, "raw", volume_id))
            continue
        try:
            mode = os.stat(source).st_mode
        except OSError as exc:
            raise BackupFailed(f"disk {source}: {exc.strerror}") from None
        if stat.S_ISBLK(mode):
            disks.append(DomainDisk(target, role, BLOCK.name, source, "raw", volume_id))
            continue
        if not stat.S_ISREG(mode):
            raise InputError(f"disk {source} is neither a file nor a block device")
        fmt = declared.get(os.path.realpath(source))
        if fmt is None:
            fmt = qemu_img.info(source).format
            log.info("disk %s: no domain describes it, its format (%s) was probed", source, fmt)
        if fmt not in ("qcow2", "raw"):
            raise BackupFailed(f"disk {source}: unsupported format {fmt}")
        if fmt == "qcow2":
            home = Path(os.path.realpath(source)).parent
            for link in qemu_img.chain(source)[1:]:
                if Path(os.path.realpath(link.filename)).parent != home:
                    raise InputError(f"disk {source} has a backing file outside its pool")
        disks.append(DomainDisk(target, role, FILE.name, source, fmt, volume_id))
    return disks


def declared_formats(dom: libvirt.virDomain | None) -> dict[str, str]:
    """The format the domain's (inactive) XML gives each of its file disks, by real path;
    empty when libvirt no longer has the domain or cannot describe it."""
    if dom is None:
        return {}
    try:
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    except libvirt.libvirtError as exc:
        # Undefined meanwhile: the sources are then treated as if libvirt never knew them.
        log.warning("cannot read the XML of the stopped domain: %s", exc.get_error_message())
        return {}
    return {
        os.path.realpath(disk.source): disk.driver_type
        for disk in parse_disks(xml)
        if disk.kind is FILE and disk.source
    }


class OfflineBackup(BackupMethod):
    """A backup of a stopped VM's disks into one backup directory."""

    offline = True

    def __init__(
        self,
        request: BackupRequest,
        session: MountSession,
        targets: Targets,
        dom: libvirt.virDomain | None,
    ) -> None:
        super().__init__(request, session, targets)
        self.dom = dom

    def run(self) -> BackupOutcome:
        """Copy every disk, publish the directory; clean up after any failure."""
        disks = source_disks(
            self.request.disk_paths, self.request.volume_ids, declared_formats(self.dom)
        )
        parents = self.read_parents(disks)  # before anything is written
        self.directory.prepare()
        all_carry = all(d.carries_bitmaps for d in disks)
        try:
            plan = self._copy(disks, parents)
            files = self.publish(disks, plan, bitmap=plan.checkpoint if all_carry else None)
        except BaseException as exc:
            log.error("offline backup of %s failed: %s", self.request.vm, exc)
            self.directory.discard()
            raise
        if plan.checkpoint and self.dom is not None:
            self._forget_libvirt_checkpoints(self.dom)
        outcome = self.directory.outcome(
            files,
            bitmap_created=plan.checkpoint if all_carry else None,
            incremental_fallback=plan.fallback,
        )
        log.info("offline backup of %s done: %d bytes", self.request.vm, outcome.size)
        return outcome

    # -- the copy ---------------------------------------------------------------------------
    def _copy(self, disks: list[DomainDisk], parents: Parents | None) -> BackupPlan:
        request = self.request
        # What QEMU cannot open as a local path is copied by qemu-img from its name.
        local = [d for d in disks if d.kind.host_driver is not None]
        for disk in disks:
            if disk.kind.host_driver is None:
                self._convert(disk)
        if not local:
            # No disk carries a bitmap: the planner never asks about the parent.
            return plan_backup(request, disks, parents, lambda parent, files: None)
        # Sizes first: once the daemon holds the images, even qemu-img info is locked out.
        sizes = self.sizes
        sizes.update(
            {d.target: qemu_img.info(d.source, fmt=d.driver_type).virtual_size for d in local}
        )
        damaged = _damaged_images(local) if parents is not None else {}
        blockdevs = []
        for i, disk in enumerate(local):
            driver = disk.kind.host_driver
            writable = planned_checkpoint(request) is not None and disk.carries_bitmaps
            ro = "" if writable else ",read-only=on"
            source = disk.source.replace(",", ",,")
            blockdevs += [
                f"driver={driver},filename={source},node-name=src{i}-file,locking=on{ro}",
                f"driver={disk.driver_type},file=src{i}-file,node-name=src{i}{ro}",
            ]
        try:
            with StorageDaemon(blockdevs, self.targets.daemon_objects) as daemon:
                return self._copy_in(daemon, disks, local, parents, damaged)
        except CommandFailed as exc:
            if "lock" in exc.stderr:
                raise BackupFailed(
                    f"the disks of VM {request.vm} are in use (has it started?): {exc}"
                ) from None
            raise

    def _copy_in(
        self,
        daemon: StorageDaemon,
        disks: list[DomainDisk],
        local: list[DomainDisk],
        parents: Parents | None,
        damaged: Mapping[str, str],
    ) -> BackupPlan:
        request = self.request
        nodes = {d.target: f"src{i}" for i, d in enumerate(local)}
        plan = plan_backup(
            request,
            disks,
            parents,
            lambda parent, files: self._bitmap_problem(
                daemon, disks, nodes, parent, files, damaged=damaged
            ),
        )
        actions = []
        for disk in local:
            actions += self._prepare_target(daemon, disk, nodes[disk.target], plan)
        carriers = [nodes[d.target] for d in local if plan.checkpoint and d.carries_bitmaps]
        daemon.command("transaction", actions=actions)
        log.info(
            "offline copy of %d disk(s) of %s started (%s)",
            len(local), request.vm, self.targets.describe(),
        )  # fmt: skip
        try:
            daemon.wait_jobs([f"{nodes[d.target]}-job" for d in local])
        except BaseException:
            # The new bitmap must not survive a failed or interrupted copy (the daemon stores
            # bitmaps as it quits): the parent stays the parent.
            for node in carriers:
                self._remove_bitmap(daemon, node, str(plan.checkpoint))
            raise
        for disk in local:
            daemon.command("blockdev-del", **{"node-name": f"{nodes[disk.target]}-tgt"})
        for node in carriers:
            # One bitmap per disk after a success: the one just created.
            for name in node_bitmaps(daemon, node):
                if name != plan.checkpoint:
                    self._remove_bitmap(daemon, node, name)
        return plan

    def _prepare_target(
        self, daemon: StorageDaemon, disk: DomainDisk, node: str, plan: BackupPlan
    ) -> list[dict[str, object]]:
        """Create and attach ``disk``'s target; return its transaction actions."""
        self.create_target(disk, plan)
        # Zeroes written to the target become sparse (re-sparsifies raw DRBD output); with
        # its backing open, a zero cluster reads as zero, never as parent data.
        daemon.command("blockdev-add", **self.target_node(disk, plan, f"{node}-tgt"))
        actions: list[dict[str, object]] = []
        if plan.checkpoint and disk.carries_bitmaps:
            bitmap = {"node": node, "name": plan.checkpoint, "persistent": True}
            actions.append({"type": "block-dirty-bitmap-add", "data": bitmap})
        backup: dict[str, object] = {
            "device": node,
            "target": f"{node}-tgt",
            "job-id": f"{node}-job",
            **self.targets.job_options,
        }
        if disk.target in plan.parents:
            backup.update(sync="incremental", bitmap=plan.incremental_from)
        else:
            backup["sync"] = "full"
        actions.append({"type": "blockdev-backup", "data": backup})
        return actions

    @staticmethod
    def _bitmap_problem(
        daemon: StorageDaemon,
        disks: list[DomainDisk],
        nodes: dict[str, str],
        parent_bitmap: str,
        files: dict[str, Path],
        *,
        damaged: Mapping[str, str],
    ) -> str | None:
        """Why the images cannot serve ``parent_bitmap`` as the parent (None: they can)."""
        for disk in disks:
            if disk.target not in files:
                continue  # attached since the parent, or no bitmaps: copied full
            if disk.target in damaged:
                return damaged[disk.target]
            bitmaps = node_bitmaps(daemon, nodes[disk.target])
            if parent_bitmap not in bitmaps:
                return f"{disk.source} has no bitmap {parent_bitmap}"
            if not bitmaps[parent_bitmap]:
                return f"bitmap {parent_bitmap} of {disk.source} is inconsistent"
        return None

    @staticmethod
    def _remove_bitmap(daemon: StorageDaemon, node: str, name: str) -> None:
        try:
            daemon.command("block-dirty-bitmap-remove", node=node, name=name)
        except QmpError as exc:
            log.warning("cannot remove bitmap %s from %s: %s", name, node, exc)

    def _convert(self, disk: DomainDisk) -> None:
        # rbd: no image lock to hold and no bitmap to keep; qemu-img reads it as raw.
        target = self.directory.work / disk.backup_name
        self.convert_into(disk.source, target, source_fmt="raw")
        self.sizes[disk.target] = qemu_img.info(target).virtual_size

    def _forget_libvirt_checkpoints(self, dom: libvirt.virDomain) -> None:
        # A defined (stopped) domain's checkpoint metadata no longer matches its bitmaps;
        # the next live backup redefines the checkpoint it needs from the bitmap.
        try:
            for checkpoint in checkpoints.listed(dom):
                checkpoints.delete(dom, checkpoint.name, metadata_only=True)
        except VirtError as exc:  # housekeeping never fails a published backup
            log.warning("cannot clear the checkpoint metadata of %s: %s", self.request.vm, exc)


def _damaged_images(disks: Sequence[DomainDisk]) -> dict[str, str]:
    """Disk target -> why its image's bitmaps cannot be trusted, for the stopped disks
    that carry bitmaps.

    Only an image ``qemu-img check`` finds sound is trusted with an incremental: QEMU reads
    a torn bitmap directory's table past the end of the file as zeroes, an empty bitmap
    that would silently drop every change since the parent (leaked clusters are harmless
    and do not count)."""
    damaged = {}
    for disk in disks:
        if not disk.carries_bitmaps:
            continue
        try:
            result = qemu_img.check(disk.source, fmt=disk.driver_type, chain=False)
        except CommandFailed as exc:
            damaged[disk.target] = f"{disk.source} cannot be checked: {exc}"
            continue
        if result.corruptions or result.check_errors:
            damaged[disk.target] = (
                f"{disk.source} fails qemu-img check ({result.corruptions} corruptions, "
                f"{result.check_errors} errors): its bitmaps are not trusted"
            )
    return damaged
