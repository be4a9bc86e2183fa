"""The agent's backup commands and answers as typed values, and their link to the engine.

Each class mirrors one Java class of ``org.apache.cloudstack.backup`` field for field
(contract §5), with Python names; :mod:`commands.schemas` maps them to the wire names.
A command turns into exactly one request of :mod:`shim.operations`
(:meth:`Command.to_request`) and makes its answer from that request's
:class:`~shim.operations.Result` (:meth:`Command.answer`) or from a failure
(:meth:`Command.failure`), or from a run past its deadline (:meth:`Command.timed_out`):
each answer is what the Java wrapper of the command's :class:`~commands.wrappers.Generation`
builds from the drop-in's exit code and stdout for the same run (contract §7,
:mod:`commands.wrappers`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import PurePosixPath
from typing import Any, ClassVar

from commands import pools as pools_
from commands import wrappers
from commands.wrappers import DEFAULT_GENERATION, TIMEOUT_EXIT, TIMEOUT_STDOUT, Generation
from shim import contract, operations
from shim.errors import UsageError
from shim.nas import Repository, redact_options
from shim.virt.disks import DATADISK, ROOT, volume_id_of

log = logging.getLogger("shim.commands")


def _ceph_auth(pool_uuid: str) -> pools_.CephAuth | None:
    from shim.virt.connection import open_connection  # noqa: PLC0415 - Ceph volumes only

    conn = open_connection()
    try:
        return pools_.ceph_auth(conn, pool_uuid)
    finally:
        conn.close()


def _sources(
    paths: Sequence[str], pools: Sequence[OpaqueObject], *, secrets: bool
) -> tuple[str, ...]:
    # Volume i's path as the agent passes it: as it is, or for a Ceph RBD store (pool i),
    # the rbd: string it builds; its key looked up (libvirt I/O) only with ``secrets``.
    sources = []
    for index, path in enumerate(paths):
        pool = pools[index] if index < len(pools) else None
        if pool is not None and pools_.is_rbd(pool):
            auth = _ceph_auth(str(pool.get("uuid"))) if secrets else None
            sources.append(pools_.rbd_source(pool, path, auth))
        else:
            sources.append(path)
    return tuple(sources)


PACKAGE = "org.apache.cloudstack.backup"
"""The Java package of every command and answer here."""

OpaqueObject = Mapping[str, Any]
"""A Java object the shim passes through untouched (a primary store TO, a volume info)."""

_REQUIRED: Any = object()


def required() -> Any:
    """A field the caller must give. Python 3.9 has no ``kw_only`` dataclasses, so a field
    without a default cannot follow the base class's defaulted ones: this default stands
    for "not given", and :meth:`Message.__post_init__` refuses it as ``__init__`` would."""
    return field(default=_REQUIRED)


@dataclass(frozen=True)
class Message:
    """The fields of ``com.cloud.agent.api.Command``, which answers extend too."""

    JAVA_CLASS: ClassVar[str] = ""

    context_map: Mapping[str, str] = field(default_factory=dict)
    wait: int = 0
    bypass_host_maintenance: bool = False

    def __post_init__(self) -> None:
        missing = [f.name for f in fields(self) if getattr(self, f.name) is _REQUIRED]
        if missing:
            raise TypeError(f"{type(self).__name__} needs {', '.join(missing)}")


@dataclass(frozen=True)
class Command(Message):
    """A command the agent runs: one engine request, one answer."""

    VM_FIELD: ClassVar[str | None] = None
    """The field naming the VM; else the first component of this path field names it."""
    VM_PATH_FIELD: ClassVar[str | None] = None

    generation: Generation = DEFAULT_GENERATION
    """Whose agent this command came from: its answer is that generation's (not a Java
    field: the service sets it per request)."""

    @property
    def vm(self) -> str | None:
        """The VM the command works on (for per-VM serialization), if any.

        Backup paths are ``<vm>/<backup>``: a delete or a rebase works on that VM's backups,
        and so does a restore that names no VM (the engine takes that VM's lock for it).
        """
        if self.VM_FIELD and getattr(self, self.VM_FIELD):
            return str(getattr(self, self.VM_FIELD))
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

    def validate(self) -> None:
        """Refuse, with the engine's (the Java wrapper's) message, a command that cannot
        run; touches nothing."""
        operations.validate(self.to_request())

    def from_run(self, exit_code: int, stdout: str) -> Answer:
        """The answer this command's Java wrapper builds from a run's exit code and stdout."""
        raise NotImplementedError

    def answer(self, result: operations.Result) -> Answer:
        """The answer to a successful run."""
        return self._safely(0, result.stdout)

    def failure(self, message: str, exit_code: int) -> Answer:
        """The answer to a failed run: from the drop-in's failure stdout for ``exit_code``."""
        return self._safely(exit_code, contract.failure_stdout(message, exit_code))

    def timed_out(self) -> Answer:
        """The answer to a run stopped at its deadline: the agent's ``Script`` reports exit
        -1 and stdout ``timeout``, and the wrapper builds its answer from that."""
        return self._safely(TIMEOUT_EXIT, TIMEOUT_STDOUT)

    def _safely(self, exit_code: int, stdout: str) -> Answer:
        try:
            return self.from_run(exit_code, stdout)
        except wrappers.JavaParseError as exc:
            # The Java wrapper would throw here: the run broke the stdout contract.
            log.error("%s: stdout the Java wrapper cannot parse: %s", self.JAVA_CLASS, exc)
            return BackupAnswer(result=False, details=str(exc))

    def describe(self) -> str:
        """One log line naming the command, its generation and values, with no secret:
        mount options redacted, primary stores shown by uuid and type only (their URLs
        and details can carry credentials), the agent's log id first."""
        shown: dict[str, object] = {}
        if self.context_map.get("logid"):
            shown["logid"] = self.context_map["logid"]
        shown["generation"] = self.generation.value
        for name, value in vars(self).items():
            if value in (None, (), [], {}) or name in ("context_map", "generation"):
                continue
            if name.endswith("pools"):
                shown[name] = [f"{p.get('uuid')}/{p.get('poolType')}" for p in value]
            else:
                shown[name] = value
        if "mount_options" in shown:
            shown["mount_options"] = redact_options(str(shown["mount_options"]))
        return " ".join(
            [self.JAVA_CLASS.rsplit(".", 1)[-1], *(f"{k}={v!r}" for k, v in shown.items())]
        )


