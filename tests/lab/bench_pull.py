"""P11 to P13: pull mode (:mod:`shim.pull`) against push mode, side by side in one run.

* ``P11``: full backup wall time in pull mode ÷ push mode, same VM (a 1 GiB disk holding
  512 MiB and a 256 MiB one holding 128 MiB, as P1), page cache evicted before each; the
  medians of three alternating runs. Target 1.3.
* ``P12``: the same for incrementals after 10 % of the first disk was rewritten. Target 1.3.
* ``P13``: peak RSS of the drop-in's process tree in pull mode (the shim and its storage
  daemon), in MB. Target 80.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator
from pathlib import Path

from shim.pull import SCRATCH_ENV
from tests.lab.bench import Bench, Metric, PeakRss, evict
from tests.lab.lab import Lab, MiB
from tests.lab.system import environment

ROUNDS = 3


@contextlib.contextmanager
def pull_mode(scratch: Path) -> Iterator[None]:
    """Pull mode for the drop-ins run meanwhile (the host setting)."""
    with environment(SCRATCH_ENV, str(scratch)):
        yield


def pull_metrics(selected: list[str]) -> list[Metric]:
    """The selected ones of P11 to P13, on a VM of their own."""
    with Lab() as lab:
        bench = Bench(lab, lab.dir / "pull.log")
        bench.vm.write(0, 0, 512 * MiB, pattern=0x5A)
        bench.vm.write(1, 0, 128 * MiB, pattern=0xA5)
        scratch = lab.new_dir("scratch")
        disks = [d.path for d in bench.vm.disks]
        fulls: dict[str, list[float]] = {"push": [], "pull": []}
        incrementals: dict[str, list[float]] = {"push": [], "pull": []}
        peak_kib = 0
        for _ in range(ROUNDS):
            for mode in ("push", "pull"):
                evict(disks)
                with contextlib.ExitStack() as stack:
                    if mode == "pull":
                        stack.enter_context(pull_mode(scratch))
                        rss = stack.enter_context(PeakRss("shim.cli"))
                    fulls[mode].append(bench.backup("full")[0])
                    bench.dirty(0.10)
                    incrementals[mode].append(bench.backup("incremental")[0])
                if mode == "pull":
                    peak_kib = max(peak_kib, rss.peak_kib)
    full = {mode: statistics.median(runs) for mode, runs in fulls.items()}
    incremental = {mode: statistics.median(runs) for mode, runs in incrementals.items()}
    metrics = [
        Metric(
            "P11", full["pull"] / full["push"], 1.3,
            f"median of {ROUNDS} fulls: pull {full['pull']:.2f} s, push {full['push']:.2f} s",
        ),
        Metric(
            "P12", incremental["pull"] / incremental["push"], 1.3,
            f"median of {ROUNDS} incrementals after 10% rewritten: pull "
            f"{incremental['pull']:.2f} s, push {incremental['push']:.2f} s",
        ),
        Metric("P13", peak_kib / 1024, 80, "MB peak RSS of the drop-in's tree in pull mode"),
    ]  # fmt: skip
    return [m for m in metrics if m.name in selected]
