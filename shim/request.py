"""The backup request: what a TakeBackupCommand asks, and the checks the Java wrapper makes.

Shared by the live and the offline backup and by every entry point; validation touches
nothing and raises the Java wrapper's own messages where it has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from shim.errors import InputError, UsageError
from shim.lock import validate_vm_name
from shim.nas import Repository, validate_relative
from shim.targets import parse_bandwidth

FULL = "full"
INCREMENTAL = "incremental"
LEGACY_FULL = "legacy-full"
MODES = (FULL, INCREMENTAL, LEGACY_FULL)


@dataclass(frozen=True)
class BackupRequest:
    """A TakeBackupCommand, as the drop-in's argv or the socket's JSON carries it."""

    vm: str
    repository: Repository
    path: str
    disk_paths: Sequence[str] = ()
    quiesce: bool = False
    mode: str | None = None
    bitmap_new: str | None = None
    bitmap_parent: str | None = None
    parent_paths: Sequence[str] = ()
    parent_path: str | None = None
    volume_ids: Sequence[str] = ()
    """The downstream generation's ``-u``: the ids that name the disks' files, in disk
    order, in place of the sources' basenames (empty: the basenames)."""
    scratch_dir: str | None = None
    """``-S``: a local directory for pull mode's scratch images (None: the host setting,
    :data:`shim.pull.SCRATCH_ENV`; neither: the method's rule, :mod:`shim.backup`)."""
    compress: bool | None = None
    """``-c``: compressed qcow2 files (None: the host setting, :mod:`shim.targets`)."""
    bandwidth_mib: int | None = None
    """``-b``: the backup's cap in MiB/s, 0 for none (None: the host setting)."""

    @property
    def effective_mode(self) -> str:
        """``full``, ``incremental`` or ``legacy-full`` (what an empty mode means)."""
        return self.mode or LEGACY_FULL

    def validate(self) -> None:
        """The Java wrapper's checks, with its messages, before anything is touched."""
        if self.mode and self.mode not in MODES:
            raise UsageError(f"Unknown backup mode: {self.mode}")
        if self.mode == INCREMENTAL:
            if not self.bitmap_new:
                raise UsageError("incremental mode requires bitmapNew")
            if not self.bitmap_parent:
                raise UsageError("incremental mode requires bitmapParent")
            if not self.parent_paths and not self.parent_path:
                raise UsageError("incremental mode requires parentPaths")
            if self.bitmap_new == self.bitmap_parent:
                raise UsageError("bitmapNew must differ from bitmapParent")
        if self.mode == FULL and not self.bitmap_new:
            raise UsageError(
                "full mode requires bitmapNew (the bitmap to create for the next incremental)"
            )
        validate_vm_name(self.vm)
        if not self.path:
            raise UsageError("missing backup path (-p)")
        # Checked again once mounted (symlinks); refused here, nothing is locked or mounted.
        validate_relative(self.path, "backup path")
        validate_backup_path_of(self.vm, self.path)
        for parent in (*self.parent_paths, *([self.parent_path] if self.parent_path else [])):
            validate_relative(parent, "parent path")
        for bitmap in (self.bitmap_new, self.bitmap_parent):
            if bitmap is not None:
                validate_bitmap_name(bitmap)
        validate_volume_ids(self.volume_ids, self.disk_paths)
        self._validate_how()
        self.repository.validate()

    def _validate_how(self) -> None:
        """The options of how the backup is taken (none of them is the Java wrapper's)."""
        if self.scratch_dir is not None:
            validate_scratch_dir(self.scratch_dir)
        if self.bandwidth_mib is not None:
            parse_bandwidth(str(self.bandwidth_mib), "the bandwidth cap (-b)")


def validate_scratch_dir(path: str) -> None:
    """Refuse a scratch directory that is not an existing local directory named absolutely
    (pull mode's scratch images and NBD socket go there)."""
    if not path.startswith("/"):
        raise UsageError(f"the scratch directory must be an absolute path, not {path!r}")
    if not Path(path).is_dir():
        raise InputError(f"the scratch directory {path} does not exist")


def validate_backup_path_of(vm: str, path: str) -> None:
    """Refuse a backup path that is not ``<vm>/<name>``, ``vm`` being the VM backed up.

    Every CloudStack generation builds it so. Anything else would put the backup (and the
    sweep of dead runs' leftovers) in a directory the VM's lock does not protect, and
    chain it to parents looked up in another VM's directory.
    """
    parts = PurePosixPath(path).parts
    if len(parts) != 2 or parts[0] != vm:
        raise InputError(
            f"backup path {path} is not a backup of VM {vm}: it must be {vm}/<backup name>"
        )


def validate_backup_dir(path: str, operation: str) -> None:
    """Refuse a backup path that is not ``<vm>/<backup>``: the VM whose lock the operation
    takes, and one backup directory of it."""
    parts = PurePosixPath(path).parts
    if len(parts) != 2:
        raise InputError(f"{operation} path must name a backup directory (<vm>/<backup>): {path}")
    validate_vm_name(parts[0])