@dataclass(frozen=True)
class RepositoryCommand(Command):
    """A command naming a backup repository (``-t TYPE -s ADDRESS -m OPTIONS``)."""

    backup_repo_type: str = required()
    backup_repo_address: str = required()
    mount_options: str | None = None

    @property
    def repository(self) -> Repository:
        """The repository as the engine names it (null mount options are none)."""
        return Repository(
            type=self.backup_repo_type,
            address=self.backup_repo_address,
            options=self.mount_options or "",
        )


@dataclass(frozen=True)
class TakeBackupCommand(RepositoryCommand):
    """``TakeBackupCommand``: a backup of one VM (running, or stopped with volumePaths)."""

    JAVA_CLASS: ClassVar[str] = f"{PACKAGE}.TakeBackupCommand"
    VM_FIELD: ClassVar[str | None] = "vm_name"

    vm_name: str = required()
    backup_path: str = required()
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

    def to_request(self, *, secrets: bool = True) -> operations.BackupRequest:
        """The BackupRequest the drop-in would build from the same values (empty = absent);
        without ``secrets`` a Ceph source carries no key (the checks need none)."""
        return operations.BackupRequest(
            vm=self.vm_name,
            repository=self.repository,
            path=self.backup_path,
            disk_paths=self.disk_sources(secrets=secrets),
            quiesce=bool(self.quiesce),
            mode=self.mode or None,
            bitmap_new=self.bitmap_new or None,
            bitmap_parent=self.bitmap_parent or None,
            parent_paths=tuple(self.parent_paths or ()),
            parent_path=self.parent_path or None,
        )

    def validate(self) -> None:
        """As any command's, without looking up a Ceph key: that is libvirt I/O, done when
        the command runs (a missing pool is then its failed answer, as in the agent)."""
        operations.validate(self.to_request(secrets=False))

    def disk_sources(self, *, secrets: bool = True) -> tuple[str, ...]:
        """What the agent passes as ``-d``: each volume path, or for a volume whose store is
        Ceph RBD, the ``rbd:`` string it builds with the pool's monitors, user and key."""
        return _sources(self.volume_paths or (), self.volume_pools or (), secrets=secrets)

    def from_run(self, exit_code: int, stdout: str) -> BackupAnswer:
        """``LibvirtTakeBackupCommandWrapper`` of this generation (contract §7): the merged
        one sets ``bitmapCreated`` to ``bitmapNew`` whatever stdout says, the seed reads it
        from the marker, older ones set only ``details`` and ``size``."""
        fields = wrappers.take_backup_answer(
            self.generation,
            exit_code,
            stdout,
            disk_paths_given=bool(self.volume_paths),
            bitmap_new=self.bitmap_new,
        )
        return BackupAnswer(**vars(fields))


