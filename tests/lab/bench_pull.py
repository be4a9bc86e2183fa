"""P11 to P13: pull mode (:mod:`shim.pull`) against push mode, side by side in one run.

* ``P11``: full backup wall time in pull mode minus push mode, in seconds, same VM (a 1 GiB
  disk holding 512 MiB and a 256 MiB one holding 128 MiB, as P1), page cache evicted
  before each; the median of interleaved rounds and their spread. Target 0.3 s.
* ``P12``: the same for incrementals after 10 % of the first disk was rewritten. Target
  0.3 s.
* ``P13``: peak RSS of the drop-in's process tree in pull mode (the shim and its storage
  daemon), in MB. Target 80.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from shim import settings
from shim.pull import SCRATCH_ENV
from tests.lab.bench import Bench, Metric, PeakRss, evict, from_rounds, medians
from tests.lab.lab import Lab, MiB
from tests.lab.system import environment


@contextlib.contextmanager
def pull_mode(scratch: Path) -> Iterator[None]:
    """Pull mode for the drop-ins run meanwhile (the host setting)."""
    with environment(SCRATCH_ENV, str(scratch)):
        yield


@contextlib.contextmanager
def in_mode(mode: str, scratch: Path) -> Iterator[None]:
    """``push`` or ``pull`` mode forced for the drop-ins run meanwhile, or ``default``: no
    setting (fulls are then taken in pull mode through the default scratch directory,
    incrementals in push mode)."""
    if mode == "pull":
        with pull_mode(scratch):
            yield
    elif mode == "push":
        with environment(settings.METHOD.name, "push"):
            yield
    elif mode == "default":
        yield
    else:
        raise ValueError(f"no mode {mode!r}: push, pull or default")


def pull_metrics(selected: list[str], rounds: int) -> list[Metric]:
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
        for _ in range(rounds):
            for mode in ("push", "pull"):
                evict(disks)
                with contextlib.ExitStack() as stack:
                    stack.enter_context(in_mode(mode, scratch))
                    if mode == "pull":
                        rss = stack.enter_context(PeakRss("shim.cli"))
                    fulls[mode].append(bench.backup("full")[0])
                    bench.dirty(0.10)
                    incrementals[mode].append(bench.backup("incremental")[0])
                if mode == "pull":
                    peak_kib = max(peak_kib, rss.peak_kib)
    full, incremental = medians(fulls), medians(incrementals)
    metrics = [
        from_rounds(
            "P11", 0.3, [pull - push for push, pull in zip(fulls["push"], fulls["pull"])],
            f"fulls: pull {full['pull']:.2f} s, push {full['push']:.2f} s",
        ),
        from_rounds(
            "P12", 0.3,
            [pull - push for push, pull in zip(incrementals["push"], incrementals["pull"])],
            f"incrementals after 10% rewritten: pull {incremental['pull']:.2f} s, push "
            f"{incremental['push']:.2f} s",
        ),
        Metric("P13", peak_kib / 1024, 80, "MB peak RSS of the drop-in's tree in pull mode"),
    ]  # fmt: skip
    return [m for m in metrics if m.name in selected]
