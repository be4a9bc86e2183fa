"""P14 to P18: a big disk in pull mode (:mod:`shim.pull`) against the copy floor, what a
backup costs the NAS, a sparse disk, a long chain. Each line is the median of interleaved
rounds and their spread, each round's value made of that round's figures only (the larger
of push and pull mode's, where the line takes the larger); page cache evicted before each
run.

* ``P16``: bytes read from the NAS during a full ÷ bytes written, counted by the lab's FUSE
  NAS with the kernel's page cache off. A round: push mode's full and incremental (after
  10 % rewritten), then pull mode's; its value the larger full's ratio (the incrementals'
  figures printed too). Target 0.02.
* ``P17``: a disk of 1 TiB holding 256 MiB against the same 256 MiB on a 1 GiB disk, the
  full's and the restore's wall times. A round: in the default configuration (no setting:
  a full in pull mode, through the default scratch directory), then push mode forced, the
  1 GiB disk's full and restore, then the 1 TiB disk's; its value the larger of the
  default's two ratios (push mode's and the stored sizes printed). Target 1.5.
* ``P18``: restoring the 30th incremental of a chain ÷ restoring its full. A round: the
  full's restore, then the 30th's. Target 1.5.

One 8 GiB disk holding 4 GiB (64 MiB written in every other 128 MiB, through QEMU's block
layer):

* ``P14``: the full's wall time in pull mode ÷ the copy floor (``qemu-img convert`` of the
  stopped disk into a directory of the lab, beside the repository's, then fsync: the same
  flush as a backup's). A round: the floor, then (the VM started again) a full in push
  mode, then one in pull mode. Push mode's ratio is printed beside it. Target 1.3.
* ``P15``: flattening that full (``qemu-img convert`` of the backup file, as the Java
  restore does) ÷ the same convert of the source disk. A round: the source's convert, then
  push mode's full's, then pull mode's (the last P14 round's fulls), at least
  :data:`FLATTEN_ROUNDS` rounds. Push mode's is printed too. Target 1.3.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

from shim import qemu_img
from tests.lab.bench import (
    ROUNDS,
    Bench,
    Metric,
    evict,
    from_rounds,
    median_ratio,
    medians,
    ratios,
    timed,
    worst,
)
from tests.lab.bench_pull import in_mode
from tests.lab.lab import FlakyNas, Lab, LabVM, MiB

GiB = 1024 * MiB
TiB = 1024 * GiB
SPARSE_PIECE = 64 * MiB
CHAIN_LENGTH = 30
SIZE = 8 * GiB
STRIDE = 128 * MiB
WRITTEN = 64 * MiB
FLATTEN_ROUNDS = 5
"""P15's rounds at least: the same convert takes 3 to 10 s on this host's disk."""
MODES = ("push", "pull")
SPARSE_MODES = ("default", "push")
"""P17's: what an operator gets with no setting, and push mode forced."""
SPARSE_SIZES = {"1GiB": GiB, "1TiB": TiB}
"""P17's disks, the baseline first: it is measured first in each round."""


def _fill(vm: LabVM) -> None:
    """4 GiB of data over the 8 GiB disk, written through QEMU's block layer (qemu-io)."""
    commands = []
    for k, offset in enumerate(range(0, SIZE, STRIDE)):
        commands += ["-c", f"write -P {k % 251 + 1} {offset} {WRITTEN}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(vm.disks[0].path)],
                   check=True, capture_output=True)  # fmt: skip


def scale_metrics(selected: list[str], rounds: int = ROUNDS) -> list[Metric]:
    """The selected ones of P14 to P18 in ``rounds`` rounds, each on VMs of its own."""
    metrics = big_disk_metrics(rounds) if {"P14", "P15"} & set(selected) else []
    if "P16" in selected:
        metrics.append(nas_traffic(rounds))
    if "P17" in selected:
        metrics.append(sparse_disk(rounds))
    if "P18" in selected:
        metrics.append(long_chain_restore(rounds))
    return [m for m in metrics if m.name in selected]


