"""P20 to P22: compressed backups and the bandwidth cap (:mod:`shim.targets`), each against
its baseline measured in the same run, rounds interleaved (median and spread).

* ``P20``: a compressed full of a running VM, in the default configuration otherwise, to
  the lab's FUSE NAS throttled to 110 MB/s (a 1 GbE NAS) ÷ the uncompressed copy floor to
  the same NAS (``qemu-img convert`` of the disk, then fsync). The NAS takes 128 KiB
  writes: with the kernel's 4 KiB, Python's FUSE server tops out near 22 MB/s. Target
  0.6. The bytes the compressed full stores ÷ the floor's are printed beside it (target
  0.55). The disk holds 768 MiB of random bytes written as hexadecimal text (4 bits of
  information per byte, like text and logs; zstd stores it in about half).
* ``P21``: restoring (``-o restore``) a compressed chain (full and incremental) ÷ restoring
  the same chain uncompressed, from the same NAS. Target 1.2.
* ``P22``: with ``-b 50``, the rate each method achieves (push, pull and a stopped VM's
  copy; 512 MiB written), read from the growth of its files on the NAS between 20 % and
  80 % of their final size: each round's worst method's distance from 50 MiB/s, as a
  fraction (median and spread of the rounds). Target 0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from shim import qemu_img, settings
from shim.backupdir import fsync_tree
from tests.lab.bench import (
    Bench,
    Metric,
    Sampler,
    evict,
    from_rounds,
    medians,
    timed,
    worst,
)
from tests.lab.lab import FlakyNas, Lab, LabVM, MiB
from tests.lab.system import environment

GiB = 1024 * MiB
NAS_RATE = 110_000_000
"""A 1 GbE NAS: what the lab's FUSE NAS lets through, in bytes per second."""
DISK = 1 * GiB
TEXT = 768 * MiB
CAP_MIB = 50
CAPPED_DATA = 512 * MiB
_SAMPLE_SECONDS = 0.02


@contextlib.contextmanager
def host_settings(**values: str) -> Iterator[None]:
    """The drop-ins started meanwhile run with these host settings."""
    with contextlib.ExitStack() as stack:
        for name, value in values.items():
            stack.enter_context(environment(name, value))
        yield


