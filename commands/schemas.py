"""Marshmallow schemas of the commands and answers, with the Java field names and types.

Loading is as strict about types as JSON allows (a string is not a number, ``1`` is not a
boolean) and as lax as GSON about the rest: unknown fields are ignored, and logged. A
Java primitive (``wait``, ``bypassHostMaintenance``, ``result``) may be absent (its Java
default) but not null; a boxed or object field may be null, which means absent. Dumping
omits nulls, as GSON does. ``volumePools``, ``restoreVolumePools`` and ``volumes`` are
opaque objects, passed through untouched.

A loaded command is also checked the way the Java wrapper checks it, with its messages
(``incremental mode requires bitmapNew``, ...): the engine's own ``validate`` runs on the
request the command maps to, so a command that loads is one the engine accepts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_dump, post_load, pre_load
from marshmallow.validate import Range

from commands import model
from commands.model import Message
from shim.errors import ShimError
from shim.redact import redact

log = logging.getLogger("shim.commands")

JAVA_INT = (-(2**31), 2**31 - 1)
JAVA_LONG = (-(2**63), 2**63 - 1)


class StrictBoolean(fields.Boolean):
    """A JSON boolean: ``true`` or ``false``, not ``"true"`` nor ``1``."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class StrictInteger(fields.Integer):
    """A JSON integer within a Java type's range: not a string, a float or a boolean."""

    def __init__(self, bounds: tuple[int, int], **kwargs: Any) -> None:
        super().__init__(strict=True, validate=Range(*bounds), **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


def _int(name: str, **kwargs: Any) -> StrictInteger:
    return StrictInteger(JAVA_INT, data_key=name, **kwargs)


def _long(name: str, **kwargs: Any) -> StrictInteger:
    return StrictInteger(JAVA_LONG, data_key=name, **kwargs)


def _text(name: str, *, required: bool = False) -> fields.String:
    # Required fields are Java Strings too, but the shim cannot run without them.
    return fields.String(data_key=name, required=required, allow_none=not required)


def _flag(name: str) -> StrictBoolean:
    return StrictBoolean(data_key=name, allow_none=True)


def _texts(name: str) -> fields.Field[Any]:
    return fields.List(fields.String(), data_key=name, allow_none=True)


def _opaque_list(name: str) -> fields.Field[Any]:
    return fields.List(fields.Dict(keys=fields.String()), data_key=name, allow_none=True)


_ENCRYPTION_KEYS = ("passphrase", "encryptformat")
_ENCRYPTED = (
    "encrypted volumes are not supported by this service: their data would reach the "
    "backup repository in clear; refused"
)
# Options some TakeBackupCommand variants carry in a ``details`` map: the ones whose loss
# changes what is written are refused, the tuning ones logged and dropped.
_REFUSED_DETAILS = {
    "encryption": "encrypted backups are not implemented here; refused rather than "
    "written in clear",
}


def _encryption_fields(value: Any) -> dict[Any, Any]:
    # Nested like the body, so that each problem is named by its JSON pointer.
    found: dict[Any, Any] = {}
    items = value.items() if isinstance(value, Mapping) else enumerate(value)
    for key, item in items:
        lowered = str(key).lower()
        if any(k in lowered for k in _ENCRYPTION_KEYS) and item not in (None, "", [], {}):
            found[key] = _ENCRYPTED
        elif isinstance(item, (Mapping, list)):
            nested = _encryption_fields(item)
            if nested:
                found[key] = nested
    return found


def refused_fields(body: Mapping[str, Any]) -> dict[Any, Any]:
    """Fields of a command body whose meaning the service does not implement and whose
    loss would change what happens to data (a passphrase: the volume is encrypted), each
    with why. Anywhere in the body, the opaque primary store objects included."""
    refused = _encryption_fields(body)
    details = body.get("details")
    if isinstance(details, Mapping):
        for key, why in _REFUSED_DETAILS.items():
            if str(details.get(key, "")).lower() == "true":
                refused.setdefault("details", {})[key] = why
        tuning = sorted(str(k) for k in details if k not in _REFUSED_DETAILS)
        if tuning:
            log.info("ignoring backup options this service does not implement: %s", tuning)
    return refused


class JavaSchema(Schema):
    """Base of every schema here: GSON's handling of unknown fields and nulls."""

    model: ClassVar[type[Message]]

    class Meta:
        """Unknown fields are dropped (and logged by :meth:`drop_unknown`), as GSON does."""

        unknown = EXCLUDE

    context_map = fields.Dict(
        keys=fields.String(), values=fields.String(), data_key="contextMap", load_default=dict
    )
    wait = StrictInteger(JAVA_INT, data_key="wait", load_default=0)
    bypass_host_maintenance = StrictBoolean(data_key="bypassHostMaintenance", load_default=False)

    @pre_load
    def drop_unknown(self, data: Any, **_kwargs: Any) -> Any:
        """Refuse fields whose meaning this service does not implement and whose loss would
        change what happens to data; log the other fields this class does not know, then
        drop them (as GSON does)."""
        if not isinstance(data, Mapping):
            return data  # the type error is reported by the load itself
        refused = refused_fields(data)
        if refused:
            raise ValidationError(refused)
        known = {f.data_key or name for name, f in self.load_fields.items()}
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            log.info("%s: ignoring unknown fields %s", self.model.JAVA_CLASS, ", ".join(unknown))
        return {key: value for key, value in data.items() if key in known}

    @post_load
    def make(self, data: dict[str, Any], **_kwargs: Any) -> Message:
        """The typed value of what was loaded."""
        return self.model(**data)

    @post_dump
    def omit_nulls(self, data: dict[str, Any], **_kwargs: Any) -> dict[str, Any]:
        """Null fields are not written (GSON's default)."""
        return {key: value for key, value in data.items() if value is not None}


class CommandSchema(JavaSchema):
    """Base of the command schemas: a loaded command is one the engine accepts."""

    @post_load
    def make(self, data: dict[str, Any], **_kwargs: Any) -> Message:
        """The command, refused with the engine's (the Java wrapper's) message if invalid."""
        command = self.model(**data)
        assert isinstance(command, model.Command)  # noqa: S101 - model is a command class
        try:
            command.validate()
        except ShimError as exc:
            raise ValidationError(redact(exc.message)) from None
        return command


class RepositorySchema(CommandSchema):
    """The repository fields: ``backupRepoType``, ``backupRepoAddress``, ``mountOptions``."""

    backup_repo_type = _text("backupRepoType", required=True)
    backup_repo_address = _text("backupRepoAddress", required=True)
    mount_options = _text("mountOptions")


class TakeBackupCommandSchema(RepositorySchema):
    """``org.apache.cloudstack.backup.TakeBackupCommand``."""

    model = model.TakeBackupCommand

    vm_name = _text("vmName", required=True)
    backup_path = _text("backupPath", required=True)
    volume_pools = _opaque_list("volumePools")
    volume_paths = _texts("volumePaths")
    quiesce = _flag("quiesce")
    mode = _text("mode")
    bitmap_new = _text("bitmapNew")
    bitmap_parent = _text("bitmapParent")
    parent_paths = _texts("parentPaths")
    parent_path = _text("parentPath")


class DeleteBackupCommandSchema(RepositorySchema):
    """``org.apache.cloudstack.backup.DeleteBackupCommand``."""

    model = model.DeleteBackupCommand

    backup_path = _text("backupPath", required=True)


class RebaseBackupCommandSchema(RepositorySchema):
    """``org.apache.cloudstack.backup.RebaseBackupCommand`` (seed generation)."""

    model = model.RebaseBackupCommand

    target_path = _text("targetPath", required=True)
    new_backing_path = _text("newBackingPath", required=True)


class RestoreBackupCommandSchema(RepositorySchema):
    """``org.apache.cloudstack.backup.RestoreBackupCommand``."""

    model = model.RestoreBackupCommand

    vm_name = _text("vmName")
    backup_path = _text("backupPath", required=True)
    backup_volumes_uuids = _texts("backupVolumesUUIDs")
    restore_volume_pools = _opaque_list("restoreVolumePools")
    restore_volume_paths = _texts("restoreVolumePaths")
    restore_volume_sizes = fields.List(
        StrictInteger(JAVA_LONG), data_key="restoreVolumeSizes", allow_none=True
    )
    backup_files = _texts("backupFiles")
    volume_paths = _texts("volumePaths")
    disk_type = _text("diskType")
    vm_exists = _flag("vmExists")
    vm_state = _text("vmState")
    mount_timeout = _int("mountTimeout", allow_none=True)


class GetBackupStorageStatsCommandSchema(RepositorySchema):
    """``org.apache.cloudstack.backup.GetBackupStorageStatsCommand``."""

    model = model.GetBackupStorageStatsCommand


class AnswerSchema(JavaSchema):
    """The fields of ``com.cloud.agent.api.Answer``: ``result`` and ``details``."""

    result = StrictBoolean(data_key="result", required=True)
    details = _text("details")


class BackupAnswerSchema(AnswerSchema):
    """``org.apache.cloudstack.backup.BackupAnswer`` (``bitmapRecreated``: seed only;
    ``parentBitmapDeleted``: merged only)."""

    model = model.BackupAnswer

    size = _long("size", allow_none=True)
    virtual_size = _long("virtualSize", allow_none=True)
    volumes = fields.Dict(keys=fields.String(), data_key="volumes", allow_none=True)
    needs_cleanup = _flag("needsCleanup")
    bitmap_created = _text("bitmapCreated")
    incremental_fallback = _flag("incrementalFallback")
    bitmap_recreated = _text("bitmapRecreated")
    parent_bitmap_deleted = _flag("parentBitmapDeleted")


class BackupStorageStatsAnswerSchema(AnswerSchema):
    """``org.apache.cloudstack.backup.BackupStorageStatsAnswer`` (sizes in bytes; 4.20.0:
    KiB)."""

    model = model.BackupStorageStatsAnswer

    total_size = _long("totalSize", allow_none=True)
    used_size = _long("usedSize", allow_none=True)


COMMAND_SCHEMAS: dict[str, type[CommandSchema]] = {
    schema.model.JAVA_CLASS: schema
    for schema in (
        TakeBackupCommandSchema,
        DeleteBackupCommandSchema,
        RebaseBackupCommandSchema,
        RestoreBackupCommandSchema,
        GetBackupStorageStatsCommandSchema,
    )
}
"""The schema of each command, by fully qualified Java class name."""

ANSWER_SCHEMAS: dict[str, type[AnswerSchema]] = {
    schema.model.JAVA_CLASS: schema
    for schema in (BackupAnswerSchema, BackupStorageStatsAnswerSchema)
}
"""The schema of each answer, by fully qualified Java class name."""
