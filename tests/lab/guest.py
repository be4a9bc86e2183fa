"""The lab's real guest: a booted Linux with qemu-guest-agent, driven through the agent.

:meth:`Lab.create_guest` boots the image :mod:`tests.lab.guest_image` built (the
distribution kernel, a busybox initramfs, qemu-ga) as a TCG domain shaped like CloudStack's:
transient, ``i-2-<n>-VM``, a ROOT volume holding an ext4 filesystem (``vda``, mounted at
``/mnt/data`` in the guest) and raw data volumes (``vdb``...), all at ``<pool>/<uuid>``.

Workloads run in the guest through the agent's ``guest-exec``: files written through the
filesystem and checked by their checksums, a sequence writer on a raw disk whose layout
tells whether an image is one point in time, and a 4 KiB synchronous-write latency probe.
Its writes go through virtio-blk, so they obey the device's error policy: a write that fails
with ENOSPC pauses the VM, as it would a production guest.
"""

from __future__ import annotations

import base64
import json
import re
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from tests.lab.guest_image import DATA_MOUNT, DD, FREEZE_LOG, GuestImage
from tests.lab.lab import Lab, LabError, LabVM, MiB

BOOT_TIMEOUT_SECONDS = 90
BLOCK = 4096
_SEQ_RECORD = re.compile(rb"seq (\d{12})\n")
_LATENCY = re.compile(r"time=([\d.]+) (us|ms|s)\b")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclass(frozen=True)
class ExecResult:
    """What a program run in the guest left: its exit code and its output."""

    code: int
    out: str
    err: str


@dataclass(frozen=True)
class SequenceCut:
    """What a sequence-writer disk image holds: the latest sequence number in it, and
    whether every block is exactly what the writer had written by then (one point in time).
    """

    latest: int
    consistent: bool
    problems: tuple[str, ...] = ()


@dataclass
class PauseWatch:
    """Intervals a domain spent paused by an I/O error, from libvirt's lifecycle events."""

    paused_at: float | None = None
    intervals: list[float] = field(default_factory=list)
    io_error_pauses: int = 0

    @property
    def seconds(self) -> float:
        """Time spent paused on I/O errors (an interval still open counts up to now)."""
        open_for = time.monotonic() - self.paused_at if self.paused_at is not None else 0.0
        return sum(self.intervals) + open_for