def validate_volume_ids(volume_ids: Sequence[str], disk_paths: Sequence[str]) -> None:
    """Refuse ``-u`` ids that are not distinct plain names, one per ``-d`` source when
    given (a running VM's disks are counted once known, before anything is written)."""
    for volume_id in volume_ids:
        validate_volume_id(volume_id)
    if len(set(volume_ids)) != len(volume_ids):
        raise InputError("duplicate volume id in --volumeuuids")
    if volume_ids and disk_paths:
        check_volume_id_count(volume_ids, len(disk_paths), "disk paths (-d)")


def validate_volume_id(volume_id: str) -> None:
    """Refuse a volume id that would not be one plain file name component."""
    if not volume_id:
        raise InputError("invalid volume id: empty")
    if (
        "/" in volume_id
        or ".." in volume_id
        or volume_id.startswith(("-", "."))
        or not volume_id.isprintable()
        or len(volume_id.encode()) > MAX_VOLUME_ID_BYTES
    ):
        raise InputError(f"invalid volume id: {volume_id!r}")


MAX_VOLUME_ID_BYTES = 200
"""``datadisk.<id>.qcow2`` must fit a file name (255 bytes)."""


def check_volume_id_count(volume_ids: Sequence[str], disks: int, what: str) -> None:
    """Refuse ``-u`` ids that do not name every disk exactly once."""
    if len(volume_ids) != disks:
        raise InputError(
            f"--volumeuuids names {len(volume_ids)} volume(s) but there are {disks} {what}"
        )


def validate_bitmap_name(name: str) -> None:
    """Refuse a bitmap name QEMU or libvirt would reject (or misread as XML or a path)."""
    if not name or len(name) > 1023:
        raise InputError("invalid bitmap name: empty or too long")
    if name.startswith("-") or any(c in name for c in "/<>&'\"") or not name.isprintable():
        raise InputError(f"invalid bitmap name: {name!r}")


@dataclass(frozen=True)
class DeleteRequest:
    """DeleteBackupCommand: remove one backup directory (``-o delete -p PATH``)."""

    repository: Repository
    path: str

    def validate(self) -> None:
        """Refuse what can be refused without touching anything."""
        self.repository.validate()
        validate_relative(self.path, "backup path")
        validate_backup_dir(self.path, "delete")


@dataclass(frozen=True)
class RebaseRequest:
    """RebaseBackupCommand (seed generation): re-point ``target`` onto ``new_backing``,
    content preserved (``-o rebase --rebase-target T --rebase-new-backing B``)."""

    repository: Repository
    target: str
    new_backing: str

    def validate(self) -> None:
        """Refuse what can be refused without touching anything."""
        self.repository.validate()
        validate_relative(self.target, "rebase target")
        validate_relative(self.new_backing, "rebase new backing")
        if Path(self.target).parts[0] != Path(self.new_backing).parts[0]:
            raise InputError(
                "--rebase-target and --rebase-new-backing are backups of different VMs"
            )
        validate_vm_name(Path(self.target).parts[0])


@dataclass(frozen=True)
class StatsRequest:
    """GetBackupStorageStatsCommand: the repository's size and use (``-o stats``)."""

    repository: Repository

    def validate(self) -> None:
        """Refuse what can be refused without touching anything."""
        self.repository.validate()


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
    """The VM whose volumes these are (its lock is held while they are written)."""
    volume_uuids: Sequence[str] = ()
    """How errors name each volume (the Java restore's messages); default: the target's id."""
    create_size: int | None = None
    """A block or ``rbd:`` target that does not exist yet is created with this many bytes."""
    attach_to: str | None = None
    """Attach the (single) restored volume to this running VM afterwards."""

    def validate(self) -> None:
        """Refuse what can be refused without touching anything."""
        self.repository.validate()
        validate_relative(self.backup_path, "backup path")
        validate_backup_dir(self.backup_path, "restore")
        for name in self.backup_files:
            validate_relative(name, "backup file")
        if not self.targets:
            raise UsageError("missing target volume paths (--restore-volume-paths)")
        if self.volume_uuids and len(self.volume_uuids) != len(self.targets):
            raise UsageError("one volume uuid per target volume")
        if self.create_size is not None and self.create_size <= 0:
            raise InputError(f"invalid size for the new volume: {self.create_size}")
        if self.attach_to is not None:
            validate_vm_name(self.attach_to)
            if len(self.targets) != 1:
                raise UsageError("only a single restored volume can be attached to a VM")
            if self.targets[0].startswith("rbd:"):
                raise UsageError("attaching a restored Ceph volume is not supported here")
        for target in self.targets:
            if not target.startswith(("/", "rbd:")):
                raise InputError(f"target volume must be an absolute path or rbd: {target}")
        if self.vm is not None:
            validate_vm_name(self.vm)


@dataclass(frozen=True)
class VerifyRequest:
    """Check one backup and its chain (``-o verify -p PATH``)."""

    repository: Repository
    path: str

    def validate(self) -> None:
        """Refuse what can be refused without touching anything."""
        self.repository.validate()
        validate_relative(self.path, "backup path")
        validate_backup_dir(self.path, "verify")
