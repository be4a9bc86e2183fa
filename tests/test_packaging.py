"""What ``pip install`` ships: the engine and its edges, never the lab."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib
from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]


def test_the_lab_is_not_installed() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = find_packages(where=str(REPO), include=include)
    assert "shim" in shipped
    assert "commands" in shipped
    assert not [p for p in shipped if p.startswith("tests") or ".lab" in p], shipped


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