class Guest:
    """A running lab guest with an agent. ``vm`` is its :class:`LabVM` (disks, state)."""

    def __init__(self, vm: LabVM) -> None:
        self.vm = vm
        self.boot_seconds = 0.0

    # -- the agent --------------------------------------------------------------------------
    def agent(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: int = 10
    ) -> Any:
        """One agent command through libvirt; returns its ``return`` member."""
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        try:
            reply = libvirt_qemu.qemuAgentCommand(self.vm.dom, json.dumps(request), timeout, 0)
        except libvirt.libvirtError as exc:
            raise LabError(f"{self.vm.name}: agent {command}: {exc.get_error_message()}") from exc
        return json.loads(reply)["return"]

    def wait_ready(self, timeout: float = BOOT_TIMEOUT_SECONDS) -> float:
        """Wait until the agent answers; returns the seconds it took."""
        started = time.monotonic()
        while True:
            try:
                self.agent("guest-ping", timeout=2)
                return time.monotonic() - started
            except LabError:
                if time.monotonic() - started > timeout:
                    raise LabError(
                        f"{self.vm.name}: no agent after {timeout:.0f} s; console:\n"
                        + self.console()[-2000:]
                    ) from None
                time.sleep(0.1)

    def console(self) -> str:
        """What the guest printed on its serial console."""
        path = self.vm.lab.dir / f"{self.vm.name}.serial"
        return path.read_text(errors="replace") if path.exists() else ""

    def spawn(self, script: str) -> int:
        """Start ``sh -c script`` in the guest, not waiting for it; returns its pid. Its
        output goes where the script sends it (the agent keeps none)."""
        return int(self.agent("guest-exec", {"path": "/bin/sh", "arg": ["-c", script]})["pid"])

    def run(self, script: str, *, timeout: float = 60, check: bool = True) -> ExecResult:
        """Run ``sh -c script`` in the guest and wait for it."""
        pid = self.agent(
            "guest-exec", {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True}
        )["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.agent("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                break
            if time.monotonic() > deadline:
                raise LabError(f"{self.vm.name}: {script!r} still runs after {timeout:.0f} s")
            time.sleep(0.02)
        result = ExecResult(
            code=int(status.get("exitcode", -1)),
            out=base64.b64decode(status.get("out-data", "")).decode(errors="replace"),
            err=base64.b64decode(status.get("err-data", "")).decode(errors="replace"),
        )
        if check and result.code != 0:
            raise LabError(f"{self.vm.name}: {script!r} exited {result.code}: {result.err.strip()}")
        return result

    def freeze_status(self) -> str:
        """``frozen`` or ``thawed``, as the agent says."""
        return str(self.agent("guest-fsfreeze-status"))

    def freeze_log(self) -> list[str]:
        """Each ``freeze`` and ``thaw`` the agent's hook saw, in order."""
        out = self.run(f"cat {FREEZE_LOG} 2>/dev/null || true").out
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def stop_agent(self) -> None:
        """Stop (SIGSTOP) the agent: from now on it takes commands and never answers."""
        self.spawn("sleep 0.2; kill -STOP $(cat /run/qemu-ga.pid)")
        time.sleep(0.6)

    # -- workloads --------------------------------------------------------------------------
    def write_files(self, directory: str, count: int, size_kib: int) -> None:
        """``count`` files of random data in ``/mnt/data/<directory>`` and their checksums
        (``MD5SUMS``), written through the filesystem and synced."""
        d = f"{DATA_MOUNT}/{directory}"
        self.run(
            f"mkdir -p {d} && cd {d} && i=0; while [ $i -lt {count} ]; do "
            f"dd if=/dev/urandom of=f$i bs=1024 count={size_kib} 2>/dev/null || exit 1; "
            f"i=$((i + 1)); done; md5sum f* > MD5SUMS && sync",
            timeout=120,
        )

    def dirty_file(self, path: str, size_kib: int) -> str:
        """A file written through the filesystem and left in the guest's page cache (no
        sync); returns its md5."""
        out = self.run(
            f"dd if=/dev/urandom of={DATA_MOUNT}/{path} bs=1024 count={size_kib} 2>/dev/null"
            f" && md5sum {DATA_MOUNT}/{path}"
        ).out
        return out.split()[0]

    def check_files(self, directory: str) -> ExecResult:
        """``md5sum -c`` of a directory :meth:`write_files` made."""
        return self.run(f"cd {DATA_MOUNT}/{directory} && md5sum -c MD5SUMS", check=False)

    @contextmanager
    def sequence_writer(self, device: str, blocks: int, first: int = 0) -> Iterator[SequenceWriter]:
        """Write 4 KiB records ``seq <n>`` to block ``first + n mod blocks`` of ``device``,
        one after another, each O_DIRECT and flushed (fsync), until the block ends."""
        writer = SequenceWriter(self, device, blocks, first)
        writer.start()
        try:
            yield writer
        finally:
            writer.stop()

    def write_latencies(
        self, count: int, interval_ms: int = 10, *, device: str = "", span: int = 32 * MiB
    ) -> list[float]:
        """Seconds each of ``count`` 4 KiB O_DIRECT O_SYNC writes took in the guest
        (ioping, at random offsets within ``span`` bytes: of a file of the ext4 filesystem,
        or of ``device`` when given, overwriting it)."""
        target = f"-WWW {device}" if device else f"-W {DATA_MOUNT}"
        out = self.run(
            f"ioping -D -Y -s 4k -S {span} -c {count} -i {interval_ms}ms {target}",
            timeout=count * (interval_ms / 1000 + 2) + 60,
        ).out
        return [float(v) * _UNIT_SECONDS[u] for v, u in _LATENCY.findall(out)][1:]

    # -- state ------------------------------------------------------------------------------
    @contextmanager
    def watch_pauses(self) -> Iterator[PauseWatch]:
        """Record, while the block runs, each interval the VM spends paused on an I/O error."""
        watch = PauseWatch()
        lock = threading.Lock()

        def on_event(_c: object, _d: object, event: int, detail: int, _o: object) -> None:
            with lock:
                if (
                    event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED
                    and detail == libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR
                ):
                    watch.io_error_pauses += 1
                    watch.paused_at = time.monotonic()
                elif event == libvirt.VIR_DOMAIN_EVENT_RESUMED and watch.paused_at is not None:
                    watch.intervals.append(time.monotonic() - watch.paused_at)
                    watch.paused_at = None

        conn = self.vm.lab.conn
        callback = conn.domainEventRegisterAny(
            self.vm.dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_event, None
        )
        try:
            yield watch
        finally:
            conn.domainEventDeregisterAny(callback)


class SequenceWriter:
    """The guest's sequence writer (see :meth:`Guest.sequence_writer`)."""

    def __init__(self, guest: Guest, device: str, blocks: int, first: int = 0) -> None:
        self.guest = guest
        self.device = device
        self.blocks = blocks
        self.first = first

    def start(self) -> None:
        """Start writing (from sequence 0)."""
        self.guest.run("rm -f /run/seq /run/seq.stop")
        self.guest.spawn(
            "i=0; while [ ! -e /run/seq.stop ]; do "
            f"printf 'seq %012d\\n' $i | {DD} of={self.device} bs={BLOCK} "
            f"seek=$(({self.first} + i % {self.blocks})) "
            "conv=sync,notrunc,fsync oflag=direct 2>/dev/null "
            "|| { echo failed $i > /run/seq.failed; sleep 0.1; continue; }; "
            "echo $i > /run/seq; i=$((i + 1)); done; echo stopped > /run/seq.done"
        )

    def written(self) -> int:
        """The latest sequence number the guest has completed (-1 before the first)."""
        out = self.guest.run("cat /run/seq 2>/dev/null || echo -1").out.strip()
        return int(out or -1)

    def wait_for(self, sequence: int, timeout: float = 60) -> None:
        """Wait until the writer has completed ``sequence``."""
        deadline = time.monotonic() + timeout
        while self.written() < sequence:
            if time.monotonic() > deadline:
                raise LabError(f"the guest's sequence writer did not reach {sequence}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop writing, and wait until the last write completed."""
        self.guest.run("touch /run/seq.stop")
        deadline = time.monotonic() + 30
        while self.guest.run("test -e /run/seq.done", check=False).code != 0:
            if time.monotonic() > deadline:
                raise LabError("the guest's sequence writer did not stop")
            time.sleep(0.05)

    def cut(self, raw_image: Path) -> SequenceCut:
        """What ``raw_image`` (this writer's disk, as raw) holds: see :class:`SequenceCut`."""
        seen: list[int | None] = []
        with raw_image.open("rb") as image:
            image.seek(self.first * BLOCK)
            for _ in range(self.blocks):
                match = _SEQ_RECORD.match(image.read(BLOCK))
                seen.append(int(match.group(1)) if match else None)
        numbers = [s for s in seen if s is not None]
        latest = max(numbers) if numbers else -1
        problems = []
        for block, got in enumerate(seen):
            # At a point in time when ``latest`` was the newest write, block b holds the
            # newest n <= latest with n % blocks == b (nothing when there was none yet).
            expected = latest - ((latest - block) % self.blocks)
            want = expected if expected >= 0 else None
            if got != want:
                problems.append(f"block {block}: seq {got}, expected {want}")
        return SequenceCut(latest, not problems, tuple(problems[:5]))


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        raise LabError("no values")
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: list[float]) -> float:
    """The median of ``values``."""
    return statistics.median(values)


def boot_guest(
    lab: Lab,
    data_disks: Sequence[int] = (32 * MiB,),
    *,
    root: Path | None = None,
    wait: bool = True,
) -> Guest:
    """Boot a guest in ``lab``: a ROOT volume copied from ``root`` (default: the image's
    empty ext4 template) and one raw-used qcow2 data volume per size; waits for its agent
    unless ``wait=False``."""
    image = GuestImage.cached()
    root_volume = lab.new_volume("vda", 0, template=root or image.root_template)
    started = time.monotonic()
    vm = lab.create_vm(data_disks, volumes=[root_volume], boot=image, guest_agent=True)
    guest = Guest(vm)
    if wait:
        guest.wait_ready()
        guest.boot_seconds = time.monotonic() - started
    return guest
