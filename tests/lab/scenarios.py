"""Scenarios the fault suite and ``scripts/fault-report`` share: each one runs on a lab and
raises (an AssertionError saying what broke) when the shim does not hold up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.lab.lab import Lab


@dataclass(frozen=True)
class Scenario:
    """One fault or bad input: a name for reports and test ids, and the code that runs it."""

    name: str
    run: Callable[[Lab, Path], None]
    """Runs the scenario in ``lab`` with a scratch directory; raises if it was not survived."""
    live_backup: bool = False
    """It asks for a backup of a running VM: the suite runs it in pull mode too."""
