"""How a backup's files are written: the one seam every writer asks.

Data reaches the NAS through three writers: QEMU's push job (libvirt's), a storage
daemon's backup jobs (a stopped VM's disks, pull incrementals) and ``qemu-img convert``
(pull fulls, ``rbd:`` sources, re-sparsified block copies). Each takes its options from
one :class:`Targets`, made once per backup by :func:`targets_for`, so an option is one
change here and the writers stay as they are:

* **compression**: clusters are stored compressed in the qcow2 (zstd where this host's
  QEMU was built with it, zlib otherwise); any ``qemu-img`` reads them, the Java restore's
  ``qemu-img convert`` and ``-o restore`` included, on a host whose QEMU has that type
  (``NASBACKUP_SHIM_COMPRESS=zlib`` where a restore may run on Debian 11's). QEMU's push
  job, which libvirt starts, cannot compress (:attr:`Targets.pull_reason`). A compressed
  full has clusters of :data:`COMPRESSED_FULL_CLUSTER`, and ``qemu-img convert`` compresses
  several at once (``-W``): QEMU writes each compressed cluster on its own, and with 64 KiB
  clusters one at a time a full to a 1 GbE NAS (the lab's) took longer than the
  uncompressed copy (13.5 s against 10.0 s for 768 MiB); several at once, 11.2 s with
  64 KiB clusters, 9.2 s with 256 KiB, 7.1 s with 512 KiB, 6.8 s with 1 MiB. But QEMU
  decompresses a whole cluster for every piece of it a restore reads, and an incremental's
  64 KiB clusters cut a full's into pieces: behind 4 KiB changes in 10 % of the 64 KiB
  areas, restoring the chain took 0.9 s of CPU over 64 KiB clusters, 1.2 s over 512 KiB,
  1.8 s over 1 MiB. An incremental keeps 64 KiB clusters: a larger one would copy the
  unchanged data around each change.
* **rate**: a cap on the bytes per second one backup sends to the NAS (the NAS is what it
  protects, not one disk). A storage daemon's targets share one throttle group on their
  files: what reaches the NAS is counted, compressed, and a hole costs nothing.
  ``qemu-img convert -r`` counts the data it reads. QEMU's push job counts every byte of
  the disk, holes too; it starts uncapped and is capped as soon as libvirt lets it
  (:meth:`shim.virt.jobs.BackupJob.cap_rate`); and a capped push job keeps the guest's
  writes waiting on the NAS for longer. So a capped backup of a running VM is taken in
  pull mode (:attr:`Targets.pull_reason`).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass

from shim import qemu_img, settings
from shim.errors import CommandFailed, UsageError

log = logging.getLogger(__name__)

ZSTD = "zstd"
ZLIB = "zlib"
MiB = 1024 * 1024
CAP_GROUP = "nasbackup-cap"
"""The throttle group of a storage daemon's targets."""
MAX_BANDWIDTH_MIB = 1024 * 1024
"""A cap above 1 TiB/s is a typo, not a cap."""
COMPRESSED_FULL_CLUSTER = 512 * 1024
"""The cluster size of a compressed full's files: most of the larger clusters' speed for a
backup, less of their cost for a restore (see above)."""
COMPRESSING_COROUTINES = 8
"""Clusters ``qemu-img convert`` reads and compresses at once when compressing (QEMU
compresses on at most 4 threads per image; 16 were no faster and held 26 MB more)."""


