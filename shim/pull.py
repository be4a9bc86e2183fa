"""Pull-mode copies: the guest only ever waits on local storage (fleecing).

In push mode QEMU copies an area to the NAS before a guest write may change it, so a slow
NAS slows the guest and a full one fails its writes (the VM pauses). In pull mode libvirt
keeps each disk's point-in-time view with copy-before-write into a sparse **scratch**
image on local storage and exports that view over NBD on a Unix socket; the shim then
copies from the export to the backup's qcow2 files at the NAS's own pace.

The copy runs in a ``qemu-storage-daemon``: an NBD client node per disk, the target qcow2
(backed by its parent, as in push mode), and QEMU's backup job between them. A full copies
the whole view (holes stay holes: the export reports them). An incremental copies only the
extents the export's dirty-bitmap context marks, a job per extent between two ``raw``
windows at that offset, many side by side (QEMU has no QMP command to fill a bitmap, and ``qemu-img
convert`` reads a dirty-bitmap view inverted). QEMU moves every byte; Python reads the
extent map (``qemu-img map``) and speaks QMP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shim import proc
from shim.errors import InputError
from shim.qemu_img import QEMU_IMG
from shim.request import validate_scratch_dir
from shim.storage_daemon import StorageDaemon, blockdev_nbd

log = logging.getLogger(__name__)

SCRATCH_ENV = "NASBACKUP_SHIM_SCRATCH_DIR"
"""The host setting: a local directory for scratch images; set, running VMs are backed up
in pull mode (``-S DIR``/``--scratch-dir DIR`` sets it for one run)."""
SOCKET_NAME = "nbd.sock"
EXTENT_JOBS_AT_ONCE = 32
"""An incremental's extents are copied this many at a time (a job each, side by side)."""
_SOCKET_PATH_MAX = 107
"""A Unix socket path's limit (108 bytes with its terminating NUL)."""


def scratch_setting() -> str | None:
    """The host's scratch directory (:data:`SCRATCH_ENV`), None when push mode is set."""
    return os.environ.get(SCRATCH_ENV) or None


@dataclass(frozen=True)
class Extent:
    """A byte range of a disk."""

    start: int
    length: int


