"""P19 (``scripts/bench --peers``): the shim against virtnbdbackup, same VM shapes, same run.

virtnbdbackup comes from the distribution (installed with apt when missing). Each shape is
built twice, one VM for each tool (each keeps its own checkpoints), with the same data
written through QEMU's block layer; both take a full, then the same random 1 MiB writes over
10 % of the first disk, then an incremental; page cache evicted before each; three rounds,
medians. The peer's times include a ``sync`` after it (the shim's own include its fsync).

A full cannot beat the copy floor without compression (``qemu-img convert`` of its disks,
then fsync: no uncompressed full takes less on this host), so P19 holds the shim's fulls
to 1.1 times each shape's floor and its incrementals to 0.5 times virtnbdbackup's, in the
default configuration; virtnbdbackup's fulls are printed beside. P19 is the worst of those
two ratios, each over its own target, over the shapes: target 1. Without ``--peers`` the
line is not printed: nothing is faked.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path

from shim import qemu_img
from shim.backupdir import fsync_tree
from tests.lab.bench import Bench, Metric, evict, timed
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
ROUNDS = 3
"""Rounds per shape: this host's disk makes single runs noisy (the same convert takes 3 to
10 s)."""


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


def peer_metric() -> Metric:
    """P19 over every shape: medians of :data:`ROUNDS` rounds, the tools alternating."""
    version = install_peer()
    worst: list[list[float]] = []
    shown = []
    for shape, disks in SHAPES.items():
        with Lab() as lab:
            bench = Bench(lab, lab.dir / "peers.log", disks=[s for s, _ in disks], start=False)
            peer_vm = lab.create_vm(disks=[s for s, _ in disks], start=False, persistent=True)
            for vm in (bench.vm, peer_vm):
                _fill(vm, disks)
                vm.start()
            rng = random.Random(19)  # noqa: S311 - reproducible offsets, not secrets
            first = disks[0][0]
            offsets = [o * MiB for o in rng.sample(range(first // MiB), first // MiB // 10)]
            times: dict[str, list[float]] = {
                k: [] for k in ("floor", "full", "pfull", "inc", "pinc")
            }
            for k in range(ROUNDS):
                times["floor"].append(_copy_floor(lab, bench.vm))
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
        t = {name: statistics.median(runs) for name, runs in times.items()}
        worst.append([
            max(full / floor / FULL_OVER_FLOOR, inc / pinc / INCREMENTAL_OVER_PEER)
            for full, floor, inc, pinc in zip(
                times["full"], times["floor"], times["inc"], times["pinc"]
            )
        ])  # fmt: skip
        shown.append(
            f"{shape}: full {t['full']:.2f} s vs {t['pfull']:.2f} s "
            f"({t['full'] / t['pfull']:.2f}; copy floor {t['floor']:.2f} s), incremental "
            f"{t['inc']:.2f} s vs {t['pinc']:.2f} s ({t['inc'] / t['pinc']:.2f})"
        )
    return Metric(
        "P19", max(statistics.median(w) for w in worst), 1,
        f"fulls / ({FULL_OVER_FLOOR} x floor), incrementals / ({INCREMENTAL_OVER_PEER} x "
        f"{version}), the worst; medians of {ROUNDS}: " + "; ".join(shown),
        spread=(max(min(w) for w in worst), max(max(w) for w in worst)),
    )  # fmt: skip


def _copy_floor(lab: Lab, vm: LabVM) -> float:
    """``qemu-img convert`` of each of ``vm``'s disks into a local directory, then fsync, data
    cold: what any copy of them costs on this host (the VM writes nothing meanwhile)."""
    target = lab.new_dir("floor")
    evict([d.path for d in vm.disks])

    def copy() -> None:
        for disk in vm.disks:
            qemu_img.convert(disk.path, target / disk.path.name, force_share=True)
        fsync_tree(target)

    try:
        return timed(copy)
    finally:
        shutil.rmtree(target)
