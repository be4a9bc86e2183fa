"""P14 to P16: a big disk in pull mode (:mod:`shim.pull`) against the copy floor, and what
a backup costs the NAS.

* ``P16``: bytes read from the NAS during a full ÷ bytes written, counted by the lab's FUSE
  NAS with the kernel's page cache off (the larger of push and pull mode; an incremental's
  figures printed too). Target 0.02.
* ``P17``: a disk of 1 TiB holding 256 MiB against the same 256 MiB on a 1 GiB disk, the
  full's and the restore's wall times (the largest ratio of push and pull mode; the stored
  sizes printed). Target 1.5.
* ``P18``: restoring the 30th incremental of a chain ÷ restoring its full. Target 1.5.

One 8 GiB disk holding 4 GiB (64 MiB written in every other 128 MiB, through QEMU's block
layer), page cache evicted before each run, medians of two:

* ``P14``: the full's wall time in pull mode ÷ the copy floor (``qemu-img convert`` of the
  stopped disk into the repository, then fsync: the same flush as a backup's). Push mode's
  figure is printed beside it. Target 1.3.
* ``P15``: flattening that full (``qemu-img convert`` of the backup file, as the Java
  restore does) ÷ the same convert of the source disk, medians of five alternating runs.
  Push mode's is printed too. Target 1.3.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
from pathlib import Path

from shim import qemu_img
from shim.backupdir import fsync_tree
from tests.lab.bench import Bench, Metric, evict, timed
from tests.lab.bench_pull import in_mode
from tests.lab.lab import Lab, LabVM, MiB

GiB = 1024 * MiB
TiB = 1024 * GiB
SPARSE_PIECE = 64 * MiB
CHAIN_LENGTH = 30
SIZE = 8 * GiB
STRIDE = 128 * MiB
WRITTEN = 64 * MiB
ROUNDS = 2
FLATTEN_ROUNDS = 5


def _fill(vm: LabVM) -> None:
    """4 GiB of data over the 8 GiB disk, written through QEMU's block layer (qemu-io)."""
    commands = []
    for k, offset in enumerate(range(0, SIZE, STRIDE)):
        commands += ["-c", f"write -P {k % 251 + 1} {offset} {WRITTEN}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(vm.disks[0].path)],
                   check=True, capture_output=True)  # fmt: skip


def scale_metrics(selected: list[str]) -> list[Metric]:
    """The selected ones of P14 to P18, each on VMs of its own."""
    metrics = big_disk_metrics() if {"P14", "P15"} & set(selected) else []
    if "P16" in selected:
        metrics.append(nas_traffic())
    if "P17" in selected:
        metrics.append(sparse_disk())
    if "P18" in selected:
        metrics.append(long_chain_restore())
    return [m for m in metrics if m.name in selected]


def sparse_disk() -> Metric:
    """P17: a disk of 1 TiB holding 256 MiB against the same data on a 1 GiB disk: the
    full's and the restore's wall times, push and pull mode; the largest ratio."""
    results: dict[str, dict[str, tuple[float, int, float]]] = {}
    with Lab() as lab:
        scratch = lab.new_dir("scratch")
        for name, size in (("1TiB", TiB), ("1GiB", GiB)):
            bench = Bench(lab, lab.dir / f"sparse-{name}.log", disks=(size,), start=False)
            # 256 MiB in four pieces spread over the disk, as a filesystem would place them.
            pieces = [0, size // 4, size // 2, size - SPARSE_PIECE]
            commands = [a for k, o in enumerate(pieces)
                        for a in ("-c", f"write -P {k + 1} {o} {SPARSE_PIECE}")]  # fmt: skip
            subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(bench.vm.disks[0].path)],
                           check=True, capture_output=True)  # fmt: skip
            bench.vm.start()
            for mode in ("push", "pull"):
                evict([bench.vm.disks[0].path])
                with contextlib.ExitStack() as stack:
                    stack.enter_context(in_mode(mode, scratch))
                    seconds = bench.backup("full")[0]
                backup = bench.files(bench.backups[-1])[0]
                stored = backup.stat().st_blocks * 512
                results.setdefault(mode, {})[name] = (
                    seconds,
                    stored,
                    bench.restore_seconds(bench.backups[-1]),
                )
            bench.vm.stop()
    ratios, shown = [], []
    for mode, by_size in results.items():
        (big_full, big_stored, big_restore), (full, stored, restore) = (
            by_size["1TiB"],
            by_size["1GiB"],
        )
        ratios += [big_full / full, big_restore / restore]
        shown.append(
            f"{mode}: full {big_full:.2f} s vs {full:.2f} s, stored {big_stored / MiB:.0f} "
            f"vs {stored / MiB:.0f} MiB, restore {big_restore:.2f} s vs {restore:.2f} s"
        )
    return Metric("P17", max(ratios), 1.5, "1 TiB holding 256 MiB vs 1 GiB: " + "; ".join(shown))


