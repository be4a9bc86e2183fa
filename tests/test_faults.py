"""The fault suite: every scenario of tests.lab.faults, on the lab (see that module)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab import Lab
from tests.lab.faults import FAULTS
from tests.lab.scenarios import Scenario

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("scenario", FAULTS, ids=[s.name for s in FAULTS])
def test_fault_is_survived(scenario: Scenario, lab: Lab, tmp_path: Path) -> None:
    scenario.run(lab, tmp_path)