def _hex_text(lab: Lab, size: int) -> Path:
    """A raw file of ``size`` bytes: random bytes written as hexadecimal digits."""
    path = lab.new_dir("text") / "text.raw"
    with path.open("wb") as out:
        for _ in range(size // (8 * MiB)):
            out.write(os.urandom(4 * MiB).hex().encode("ascii"))
    return path


def _text_vm(lab: Lab, repo_nas: FlakyNas | None = None) -> Bench:
    """A stopped VM whose disk holds :data:`TEXT` bytes of hex text, started."""
    bench = Bench(lab, lab.dir / "bench.log", disks=(DISK,), start=False,
                  repo=repo_nas.repository if repo_nas else None)  # fmt: skip
    text = _hex_text(lab, TEXT)
    subprocess.run(
        ["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(text),
         str(bench.vm.disks[0].path)],
        check=True, capture_output=True,
    )  # fmt: skip
    text.unlink()
    bench.vm.start()
    return bench


def _stored(paths: list[Path]) -> int:
    return sum(p.stat().st_blocks * 512 for p in paths)


def compression_metrics(rounds: int) -> list[Metric]:
    """P20 and P21, on one VM and one throttled NAS."""
    with Lab() as lab:
        nas = lab.flaky_repository(big_writes=True)
        nas.throttle(NAS_RATE)
        bench = _text_vm(lab, nas)
        disk = bench.vm.disks[0].path
        ratios, stored = [], []
        floor_s, shim_s = [], []
        for _ in range(rounds):
            floor_dir = Path(nas.repository.address) / "floor"
            floor_dir.mkdir()
            evict([disk])

            def floor(target: Path = floor_dir / "disk.qcow2") -> None:
                qemu_img.convert(disk, target, force_share=True)
                fsync_tree(target.parent)

            floor_seconds = timed(floor)
            floor_bytes = _stored([floor_dir / "disk.qcow2"])
            shutil.rmtree(floor_dir)
            evict([disk])
            with host_settings(**{settings.COMPRESS.name: "true"}):
                seconds, _ = bench.backup("full")
            files = bench.files(bench.backups[-1])
            stored.append(_stored(files) / floor_bytes)
            ratios.append(seconds / floor_seconds)
            floor_s.append(floor_seconds)
            shim_s.append(seconds)
        p20 = from_rounds(
            "P20", 0.6, ratios,
            f"compressed full {statistics.median(shim_s):.2f} s, uncompressed copy floor "
            f"{statistics.median(floor_s):.2f} s to a NAS at {NAS_RATE / 1e6:g} MB/s; stored "
            f"{statistics.median(stored):.3f} of the floor's bytes "
            f"({'ok' if max(stored) <= 0.55 else 'MISS'}: target 0.55)",
        )  # fmt: skip
        return [p20, _restore_ratio(bench, rounds)]


def _restore_ratio(bench: Bench, rounds: int) -> Metric:
    """P21: the same chain shape, compressed and not, each restored in turn."""
    tops = {}
    for compress in ("false", "true"):
        with host_settings(**{settings.COMPRESS.name: compress}):
            bench.backup("full")
            bench.dirty(0.10)
            bench.backup("incremental")
        tops[compress] = bench.backups[-1]
    ratios, plain_s, compressed_s = [], [], []
    for _ in range(rounds):
        plain = bench.restore_seconds(tops["false"])
        compressed = bench.restore_seconds(tops["true"])
        ratios.append(compressed / plain)
        plain_s.append(plain)
        compressed_s.append(compressed)
    return from_rounds(
        "P21", 1.2, ratios,
        f"compressed chain {statistics.median(compressed_s):.2f} s, uncompressed "
        f"{statistics.median(plain_s):.2f} s (full and a 10 % incremental)",
    )  # fmt: skip


class _Growth(Sampler):
    """Samples the bytes a backup's files hold on the NAS while it runs."""

    def __init__(self, vm_dir: Path, backup: str) -> None:
        super().__init__(_SAMPLE_SECONDS)
        self.vm_dir = vm_dir
        self.name = backup
        self.samples: list[tuple[float, int]] = []

    def _held(self) -> int:
        total = 0
        for top, _dirs, names in os.walk(self.vm_dir):
            if not Path(top).name.startswith(self.name):
                continue
            for name in names:
                with contextlib.suppress(OSError):
                    total += (Path(top) / name).stat().st_size
        return total

    def sample(self) -> None:
        self.samples.append((time.monotonic(), self._held()))

    def rate(self) -> float:
        """Bytes per second between 20 % and 80 % of the final size."""
        final = max(size for _t, size in self.samples)
        start = next(t for t, size in self.samples if size >= 0.2 * final)
        end = next(t for t, size in self.samples if size >= 0.8 * final)
        return 0.6 * final / (end - start)


def cap_metric(rounds: int) -> Metric:
    """P22: each method with ``-b 50``, its files' growth sampled."""
    with Lab() as lab:
        bench = Bench(lab, lab.dir / "bench.log", disks=(CAPPED_DATA,))
        vm: LabVM = bench.vm
        vm.write(0, 0, CAPPED_DATA, pattern=0x3C)
        vm_dir = Path(bench.repo.address) / vm.name
        deviations: dict[str, list[float]] = {"push": [], "pull": [], "stopped": []}
        cap = CAP_MIB * MiB
        for _ in range(rounds):
            for method, found in deviations.items():
                name = f"{len(bench.backups):04d}"
                capped = {settings.BANDWIDTH.name: str(CAP_MIB)}
                if method == "push":
                    capped[settings.METHOD.name] = "push"
                with host_settings(**capped), _Growth(vm_dir, name) as growth:
                    if method == "stopped":
                        vm.stop()
                        _offline_full(bench, name)
                        vm.start()
                    else:
                        bench.backup("full")
                found.append(abs(growth.rate() / cap - 1))
        shown = ", ".join(f"{m} {v:.3f}" for m, v in medians(deviations).items())
        return from_rounds(
            "P22", 0.1, worst(*deviations.values()),
            f"each round's worst method: distance from {CAP_MIB} MiB/s, {shown}",
        )  # fmt: skip


def _offline_full(bench: Bench, name: str) -> None:
    """A stopped VM's full, as the agent asks it (``-d``)."""
    vm = bench.vm
    path = f"{vm.name}/{name}"
    bench.nasbackup(
        "-o", "backup", "-v", vm.name, "-p", path, "-q", "false",
        "-d", ",".join(str(d.path) for d in vm.disks),
        "-M", "full", "--bitmap-new", f"backup-{1790000000 + len(bench.backups)}",
    )  # fmt: skip
    bench.backups.append(path)
    bench.bitmaps.append(f"backup-{1790000000 + len(bench.backups) - 1}")


def target_metrics(selected: list[str], rounds: int) -> list[Metric]:
    """The selected ones of P20 to P22."""
    metrics = compression_metrics(rounds) if {"P20", "P21"} & set(selected) else []
    if "P22" in selected:
        metrics.append(cap_metric(rounds))
    return [m for m in metrics if m.name in selected]
