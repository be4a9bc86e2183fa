"""The manifest every backup directory ends with: the repository describes itself.

``manifest.json`` is written last (a temporary file, fsynced, then renamed), so a directory
without one is an incomplete backup. It records the mode, the checkpoint created, the
parent directory, and per disk the file, volume id, source, virtual and stored sizes and a
checksum of the stored file, computed by a C tool (no image byte passes through Python):

* ``cksum`` (the default): POSIX CRC-32 and length; catches storage corruption (flipped
  bits, torn or truncated writes) at memory speed (0.07 s for 512 MiB, against 0.33 s for
  SHA-256 with SHA extensions);
* ``sha256`` (``NASBACKUP_SHIM_CHECKSUM=sha256``): also detects deliberate changes.

A checksum of a file on the NAS costs reading it back over the network: for a full, as
many bytes as the backup wrote. So by default (``NASBACKUP_SHIM_CHECKSUM_AT=verify``) a
backup records its files' algorithm and sizes with an empty checksum, and the first
``verify`` of the backup computes and records ("seals") them; every later one compares.
``NASBACKUP_SHIM_CHECKSUM_AT=backup`` computes them as each backup ends instead.
The algorithm is recorded with the checksums; verify uses the recorded one.

A manifest read back comes through the gate (:meth:`shim.gate.VmDirectory.manifest`), which
hands its bytes to :func:`parse`: every field's type is checked, and a disk's file must be a
plain backup file name. One is written by :func:`write_manifest`, never through a link.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any, TypeVar

from shim import proc, settings
from shim.compat import strict_zip

MANIFEST = "manifest.json"
FORMAT = 1
CHECKSUM_ENV = settings.CHECKSUM.name
ALGORITHMS = ("cksum", "sha256")
CHECKSUM_AT_ENV = settings.CHECKSUM_AT.name
"""When a backup's checksums are computed: ``verify`` (its first verify, the default) or
``backup`` (as it ends, reading every file back from the NAS)."""
UNSEALED = ""
"""The checksum of a file whose checksum its first verify computes."""


@dataclass(frozen=True)
class DiskRecord:
    """One disk's file in a backup directory."""

    role: str
    volume_id: str
    file: str
    source: str
    virtual_size: int
    stored_size: int
    checksum: str
    """The stored file's checksum; :data:`UNSEALED` until its first verify computes it."""
    backing: str | None = None


@dataclass(frozen=True)
class Manifest:
    """What one backup directory holds and how it came to be."""

    vm: str
    mode: str
    """``full``, ``incremental`` (some disks may still be full) or ``legacy-full``."""
    offline: bool
    bitmap: str | None
    parent: str | None
    """The parent backup's directory name (a sibling), None for a full."""
    fallback: bool
    disks: list[DiskRecord] = field(default_factory=list)
    checksum_algorithm: str = "cksum"
    created: str = ""
    format: int = FORMAT


def checksum_algorithm() -> str:
    """The algorithm new backups use (``NASBACKUP_SHIM_CHECKSUM``, default ``cksum``)."""
    algorithm = settings.value(settings.CHECKSUM)
    return algorithm if algorithm in ALGORITHMS else settings.CHECKSUM.default


def checksums_at_backup() -> bool:
    """Whether backups compute their checksums as they end (``NASBACKUP_SHIM_CHECKSUM_AT``
    is ``backup``), rather than leaving them to the first verify."""
    return settings.value(settings.CHECKSUM_AT) == "backup"


def _checksum_argv(name: str, algorithm: str) -> list[str]:
    if algorithm == "cksum":
        return ["cksum", "--", name]
    # openssl uses the CPU's SHA extensions (about 3x coreutils' sha256sum here).
    if shutil.which("openssl"):
        return ["openssl", "dgst", "-sha256", "-r", name]
    return ["sha256sum", "--", name]


def _digest(output: str, algorithm: str) -> str:
    fields_ = output.split()
    # cksum prints "<crc> <length> <name>": both numbers are the checksum.
    return f"{fields_[0]} {fields_[1]}" if algorithm == "cksum" else fields_[0]


Name = TypeVar("Name", str, Path)


