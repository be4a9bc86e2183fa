"""The fault suite: every scenario of tests.lab.faults, on the lab (see that module); those
that break a running VM's backup mid-job run in pull mode too (``shim/pull.py``)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from shim.pull import SCRATCH_ENV
from tests.lab import Lab
from tests.lab.faults import FAULTS
from tests.lab.scenarios import Scenario

pytestmark = pytest.mark.lab

MID_JOB = {
    "qemu-killed-mid-backup", "libvirtd-restarted-mid-job", "nas-eio-mid-job",
    "shim-sigkilled-then-run-again", "sigterm-from-the-agent", "two-backups-of-one-vm-at-once",
    "nas-unmounted-mid-job",
}  # fmt: skip
"""What a running job meets: in pull mode the copy is the shim's, so each is asked again."""
PULL_FAULTS = [s for s in FAULTS if s.name in MID_JOB]


@pytest.mark.live_backup
@pytest.mark.parametrize("scenario", FAULTS, ids=[s.name for s in FAULTS])
def test_fault_is_survived(scenario: Scenario, lab: Lab, tmp_path: Path) -> None:
    scenario.run(lab, tmp_path)


@pytest.mark.live_backup
@pytest.mark.parametrize("scenario", PULL_FAULTS, ids=[s.name for s in PULL_FAULTS])
def test_fault_is_survived_in_pull_mode(
    scenario: Scenario, lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="scratch.", dir="/tmp"))
    monkeypatch.setenv(SCRATCH_ENV, str(scratch))  # the drop-ins inherit it
    try:
        scenario.run(lab, tmp_path)
        logs = "".join(log.read_text() for log in tmp_path.glob("*.log"))
        assert "pull through" in logs, "the scenario's backups were not in pull mode"
        assert list(scratch.iterdir()) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
