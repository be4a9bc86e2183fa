"""The envelope fixtures: reading them, filling their placeholders, matching answers.

The placeholder scheme is documented in ``fixtures/README.md``: ``${name}`` is replaced by
a value, ``${?name}`` (answers only) matches what the test cannot know beforehand.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shim.compat import strict_zip
from tests.support import FIXTURES

ENVELOPES = FIXTURES / "envelopes"
GENERATIONS = sorted(p.name for p in ENVELOPES.iterdir() if p.is_dir())
_PLACEHOLDER = re.compile(r"\$\{(\??)([A-Za-z0-9]+)\}")


def cases(generation: str) -> list[str]:
    """The cases of one generation (``full``, ``delete``, ...)."""
    return sorted(
        p.name.removesuffix(".json")
        for p in (ENVELOPES / generation).glob("*.json")
        if not p.name.endswith(".answer.json")
    )


def all_cases() -> list[tuple[str, str]]:
    """Every (generation, case) pair."""
    return [(generation, case) for generation in GENERATIONS for case in cases(generation)]


def read(generation: str, case: str) -> tuple[Any, Any]:
    """The command envelope and the answer envelope templates of one case."""
    base = ENVELOPES / generation / case
    expected = json.loads(Path(f"{base}.answer.json").read_text())
    return json.loads(Path(f"{base}.json").read_text()), expected["answers"]


def rule(generation: str, case: str) -> str:
    """The rule of contract §7 the expected answer of one case follows, as its file says."""
    return str(json.loads((ENVELOPES / generation / f"{case}.answer.json").read_text())["rule"])


def fill(template: Any, values: Mapping[str, Any]) -> Any:
    """``template`` with every ``${name}`` replaced (wildcards are left as they are)."""
    if isinstance(template, dict):
        return {key: fill(value, values) for key, value in template.items()}
    if isinstance(template, list):
        return [fill(item, values) for item in template]
    if not isinstance(template, str):
        return template
    whole = _PLACEHOLDER.fullmatch(template)
    if whole and not whole.group(1):
        return values[whole.group(2)]
    return _PLACEHOLDER.sub(
        lambda m: m.group(0) if m.group(1) else str(values[m.group(2)]), template
    )


def _string_pattern(template: str, values: Mapping[str, Any]) -> re.Pattern[str]:
    pattern, last = "", 0
    for m in _PLACEHOLDER.finditer(template):
        pattern += re.escape(template[last : m.start()])
        if m.group(1):
            pattern += f"(?P<{m.group(2)}>[^\n]*)"
        else:
            pattern += re.escape(str(values[m.group(2)]))
        last = m.end()
    return re.compile(pattern + re.escape(template[last:]), re.DOTALL)


def mismatches(
    template: Any,
    actual: Any,
    values: Mapping[str, Any],
    *,
    at: str = "",
    found: dict | None = None,
) -> list[str]:
    """How ``actual`` differs from ``template`` (empty when it matches); what wildcards
    matched is stored in ``found``."""
    found = {} if found is None else found
    where = at or "/"
    whole = _PLACEHOLDER.fullmatch(template) if isinstance(template, str) else None
    if whole and whole.group(1):
        found[whole.group(2)] = actual
        return []
    if whole:
        template = values[whole.group(2)]
    if isinstance(template, dict):
        return _object_mismatches(template, actual, values, at, found)
    if isinstance(template, list):
        return _array_mismatches(template, actual, values, at, found)
    if isinstance(template, str) and not whole:
        m = _string_pattern(template, values).fullmatch(actual) if isinstance(actual, str) else None
        if m is None:
            return [f"{where}: {actual!r} does not match {template!r}"]
        found.update(m.groupdict())
        return []
    return [] if template == actual else [f"{where}: {actual!r} != {template!r}"]


def _object_mismatches(
    template: dict, actual: Any, values: Mapping[str, Any], at: str, found: dict
) -> list[str]:
    if not isinstance(actual, dict):
        return [f"{at or '/'}: {actual!r} is not an object"]
    problems = [f"{at}/{k}: unexpected" for k in actual if k not in template]
    problems += [f"{at}/{k}: missing" for k in template if k not in actual]
    for key in template.keys() & actual.keys():
        problems += mismatches(template[key], actual[key], values, at=f"{at}/{key}", found=found)
    return problems


def _array_mismatches(
    template: list, actual: Any, values: Mapping[str, Any], at: str, found: dict
) -> list[str]:
    if not isinstance(actual, list) or len(actual) != len(template):
        return [f"{at or '/'}: {actual!r} does not have {len(template)} items"]
    problems = []
    for index, (item, got) in enumerate(strict_zip(template, actual)):
        problems += mismatches(item, got, values, at=f"{at}/{index}", found=found)
    return problems


SAMPLE_VALUES: dict[str, Any] = {
    "vm": "i-2-3-VM",
    "backupPath": "i-2-3-VM/2026.10.04.00.00.00",
    "repoType": "nfs",
    "repoAddress": "10.0.0.1:/backup",
    "mountOptions": "vers=4.1",
    "poolUuid": "6b1c0c9a-1c3e-4a4b-9a5e-1f2e3d4c5b6a",
    "bitmapNew": "backup-1790000000",
    "bitmapParent": "backup-1789990000",
    "parentPath": "i-2-3-VM/2026.10.03.00.00.00",
    "parentPaths": [
        "i-2-3-VM/2026.10.03.00.00.00/root.0c9a.qcow2",
        "i-2-3-VM/2026.10.03.00.00.00/datadisk.1d2e.qcow2",
    ],
    "volumePaths": ["/mnt/6b1c/0c9a", "/mnt/6b1c/1d2e"],
    "volumeIds": ["0c9a", "1d2e"],
    "volumeSizes": [64 * 1024**2, 32 * 1024**2],
    "backupFiles": ["root.0c9a.qcow2", "datadisk.1d2e.qcow2"],
    "rebaseTarget0": "i-2-3-VM/2026.10.05.00.00.00/root.0c9a.qcow2",
    "rebaseNewBacking0": "i-2-3-VM/2026.10.03.00.00.00/root.0c9a.qcow2",
    "rebaseTarget1": "i-2-3-VM/2026.10.05.00.00.00/datadisk.1d2e.qcow2",
    "rebaseNewBacking1": "i-2-3-VM/2026.10.03.00.00.00/datadisk.1d2e.qcow2",
    "size": 1234567,
    "jobinfo": "Job type:         Completed   \nOperation:        Backup      \n\n",
    "fileSizeLines": "1000\n2000",
    "fileSizeSum": 3000,
    "wait": 2,
    "dataVolumeId": "1d2e",
    "dataVolumeSize": 32 * 1024**2,
    "newVolumePath": "/mnt/6b1c/5f6a",
    "newVolumeId": "5f6a",
    "totalKiB": 1024,
    "usedKiB": 512,
    "totalBytes": 1024 * 1024,
    "usedBytes": 512 * 1024,
}
"""Values that fill every template (unit tests: no lab behind them)."""
