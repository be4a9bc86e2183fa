"""The repository is hostile: every scenario of :mod:`tests.lab.hostile` on a local
repository, most without a VM. Each command refuses naming the file and the rule (or
succeeds harmlessly), within its deadline, no host file changes, the host's marker reaches
no volume and no NAS file, nothing connects to the listener the planted ``nbd`` names point
at, and nothing leaks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import Lab
from tests.lab.hostile import HOSTILE
from tests.lab.scenarios import Scenario

pytestmark = pytest.mark.lab


def test_the_names_are_unique() -> None:
    names = [scenario.name for scenario in HOSTILE]
    assert len(set(names)) == len(names)


@pytest.fixture(scope="module")
def shared_lab(_lab_swept: None) -> Iterator[Lab]:
    """One lab for every scenario: each plants in a repository of its own."""
    with Lab() as lab:
        yield lab


@pytest.mark.parametrize("scenario", HOSTILE, ids=[s.name for s in HOSTILE])
def test_a_hostile_repository_gains_nothing(
    scenario: Scenario, shared_lab: Lab, tmp_path: Path
) -> None:
    scenario.run(shared_lab, tmp_path)
