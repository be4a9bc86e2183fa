"""The interface every way of taking a backup implements, and the steps they share.

Three methods exist: a live push backup (QEMU writes the targets on the NAS), a live pull
backup (the shim copies from libvirt's export through a local scratch) and an offline
backup of a stopped VM's disks. Each plans with :mod:`shim.plan`, writes its files into
one :class:`~shim.backupdir.BackupDirectory` with the targets created here, as
:attr:`BackupMethod.targets` says (compression, rate), and publishes it here, so a restore,
``verify`` and every CloudStack generation see one format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from shim import qemu_img
from shim.backupdir import BackupDirectory
from shim.chain import Parents, relative_backing
from shim.contract import BackupOutcome
from shim.nas import MountSession
from shim.plan import BackupPlan, read_parents
from shim.request import BackupRequest
from shim.targets import Targets
from shim.virt.disks import DomainDisk


class BackupMethod(ABC):
    """One backup of one VM into the directory ``request.path`` of the mounted repository."""

    offline: bool = False
    """Recorded in the manifest: the disks were copied while the VM was stopped."""

    def __init__(self, request: BackupRequest, session: MountSession, targets: Targets) -> None:
        self.request = request
        self.session = session
        self.directory = BackupDirectory(session, request.path)
        self.sizes: dict[str, int] = {}
        """Disk target -> virtual size, filled before the targets are created."""
        self.targets = targets
        """How every file of this backup is written (:func:`shim.targets.targets_for`);
        each writer asks it."""

    @abstractmethod
    def run(self) -> BackupOutcome:
        """Take the backup and publish it; raise a ShimError after any failure, with this
        run's traces gone (its partial directory, and whatever the method changed)."""

    def read_parents(self, disks: Sequence[DomainDisk]) -> Parents | None:
        """The request's parent files (see :func:`shim.plan.read_parents`)."""
        return read_parents(self.request, self.session, disks)

    def create_target(self, disk: DomainDisk, plan: BackupPlan) -> Path:
        """Create ``disk``'s empty qcow2 in the partial directory, backed by its own parent
        file by a relative path when the plan has one (a valid chain from then on)."""
        target = self.directory.work / disk.backup_name
        size = self.sizes[disk.target]
        parent = plan.parents.get(disk.target)
        options = self.targets.create_options(full=parent is None)
        if parent is None:
            qemu_img.create(target, size, options=options)
        else:
            backing = relative_backing(parent, self.directory.final)
            qemu_img.create(target, size, backing=backing, backing_fmt="qcow2", options=options)
        return target

    def convert_into(self, source: str | Path, target: Path, *, source_fmt: str = "qcow2") -> None:
        """``qemu-img convert`` ``source`` into a new full of this backup, written as
        :attr:`targets` say."""
        qemu_img.convert(
            source,
            target,
            source_fmt=source_fmt,
            create_options=self.targets.create_options(full=True),
            write_options=self.targets.convert_options(),
        )

    def target_node(self, disk: DomainDisk, plan: BackupPlan, node_name: str) -> dict[str, object]:
        """``disk``'s target as a storage daemon opens it: its parent's chain, when it has
        one, given layer by layer with each driver named (never read from the headers), and
        zeroes written kept as zero clusters, never as the parent's data; its file written
        as :attr:`targets` say."""
        chain = plan.parent_chains.get(disk.target)
        target = self.directory.work / disk.backup_name
        return {
            "driver": "qcow2",
            "node-name": node_name,
            "discard": "unmap",
            "detect-zeroes": "unmap",
            "file": self.targets.file_node(str(target)),
            "backing": chain.node_graph(self.directory.vm_dir.path) if chain else None,
        }

    def publish(
        self, disks: Sequence[DomainDisk], plan: BackupPlan, bitmap: str | None
    ) -> list[str]:
        """Publish the directory (manifest last, durable, renamed into place); ``bitmap``
        is the checkpoint the manifest records. Returns the file names, manifest last."""
        return self.directory.publish(
            vm=self.request.vm,
            requested_mode=self.request.effective_mode,
            offline=self.offline,
            checkpoint=plan.checkpoint,
            bitmap=bitmap,
            parents=plan.parents,
            fallback=plan.fallback,
            disks=disks,
            sizes=self.sizes,
        )
