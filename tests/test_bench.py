"""The benchmark's verdicts (``tests/lab/bench.py``): what a reader may trust."""

from __future__ import annotations

import pytest

from tests.lab.bench import Metric, from_rounds, median_ratio, medians, ratios, worst


def test_a_line_without_rounds_is_ok_or_miss() -> None:
    assert Metric("P1", 1.2, 1.2, "").verdict == "ok"
    assert Metric("P1", 1.21, 1.2, "").verdict == "MISS"


def test_rounds_on_both_sides_of_the_target_are_noisy() -> None:
    assert from_rounds("P20", 0.6, [0.5, 0.55, 0.58], "").verdict == "ok"
    assert from_rounds("P20", 0.6, [0.61, 0.7, 0.9], "").verdict == "MISS"
    noisy = from_rounds("P20", 0.6, [0.5, 0.55, 0.7], "x")
    assert (noisy.verdict, noisy.ok, noisy.value) == ("NOISY", False, 0.55)
    assert noisy.line() == "P20 0.55 [0.5-0.7] target 0.6 NOISY (median of 3: x)"


def test_a_ratio_is_taken_within_each_round() -> None:
    # A slow round slows the shim and its baseline alike: its ratio is the shim's own.
    shim, floor = [1.0, 10.0, 2.0], [1.0, 10.0, 4.0]
    assert ratios(shim, floor) == [1.0, 1.0, 0.5]
    assert from_rounds("P1", 1.2, ratios(shim, floor), "").value == 1.0  # medians' ratio: 0.5
    assert median_ratio(shim, floor) == 1.0


def test_rounds_pair_up_or_fail() -> None:
    with pytest.raises(ValueError, match="3 rounds' figures against 2 baselines"):
        ratios([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="different numbers of rounds"):
        worst([1.0, 2.0, 3.0], [1.0, 2.0])


def test_the_worst_case_is_taken_inside_each_round() -> None:
    one_percent, half = [1.2, 1.0, 1.0], [1.0, 1.0, 1.3]
    assert worst(one_percent, half) == [1.2, 1.0, 1.3]
    assert worst([0.5, 0.7]) == [0.5, 0.7]


def test_the_details_show_each_figures_median() -> None:
    assert medians({"full": [3.0, 1.0, 2.0], "floor": [1.0, 4.0]}) == {"full": 2.0, "floor": 2.5}
