"""Benchmarks, run by hand (``scripts/bench``): ratios measured side by side in one run.

Each line compares the shim with a baseline measured in the same run on the same data, so
the figures travel between machines: the copy floor (``qemu-img convert`` of the same disks
from a stopped VM, flushed), the shim's own full against its incremental, a depth-1 chain
against a depth-10 one, a full flatten against a rebase. Tests check behaviour; this checks
speed.

Each line is measured in interleaved rounds (:data:`ROUNDS` at least, ``--rounds N`` for
more): a round measures the baseline, then the shim, and the round's value is made of that
round's figures only (the shim's over its own round's baseline, :func:`ratios`; a line that
is the worst of several shapes, modes or fractions takes it inside each round,
:func:`worst`). The line prints the median of the rounds and their spread,
``P<n> <median> [<min>-<max>] target <target> ok|MISS|NOISY (details)``, NOISY when the
rounds fall on both sides of the target; its details give the medians of the raw figures.
Not medians of rounds: P6 (the median of 21 cold starts), P7 (a p99), P8 and P13 (peaks
over every round) and P10 (the worst round's seconds paused). Then a blank line and
``benchmarks: N/M on target``.

P1 to P8 are here; P9 and P10 measure a real guest's I/O during a backup
(:mod:`tests.lab.bench_guest`), P11 to P13 pull mode against push mode
(:mod:`tests.lab.bench_pull`), P14 to P18 a big disk, the NAS's traffic, a sparse disk and
a long chain (:mod:`tests.lab.bench_scale`), P19 virtnbdbackup (:mod:`tests.lab.bench_peers`,
with ``--peers``), P20 to P22 compression and the bandwidth cap
(:mod:`tests.lab.bench_targets`).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from shim import qemu_img
from shim.backupdir import fsync_tree
from shim.nas import Repository
from tests.lab import Lab, LabVM, MiB
from tests.lab.system import descendants_running

ROUNDS = 3
"""Interleaved rounds per line, at least: one run of a line can differ 2x from the next."""
LINES = 22
"""P1 to P22."""
FRACTIONS = (0.01, 0.10, 0.50)
"""P2's fractions of disk 0 rewritten, one incremental after each, in this order."""
ROOT = Path(__file__).resolve().parents[2]
DROPIN = ROOT / "scripts" / "nasbackup.sh"
GiB = 1024 * MiB


@dataclass(frozen=True)
class Metric:
    """One benchmark line."""

    name: str
    value: float
    target: float
    details: str
    higher_is_worse: bool = True
    spread: tuple[float, float] | None = None
    """The lowest and highest of the rounds whose median is :attr:`value`."""

    @property
    def ok(self) -> bool:
        """Whether the value meets its target, in every round when there were rounds."""
        return self.verdict == "ok"

    @property
    def verdict(self) -> str:
        """``ok``, ``MISS``, or ``NOISY`` when the rounds fall on both sides of the target
        (the machine, not the code, decided that run)."""
        low, high = self.spread or (self.value, self.value)
        if high <= self.target:
            return "ok"
        return "MISS" if low > self.target else "NOISY"

    def line(self) -> str:
        """``P<n> <value> [<min>-<max>] target <target> ok|MISS|NOISY (details)``."""
        spread = f" [{self.spread[0]:.3g}-{self.spread[1]:.3g}]" if self.spread else ""
        return (
            f"{self.name} {self.value:.3g}{spread} target {self.target:g} {self.verdict} "
            f"({self.details})"
        )


def from_rounds(name: str, target: float, values: Sequence[float], details: str) -> Metric:
    """A line from the values of interleaved rounds: their median, and their spread."""
    return Metric(
        name, statistics.median(values), target, f"median of {len(values)}: {details}",
        spread=(min(values), max(values)),
    )  # fmt: skip


def ratios(figures: Sequence[float], baselines: Sequence[float]) -> list[float]:
    """Each round's figure over the baseline measured in that same round.

    Never a ratio of medians: that would set one round's figure against another round's
    baseline, and hide how far the rounds spread.
    """
    if len(figures) != len(baselines):
        raise ValueError(f"{len(figures)} rounds' figures against {len(baselines)} baselines")
    return [figure / baseline for figure, baseline in zip(figures, baselines)]


