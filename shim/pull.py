"""Pull-mode copies: the guest only ever waits on local storage (fleecing).

In push mode QEMU copies an area to the NAS before a guest write may change it, so a slow
NAS slows the guest and a full one fails its writes (the VM pauses). In pull mode libvirt
keeps each disk's point-in-time view with copy-before-write into a sparse **scratch**
image on local storage and exports that view over NBD on a Unix socket; the shim then
copies from the export to the backup's qcow2 files at the NAS's own pace.

A full is ``qemu-img convert`` of the export into its empty target: holes stay holes (the
export reports them) and the clusters are stored in the disk's order. An incremental copies
only the extents the export's dirty-bitmap context marks, in a ``qemu-storage-daemon``: an
NBD client node per disk, the target qcow2 backed by its parent (as in push mode), and a
``sync=incremental`` backup job between them, every disk at once. QEMU's NBD client cannot
hand the export's context to a job, and QMP has no command to set a bitmap's bits, so the
extents are written as zeroes (``qemu-io``, no data stored) into a small local qcow2 whose
persistent bitmap records them, and that bitmap is merged into one on the source node.
(A job per extent between raw windows was 1.6 times slower than push mode's job on
scattered changes; ``qemu-img convert`` reads a dirty-bitmap view inverted.) QEMU moves
every byte; Python reads the extent map (``qemu-img map``) and speaks QMP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shim import proc, qemu_img, settings
from shim.compat import strict_zip
from shim.errors import CommandFailed, InputError
from shim.manifest import checksums_at_backup
from shim.qemu_img import QEMU_IMG
from shim.request import validate_scratch_dir
from shim.storage_daemon import (
    JOB_STALL_SECONDS,
    QmpError,
    StorageDaemon,
    bitmap_count,
    blockdev_file,
    blockdev_nbd,
    blockdev_qcow2,
)
from shim.targets import Targets
from shim.versions import X_PERF_SINCE

log = logging.getLogger(__name__)

SCRATCH_ENV = settings.SCRATCH_DIR.name
"""The host setting: a local directory for scratch images; set, running VMs are backed up
in pull mode (``-S DIR``/``--scratch-dir DIR`` sets it for one run)."""
DEFAULT_SCRATCH = Path("/var/lib/cloudstack-nasbackup-shim/scratch")
"""Pull mode's scratch directory when none is set (:func:`shim.backup.take_backup` takes
fulls, compressed and capped backups in pull mode): created on first use, root's alone."""
SCRATCH_RESERVE = 1024 * 1024 * 1024
SCRATCH_RESERVE_FRACTION = 0.05
"""What the default scratch directory's filesystem keeps free beyond the worst case: the
larger of 1 GiB and 5 % of it (it is usually the host's own)."""
SOCKET_NAME = "nbd.sock"
SCRATCH_SUFFIX = ".scratch.qcow2"
"""libvirt's scratch image of a disk: ``<target>.scratch.qcow2``."""
SELECTION_BITMAP = "selection"
"""The bitmap that selects an incremental's extents, in its local image and on the source."""
SELECTION_GRANULARITY = 64 * 1024
"""libvirt's bitmaps have the qcow2 cluster size as granularity: 64 KiB by default."""
COPY_WORKERS = 16
"""Requests each incremental's job keeps in flight (QEMU's default, 64, holds up to 64 MiB
of buffers per disk for no measured gain)."""
COPY_STALL_SECONDS = JOB_STALL_SECONDS
"""A full copy whose process does nothing (no CPU time, no write) this long is stopped and
fails."""
_WATCH_SECONDS = 0.5
"""How often a full's progress is read (the bytes its target holds)."""
QEMU_IO = "qemu-io"
_EXTENTS_PER_QEMU_IO = 2000
"""Extents per ``qemu-io`` run (a ``-c`` each: the argument list stays small)."""
_SOCKET_PATH_MAX = 107
"""A Unix socket path's limit (108 bytes with its terminating NUL)."""


def scratch_setting() -> str | None:
    """The host's scratch directory (:data:`SCRATCH_ENV`), None when none is set."""
    return settings.value(settings.SCRATCH_DIR) or None


