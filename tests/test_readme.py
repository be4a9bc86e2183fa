"""The README states what the code holds: the benchmark lines' targets."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _targets_in_code() -> dict[str, float]:
    """Every ``Metric("P<n>", value, target, ...)`` and ``from_rounds("P<n>", target, ...)``
    of the benchmarks: line -> target."""
    where = {"Metric": 2, "from_rounds": 1}  # the target's position
    found: dict[str, float] = {}
    for source in sorted((ROOT / "tests/lab").glob("bench*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            at = where.get(getattr(node, "func", None) and getattr(node.func, "id", ""), -1)
            if (
                isinstance(node, ast.Call)
                and at > 0
                and len(node.args) > at
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[at], ast.Constant)
            ):
                found[node.args[0].value] = float(node.args[at].value)
    return found


def test_the_readme_states_every_benchmark_target() -> None:
    readme = (ROOT / "README.md").read_text()
    stated: dict[str, float] = {}
    rows = re.findall(r"^\| (P\d+(?:, P\d+)*) \| [^|]+ \| ([\d.]+) \|$", readme, re.M)
    for lines, target in rows:
        for line in lines.split(", "):
            stated[line] = float(target)
    assert stated == _targets_in_code()