def median_ratio(figures: Sequence[float], baselines: Sequence[float]) -> float:
    """The median of :func:`ratios`: a ratio printed beside a line (push mode's, say)."""
    return statistics.median(ratios(figures, baselines))


def worst(*series: Sequence[float]) -> list[float]:
    """Each round's largest value of ``series`` (one list per shape, mode or fraction, a
    value per round): a line that holds the worst case takes it inside each round."""
    if len({len(values) for values in series}) != 1:
        raise ValueError("series of different numbers of rounds")
    return [max(values) for values in zip(*series)]


def medians(runs: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Each name's median over its rounds: the raw figures a line's details show."""
    return {name: statistics.median(values) for name, values in runs.items()}


def evict(paths: Sequence[Path]) -> None:
    """Start a measurement with these files' data cold, and nothing else.

    Not drop_caches: that would also make the shim's own code cold, which on an agent host
    that runs it every day it is not; the images' data is what a backup must read.
    """
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_S = TypeVar("_S", bound="Sampler")


class Sampler:
    """Calls :meth:`sample` every ``interval`` seconds in a thread of its own while the
    ``with`` block runs (a measurement, not the product: polling is fine here)."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self: _S) -> _S:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self) -> None:
        """One look at what is measured."""
        raise NotImplementedError


class PeakRss(Sampler):
    """Samples the resident memory of a process tree (QEMU is not in it) while it runs."""

    def __init__(self, needle: str) -> None:
        super().__init__(0.005)
        self.needle = needle
        self.peak_kib = 0

    def sample(self) -> None:
        pids = descendants_running(self.needle)
        tree = set(pids)
        for pid in pids:
            tree.update(_children(pid))
        total = sum(_rss_kib(pid) for pid in tree)
        self.peak_kib = max(self.peak_kib, total)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    kids = [int(c) for c in text.split()]
    return kids + [g for c in kids for g in _children(c)]


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed(action: Callable[[], object]) -> float:
    """Seconds ``action`` takes."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def copy_floor(lab: Lab, disks: Sequence[Path], *, force_share: bool = False) -> float:
    """The copy floor: seconds ``qemu-img convert`` of ``disks`` into a local directory then
    fsync take, their data cold, what any copy of them costs on this host (the copies are
    removed after). ``force_share`` for a running VM's disks, which it must not write
    meanwhile."""
    target = lab.new_dir("floor")
    evict(disks)

    def copy() -> None:
        for disk in disks:
            qemu_img.convert(disk, target / disk.name, force_share=force_share)
        fsync_tree(target)

    try:
        return timed(copy)
    finally:
        shutil.rmtree(target)


class Bench:
    """One VM, one repository, every measurement."""

    def __init__(
        self,
        lab: Lab,
        log: Path,
        disks: Sequence[int] = (1 * GiB, 256 * MiB),
        *,
        start: bool = True,
        repo: Repository | None = None,
    ) -> None:
        self.lab = lab
        self.log = log
        self.repo = repo or lab.repository()
        self.vm = lab.create_vm(disks=disks, start=start)
        self.backups: list[str] = []
        self.bitmaps: list[str] = []
        self.rng = random.Random(7)  # noqa: S311 - reproducible offsets, not secrets

    # -- driving the drop-in ----------------------------------------------------------------
    def nasbackup(self, *args: str) -> str:
        repo = self.repo
        argv = [str(DROPIN), *args[:2], "-t", repo.type, "-s", repo.address, "-m", repo.options]
        env = {**os.environ, "NASBACKUP_SHIM_LOG": str(self.log)}
        done = subprocess.run(
            [*argv, *args[2:]], capture_output=True, text=True, env=env, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"nasbackup.sh {args[1]}: {done.stdout.strip()}")
        return done.stdout

    def backup(self, mode: str, vm: LabVM | None = None) -> tuple[float, str]:
        vm = vm or self.vm
        path = f"{vm.name}/{len(self.backups):04d}"
        bitmap = f"backup-{1790000000 + len(self.backups)}"
        args = ["-o", "backup", "-v", vm.name, "-p", path, "-q", "false", "-d", "",
                "-M", mode, "--bitmap-new", bitmap]  # fmt: skip
        if mode == "incremental":
            parents = [str(f.relative_to(self.repo.address)) for f in self.files(self.backups[-1])]
            args += ["--bitmap-parent", self.bitmaps[-1], "--parent-paths", ",".join(parents)]
        start = time.perf_counter()
        out = self.nasbackup(*args)
        elapsed = time.perf_counter() - start
        self.backups.append(path)
        self.bitmaps.append(bitmap)
        return elapsed, out

    def files(self, backup: str) -> list[Path]:
        directory = Path(self.repo.address) / backup
        return sorted(directory.glob("*.qcow2"), key=lambda p: not p.name.startswith("root."))

    def dirty(self, fraction: float) -> int:
        """Random 1 MiB writes over ``fraction`` of disk 0; returns the bytes dirtied."""
        chunks = max(1, round(fraction * self.vm.disks[0].size / MiB))
        offsets = self.rng.sample(range(self.vm.disks[0].size // MiB), chunks)
        for offset in offsets:
            self.vm.write(0, offset * MiB, MiB, pattern=self.rng.randrange(1, 256))
        return chunks * MiB

    # -- the metrics ------------------------------------------------------------------------
    def full_against_floor(self, rounds: int = ROUNDS) -> list[Metric]:
        """P1, P2, P3 and P8 in ``rounds`` rounds, each: the copy floor of the stopped VM's
        disks, then (the VM started again) a full with their data cold, then incrementals
        after 1, 10 and 50 % of disk 0 rewritten. P8 is the peak over every round's full:
        a bound, not a ratio, so no median."""
        self.vm.write(0, 0, 512 * MiB, pattern=0x5A)
        self.vm.write(1, 0, 128 * MiB, pattern=0xA5)
        runs: defaultdict[str, list[float]] = defaultdict(list)
        peak_kib = 0
        for _ in range(rounds):
            runs["floor"].append(self.stopped_floor())
            with PeakRss("shim.cli") as rss:
                full, jobs = self.cold_full()
            peak_kib = max(peak_kib, rss.peak_kib)
            runs["full"].append(full)
            runs["job"] += jobs
            self.incremental_efficiency(runs)
        m = medians(runs)
        stored = [f"{f:.0%}: {m[f'{f:.0%}']:.3f}" for f in FRACTIONS]
        return [
            from_rounds(
                "P1", 1.2, ratios(runs["full"], runs["floor"]),
                f"shim {m['full']:.2f} s, copy floor {m['floor']:.2f} s, libvirt job "
                f"{m['job']:.2f} s",
            ),
            from_rounds(
                "P2", 1.10, worst(*(runs[f"{f:.0%}"] for f in FRACTIONS)),
                "each round's worst of stored/dirtied " + ", ".join(stored),
            ),
            from_rounds(
                "P3", 0.25, ratios(runs["1% seconds"], runs["full"]),
                f"incremental at 1% {m['1% seconds']:.2f} s, full {m['full']:.2f} s",
            ),
            Metric("P8", peak_kib / 1024, 80,
                   f"MB peak RSS of the drop-in's process tree over {rounds} fulls"),
        ]  # fmt: skip

    def stopped_floor(self) -> float:
        """The copy floor of this VM's disks, the VM stopped meanwhile (started again after:
        a backup needs it running)."""
        self.vm.stop()
        try:
            return copy_floor(self.lab, [d.path for d in self.vm.disks])
        finally:
            self.vm.start()

    def cold_full(self) -> tuple[float, list[float]]:
        """A full with the disks' data cold: its seconds, and its libvirt jobs' seconds."""
        evict([d.path for d in self.vm.disks])
        seconds, out = self.backup("full")
        jobs = [
            int(line.split()[2]) / 1000 for line in out.splitlines()
            if line.startswith("Time elapsed")
        ]  # fmt: skip
        return seconds, jobs

    def incremental_efficiency(self, runs: defaultdict[str, list[float]]) -> None:
        """One round of P2 and P3 after a full: an incremental after each of
        :data:`FRACTIONS` of disk 0 rewritten, its bytes stored ÷ dirtied added to ``runs``
        under ``"1%"``, ``"10%"``, ``"50%"``, and the first one's seconds under
        ``"1% seconds"``."""
        for fraction in FRACTIONS:
            dirtied = self.dirty(fraction)
            seconds, _ = self.backup("incremental")
            stored = sum(f.stat().st_size for f in self.files(self.backups[-1]))
            runs[f"{fraction:.0%}"].append(stored / dirtied)
            if fraction == FRACTIONS[0]:
                runs[f"{fraction:.0%} seconds"].append(seconds)

    def restore_depth(self, rounds: int = ROUNDS) -> Metric:
        """P4: the top of a depth-10 chain and a full taken after it (depth 1, the same
        data); each round restores the full, then the chain's top, each cold."""
        while len(self.backups) < 1 or self._depth() < 10:
            self.dirty(0.01)
            self.backup("incremental")
        deep = self.backups[-1]
        self.backup("full")
        shallow = self.backups[-1]
        runs = dict(zip(("depth-1", "depth-10"), self.restore_rounds(shallow, deep, rounds)))
        m = medians(runs)
        return from_rounds(
            "P4", 1.3, ratios(runs["depth-10"], runs["depth-1"]),
            f"depth-10 {m['depth-10']:.2f} s, depth-1 {m['depth-1']:.2f} s",
        )  # fmt: skip

    def restore_rounds(self, base: str, top: str, rounds: int) -> tuple[list[float], list[float]]:
        """Each round restores ``base``, then ``top`` (:meth:`restore_seconds`): their
        seconds, round by round."""
        seconds: tuple[list[float], list[float]] = ([], [])
        for _ in range(rounds):
            for backup, found in zip((base, top), seconds):
                found.append(self.restore_seconds(backup))
        return seconds

    def restore_seconds(self, backup: str, vm: LabVM | None = None) -> float:
        """Seconds the drop-in's restore of ``backup`` into fresh volumes takes, its chain's
        data cold (the volumes are removed afterwards)."""
        vm = vm or self.vm
        volumes = [self.lab.new_volume(f"r{i}", d.size).path for i, d in enumerate(vm.disks)]
        evict(self.chain_files(backup))
        argv = [
            "-o",
            "restore",
            "-p",
            backup,
            "--restore-volume-paths",
            ",".join(map(str, volumes)),
        ]
        try:
            return timed(lambda: self.nasbackup(*argv))
        finally:
            for volume in volumes:
                volume.unlink()

    def chain_files(self, backup: str) -> list[Path]:
        """Every file of every disk's chain of ``backup``."""
        return [Path(i.filename) for f in self.files(backup) for i in qemu_img.chain(f)]

    def _depth(self) -> int:
        return len(qemu_img.chain(self.files(self.backups[-1])[0]))

    def rebase_against_flatten(self, rounds: int = ROUNDS) -> Metric:
        """P5 on a 1 GiB disk full of data. A rebase changes its chain, so each round builds
        one (a full, an incremental of 16 MiB, one of 1 MiB), flattens its top, then rebases
        the top onto the full (merging the 16 MiB delta), each cold, and removes it."""
        vm = self.lab.create_vm(disks=(1 * GiB,))
        vm.write(0, 0, 1 * GiB, pattern=0x11)  # a full disk: what a flatten must copy
        runs: defaultdict[str, list[float]] = defaultdict(list)
        for _ in range(rounds):
            grandparent, child = self._delta_chain(vm)
            top = Path(self.repo.address) / child / f"root.{vm.disks[0].volume_id}.qcow2"
            runs["flatten"].append(self._flatten_seconds(top))
            runs["rebase"].append(self._rebase_seconds(child, grandparent))
            for backup in self.backups[-3:]:  # 1 GiB a round: the disk need not hold them all
                shutil.rmtree(Path(self.repo.address) / backup)
        m = medians(runs)
        return from_rounds(
            "P5", 0.1, ratios(runs["rebase"], runs["flatten"]),
            f"rebase of a 16 MiB delta {m['rebase']:.2f} s, flatten {m['flatten']:.2f} s",
        )  # fmt: skip

    def _delta_chain(self, vm: LabVM) -> tuple[str, str]:
        """A full of ``vm``, an incremental after 16 MiB rewritten, one after 1 MiB: the
        full's and the last one's backups."""
        self.backup("full", vm)
        grandparent = self.backups[-1]
        for offset in self.rng.sample(range(1024), 16):
            vm.write(0, offset * MiB, MiB, pattern=0x22)
        self.backup("incremental", vm)
        vm.write(0, 900 * MiB, MiB, pattern=0x33)
        self.backup("incremental", vm)
        return grandparent, self.backups[-1]

    def _rebase_seconds(self, child: str, grandparent: str) -> float:
        """The drop-in's safe rebase of ``child`` onto ``grandparent``, data cold."""
        evict(self.chain_files(child))
        return timed(lambda: self.nasbackup(
            "-o", "rebase", "--rebase-target", child, "--rebase-new-backing", grandparent
        ))  # fmt: skip

    def _flatten_seconds(self, top: Path) -> float:
        """``qemu-img convert`` of ``top``'s chain into one local file, data cold."""
        flat = self.lab.new_dir("flat")
        evict([Path(i.filename) for i in qemu_img.chain(top)])
        try:
            return timed(lambda: qemu_img.convert(top, flat / "flat.qcow2"))
        finally:
            shutil.rmtree(flat)


