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
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shim import proc

MANIFEST = "manifest.json"
FORMAT = 1
CHECKSUM_ENV = "NASBACKUP_SHIM_CHECKSUM"
ALGORITHMS = ("cksum", "sha256")
CHECKSUM_AT_ENV = "NASBACKUP_SHIM_CHECKSUM_AT"
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
    algorithm = os.environ.get(CHECKSUM_ENV) or "cksum"
    return algorithm if algorithm in ALGORITHMS else "cksum"


def checksums_at_backup() -> bool:
    """Whether backups compute their checksums as they end (``NASBACKUP_SHIM_CHECKSUM_AT``
    is ``backup``), rather than leaving them to the first verify."""
    return os.environ.get(CHECKSUM_AT_ENV, "verify") == "backup"


def _checksum_argv(path: Path, algorithm: str) -> list[str]:
    if algorithm == "cksum":
        return ["cksum", "--", str(path)]
    # openssl uses the CPU's SHA extensions (about 3x coreutils' sha256sum here).
    if shutil.which("openssl"):
        return ["openssl", "dgst", "-sha256", "-r", str(path)]
    return ["sha256sum", "--", str(path)]


def _digest(output: str, algorithm: str) -> str:
    fields = output.split()
    # cksum prints "<crc> <length> <name>": both numbers are the checksum.
    return f"{fields[0]} {fields[1]}" if algorithm == "cksum" else fields[0]


def checksums(paths: Sequence[Path], algorithm: str) -> dict[Path, str]:
    """The checksum of each file with ``algorithm``, files in parallel."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    if not paths:
        return {}
    workers = min(len(paths), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outputs = list(pool.map(lambda p: proc.run(_checksum_argv(p, algorithm)).stdout, paths))
    return {p: _digest(out, algorithm) for p, out in zip(paths, outputs, strict=True)}


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
    directory: Path, disks: Sequence[DiskFile], algorithm: str, *, read_back: bool
) -> list[DiskRecord]:
    """Records of the disk files in ``directory``, in disk order, stored sizes from the
    files; with ``read_back``, checksums with ``algorithm`` (else :data:`UNSEALED`)."""
    paths = [directory / d.file for d in disks]
    digests = checksums(paths, algorithm) if read_back else dict.fromkeys(paths, UNSEALED)
    return [
        DiskRecord(
            role=d.role,
            volume_id=d.volume_id,
            file=d.file,
            source=d.source,
            virtual_size=d.virtual_size,
            stored_size=path.stat().st_size,
            checksum=digests[path],
            backing=d.backing,
        )
        for d, path in zip(disks, paths, strict=True)
    ]


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json``: temporary file, fsync, rename. The caller fsyncs
    ``directory`` (:mod:`shim.backupdir` does, which owns the directory's durability)."""
    created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    doc = {**asdict(manifest), "created": created}
    final = directory / MANIFEST
    tmp = directory / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, final)
    return final


def read_manifest(directory: Path) -> Manifest | None:
    """The manifest of a backup directory, None when there is none (incomplete backup)."""
    try:
        doc = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    disks = [DiskRecord(**d) for d in doc.pop("disks", [])]
    known = {f for f in Manifest.__dataclass_fields__ if f != "disks"}
    return Manifest(**{k: v for k, v in doc.items() if k in known}, disks=disks)


def checkpoint_mismatch(directory: Path, expected: str) -> str | None:
    """Why the backup in ``directory`` is not the one that created checkpoint
    ``expected`` (None when it is, or when it has no manifest to say: a backup written by
    upstream's script). Only the recorded bitmap is read, so a manifest of a newer format
    still answers; one that cannot be read is a reason, not an error."""
    try:
        doc = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return f"the manifest of parent backup {directory.name} is unreadable: {exc}"
    if not isinstance(doc, dict) or not isinstance(doc.get("bitmap"), str | None):
        return f"the manifest of parent backup {directory.name} is malformed"
    recorded = doc.get("bitmap")
    if recorded != expected:
        return (
            f"parent backup {directory.name} recorded checkpoint {recorded or '(none)'}, "
            f"not {expected}"
        )
    return None
