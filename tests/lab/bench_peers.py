"""P19 (``scripts/bench --peers``): the shim against virtnbdbackup, same VM shapes, same run.

virtnbdbackup comes from the distribution (installed with apt when missing). Each shape is
built twice, one VM for each tool (each keeps its own checkpoints), with the same data
written through QEMU's block layer. A round: the copy floor, the shim's full, then
virtnbdbackup's, the same random 1 MiB writes over 10 % of the first disk on both VMs, the
shim's incremental, then virtnbdbackup's; page cache evicted before each. The peer's times
include a ``sync`` after it (the shim's own include its fsync).

A full cannot beat the copy floor without compression (``qemu-img convert`` of its disks,
then fsync: no uncompressed full takes less on this host), so P19 holds the shim's fulls
to 1.1 times each shape's floor and its incrementals to 0.5 times virtnbdbackup's, in the
default configuration; virtnbdbackup's fulls are printed beside. A round's value is the
worse of those two ratios (each over its own target, each from that round's runs); P19 is
the worst shape's median of its rounds, with the highest minimum and maximum of the
shapes' rounds as its spread (each shape runs at its own time: round k of one shape is not
round k of another): target 1. Without ``--peers`` the line is not printed: nothing is
faked.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.lab.bench import (
    ROUNDS,
    Bench,
    Metric,
    copy_floor,
    evict,
    median_ratio,
    medians,
    ratios,
    timed,
    worst,
)
from tests.lab.lab import Lab, LabVM, MiB

GiB = 1024 * MiB
PIECE = 64 * MiB
SHAPES: dict[str, list[tuple[int, int]]] = {
    "1 GiB (512 MiB) + 256 MiB (128 MiB)": [(1 * GiB, 512 * MiB), (256 * MiB, 128 * MiB)],
    "8 GiB holding 4 GiB": [(8 * GiB, 4 * GiB)],
    "four 1 GiB disks holding 512 MiB each": [(1 * GiB, 512 * MiB)] * 4,
}
"""Virtual size and data of each disk, by shape (the issue's table)."""
PEER = "virtnbdbackup"


def install_peer() -> str:
    """virtnbdbackup's version, installed from the distribution first if missing."""
    if shutil.which(PEER) is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", PEER], check=True, env=env,
                       capture_output=True)  # fmt: skip
    done = subprocess.run([PEER, "--version"], capture_output=True, text=True, check=True)
    return (done.stdout or done.stderr).strip()


def _fill(vm: LabVM, disks: Sequence[tuple[int, int]]) -> None:
    """Each disk's data in 64 MiB pieces spread evenly over it (qemu-io on the stopped VM)."""
    for index, (size, data) in enumerate(disks):
        stride = size * PIECE // data
        commands = []
        for k, offset in enumerate(range(0, size, stride)):
            commands += ["-c", f"write -P {k % 251 + 1} {offset} {PIECE}"]
        subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(vm.disks[index].path)],
                       check=True, capture_output=True)  # fmt: skip


def _dirty(vm: LabVM, offsets: Sequence[int]) -> None:
    for k, offset in enumerate(offsets):
        vm.write(0, offset, MiB, pattern=k % 255 + 1)


def _peer(vm: LabVM, level: str, out: Path) -> float:
    def run() -> None:
        subprocess.run([PEER, "-d", vm.name, "-l", level, "-o", str(out), "--noprogress"],
                       check=True, capture_output=True)  # fmt: skip
        os.sync()

    return timed(run)


FULL_OVER_FLOOR = 1.1
INCREMENTAL_OVER_PEER = 0.5


def peer_metric(rounds: int = ROUNDS) -> Metric:
    """P19 over every shape: the worst shape's median of its rounds' ratios over their
    targets (each shape's rounds run in a lab of their own, at another time than the
    others': round k of one shape has nothing to do with round k of another), with the
    spread of the worst shape's rounds (the highest minimum and maximum)."""
    version = install_peer()
    per_shape: list[list[float]] = []
    shown = []
    for shape, disks in SHAPES.items():
        times = _shape_rounds(disks, rounds)
        per_shape.append(worst(
            [r / FULL_OVER_FLOOR for r in ratios(times["full"], times["floor"])],
            [r / INCREMENTAL_OVER_PEER for r in ratios(times["inc"], times["pinc"])],
        ))  # fmt: skip
        t = medians(times)
        shown.append(
            f"{shape}: full {t['full']:.2f} s vs {t['pfull']:.2f} s "
            f"({median_ratio(times['full'], times['pfull']):.2f}; copy floor "
            f"{t['floor']:.2f} s), incremental {t['inc']:.2f} s vs {t['pinc']:.2f} s "
            f"({median_ratio(times['inc'], times['pinc']):.2f})"
        )
    return Metric(
        "P19", max(statistics.median(v) for v in per_shape), 1,
        f"fulls / ({FULL_OVER_FLOOR} x floor), incrementals / ({INCREMENTAL_OVER_PEER} x "
        f"{version}), the worst shape's median of {rounds}; medians: " + "; ".join(shown),
        spread=(max(min(v) for v in per_shape), max(max(v) for v in per_shape)),
    )  # fmt: skip


def _shape_rounds(disks: Sequence[tuple[int, int]], rounds: int) -> dict[str, list[float]]:
    """One shape's rounds on two VMs of it, one for each tool, each round: the copy floor,
    the shim's full, the peer's, the same writes on both, the shim's incremental, the
    peer's; every run's data cold. Seconds by run: floor, full, pfull, inc, pinc."""
    times: dict[str, list[float]] = {k: [] for k in ("floor", "full", "pfull", "inc", "pinc")}
    with Lab() as lab:
        bench = Bench(lab, lab.dir / "peers.log", disks=[s for s, _ in disks], start=False)
        peer_vm = lab.create_vm(disks=[s for s, _ in disks], start=False, persistent=True)
        for vm in (bench.vm, peer_vm):
            _fill(vm, disks)
            vm.start()
        rng = random.Random(19)  # noqa: S311 - reproducible offsets, not secrets
        first = disks[0][0]
        offsets = [o * MiB for o in rng.sample(range(first // MiB), first // MiB // 10)]
        for k in range(rounds):
            times["floor"].append(copy_floor(lab, [d.path for d in bench.vm.disks],
                                             force_share=True))  # fmt: skip
            evict([d.path for d in bench.vm.disks])
            times["full"].append(bench.backup("full")[0])
            out = Path(bench.repo.address) / f"peer-{k}"
            evict([d.path for d in peer_vm.disks])
            times["pfull"].append(_peer(peer_vm, "full", out))
            _dirty(bench.vm, offsets)
            _dirty(peer_vm, offsets)
            evict([d.path for d in bench.vm.disks])
            times["inc"].append(bench.backup("incremental")[0])
            evict([d.path for d in peer_vm.disks])
            times["pinc"].append(_peer(peer_vm, "inc", out))
            # Each round's backups go: an 8 GiB shape stores 4 GiB per tool and round.
            for backup in bench.backups[-2:]:
                shutil.rmtree(Path(bench.repo.address) / backup)
            shutil.rmtree(out)
    return times
