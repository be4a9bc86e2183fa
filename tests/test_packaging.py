"""What ``pip install`` ships: the engine and its edges, never the lab."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_lab_is_not_installed(tmp_path: Path) -> None:
    # The wheel pip would install, built as pip builds it (any Python, no setuptools needed
    # in this environment: the build backend comes in its own isolated environment), from a
    # copy of the sources: setuptools reuses a checkout's build/ directory, stale or not.
    source = tmp_path / "source"
    shutil.copytree(
        REPO, source,
        ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "fixtures"),
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
         "-w", str(tmp_path), str(source)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("*.whl")
    shipped = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {"shim", "commands"} <= shipped
    assert not [p for p in shipped if p.startswith("tests") or p == "lab"], shipped


def test_the_engine_imports_neither_the_lab_nor_fuse() -> None:
    # A fresh interpreter, outside the checkout: every engine module, then what came with it.
    code = (
        "import importlib, pkgutil, sys\n"
        "import shim, commands\n"
        "for package in (shim, commands):\n"
        "    for m in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "print(' '.join(sorted(n for n in sys.modules if n.split('.')[0] in ('tests', 'fuse'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