def long_chain_restore() -> Metric:
    """P18: restoring the 30th incremental of a chain ÷ restoring its full (medians of 3,
    alternating; each incremental after 1 % of the first disk rewritten)."""
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
        times: dict[str, list[float]] = {"last": [], "full": []}
        for _ in range(3):
            times["last"].append(bench.restore_seconds(last))
            times["full"].append(bench.restore_seconds(full))
    deep, shallow = statistics.median(times["last"]), statistics.median(times["full"])
    return Metric(
        "P18", deep / shallow, 1.5,
        f"restore of incremental {CHAIN_LENGTH}: {deep:.2f} s, of its full: {shallow:.2f} s",
    )  # fmt: skip


def nas_traffic() -> Metric:
    """P16: bytes read from the NAS during a full ÷ bytes written, counted by the FUSE NAS
    (no page cache), push and pull mode; an incremental's printed beside."""
    with Lab() as lab:
        nas = lab.flaky_repository(counting=True)
        bench = Bench(lab, lab.dir / "traffic.log", repo=nas.repository)
        bench.vm.write(0, 0, 512 * MiB, pattern=0x5A)
        bench.vm.write(1, 0, 128 * MiB, pattern=0xA5)
        scratch = lab.new_dir("scratch")
        ratios: dict[str, float] = {}
        shown = []
        for mode in ("push", "pull"):
            for kind in ("full", "incremental"):
                if kind == "incremental":
                    bench.dirty(0.10)
                read_before, written_before = nas.traffic()
                with contextlib.ExitStack() as stack:
                    stack.enter_context(in_mode(mode, scratch))
                    bench.backup(kind)
                read_after, written_after = nas.traffic()
                read, written = read_after - read_before, written_after - written_before
                ratio = read / written
                if kind == "full":
                    ratios[mode] = ratio
                shown.append(f"{mode} {kind} read {read / MiB:.1f} MiB of {written / MiB:.0f}")
    return Metric("P16", max(ratios.values()), 0.02, "; ".join(shown))


def big_disk_metrics() -> list[Metric]:
    """P14 and P15, on a VM of their own."""
    with Lab() as lab:
        bench = Bench(lab, lab.dir / "scale.log", disks=(SIZE,), start=False)
        vm = bench.vm
        _fill(vm)
        source = vm.disks[0].path
        floors = []
        for _ in range(ROUNDS):
            floor_dir = lab.new_dir("floor")
            evict([source])

            def copy_floor(target: Path = floor_dir) -> None:
                qemu_img.convert(source, target / source.name)
                fsync_tree(target)

            floors.append(timed(copy_floor))
            shutil.rmtree(floor_dir)
        vm.start()
        scratch = lab.new_dir("scratch")
        fulls: dict[str, list[float]] = {"push": [], "pull": []}
        kept: dict[str, Path] = {}
        for k in range(ROUNDS):
            for mode in ("push", "pull"):
                evict([source])
                with contextlib.ExitStack() as stack:
                    stack.enter_context(in_mode(mode, scratch))
                    fulls[mode].append(bench.backup("full")[0])
                backup = bench.files(bench.backups[-1])[0]
                if k == ROUNDS - 1:
                    kept[mode] = backup
                else:
                    backup.unlink()  # 4 GiB each: the disk need not hold them all
        vm.stop()
        # This host's disk is noisy (the same convert takes 3 to 10 s): alternate, medians.
        flattens: dict[str, list[float]] = {"source": [], "push": [], "pull": []}
        for _ in range(FLATTEN_ROUNDS):
            for name, image in (("source", source), *kept.items()):
                flattens[name].append(_flatten_seconds(lab, image))
    flat = {name: statistics.median(runs) for name, runs in flattens.items()}
    floor = statistics.median(floors)
    full = {mode: statistics.median(runs) for mode, runs in fulls.items()}
    metrics = [
        Metric(
            "P14", full["pull"] / floor, 1.3,
            f"8 GiB disk holding 4 GiB, median of {ROUNDS}: pull {full['pull']:.2f} s, copy "
            f"floor {floor:.2f} s; push {full['push']:.2f} s ({full['push'] / floor:.2f})",
        ),
        Metric(
            "P15", flat["pull"] / flat["source"], 1.3,
            f"flattening the full, median of {FLATTEN_ROUNDS}: pull's {flat['pull']:.2f} s, "
            f"the source's {flat['source']:.2f} s; push's {flat['push']:.2f} s "
            f"({flat['push'] / flat['source']:.2f})",
        ),
    ]  # fmt: skip
    return metrics


def _flatten_seconds(lab: Lab, image: Path) -> float:
    """``qemu-img convert`` of ``image`` (and its chain) into a local qcow2, cache cold."""
    out_dir = lab.new_dir("flat")
    evict([image])
    try:
        return timed(lambda: qemu_img.convert(image, out_dir / "flat.qcow2"))
    finally:
        shutil.rmtree(out_dir)