@dataclass(frozen=True)
class Targets:
    """How every file of one backup is written."""

    compression: str | None = None
    """The qcow2 ``compression_type`` of the files (their clusters written compressed);
    None: stored as read."""
    rate: int | None = None
    """The backup's cap in bytes per second; None: as fast as the NAS takes it."""

    def create_options(self, *, full: bool) -> tuple[str, ...]:
        """``qemu-img create -o`` options of a file: of a full (no backing file) or not."""
        if not self.compression:
            return ()
        cluster = (f"cluster_size={COMPRESSED_FULL_CLUSTER}",) if full else ()
        return (f"compression_type={self.compression}", *cluster)

    def share(self, copies: int) -> int | None:
        """Each copy's cap when ``copies`` run at once (at least 1 byte/s)."""
        return None if self.rate is None else max(1, self.rate // max(1, copies))

    def convert_options(self) -> list[str]:
        """``qemu-img convert`` options (one copy at a time: the whole cap)."""
        argv = ["-c", "-W", "-m", str(COMPRESSING_COROUTINES)] if self.compression else []
        return argv + (["-r", str(self.rate)] if self.rate is not None else [])

    @property
    def daemon_objects(self) -> tuple[str, ...]:
        """``qemu-storage-daemon --object`` options: the throttle group of a capped backup."""
        if self.rate is None:
            return ()
        return (f"throttle-group,id={CAP_GROUP},x-bps-write={self.rate}",)

    def file_node(self, filename: str) -> dict[str, object]:
        """The protocol node of a target file in a storage daemon, in the cap's group."""
        node: dict[str, object] = {"driver": "file", "filename": filename}
        if self.rate is None:
            return node
        return {"driver": "throttle", "throttle-group": CAP_GROUP, "file": node}

    @property
    def job_options(self) -> dict[str, object]:
        """``blockdev-backup`` arguments of a storage daemon's job."""
        return {"compress": True} if self.compression else {}

    @property
    def pull_reason(self) -> str | None:
        """Why a running VM's backup with these targets should be taken in pull mode (see
        :func:`shim.backup._scratch_for`); None when push mode serves as well."""
        if self.compression:
            return "a compressed backup needs pull mode (QEMU's push job cannot compress)"
        if self.rate is not None:
            return "a capped backup is taken in pull mode (the guest never waits on it)"
        return None

    def describe(self) -> str:
        """For the log: what differs from a plain copy."""
        parts = [f"{self.compression} compressed"] if self.compression else []
        if self.rate is not None:
            parts.append(f"capped at {self.rate / MiB:g} MiB/s")
        return ", ".join(parts) or "uncompressed, no cap"


def parse_bandwidth(value: str, source: str) -> int | None:
    """A cap in MiB/s as ``-b`` and the host setting give it (0: none); UsageError if bad."""
    if not (value.isascii() and value.isdigit()) or len(value) > 9:
        raise UsageError(f"{source} takes a whole number of MiB/s (0 for no cap), not {value!r}")
    mib = int(value)
    if mib > MAX_BANDWIDTH_MIB:
        raise UsageError(f"{source} is too large: {mib} MiB/s")
    return mib or None


COMPRESS_VALUES = ("false", "true", ZLIB)
"""The host setting's values: ``zlib`` where a restore may run on a host whose QEMU has no
zstd (Debian 11's)."""


def targets_for(compress: bool | None, bandwidth_mib: int | None) -> Targets:
    """The targets of one backup: the request's options, else the host's settings (whose
    ``zlib`` also names the type ``-c`` writes)."""
    setting = settings.value(settings.COMPRESS)
    if setting not in COMPRESS_VALUES:
        raise UsageError(
            f"{settings.COMPRESS.name} is {', '.join(COMPRESS_VALUES)}, not {setting!r}"
        )
    if compress is None:
        compress = setting != "false"
    if bandwidth_mib is None:
        bandwidth_mib = parse_bandwidth(settings.value(settings.BANDWIDTH), settings.BANDWIDTH.name)
    compression = (ZLIB if setting == ZLIB else compression_type()) if compress else None
    return Targets(compression=compression, rate=bandwidth_mib * MiB if bandwidth_mib else None)


_probed: list[str] = []
"""What :func:`compression_type` found, once it found it."""


def compression_type() -> str:
    """zstd when this host's QEMU can write it (Debian 11's QEMU 5.2 was built without
    it), else zlib: found by creating a small image, once per process. A probe that fails
    for another reason (no room in the temporary directory) is not remembered."""
    if _probed:
        return _probed[0]
    with tempfile.TemporaryDirectory(prefix="nasbackup-probe.") as tmp:
        try:
            qemu_img.create(f"{tmp}/probe.qcow2", MiB, options=(f"compression_type={ZSTD}",))
        except CommandFailed as exc:
            if ZSTD not in exc.stderr:
                raise
            log.info("this QEMU cannot write zstd (%s): compressed backups use zlib", exc)
            _probed.append(ZLIB)
            return ZLIB
    _probed.append(ZSTD)
    return ZSTD
