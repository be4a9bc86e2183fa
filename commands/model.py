"""The agent's backup commands and answers as typed values, and their link to the engine.

Each class mirrors one Java class of ``org.apache.cloudstack.backup`` field for field
(contract §5), with Python names; :mod:`commands.schemas` maps them to the wire names.
A command turns into exactly one request of :mod:`shim.operations`
(:meth:`Command.to_request`) and makes its answer from that request's
:class:`~shim.operations.Result` (:meth:`Command.answer`) or from a failure
(:meth:`Command.failure`): the answer carries what the Java wrapper would have derived
from the drop-in's stdout, and that stdout itself as ``details``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, ClassVar

from shim import contract, operations
from shim.contract import BackupOutcome, StorageStats
from shim.errors import EXIT_CLEANUP_FAILED, UsageError
from shim.nas import Repository, redact_options

PACKAGE = "org.apache.cloudstack.backup"
"""The Java package of every command and answer here."""

OpaqueObject = Mapping[str, Any]
"""A Java object the shim passes through untouched (a primary store TO, a volume info)."""


@dataclass(frozen=True, kw_only=True)
class Message:
    """The fields of ``com.cloud.agent.api.Command``, which answers extend too."""

    JAVA_CLASS: ClassVar[str] = ""

    context_map: Mapping[str, str] = field(default_factory=dict)
    wait: int = 0
    bypass_host_maintenance: bool = False


@dataclass(frozen=True, kw_only=True)
class Command(Message):
    """A command the agent runs: one engine request, one answer."""

    VM_FIELD: ClassVar[str | None] = None
    """The field naming the VM; else the first component of this path field names it."""
    VM_PATH_FIELD: ClassVar[str | None] = None

    @property
    def vm(self) -> str | None:
        """The VM the command works on (for per-VM serialization), if any.

        Backup paths are ``<vm>/<backup>``: a delete or a rebase works on that VM's backups
        (and the engine takes that VM's lock for it).
        """
        if self.VM_FIELD:
            return getattr(self, self.VM_FIELD) or None
        if self.VM_PATH_FIELD:
            parts = PurePosixPath(getattr(self, self.VM_PATH_FIELD)).parts
            return parts[0] if len(parts) > 1 else None
        return None

    @property
    def is_backup(self) -> bool:
        """Whether the command takes a backup (counted against the concurrent-backup limit)."""
        return False

    def to_request(self) -> operations.Request:
        """The engine's request for this command (raises UsageError when it cannot be built)."""
        raise NotImplementedError

    def answer(self, result: operations.Result) -> Answer:
        """The answer to a successful run: ``details`` is the drop-in's stdout."""
        return BackupAnswer(result=True, details=result.stdout, needs_cleanup=False)

    def failure(self, message: str, exit_code: int) -> Answer:
        """The answer to a failed run: the drop-in's failure stdout, needsCleanup on exit 20."""
        return BackupAnswer(
            result=False,
            details=contract.failure_stdout(message, exit_code),
            needs_cleanup=exit_code == EXIT_CLEANUP_FAILED,
        )

    def describe(self) -> str:
        """One log line naming the command and its values, credentials redacted."""
        shown = {
            name: value
            for name, value in vars(self).items()
            if value not in (None, (), [], {}) and name not in ("context_map",)
        }
        if "mount_options" in shown:
            shown["mount_options"] = redact_options(str(shown["mount_options"]))
        return " ".join(
            [self.JAVA_CLASS.rsplit(".", 1)[-1], *(f"{k}={v!r}" for k, v in shown.items())]
        )


@dataclass(frozen=True, kw_only=True)
class RepositoryCommand(Command):
    """A command naming a backup repository (``-t TYPE -s ADDRESS -m OPTIONS``)."""

    backup_repo_type: str
    backup_repo_address: str
    mount_options: str | None = None

    @property
    def repository(self) -> Repository:
        """The repository as the engine names it (null mount options are none)."""
        return Repository(
            type=self.backup_repo_type,
            address=self.backup_repo_address,
            options=self.mount_options or "",
        )


@dataclass(frozen=True, kw_only=True)
class TakeBackupCommand(RepositoryCommand):
    """``TakeBackupCommand``: a backup of one VM (running, or stopped with volumePaths)."""

    JAVA_CLASS: ClassVar[str] = f"{PACKAGE}.TakeBackupCommand"
    VM_FIELD: ClassVar[str | None] = "vm_name"

    vm_name: str
    backup_path: str
    volume_pools: Sequence[OpaqueObject] | None = None
    volume_paths: Sequence[str] | None = None
    quiesce: bool | None = None
    mode: str | None = None
    bitmap_new: str | None = None
    bitmap_parent: str | None = None
    parent_paths: Sequence[str] | None = None
    """Merged generation: each disk's parent file, in disk order."""
    parent_path: str | None = None
    """Seed generation: the parent backup directory (or the root disk's parent file)."""

    @property
    def is_backup(self) -> bool:
        """A backup: it counts against the concurrent-backup limit."""
        return True

    def to_request(self) -> operations.BackupRequest:
        """The BackupRequest the drop-in would build from the same values (empty = absent)."""
        return operations.BackupRequest(
            vm=self.vm_name,
            repository=self.repository,
            path=self.backup_path,
            disk_paths=tuple(self.volume_paths or ()),
            quiesce=bool(self.quiesce),
            mode=self.mode or None,
            bitmap_new=self.bitmap_new or None,
            bitmap_parent=self.bitmap_parent or None,
            parent_paths=tuple(self.parent_paths or ()),
            parent_path=self.parent_path or None,
        )

    def answer(self, result: operations.Result) -> BackupAnswer:
        """What the Java wrapper derives from the drop-in's stdout for the same backup.

        The size: the sum of the per-file lines when volumePaths were given, else the
        directory size (the last line). The markers: only those stdout carries (a
        stopped VM's stdout is integers only, so Java sees no bitmap there either).
        """
        outcome = result.outcome
        if not isinstance(outcome, BackupOutcome):
            raise TypeError(f"a backup returned {type(outcome).__name__}")
        lines = result.stdout.splitlines()
        created = [
            line.removeprefix(contract.BITMAP_CREATED_PREFIX)
            for line in lines
            if line.startswith(contract.BITMAP_CREATED_PREFIX)
        ]
        return BackupAnswer(
            result=True,
            details=result.stdout,
            size=sum(outcome.file_sizes) if self.volume_paths else outcome.size,
            bitmap_created=created[0] if created else None,
            incremental_fallback=contract.FALLBACK_MARKER in lines,
            needs_cleanup=False,
        )


@dataclass(frozen=True, kw_only=True)
class DeleteBackupCommand(RepositoryCommand):
    """``DeleteBackupCommand``: remove one backup."""

    JAVA_CLASS: ClassVar[str] = f"{PACKAGE}.DeleteBackupCommand"
    VM_PATH_FIELD: ClassVar[str | None] = "backup_path"

    backup_path: str

    def to_request(self) -> operations.DeleteRequest:
        """``-o delete -p PATH``."""
        return operations.DeleteRequest(self.repository, self.backup_path)

    def answer(self, result: operations.Result) -> BackupAnswer:
        """Java ignores a delete's stdout on success: details are null."""
        return BackupAnswer(result=True, details=None, needs_cleanup=False)


@dataclass(frozen=True, kw_only=True)
class RebaseBackupCommand(RepositoryCommand):
    """``RebaseBackupCommand`` (seed generation): re-point a backup file onto a new parent."""

    JAVA_CLASS: ClassVar[str] = f"{PACKAGE}.RebaseBackupCommand"
    VM_PATH_FIELD: ClassVar[str | None] = "target_path"

    target_path: str
    new_backing_path: str

    def to_request(self) -> operations.RebaseRequest:
        """``-o rebase --rebase-target T --rebase-new-backing B``."""
        return operations.RebaseRequest(
            self.repository, target=self.target_path, new_backing=self.new_backing_path
        )


@dataclass(frozen=True, kw_only=True)
class RestoreBackupCommand(RepositoryCommand):
    """``RestoreBackupCommand``: write a backup's disks into volumes."""

    JAVA_CLASS: ClassVar[str] = f"{PACKAGE}.RestoreBackupCommand"
    VM_FIELD: ClassVar[str | None] = "vm_name"

    backup_path: str
    vm_name: str | None = None
    backup_volumes_uuids: Sequence[str] | None = None
    restore_volume_pools: Sequence[OpaqueObject] | None = None
    restore_volume_paths: Sequence[str] | None = None
    restore_volume_sizes: Sequence[int] | None = None
    backup_files: Sequence[str] | None = None
    volume_paths: Sequence[str] | None = None
    disk_type: str | None = None
    vm_exists: bool | None = None
    vm_state: str | None = None
    mount_timeout: int | None = None

    def to_request(self) -> operations.RestoreRequest:
        """The volumes to write are restoreVolumePaths (4.21 on), else volumePaths (4.20).

        The backup files are backupFiles when given; else named after backupVolumesUUIDs as
        the Java restore names them (``<diskType>.<uuid>.qcow2`` for the first, ``datadisk``
        for the others); else left to the engine, which names them after the targets.
        """
        targets = tuple(self.restore_volume_paths or self.volume_paths or ())
        if not targets:
            raise UsageError("restore needs restoreVolumePaths or volumePaths")
        files: tuple[str, ...] = tuple(self.backup_files or ())
        if not files and self.backup_volumes_uuids:
            first = self.disk_type or "root"
            files = tuple(
                f"{first if index == 0 else 'datadisk'}.{uuid}.qcow2"
                for index, uuid in enumerate(self.backup_volumes_uuids)
            )
        return operations.RestoreRequest(
            self.repository,
            backup_path=self.backup_path,
            targets=targets,
            backup_files=files,
            vm=self.vm_name or None,
        )


@dataclass(frozen=True, kw_only=True)
class GetBackupStorageStatsCommand(RepositoryCommand):
    """``GetBackupStorageStatsCommand``: the repository's size and use."""

    JAVA_CLASS: ClassVar[str] = f"{PACKAGE}.GetBackupStorageStatsCommand"

    def to_request(self) -> operations.StatsRequest:
        """``-o stats``."""
        return operations.StatsRequest(self.repository)

    def answer(self, result: operations.Result) -> BackupStorageStatsAnswer:
        """Sizes in bytes (stdout, and so ``details``, has them in 1 KiB blocks)."""
        stats = result.outcome
        if not isinstance(stats, StorageStats):
            raise TypeError(f"stats returned {type(stats).__name__}")
        return BackupStorageStatsAnswer(
            result=True,
            details=result.stdout,
            total_size=stats.total_kib * 1024,
            used_size=stats.used_kib * 1024,
        )

    def failure(self, message: str, exit_code: int) -> BackupStorageStatsAnswer:
        """A failed stats: the failure stdout, no sizes."""
        return BackupStorageStatsAnswer(
            result=False, details=contract.failure_stdout(message, exit_code)
        )


@dataclass(frozen=True, kw_only=True)
class Answer(Message):
    """The fields of ``com.cloud.agent.api.Answer`` (which extends Command)."""

    result: bool
    details: str | None = None


@dataclass(frozen=True, kw_only=True)
class BackupAnswer(Answer):
    """``BackupAnswer``: the answer to a backup, delete, rebase or restore."""

    JAVA_CLASS: ClassVar[str] = f"{PACKAGE}.BackupAnswer"

    size: int | None = None
    virtual_size: int | None = None
    volumes: OpaqueObject | None = None
    needs_cleanup: bool | None = None
    bitmap_created: str | None = None
    incremental_fallback: bool | None = None
    bitmap_recreated: str | None = None
    """Seed generation only; this shim never re-creates a bitmap, so it stays null."""


@dataclass(frozen=True, kw_only=True)
class BackupStorageStatsAnswer(Answer):
    """``BackupStorageStatsAnswer``: the repository's size and use, in bytes."""

    JAVA_CLASS: ClassVar[str] = f"{PACKAGE}.BackupStorageStatsAnswer"

    total_size: int | None = None
    used_size: int | None = None


COMMANDS: tuple[type[Command], ...] = (
    TakeBackupCommand,
    DeleteBackupCommand,
    RebaseBackupCommand,
    RestoreBackupCommand,
    GetBackupStorageStatsCommand,
)
"""Every command the shim answers."""

ANSWERS: tuple[type[Answer], ...] = (BackupAnswer, BackupStorageStatsAnswer)
"""Every answer the shim sends."""
