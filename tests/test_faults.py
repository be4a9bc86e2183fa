"""The fault suite: every scenario of shim.lab.faults, on the lab (see that module)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.lab import Lab
from shim.lab.faults import FAULTS
from shim.lab.scenarios import Scenario

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("scenario", FAULTS, ids=[s.name for s in FAULTS])
def test_fault_is_survived(scenario: Scenario, lab: Lab, tmp_path: Path) -> None:
    scenario.run(lab, tmp_path)