@dataclass(frozen=True)
class DeleteBackupCommand(RepositoryCommand):
    """``DeleteBackupCommand``: remove one backup."""

    JAVA_CLASS: ClassVar[str] = f"{PACKAGE}.DeleteBackupCommand"
    VM_PATH_FIELD: ClassVar[str | None] = "backup_path"

    backup_path: str = required()

    def to_request(self) -> operations.DeleteRequest:
        """``-o delete -p PATH``."""
        return operations.DeleteRequest(self.repository, self.backup_path)

    def from_run(self, exit_code: int, stdout: str) -> BackupAnswer:
        """Null details on success; the untrimmed stdout on failure."""
        result, details = wrappers.script_answer(exit_code, stdout)
        return BackupAnswer(result=result, details=details)


@dataclass(frozen=True)
class RebaseBackupCommand(RepositoryCommand):
    """``RebaseBackupCommand`` (seed generation): re-point a backup file onto a new parent."""

    JAVA_CLASS: ClassVar[str] = f"{PACKAGE}.RebaseBackupCommand"
    VM_PATH_FIELD: ClassVar[str | None] = "target_path"

    target_path: str = required()
    new_backing_path: str = required()

    def to_request(self) -> operations.RebaseRequest:
        """``-o rebase --rebase-target T --rebase-new-backing B``."""
        return operations.RebaseRequest(
            self.repository, target=self.target_path, new_backing=self.new_backing_path
        )

    def from_run(self, exit_code: int, stdout: str) -> BackupAnswer:
        """As the delete wrapper: null details on success, stdout on failure."""
        result, details = wrappers.script_answer(exit_code, stdout)
        return BackupAnswer(result=result, details=details)


