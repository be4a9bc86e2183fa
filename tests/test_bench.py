"""The benchmark's verdicts (``tests/lab/bench.py``): what a reader may trust."""

from __future__ import annotations

from tests.lab.bench import Metric, from_rounds


def test_a_line_without_rounds_is_ok_or_miss() -> None:
    assert Metric("P1", 1.2, 1.2, "").verdict == "ok"
    assert Metric("P1", 1.21, 1.2, "").verdict == "MISS"


def test_rounds_on_both_sides_of_the_target_are_noisy() -> None:
    assert from_rounds("P20", 0.6, [0.5, 0.55, 0.58], "").verdict == "ok"
    assert from_rounds("P20", 0.6, [0.61, 0.7, 0.9], "").verdict == "MISS"
    noisy = from_rounds("P20", 0.6, [0.5, 0.55, 0.7], "x")
    assert (noisy.verdict, noisy.ok, noisy.value) == ("NOISY", False, 0.55)
    assert noisy.line() == "P20 0.55 [0.5-0.7] target 0.6 NOISY (median of 3: x)"
