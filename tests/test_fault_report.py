"""``scripts/fault-report`` for real, with a tiny load: a line per scenario in order, then
exactly the three closing lines, their figures agreeing with those lines and the exit status.

Whether each scenario holds is the business of ``test_faults.py``, ``test_bad_inputs.py``
and ``test_load.py``; this is the report itself.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from shim.lab.badinputs import BAD_INPUTS
from shim.lab.faults import FAULTS
from shim.lab.harness import ROOT

pytestmark = pytest.mark.lab

SCENARIO_LINE = re.compile(r"(ok|FAIL) (.+?)(: .+)?")


@pytest.mark.timeout(3600)
def test_the_report_ends_with_the_three_figures() -> None:
    done = subprocess.run(
        [str(ROOT / "scripts" / "fault-report"), "--load-seconds", "30", "--load-backups", "2"],
        capture_output=True,
        text=True,
        timeout=3500,
        check=False,
    )
    output = done.stdout[-6000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) >= 3, output
    faults, bad, load = lines[-3:]

    # One line per scenario, in order, each "ok NAME" or "FAIL NAME: why".
    ran = [SCENARIO_LINE.fullmatch(line) for line in lines if line.startswith(("ok ", "FAIL "))]
    assert all(ran), output
    names = [m.group(2) for m in ran if m]
    assert names == [s.name for s in [*FAULTS, *BAD_INPUTS]], output
    held = [m.group(1) == "ok" for m in ran if m]
    held_faults, held_bad = sum(held[: len(FAULTS)]), sum(held[len(FAULTS) :])

    # The three closing lines, exactly, and in agreement with the lines above.
    assert faults == f"faults survived {held_faults}/{len(FAULTS)}", output
    assert bad == f"bad inputs rejected {held_bad}/{len(BAD_INPUTS)}", output
    match = re.fullmatch(r"load: (\d+) backups, (\d+) failures, (\d+) leaks", load)
    assert match is not None, output
    backups, failures, leaks = map(int, match.groups())
    assert backups <= 8 * 2, output  # eight VMs, at most two backups each
    clean = all(held) and failures == leaks == 0
    assert done.returncode == (0 if clean else 1), output
    assert "Traceback" not in done.stdout, output  # every failure is one line