@dataclass(frozen=True)
class RestoreBackupCommand(RepositoryCommand):
    """``RestoreBackupCommand``: write a backup's disks into volumes."""

    JAVA_CLASS: ClassVar[str] = f"{PACKAGE}.RestoreBackupCommand"
    VM_FIELD: ClassVar[str | None] = "vm_name"
    VM_PATH_FIELD: ClassVar[str | None] = "backup_path"

    backup_path: str = required()
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

    @property
    def single_volume(self) -> bool:
        """``vmExists`` absent: one volume is restored (index 0 of every list), into a new
        volume or one that is not the VM's; true or false: the whole VM, every disk."""
        return self.vm_exists is None

    def paths_to_restore(self) -> tuple[str, ...]:
        """The paths of the volumes to write, as the command gives them: restoreVolumePaths
        (4.21 on), else volumePaths (4.20); index 0 only for a single volume."""
        paths = tuple(self.restore_volume_paths or self.volume_paths or ())
        return paths[:1] if self.single_volume else paths

    def targets(self, *, secrets: bool = True) -> tuple[str, ...]:
        """The volumes to write, a Ceph volume as the ``rbd:`` string the agent builds for
        its pool (its key looked up only with ``secrets``)."""
        pools = self.restore_volume_pools or ()
        return _sources(self.paths_to_restore(), pools, secrets=secrets)

    def validate(self) -> None:
        """As any command's, without looking up a Ceph key (see TakeBackupCommand's)."""
        operations.validate(self.to_request(secrets=False))

    def to_request(self, *, secrets: bool = True) -> operations.RestoreRequest:
        """The restore the Java wrapper performs (contract §7).

        Volume *i* is restored from ``<diskType>.<backupFiles[i]>.qcow2``: the middle is
        the volume's path as CloudStack stores it (else, for generations without
        backupFiles, its uuid or the target's last path element); ``diskType`` is ``root``
        then ``datadisk`` for a whole VM, the command's own for a single volume. Errors
        name ``backupVolumesUUIDs[i]`` for an existing VM, else the uuid in the target path.
        """
        targets = self.targets(secrets=secrets)
        if not targets:
            raise UsageError("restore needs restoreVolumePaths or volumePaths")
        names, uuids = [], []
        for index, target in enumerate(targets):
            if self.single_volume:
                kind = (self.disk_type or ROOT).lower()
            else:
                kind = ROOT if index == 0 else DATADISK
            own_id = volume_id_of(target)
            middle = _item(self.backup_files, index) or _item(self.backup_volumes_uuids, index)
            names.append(f"{kind}.{middle or own_id}.qcow2")
            given = _item(self.backup_volumes_uuids, index) if self.vm_exists else None
            uuids.append(given or own_id)
        sizes = list(self.restore_volume_sizes or ())
        return operations.RestoreRequest(
            replace(self.repository, mount_timeout=self.mount_timeout),
            backup_path=self.backup_path,
            targets=targets,
            backup_files=tuple(names),
            vm=self.vm_name or None,
            volume_uuids=tuple(uuids),
            create_size=sizes[0] if self.single_volume and sizes else None,
            attach_to=(
                self.vm_name or None if self.single_volume and self.vm_state == "Running" else None
            ),
        )

    def from_run(self, exit_code: int, stdout: str) -> BackupAnswer:
        """The restore wrapper runs no script: ``details`` is the restored volume's uuid for
        a single volume (the management server records it as the volume's location), null
        for a whole VM; a failure's details are its message."""
        if exit_code != 0:
            return BackupAnswer(result=False, details=contract.error_stdout(stdout).strip())
        # The uuid from the volume's path as given, as the wrapper takes it (no libvirt).
        uuid = volume_id_of(self.paths_to_restore()[0]) if self.single_volume else None
        return BackupAnswer(result=True, details=uuid)


def _item(values: Sequence[str] | None, index: int) -> str | None:
    return values[index] if values is not None and index < len(values) and values[index] else None


@dataclass(frozen=True)
class GetBackupStorageStatsCommand(RepositoryCommand):
    """``GetBackupStorageStatsCommand``: the repository's size and use."""

    JAVA_CLASS: ClassVar[str] = f"{PACKAGE}.GetBackupStorageStatsCommand"

    def to_request(self) -> operations.StatsRequest:
        """``-o stats``."""
        return operations.StatsRequest(self.repository)

    def from_run(self, exit_code: int, stdout: str) -> BackupStorageStatsAnswer:
        """Tokens 1 and 2 of stdout times 1024 (bytes; 4.20.0: KiB); on failure both 0, as
        Java's constructor leaves them; ``result`` false either way, as the wrapper's."""
        fields = wrappers.stats_answer(self.generation, exit_code, stdout)
        return BackupStorageStatsAnswer(**vars(fields))


@dataclass(frozen=True)
class Answer(Message):
    """The fields of ``com.cloud.agent.api.Answer`` (which extends Command)."""

    result: bool = required()
    details: str | None = None


@dataclass(frozen=True)
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
    parent_bitmap_deleted: bool | None = None
    """Merged generation only, on a backup's success: whether stdout said the parent
    bitmap was deleted (never: false)."""


@dataclass(frozen=True)
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
