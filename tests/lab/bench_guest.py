"""P9 and P10: what a backup costs the guest, measured in a real guest (tests/lab/guest.py).

* ``P9``: p99 latency of the guest's 4 KiB synchronous writes (ioping, O_DIRECT and
  O_SYNC, at random offsets of the data disk's 192 MiB of data) during a full backup to a
  NAS throttled to about 20 MB/s, divided by the same p99 while no backup runs. Target 2.
* ``P10``: seconds the VM spends paused when the NAS fills up during a backup while the
  guest writes. Target 0.

Push mode copies an area to the NAS before a guest write may change it, so a slow NAS
slows the guest's writes and a full one fails them (the VM pauses): both are expected to
MISS in push mode; they are the baseline a pull (fleecing) mode is measured against.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.lab.bench import Metric
from tests.lab.guest import Guest, boot_guest, median, percentile
from tests.lab.lab import Lab, MiB
from tests.support import Chain

THROTTLE = 20_000_000
"""Bytes per second the NAS takes during P9: a saturated gigabit link shared five ways."""
PROBES = 400
INTERVAL_MS = 10


DATA = 192 * MiB
"""Written on the data disk before the backups: what a full copies, and where P9 probes."""


def _latencies(guest: Guest) -> list[float]:
    # At random offsets of the data the backup copies, so that probes land on areas not yet
    # copied as often as the job's progress allows (the ext4 root is copied first, in a few
    # seconds, and probes there measured the idle disk).
    return guest.write_latencies(PROBES, INTERVAL_MS, device="/dev/vdb", span=DATA)


def latency_during_full(lab: Lab, guest: Guest) -> Metric:
    """P9 (see the module)."""
    idle = _latencies(guest)
    nas = lab.flaky_repository()
    nas.throttle(THROTTLE)
    chain = Chain(lab=lab, vm=guest.vm, repo=nas.repository, log=lab.dir / "p9.log")
    started = time.monotonic()
    in_flight = chain.start("full", lab.dir / "p9-full.log")
    in_flight.wait_for("backup job of")
    during = _latencies(guest)
    probe_end = time.monotonic()
    run = in_flight.finish(timeout=600)
    backup_seconds = time.monotonic() - started
    if run.returncode != 0:
        raise RuntimeError(f"P9's backup failed: {run.stdout.strip()}")
    covered = min(1.0, (probe_end - started) / backup_seconds)
    p99_idle, p99_during = percentile(idle, 0.99), percentile(during, 0.99)
    return Metric(
        "P9", p99_during / p99_idle, 2,
        f"push: 4 KiB sync write p99 {p99_during * 1000:.1f} ms during a full to a "
        f"{THROTTLE / 1e6:.0f} MB/s NAS ({backup_seconds:.1f} s, probes over the first "
        f"{covered:.0%}) / {p99_idle * 1000:.1f} ms idle; p50 {median(during) * 1000:.1f} / "
        f"{median(idle) * 1000:.1f} ms",
    )  # fmt: skip


def paused_when_the_nas_fills(lab: Lab, guest: Guest) -> Metric:
    """P10 (see the module)."""
    nas = lab.flaky_repository()
    chain = Chain(lab=lab, vm=guest.vm, repo=nas.repository, log=lab.dir / "p10.log")
    chain.backup("full")
    nas.throttle(THROTTLE // 4)
    guest.spawn(
        "rm -f /run/w.stop; while [ ! -e /run/w.stop ]; do "
        "dd if=/dev/zero of=/dev/vdb bs=64k count=1024 oflag=direct 2>/dev/null; done"
    )
    try:
        with guest.watch_pauses() as pauses:
            in_flight = chain.start("full", lab.dir / "p10-full.log")
            in_flight.wait_for("backup job of")
            time.sleep(1)
            nas.fill()
            run = in_flight.finish(timeout=600)
            seconds = pauses.seconds
    finally:
        guest.run("touch /run/w.stop")
    nas.heal()
    outcome = "failed" if run.returncode != 0 else "succeeded"
    state = "PAUSED" if guest.vm.is_paused() else "running"
    return Metric(
        "P10", seconds, 0,
        f"push: {pauses.io_error_pauses} pause(s) on an I/O error; the backup {outcome} "
        f"(exit {run.returncode}) and the VM is {state} after it",
    )  # fmt: skip


def guest_metrics(selected: list[str], log_dir: Path | None = None) -> list[Metric]:
    """The selected ones of P9 and P10, on one freshly booted guest."""
    metrics = []
    with Lab() as lab:
        guest = boot_guest(lab, data_disks=(256 * MiB,))
        # Data for the full to copy: written beside the guest (QEMU's block layer), fast.
        guest.vm.write(1, 0, DATA, pattern=0x5A)
        guest.run("sync")
        if "P9" in selected:
            metrics.append(latency_during_full(lab, guest))
        if "P10" in selected:
            metrics.append(paused_when_the_nas_fills(lab, guest))
        if log_dir is not None:
            for log in lab.dir.glob("p*.log"):
                log.replace(log_dir / log.name)
    return metrics