def _sparse_bench(lab: Lab, name: str, size: int) -> Bench:
    """A running VM of one ``size`` disk holding 256 MiB in four pieces spread over it, as a
    filesystem would place them."""
    bench = Bench(lab, lab.dir / f"sparse-{name}.log", disks=(size,), start=False)
    pieces = [0, size // 4, size // 2, size - SPARSE_PIECE]
    commands = [a for k, o in enumerate(pieces)
                for a in ("-c", f"write -P {k + 1} {o} {SPARSE_PIECE}")]  # fmt: skip
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(bench.vm.disks[0].path)],
                   check=True, capture_output=True)  # fmt: skip
    bench.vm.start()
    return bench


def _full_and_restore(bench: Bench, mode: str, scratch: Path) -> tuple[float, float, float]:
    """A cold full in ``mode``, then its restore: the full's seconds, the bytes it stores,
    the restore's seconds (the backup is removed after)."""
    evict([bench.vm.disks[0].path])
    with in_mode(mode, scratch):
        seconds = bench.backup("full")[0]
    stored = bench.files(bench.backups[-1])[0].stat().st_blocks * 512
    restore = bench.restore_seconds(bench.backups[-1])
    shutil.rmtree(Path(bench.repo.address) / bench.backups[-1])
    return seconds, stored, restore


def sparse_disk(rounds: int) -> Metric:
    """P17 (see the module): a disk of 1 TiB holding 256 MiB against the same data on a
    1 GiB disk, each round's larger ratio of the full's and the restore's in the default
    configuration (push mode forced beside it)."""
    runs: defaultdict[str, list[float]] = defaultdict(list)
    with Lab() as lab:
        scratch = lab.new_dir("scratch")
        benches = {name: _sparse_bench(lab, name, size) for name, size in SPARSE_SIZES.items()}
        for _ in range(rounds):
            for mode in SPARSE_MODES:
                for name, bench in benches.items():
                    full, stored, restore = _full_and_restore(bench, mode, scratch)
                    runs[f"{mode} {name} full"].append(full)
                    runs[f"{mode} {name} stored"].append(stored / MiB)
                    runs[f"{mode} {name} restore"].append(restore)
    m = medians(runs)
    shown = [
        f"{mode}: full {m[f'{mode} 1TiB full']:.2f} s vs {m[f'{mode} 1GiB full']:.2f} s, "
        f"stored {m[f'{mode} 1TiB stored']:.0f} vs {m[f'{mode} 1GiB stored']:.0f} MiB, restore "
        f"{m[f'{mode} 1TiB restore']:.2f} s vs {m[f'{mode} 1GiB restore']:.2f} s"
        for mode in SPARSE_MODES
    ]
    largest = worst(*(
        ratios(runs[f"default 1TiB {what}"], runs[f"default 1GiB {what}"])
        for what in ("full", "restore")
    ))  # fmt: skip
    return from_rounds(
        "P17", 1.5, largest,
        "each round's larger ratio of the default's; 1 TiB holding 256 MiB vs 1 GiB: "
        + "; ".join(shown),
    )  # fmt: skip


def long_chain_restore(rounds: int) -> Metric:
    """P18: restoring the 30th incremental of a chain ÷ restoring its full (each
    incremental after 1 % of the first disk rewritten); each round restores the full, then
    the 30th."""
    with Lab() as lab:
        bench = Bench(lab, lab.dir / "chain.log")
        bench.vm.write(0, 0, 512 * MiB, pattern=0x5A)
        bench.vm.write(1, 0, 128 * MiB, pattern=0xA5)
        bench.backup("full")
        full = bench.backups[-1]
        for _ in range(CHAIN_LENGTH):
            bench.dirty(0.01)
            bench.backup("incremental")
        last = bench.backups[-1]
        runs = dict(zip(("full", "last"), bench.restore_rounds(full, last, rounds)))
    m = medians(runs)
    return from_rounds(
        "P18", 1.5, ratios(runs["last"], runs["full"]),
        f"restore of incremental {CHAIN_LENGTH}: {m['last']:.2f} s, of its full: "
        f"{m['full']:.2f} s",
    )  # fmt: skip


def _traffic(nas: FlakyNas, bench: Bench, kind: str) -> tuple[int, int]:
    """Bytes read from and written to ``nas`` by a backup of ``kind``."""
    read_before, written_before = nas.traffic()
    bench.backup(kind)
    read_after, written_after = nas.traffic()
    return read_after - read_before, written_after - written_before