def checksums(
    names: Sequence[Name], algorithm: str, *, pass_fds: Sequence[int] = ()
) -> dict[Name, str]:
    """The checksum of each file with ``algorithm``, files side by side (a cancellation or
    signal stops them all). ``names`` are paths of local files, or ``/dev/fd/N`` of files
    the gate opened (``pass_fds``)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    if not names:
        return {}
    argvs = [_checksum_argv(os.fspath(name), algorithm) for name in names]
    runs = proc.run_many(argvs, at_once=os.cpu_count() or 1, pass_fds=pass_fds)
    return {n: _digest(run.stdout, algorithm) for n, run in strict_zip(names, runs)}


@dataclass(frozen=True)
class DiskFile:
    """What the backup itself knows of a disk file it wrote (no need to ask qemu-img)."""

    role: str
    volume_id: str
    file: str
    source: str
    virtual_size: int
    backing: str | None


def disk_records(
    disks: Sequence[DiskFile], stored_sizes: Sequence[int], digests: Sequence[str] | None
) -> list[DiskRecord]:
    """Records of the disk files, in disk order: their stored sizes, and their checksums
    (None: :data:`UNSEALED`, left to the first verify)."""
    sums = list(digests) if digests is not None else [UNSEALED] * len(disks)
    return [
        DiskRecord(
            role=d.role,
            volume_id=d.volume_id,
            file=d.file,
            source=d.source,
            virtual_size=d.virtual_size,
            stored_size=size,
            checksum=digest,
            backing=d.backing,
        )
        for d, size, digest in strict_zip(disks, stored_sizes, sums)
    ]


def write_new(directory_fd: int, name: str) -> IO[str]:
    """A new file ``name`` in the directory ``directory_fd`` opens, for writing text: made
    ``O_EXCL | O_NOFOLLOW``, so that a name planted there (a link to a host file) is an
    error, never a target. How every file the shim writes on the NAS is made."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.fdopen(os.open(name, flags, 0o644, dir_fd=directory_fd), "w", encoding="utf-8")


def write_manifest(directory_fd: int, manifest: Manifest) -> None:
    """Write ``manifest.json`` in the directory ``directory_fd`` opens: a temporary file of
    a fresh name (``O_EXCL | O_NOFOLLOW``: a name planted there is an error, never a
    target), fsynced, renamed over the old one (a rename replaces a link, never follows
    it). The caller fsyncs the directory (:mod:`shim.backupdir` owns its durability)."""
    created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = json.dumps({**asdict(manifest), "created": created}, indent=2, sort_keys=True)
    tmp = f".{MANIFEST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with write_new(directory_fd, tmp) as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, MANIFEST, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=directory_fd)
        raise


_FILE_NAME = re.compile(r"(root|datadisk)\.[^/\x00-\x1f\x7f]+\.qcow2")


def parse(data: bytes) -> Manifest:
    """The manifest ``data`` holds; ValueError saying what is wrong with it. Fields of a
    newer format are ignored; every known one must have its type."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON ({type(exc).__name__})") from None
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    disks = doc.get("disks", [])
    if not isinstance(disks, list):
        raise ValueError("'disks' is not a list")
    records = [_typed(DiskRecord, d, f"disks[{i}]") for i, d in enumerate(disks)]
    for index, record in enumerate(records):
        if not _FILE_NAME.fullmatch(record.file) or record.role not in ("root", "datadisk"):
            raise ValueError(f"disks[{index}] names no backup file of this directory")
        if record.virtual_size < 0 or record.stored_size < 0:
            raise ValueError(f"disks[{index}] has a negative size")
    # Top-level fields a format lacks take their defaults: only ``bitmap`` and ``disks`` are
    # read to decide anything, and a manifest of another format must still answer.
    top = {**_MANIFEST_DEFAULTS, **{k: v for k, v in doc.items() if k != "disks"}}
    manifest = _typed(Manifest, top, "manifest")
    if manifest.checksum_algorithm not in ALGORITHMS:
        raise ValueError(f"unknown checksum algorithm {manifest.checksum_algorithm[:40]!r}")
    return Manifest(**{**vars(manifest), "disks": records})


_MANIFEST_DEFAULTS: Mapping[str, object] = {
    "vm": "", "mode": "", "offline": False, "bitmap": None, "parent": None, "fallback": False
}  # fmt: skip
Record = TypeVar("Record", DiskRecord, Manifest)
_TYPES: Mapping[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "str | None": (str, type(None)),
    "list[DiskRecord]": (list,),
}


def _typed(cls: type[Record], doc: Any, where: str) -> Record:
    if not isinstance(doc, dict):
        raise ValueError(f"{where} is not a JSON object")
    values: dict[str, Any] = {}
    for spec in fields(cls):
        if spec.name == "disks":
            continue
        if spec.name not in doc:
            if spec.default is spec.default_factory:  # both MISSING: a required field
                raise ValueError(f"{where} has no {spec.name!r}")
            continue
        value = doc[spec.name]
        allowed = _TYPES[str(spec.type)]
        if not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool)):
            raise ValueError(f"{where}.{spec.name} is not of type {spec.type}")
        values[spec.name] = value
    return cls(**values)


def checkpoint_mismatch(manifest: Manifest | None, directory: str, expected: str) -> str | None:
    """Why the backup ``directory`` whose manifest this is did not create checkpoint
    ``expected`` (None when it did, or when it has no manifest to say: a backup written by
    upstream's script)."""
    if manifest is None:
        return None
    if manifest.bitmap != expected:
        return (
            f"parent backup {directory} recorded checkpoint {manifest.bitmap or '(none)'}, "
            f"not {expected}"
        )
    return None