class Scratch:
    """One VM's directory under the host's scratch directory: the export's socket and the
    scratch images libvirt creates (and removes when the job ends).

    Only ever used while holding the VM's lock: whatever is in it then belongs to no
    living run (a killed run's job is aborted before :meth:`prepare`).
    """

    def __init__(self, root: str, vm: str) -> None:
        validate_scratch_dir(root)  # the host setting, or -S checked again
        self.root = Path(root)
        self.dir = self.root / vm
        if len(os.fsencode(self.socket)) > _SOCKET_PATH_MAX:
            raise InputError(f"the scratch directory {root} is too long a path for a socket")

    @property
    def socket(self) -> Path:
        """Where libvirt's NBD server listens."""
        return self.dir / SOCKET_NAME

    def image(self, target: str) -> Path:
        """The scratch image of the disk ``target``."""
        return self.dir / f"{target}.scratch.qcow2"

    def prepare(self) -> None:
        """Create the VM's directory (private), clearing what a dead run left in it: its
        files, and the storage daemon a killed run left copying (it names the socket)."""
        for pid in proc.processes_naming(str(self.socket)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                log.warning("killed process %d, left copying by a run that died", pid)
        left = self.remove()
        if left:
            log.warning("removed scratch files left by a run that died: %s", ", ".join(left))
        self.dir.mkdir(mode=0o700)

    def remove(self) -> list[str]:
        """Remove the VM's directory and everything in it; the names of what was there."""
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        shutil.rmtree(self.dir, ignore_errors=True)
        return names


def dirty_extents(socket: Path, export: str, bitmap: str) -> list[Extent]:
    """The extents of ``export`` that its dirty-bitmap context ``bitmap`` marks, merged.

    Through QEMU's NBD client with ``x-dirty-bitmap`` a dirty extent reads as *not* data
    (the context's dirty bit is where base:allocation has its hole bit); only the map is
    read, never data.
    """
    opts = blockdev_nbd(socket, export, bitmap=bitmap)
    out = proc.run([QEMU_IMG, "map", "--output=json", "--image-opts", opts]).stdout
    extents: list[Extent] = []
    for entry in json.loads(out):
        if entry.get("data"):
            continue
        start, length = int(entry["start"]), int(entry["length"])
        if extents and extents[-1].start + extents[-1].length == start:
            extents[-1] = Extent(extents[-1].start, extents[-1].length + length)
        else:
            extents.append(Extent(start, length))
    return extents


@dataclass(frozen=True)
class DiskCopy:
    """What to copy of one disk: its export, its target file, and the extents (None: all)."""

    export: str
    target: Path
    extents: Sequence[Extent] | None


class ExportCopier:
    """Copies disks from libvirt's NBD export into their targets in one storage daemon.

    ``on_progress(done, total)`` is called with bytes as the copy moves (the total is known
    for incrementals from their extents, for fulls from the virtual sizes).
    """

    def __init__(
        self,
        socket: Path,
        copies: Sequence[DiskCopy],
        sizes: Sequence[int],
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.socket = socket
        self.copies = list(copies)
        self.total = sum(
            size if c.extents is None else sum(e.length for e in c.extents)
            for c, size in zip(self.copies, sizes, strict=True)
        )
        self.done = 0
        self._on_progress = on_progress

    def run(self) -> int:
        """Copy everything; return the bytes covered. Raises on any failure (QmpError,
        DaemonHung, Cancelled); the daemon is gone when it returns or raises."""
        # The export's socket on the daemon's command line: a run killed meanwhile leaves a
        # daemon that the next one finds by it (Scratch.prepare).
        sources = [
            blockdev_nbd(self.socket, copy.export, node=f"src{i}")
            for i, copy in enumerate(self.copies)
        ]
        with StorageDaemon(sources) as daemon:
            try:
                for i, copy in enumerate(self.copies):
                    self._attach(daemon, i, copy)
                # The disks side by side, as push mode's job copies them; an incremental's
                # extents a batch at a time (each job has a pair of windows of its own).
                fulls = [_Job(f"copy{i}", f"src{i}", f"tgt{i}") for i, c in enumerate(self.copies)
                         if c.extents is None]  # fmt: skip
                if fulls:
                    self._run_batch(daemon, fulls)
                extents = [
                    (i, k, extent)
                    for i, copy in enumerate(self.copies)
                    for k, extent in enumerate(copy.extents or ())
                ]
                for first in range(0, len(extents), EXTENT_JOBS_AT_ONCE):
                    batch = extents[first : first + EXTENT_JOBS_AT_ONCE]
                    self._run_batch(daemon, [self._windows(daemon, *item) for item in batch])
                for i in range(len(self.copies)):
                    # Detached before the daemon quits: the target's writes are flushed.
                    daemon.command("blockdev-del", **{"node-name": f"tgt{i}"})
                    daemon.command("blockdev-del", **{"node-name": f"src{i}"})
            except BaseException:
                daemon.kill()  # the targets are discarded: nothing to drain to the NAS
                raise
        return self.done

    def _attach(self, daemon: StorageDaemon, i: int, copy: DiskCopy) -> None:
        # Backed by its parent as the header says (an incremental's unwritten clusters read
        # through); zeroes written become zero clusters, never parent data.
        daemon.command(
            "blockdev-add",
            driver="qcow2",
            **{"node-name": f"tgt{i}", "discard": "unmap", "detect-zeroes": "unmap"},
            file={"driver": "file", "filename": str(copy.target)},
        )

    @staticmethod
    def _windows(daemon: StorageDaemon, i: int, k: int, extent: Extent) -> _Job:
        """Raw windows on the export and the target at one extent, and the job between."""
        job = _Job(f"copy{i}-{k}", f"src{i}-{k}", f"tgt{i}-{k}", windows=True)
        for node, under in ((job.source, f"src{i}"), (job.target, f"tgt{i}")):
            daemon.command(
                "blockdev-add",
                driver="raw",
                file=under,
                offset=extent.start,
                size=extent.length,
                **{"node-name": node, "read-only": node == job.source},
            )
        return job

    def _run_batch(self, daemon: StorageDaemon, jobs: list[_Job]) -> None:
        """Start ``jobs`` at once, wait for all of them, remove their windows."""
        base = self.done
        daemon.command("transaction", actions=[
            {"type": "blockdev-backup", "data": {
                "device": job.source, "target": job.target, "sync": "full", "job-id": job.id,
            }} for job in jobs
        ])  # fmt: skip
        ended = daemon.wait_jobs([job.id for job in jobs], lambda done: self._report(base + done))
        self._report(base + sum(int(data.get("len", 0)) for data in ended.values()))
        for job in jobs:
            if job.windows:
                for node in (job.target, job.source):
                    daemon.command("blockdev-del", **{"node-name": node})

    def _report(self, done: int) -> None:
        self.done = done
        if self._on_progress is not None:
            self._on_progress(done, self.total)


@dataclass(frozen=True)
class _Job:
    """One backup job in the daemon: its id, source and target nodes."""

    id: str
    source: str
    target: str
    windows: bool = False
    """Whether source and target are raw windows of this job's own (removed after it)."""
