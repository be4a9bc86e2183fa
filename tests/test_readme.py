"""The README states what the code holds: the benchmark lines' targets."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _targets_in_code() -> dict[str, float]:
    """Every ``Metric("P<n>", value, target, ...)`` of the benchmarks: line -> target."""
    found: dict[str, float] = {}
    for source in sorted((ROOT / "tests/lab").glob("bench*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "Metric"
                and len(node.args) >= 3
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[2], ast.Constant)
            ):
                found[node.args[0].value] = float(node.args[2].value)
    return found


def test_the_readme_states_every_benchmark_target() -> None:
    readme = (ROOT / "README.md").read_text()
    stated: dict[str, float] = {}
    rows = re.findall(r"^\| (P\d+(?:, P\d+)*) \| [^|]+ \| ([\d.]+) \|$", readme, re.M)
    for lines, target in rows:
        for line in lines.split(", "):
            stated[line] = float(target)
    assert stated == _targets_in_code()
