"""Fault scenarios: each breaks something during or between backups on the lab, then
checks that every earlier backup still restores bit-identical, that the next backup
succeeds (falling back to a full where it must, and saying so), and that nothing leaked."""

from __future__ import annotations

from shim.lab.scenarios import Scenario

FAULTS: list[Scenario] = []
