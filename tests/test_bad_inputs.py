"""Every bad input of :mod:`tests.lab.badinputs` on the lab: refused with one clear line
(exit 1, or an HTTP 4xx with a JSON body), nothing written outside what existed, no secret
echoed in stdout, stderr, the HTTP body or the log."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.pull import SCRATCH_ENV
from tests.lab import Lab
from tests.lab.badinputs import BAD_INPUTS
from tests.lab.lab import start_libvirtd_if_down
from tests.lab.scenarios import Scenario


def test_the_names_are_unique() -> None:
    names = [scenario.name for scenario in BAD_INPUTS]
    assert len(set(names)) == len(names)


@pytest.fixture(scope="module")
def shared_lab(_lab_swept: None) -> Iterator[Lab]:
    """One lab for every bad input: scenarios that only read a VM and its parent backup
    share them (each checks that it changed nothing, so none can spoil the next)."""
    with Lab() as lab:
        yield lab
    assert not start_libvirtd_if_down(), "libvirtd died during the bad inputs"


@pytest.mark.live_backup
@pytest.mark.lab
@pytest.mark.parametrize("scenario", BAD_INPUTS, ids=[s.name for s in BAD_INPUTS])
def test_bad_input_is_refused(scenario: Scenario, shared_lab: Lab, tmp_path: Path) -> None:
    scenario.run(shared_lab, tmp_path)


LIVE_BACKUPS = [scenario for scenario in BAD_INPUTS if scenario.live_backup]


@pytest.mark.live_backup
@pytest.mark.lab
@pytest.mark.parametrize("scenario", LIVE_BACKUPS, ids=[s.name for s in LIVE_BACKUPS])
def test_bad_input_is_refused_in_pull_mode(
    scenario: Scenario, shared_lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backups of a running VM again, with a scratch directory set: refused the same
    way, before a scratch file is made."""
    scratch = Path(tempfile.mkdtemp(prefix="scratch.", dir="/tmp"))
    monkeypatch.setenv(SCRATCH_ENV, str(scratch))  # the drop-ins inherit it
    try:
        scenario.run(shared_lab, tmp_path)
        assert list(scratch.iterdir()) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