def nas_traffic(rounds: int) -> Metric:
    """P16 (see the module): each round's larger ratio of push and pull mode's fulls."""
    runs: defaultdict[str, list[float]] = defaultdict(list)
    with Lab() as lab:
        nas = lab.flaky_repository(counting=True)
        bench = Bench(lab, lab.dir / "traffic.log", repo=nas.repository)
        bench.vm.write(0, 0, 512 * MiB, pattern=0x5A)
        bench.vm.write(1, 0, 128 * MiB, pattern=0xA5)
        scratch = lab.new_dir("scratch")
        for _ in range(rounds):
            for mode in MODES:
                for kind in ("full", "incremental"):
                    if kind == "incremental":
                        bench.dirty(0.10)
                    with in_mode(mode, scratch):
                        read, written = _traffic(nas, bench, kind)
                    runs[f"{mode} {kind} read"].append(read)
                    runs[f"{mode} {kind} written"].append(written)
    m = medians(runs)
    shown = [
        f"{mode} {kind} read {m[f'{mode} {kind} read'] / MiB:.1f} MiB of "
        f"{m[f'{mode} {kind} written'] / MiB:.0f}"
        for mode in MODES for kind in ("full", "incremental")
    ]  # fmt: skip
    larger = worst(*(ratios(runs[f"{mode} full read"], runs[f"{mode} full written"])
                     for mode in MODES))  # fmt: skip
    return from_rounds("P16", 0.02, larger, "each round's larger full; " + "; ".join(shown))


def big_disk_metrics(rounds: int) -> list[Metric]:
    """P14 and P15, on a VM of their own."""
    with Lab() as lab:
        bench = Bench(lab, lab.dir / "scale.log", disks=(SIZE,), start=False)
        _fill(bench.vm)
        bench.vm.start()
        p14, kept = _full_against_floor(lab, bench, rounds)
        bench.vm.stop()
        source = bench.vm.disks[0].path
        p15 = _flatten_against_source(lab, source, kept, max(rounds, FLATTEN_ROUNDS))
    return [p14, p15]


def _full_against_floor(lab: Lab, bench: Bench, rounds: int) -> tuple[Metric, dict[str, Path]]:
    """P14 (see the module), and the last round's fulls by mode (the others are removed: 4
    GiB each, the disk need not hold them all)."""
    scratch = lab.new_dir("scratch")
    source = bench.vm.disks[0].path
    runs: defaultdict[str, list[float]] = defaultdict(list)
    kept: dict[str, Path] = {}
    for k in range(rounds):
        runs["floor"].append(bench.stopped_floor())
        for mode in MODES:
            evict([source])
            with in_mode(mode, scratch):
                runs[mode].append(bench.backup("full")[0])
            backup = bench.files(bench.backups[-1])[0]
            if k == rounds - 1:
                kept[mode] = backup
            else:
                backup.unlink()
    m = medians(runs)
    push = median_ratio(runs["push"], runs["floor"])
    p14 = from_rounds(
        "P14", 1.3, ratios(runs["pull"], runs["floor"]),
        f"8 GiB disk holding 4 GiB: pull {m['pull']:.2f} s, copy floor {m['floor']:.2f} s; "
        f"push {m['push']:.2f} s ({push:.2f})",
    )  # fmt: skip
    return p14, kept


def _flatten_against_source(lab: Lab, source: Path, fulls: dict[str, Path], rounds: int) -> Metric:
    """P15 (see the module): this host's disk is noisy (the same convert takes 3 to 10 s),
    hence at least :data:`FLATTEN_ROUNDS` rounds."""
    runs: defaultdict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        for name, image in (("source", source), *fulls.items()):
            runs[name].append(_flatten_seconds(lab, image))
    m = medians(runs)
    push = median_ratio(runs["push"], runs["source"])
    return from_rounds(
        "P15", 1.3, ratios(runs["pull"], runs["source"]),
        f"flattening the full: pull's {m['pull']:.2f} s, the source's {m['source']:.2f} s; "
        f"push's {m['push']:.2f} s ({push:.2f})",
    )  # fmt: skip


def _flatten_seconds(lab: Lab, image: Path) -> float:
    """``qemu-img convert`` of ``image`` (and its chain) into a local qcow2, cache cold."""
    out_dir = lab.new_dir("flat")
    evict([image])
    try:
        return timed(lambda: qemu_img.convert(image, out_dir / "flat.qcow2"))
    finally:
        shutil.rmtree(out_dir)
