"""A short, bounded load on the lab: eight VMs backed up concurrently through the drop-in
and the socket service (see :mod:`tests.lab.load`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab import Lab
from tests.lab.load import run_load

pytestmark = pytest.mark.lab

VMS = 8
BACKUPS_PER_VM = 30
SECONDS = 240
"""A time bound well above what the count takes (about a minute here)."""


@pytest.mark.live_backup
@pytest.mark.timeout(600)
def test_eight_vms_under_load(lab: Lab, tmp_path: Path) -> None:
    result = run_load(
        lab, vms=VMS, duration_s=SECONDS, max_backups_per_vm=BACKUPS_PER_VM, scratch=tmp_path
    )
    report = "\n".join(result.details)
    assert (result.failures, result.leaks) == (0, 0), report
    # Bounded by count, well within the time bound: every VM got all its backups.
    assert result.backups == VMS * BACKUPS_PER_VM, report
    # Four VMs through the service at once, at most two backups in its engine: the limit
    # was reached and held.
    assert result.peak_service_backups == 2, report
    assert "per-VM serialization held" in report
