"""``scripts/fault-report``: every fault, bad-input and hostile-repository scenario on the
lab, then a load run.

Each scenario of :data:`tests.lab.faults.FAULTS`, :data:`tests.lab.badinputs.BAD_INPUTS`
and :data:`tests.lab.hostile.HOSTILE` runs in a lab of its own with a scratch directory of
its own (both removed afterwards, a failure caught and reported with its message), one line
per scenario as it goes. Then eight lab VMs are backed up concurrently
(:func:`tests.lab.load.run_load`), bounded in time and in count. The report ends with
exactly four lines::

    faults survived N/N
    bad inputs rejected N/N
    hostile repository: N/N refused
    load: N backups, N failures, N leaks

Exit status 0 when everything held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from shim.errors import ShimError
from tests.lab.badinputs import BAD_INPUTS
from tests.lab.faults import FAULTS
from tests.lab.hostile import HOSTILE
from tests.lab.lab import Lab, start_libvirtd_if_down, sweep_stale_labs
from tests.lab.load import LoadResult, run_load
from tests.lab.scenarios import Scenario

DEFAULT_LOAD_SECONDS = 600.0
DEFAULT_LOAD_BACKUPS = 400
"""Per VM: a little more than ten minutes allow on a 2-vCPU machine (about 375 each)."""


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


def run_scenario(scenario: Scenario) -> str | None:
    """Run one scenario in a fresh lab; None when it was survived, else why not."""
    problem: str | None = None
    with tempfile.TemporaryDirectory(prefix="fault-report-") as scratch:
        lab: Lab | None = None
        try:
            lab = Lab()
            scenario.run(lab, Path(scratch))
        except AssertionError as exc:
            problem = _one_line(str(exc))
        except Exception as exc:
            problem = _one_line(f"{type(exc).__name__}: {exc}")
        finally:
            if start_libvirtd_if_down():
                problem = problem or "libvirtd died during the scenario (started again)"
                if lab is not None:
                    lab.reconnect()
            try:
                if lab is not None:
                    lab.close()
            except ShimError as exc:
                problem = problem or _one_line(f"lab cleanup failed: {exc}")
    return problem


def run_all(scenarios: Sequence[Scenario]) -> int:
    """Run ``scenarios``, printing ``ok NAME`` or ``FAIL NAME: why``; return how many held."""
    held = 0
    for scenario in scenarios:
        problem = run_scenario(scenario)
        line = f"ok {scenario.name}" if problem is None else f"FAIL {scenario.name}: {problem}"
        held += problem is None
        print(line, flush=True)
    return held


def run_load_report(seconds: float, backups_per_vm: int) -> LoadResult:
    """The load in its own lab; a crash of the load itself counts as one failure."""
    with tempfile.TemporaryDirectory(prefix="fault-report-load-") as scratch:
        lab: Lab | None = None
        try:
            lab = Lab()
            result = run_load(
                lab, duration_s=seconds, max_backups_per_vm=backups_per_vm, scratch=Path(scratch)
            )
        except Exception as exc:
            result = LoadResult(0, 1, 0, [_one_line(f"the load crashed: {exc!r}")])
        finally:
            try:
                if lab is not None:
                    lab.close()
            except ShimError as exc:
                result.leaks += 1
                result.details.append(_one_line(f"lab cleanup failed: {exc}"))
    for line in result.details:
        print(f"load detail: {line}", flush=True)
    return result


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The report's command line."""
    parser = argparse.ArgumentParser(prog="fault-report", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--load-seconds",
        type=float,
        default=DEFAULT_LOAD_SECONDS,
        help=f"how long the load runs at most (default {DEFAULT_LOAD_SECONDS:.0f})",
    )
    parser.add_argument(
        "--load-backups",
        type=int,
        default=DEFAULT_LOAD_BACKUPS,
        help=f"backups per VM at most (default {DEFAULT_LOAD_BACKUPS})",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="GLOB",
        help="run only the scenarios whose name matches (repeatable; default: all)",
    )
    return parser.parse_args(argv)


def selected(scenarios: Sequence[Scenario], patterns: Sequence[str] | None) -> list[Scenario]:
    """The scenarios whose name matches one of ``patterns`` (all without patterns)."""
    if not patterns:
        return list(scenarios)
    return [s for s in scenarios if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything and print the report; 0 when every scenario held and the load was
    clean, 1 otherwise."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # The service runs in this process: its log lines go to each scenario's own log only.
    logging.getLogger().addHandler(logging.NullHandler())
    try:
        sweep_stale_labs()  # and the lab hypervisor answers
    except ShimError as exc:
        print(f"fault-report: {exc}; run scripts/setup-host as root", file=sys.stderr)
        return 1
    fault_scenarios = selected(FAULTS, args.only)
    bad_scenarios = selected(BAD_INPUTS, args.only)
    hostile_scenarios = selected(HOSTILE, args.only)
    faults = run_all(fault_scenarios)
    bad = run_all(bad_scenarios)
    hostile = run_all(hostile_scenarios)
    load = run_load_report(args.load_seconds, args.load_backups)
    print(f"faults survived {faults}/{len(fault_scenarios)}")
    print(f"bad inputs rejected {bad}/{len(bad_scenarios)}")
    print(f"hostile repository: {hostile}/{len(hostile_scenarios)} refused")
    print(f"load: {load.backups} backups, {load.failures} failures, {load.leaks} leaks")
    clean = (faults, bad, hostile) == tuple(
        map(len, (fault_scenarios, bad_scenarios, hostile_scenarios))
    )
    return 0 if clean and load.failures == 0 and load.leaks == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