def scratch_dir_problem(root: Path) -> str | None:
    """Why ``root`` (created if missing) cannot be a scratch directory; None when it can:
    an existing one must be a directory (not a link) of this user's alone."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(root)
    except OSError as exc:
        return f"the scratch directory {root} is unusable: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return f"the scratch directory {root} is not a directory of this user's alone"
    return None


def scratch_room_problem(root: Path, needed: int) -> str | None:
    """Why the scratch directory ``root`` (:func:`scratch_dir_problem` passed) cannot hold
    ``needed`` bytes and still keep :data:`SCRATCH_RESERVE` free; None when it can."""
    try:
        fs = os.statvfs(root)
    except OSError as exc:
        return f"the scratch directory {root} is unusable: {exc.strerror}"
    free = fs.f_bavail * fs.f_frsize
    reserve = max(SCRATCH_RESERVE, int(SCRATCH_RESERVE_FRACTION * fs.f_blocks * fs.f_frsize))
    if free < needed + reserve:
        return (
            f"the scratch directory {root} has {free} bytes free, less than the {needed} "
            f"the disks hold and {reserve} kept free"
        )
    return None


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
        """The scratch image of the disk ``target`` (libvirt's)."""
        return self.dir / f"{target}{SCRATCH_SUFFIX}"

    def selection(self, target: str) -> Path:
        """The image whose bitmap selects the extents of ``target`` an incremental copies."""
        return self.dir / f"{target}.selection.qcow2"

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


def write_selection(path: Path, size: int, extents: Sequence[Extent]) -> None:
    """A qcow2 of ``size`` bytes whose persistent bitmap :data:`SELECTION_BITMAP` marks
    ``extents``: they are written as zeroes, which store no data but dirty the bitmap."""
    qemu_img.create(path, size)
    proc.run([QEMU_IMG, "bitmap", "--add", "-g", str(SELECTION_GRANULARITY), str(path),
              SELECTION_BITMAP])  # fmt: skip
    for first in range(0, len(extents), _EXTENTS_PER_QEMU_IO):
        commands = []
        for extent in extents[first : first + _EXTENTS_PER_QEMU_IO]:
            commands += ["-c", f"write -z {extent.start} {extent.length}"]
        proc.run([QEMU_IO, "-f", "qcow2", *commands, str(path)])


def selected_bytes(extents: Sequence[Extent]) -> int:
    """The bytes a bitmap of :data:`SELECTION_GRANULARITY` marking ``extents`` counts
    (a grain two extents share counts once; no grain is enumerated: a disk may be 1 TiB)."""
    grains, counted_to = 0, -1
    for extent in sorted(extents, key=lambda e: e.start):
        first = max(extent.start // SELECTION_GRANULARITY, counted_to + 1)
        last = (extent.start + extent.length - 1) // SELECTION_GRANULARITY
        if last >= first:
            grains += last - first + 1
            counted_to = last
    return grains * SELECTION_GRANULARITY


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
    """What to copy of one disk: its export, its target file, and the extents (None: all)
    with the local image that will select them (see :func:`write_selection`)."""

    export: str
    target: Path
    extents: Sequence[Extent] | None = None
    selection: Path | None = None
    node: dict[str, object] | None = None
    """How the storage daemon opens an incremental's target
    (:meth:`shim.method.BackupMethod.target_node`: the parent's chain named layer by layer,
    the file written as the targets say); None for a full."""


class ExportCopier:
    """Copies disks from libvirt's NBD export into their targets.

    A full is ``qemu-img convert`` of the export into its empty target, one disk after
    another: it writes the clusters in order (a backup job's parallel requests land out of
    order, and a restore then reads the file all over), and it was twice as fast as a backup
    job on a disk of 8 GiB holding 4 GiB (6.1 s against 13.0 s, measured side by side); a
    compressed full compresses a few clusters at once (:mod:`shim.targets`). The
    incrementals run in one storage daemon, each a ``sync=incremental`` job selected by
    :func:`write_selection`, all disks at once.

    Each copy is written as ``targets`` says (compression, its share of the cap).
    ``on_progress(done, total)`` is called with bytes as the copy moves: for a full, what
    its target holds so far against the virtual size; for an incremental, the job's own.
    A full whose bytes stay still for :data:`COPY_STALL_SECONDS` is stopped and fails (a
    dead NAS, a wedged export), as the daemon's jobs are.
    """

    def __init__(
        self,
        socket: Path,
        copies: Sequence[DiskCopy],
        sizes: Sequence[int],
        targets: Targets,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.socket = socket
        self.targets = targets
        self.copies = list(copies)
        self.sizes = list(sizes)
        self.total = sum(
            size if c.extents is None else selected_bytes(c.extents)
            for c, size in strict_zip(self.copies, sizes)
        )
        self.done = 0
        self._on_progress = on_progress

    def run(self) -> int:
        """Copy everything; return the bytes covered. Raises on any failure (QmpError,
        DaemonHung, CommandFailed, Interrupted); no copying process is left when it does.

        The export's socket is on every copying process's command line: a run killed
        meanwhile leaves them to the next one, which finds them by it (Scratch.prepare)."""
        # A disk without a dirty extent needs no copy: its empty target reads its parent.
        incrementals = [(i, c) for i, c in enumerate(self.copies) if c.extents]
        if incrementals:
            self._copy_incrementals(incrementals)
        fulls = [(c, size) for c, size in strict_zip(self.copies, self.sizes)
                 if c.extents is None]  # fmt: skip
        if fulls:
            self._convert(fulls)
        self._report(self.total)
        return self.done

    def _convert(self, fulls: list[tuple[DiskCopy, int]]) -> None:
        # Each target was created empty: zeroes are skipped, holes stay holes. Made durable
        # with the whole directory before it is published.
        options = self.targets.convert_options()
        argvs = [
            [QEMU_IMG, "convert", "-n", "--target-is-zero", "-O", "qcow2", *options,
             "--image-opts", blockdev_nbd(self.socket, copy.export), str(copy.target)]
            for copy, _size in fulls
        ]  # fmt: skip
        watch = _Watch([(copy.target, size) for copy, size in fulls], self.done)
        # One disk after another: each qemu-img holds its own buffers and libraries (two
        # side by side took the drop-in's tree from 75 to 86 MB), and the scratch images
        # are held until the job ends either way.
        proc.run_many(argvs, at_once=1, on_poll=lambda pids: self._watch(watch, pids, argvs[0]))
        self._report(watch.base + sum(size for _copy, size in fulls))

    def _watch(self, watch: _Watch, pids: list[int], argv: list[str]) -> None:
        held = watch.poll(pids)
        if held is not None:
            self._report(held)
        if watch.stalled():
            raise CommandFailed(
                argv, None, f"the copy made no progress in {COPY_STALL_SECONDS:g} s",
                timed_out=True,
            )  # fmt: skip

    def _copy_incrementals(self, incrementals: list[tuple[int, DiskCopy]]) -> None:
        blockdevs = []
        for i, copy in incrementals:
            if copy.extents is None or copy.selection is None or copy.node is None:
                raise ValueError("an incremental copy needs its extents, selection and node")
            write_selection(copy.selection, self.sizes[i], copy.extents)
            blockdevs += [
                blockdev_nbd(self.socket, copy.export, node=f"src{i}"),
                blockdev_file(f"sel{i}-file", copy.selection, read_only=True),
                blockdev_qcow2(f"sel{i}", f"sel{i}-file", read_only=True),
            ]
        base = self.done
        with StorageDaemon(blockdevs, self.targets.daemon_objects) as daemon:
            try:
                options = self.targets.job_options
                jobs = [{**self._prepare(daemon, i, copy), **options} for i, copy in incrementals]
                daemon.command("transaction", actions=[
                    {"type": "blockdev-backup", "data": job} for job in jobs
                ])  # fmt: skip
                ids = [str(job["job-id"]) for job in jobs]
                ended = daemon.wait_jobs(ids, lambda done: self._report(base + done))
                self._report(base + sum(int(data.get("len", 0)) for data in ended.values()))
                for i, _copy in incrementals:
                    # Detached before the daemon quits: the target's writes are flushed.
                    daemon.command("blockdev-del", **{"node-name": f"tgt{i}"})
            except BaseException:
                daemon.kill()  # the targets are discarded: nothing to drain to the NAS
                raise

    def _prepare(self, daemon: StorageDaemon, i: int, copy: DiskCopy) -> dict[str, object]:
        """Attach disk ``i``'s target and select its extents; return its job's arguments."""
        daemon.command("blockdev-add", **{**(copy.node or {}), "node-name": f"tgt{i}"})
        bitmap = {"node": f"src{i}", "name": SELECTION_BITMAP}
        daemon.command("block-dirty-bitmap-add", **bitmap, granularity=SELECTION_GRANULARITY)
        daemon.command(
            "block-dirty-bitmap-merge", node=f"src{i}", target=SELECTION_BITMAP,
            bitmaps=[{"node": f"sel{i}", "name": SELECTION_BITMAP}],
        )  # fmt: skip
        # The selection is checked, not trusted: a copy of other extents would be a chain
        # that restores to data the VM never held.
        extents = copy.extents or ()
        selected = bitmap_count(daemon, f"src{i}", SELECTION_BITMAP)
        if selected != selected_bytes(extents):
            raise QmpError(
                f"the selection of {copy.export} marks {selected} bytes, "
                f"not the {selected_bytes(extents)} of its dirty extents"
            )
        backup: dict[str, object] = {
            "device": f"src{i}", "target": f"tgt{i}", "job-id": f"copy{i}",
            "sync": "incremental", "bitmap": SELECTION_BITMAP,
        }  # fmt: skip
        if daemon.qemu_version >= X_PERF_SINCE:
            backup["x-perf"] = {"max-workers": COPY_WORKERS}
        return backup

    def _report(self, done: int) -> None:
        self.done = done
        if self._on_progress is not None:
            self._on_progress(done, self.total)


class _Watch:
    """Full copies seen from outside, every :data:`_WATCH_SECONDS`: the bytes their targets
    hold (the progress), and whether their processes have done nothing (no CPU time, no
    byte written) for :data:`COPY_STALL_SECONDS`. Not the bytes stored alone: a disk of
    zeroes is read for minutes without its target growing (and a socket's reads are not in
    ``/proc/<pid>/io``); a copy stuck on a dead NAS or a wedged export burns no CPU.

    Each look also starts writing back what the targets hold (:func:`_write_back`):
    ``qemu-img convert`` leaves its writes in the page cache, and the flush before the
    backup is published then waited for the whole copy (on P1's VM, 0.5 s after a 1.5 s
    copy); started as the copy goes, it overlaps it (0.03 s left). Not when the backup
    takes its checksums as it ends: they read the targets, from the page cache."""

    def __init__(self, targets: list[tuple[Path, int]], base: int) -> None:
        self.base = base
        self._targets = targets
        # The checksums taken as the backup ends read the targets: their pages stay.
        self._writes_back = not checksums_at_backup()
        self._read_at = time.monotonic()
        self._moved = -1
        self._moved_at = self._read_at

    def poll(self, pids: list[int]) -> int | None:
        """``base`` plus the bytes the targets hold (each at most its size), when it is
        time to look again; else None."""
        now = time.monotonic()
        if now - self._read_at < _WATCH_SECONDS:
            return None
        self._read_at = now
        moved = sum(_activity(pid) for pid in pids)
        if moved != self._moved:
            self._moved, self._moved_at = moved, now
        held = 0
        for path, size in self._targets:
            with contextlib.suppress(OSError):
                held += min(_write_back(path) if self._writes_back else _held(path), size)
        return self.base + held

    def stalled(self) -> bool:
        """Whether the copying processes have done nothing for the stall time."""
        return time.monotonic() - self._moved_at >= COPY_STALL_SECONDS


def _held(path: Path) -> int:
    """The bytes the file holds."""
    return os.stat(path, follow_symlinks=False).st_blocks * 512


def _write_back(path: Path) -> int:
    """Start writing back the file's dirty pages, without waiting (Linux starts it for
    ``POSIX_FADV_DONTNEED``, which also drops its clean pages: the backup does not read
    them again, see :class:`_Watch`); return the bytes it holds."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)


def _activity(pid: int) -> int:
    """A number that grows while process ``pid`` works: its CPU ticks plus the bytes it
    wrote (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/io", encoding="ascii") as io:
            written = next(int(line.split(":")[1]) for line in io if line.startswith("wchar:"))
    except (OSError, IndexError, StopIteration, ValueError):
        return 0
    # After the command's ")": state is field 3 of stat(5), utime and stime 14 and 15.
    return int(fields[11]) + int(fields[12]) + written