def cold_start_ms(runs: int = 21) -> Metric:
    """P6: median wall time of ``nasbackup.sh -h``, a fresh process each time."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([str(DROPIN), "-h"], capture_output=True, check=False)
        samples.append((time.perf_counter() - start) * 1000)
    median = statistics.median(samples)
    return Metric("P6", median, 150, f"ms median of {runs}, max {max(samples):.0f} ms")


def service_latency() -> Metric:
    """P7: p99 of a stats command over the socket at 50 concurrent clients."""
    try:
        from tests.lab.bench_service import stats_latency
    except ImportError:
        return Metric("P7", float("inf"), 50, "the socket service is not there yet")
    return stats_latency()


def run(selected: Sequence[str], *, peers: bool = False, rounds: int = ROUNDS) -> list[Metric]:
    """Every selected metric, in order; P19 only with ``peers`` (it installs a peer)."""
    metrics: list[Metric] = []
    if {"P9", "P10"} & set(selected):
        # A real guest's I/O (tests/lab/bench_guest.py), on a lab of its own.
        from tests.lab.bench_guest import guest_metrics

        metrics += guest_metrics(list(selected), rounds)
    if {"P11", "P12", "P13"} & set(selected):
        # Pull mode against push mode (tests/lab/bench_pull.py), on a VM of its own.
        from tests.lab.bench_pull import pull_metrics

        metrics += pull_metrics(list(selected), rounds)
    if {"P14", "P15", "P16", "P17", "P18"} & set(selected):
        # At scale: a big disk against the copy floor, the NAS's traffic (bench_scale.py).
        from tests.lab.bench_scale import scale_metrics

        metrics += scale_metrics(list(selected), rounds)
    if {"P20", "P21", "P22"} & set(selected):
        # Compression and the bandwidth cap (tests/lab/bench_targets.py).
        from tests.lab.bench_targets import target_metrics

        metrics += target_metrics(list(selected), rounds)
    if "P19" in selected and peers:
        # Against virtnbdbackup, same shapes, same run (tests/lab/bench_peers.py).
        from tests.lab.bench_peers import peer_metric

        metrics.append(peer_metric(rounds))
    order = {f"P{i}": i for i in range(1, LINES + 1)}
    if not {f"P{i}" for i in range(1, 9)} & set(selected):
        return sorted(metrics, key=lambda m: order[m.name])
    with Lab() as lab:
        bench = Bench(lab, lab.dir / "bench.log")
        metrics += bench.full_against_floor(rounds)  # P1, P2, P3 and P8
        if "P4" in selected:
            metrics.append(bench.restore_depth(rounds))
        if "P5" in selected:
            metrics.append(bench.rebase_against_flatten(rounds))
        metrics.append(cold_start_ms())
        if "P7" in selected:
            metrics.append(service_latency())
    return sorted((m for m in metrics if m.name in selected), key=lambda m: order[m.name])


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/bench``."""
    parser = argparse.ArgumentParser(prog="bench", description=__doc__)
    parser.add_argument("metrics", nargs="*", default=[f"P{i}" for i in range(1, LINES + 1)])
    parser.add_argument(
        "--peers", action="store_true",
        help="also P19: against virtnbdbackup (installed from the distribution if missing)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS,
        help=f"interleaved rounds of each line (default {ROUNDS}, at least {ROUNDS})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.rounds < ROUNDS:
        parser.error(f"--rounds takes at least {ROUNDS}")
    metrics = run(args.metrics, peers=args.peers, rounds=args.rounds)
    for metric in metrics:
        print(metric.line(), flush=True)
    missed = [m for m in metrics if not m.ok]
    print()
    print(f"benchmarks: {len(metrics) - len(missed)}/{len(metrics)} on target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
