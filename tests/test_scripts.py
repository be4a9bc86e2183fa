"""The scripts an operator runs: ``--help`` does nothing else, and the lab scripts never
surprise a host whose CloudStack agent runs the shim.

Each script runs from a copy of ``scripts/`` in a scratch "clone" without ``pyproject.toml``
or ``.venv``: a script that ignored its ``--help`` or its guard would reach
``setup-host``, which fails there at once (and visibly) instead of touching this host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAB_SCRIPTS = ("demo", "test", "bench", "fault-report")
# Every script but the drop-in, whose -h is upstream's (below).
HELPED = sorted(
    p.name for p in (ROOT / "scripts").iterdir()
    if p.is_file() and os.access(p, os.X_OK) and p.name != "nasbackup.sh"
)  # fmt: skip
assert set(LAB_SCRIPTS) <= set(HELPED)


def _clone(tmp_path: Path) -> Path:
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "scripts", clone / "scripts", symlinks=True)
    return clone


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _run(
    script: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("name", HELPED)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_does_nothing_else(name: str, flag: str, tmp_path: Path) -> None:
    clone = _clone(tmp_path)
    before = _listing(clone)
    done = _run(clone / "scripts" / name, flag)
    assert (done.returncode, done.stderr) == (0, "")
    header = (ROOT / "scripts" / name).read_text().splitlines()[1].lstrip("# ")
    assert done.stdout.splitlines()[0] == header
    assert _listing(clone) == before


def test_the_drop_in_answers_help_as_upstream_does(tmp_path: Path) -> None:
    done = _run(ROOT / "scripts" / "nasbackup.sh", "--help")
    assert done.returncode == 1 and done.stdout.startswith("Usage: nasbackup.sh")


def _agent_linked_to(clone: Path, tmp_path: Path) -> dict[str, str]:
    """An agent configuration whose nasbackup.sh links to ``clone``'s drop-in; returns the
    environment that points the scripts at it."""
    conf = tmp_path / "agent-conf"
    kvm = tmp_path / "agent-scripts" / "kvm"
    conf.mkdir()
    kvm.mkdir(parents=True)
    (conf / "agent.properties").write_text(f"# the agent's\nkvm.scripts.dir = {kvm}\n")
    (kvm / "nasbackup.sh").symlink_to(clone / "scripts" / "nasbackup.sh")
    return {"SHIM_AGENT_CONF_DIR": str(conf)}


@pytest.fixture
def agent_runs_the_shim(tmp_path: Path) -> dict[str, str]:
    """The agent runs this checkout's drop-in."""
    return _agent_linked_to(ROOT, tmp_path)


@pytest.mark.parametrize("name", LAB_SCRIPTS)
def test_lab_scripts_refuse_where_the_agent_runs_the_shim(
    name: str, tmp_path: Path, agent_runs_the_shim: dict[str, str]
) -> None:
    clone = _clone(tmp_path)
    before = _listing(clone)
    done = _run(clone / "scripts" / name, env=agent_runs_the_shim)
    assert done.returncode == 2, done.stderr
    assert f"{name}: refusing to run on a host whose CloudStack agent runs the shim" in done.stderr
    assert "links to" in done.stderr and f"{name} --lab" in done.stderr
    assert done.stdout == "" and _listing(clone) == before


def test_told_lab_a_lab_script_goes_on(tmp_path: Path, agent_runs_the_shim: dict[str, str]) -> None:
    clone = _clone(tmp_path)
    done = _run(clone / "scripts" / "demo", "--lab", env=agent_runs_the_shim)
    # Past the guard: setup-host, which finds no project in the scratch clone.
    assert "refusing" not in done.stderr and "pyproject.toml" in done.stderr


def test_setup_host_never_rebuilds_the_environment_the_agent_runs(tmp_path: Path) -> None:
    clone = _clone(tmp_path)
    shutil.copy2(ROOT / "pyproject.toml", clone)
    (clone / "shim").mkdir()
    (clone / "shim" / "cli.py").write_text("")
    venv = clone / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".shim-stamp").write_text("an older pyproject\n")
    (venv / "bin" / "python").symlink_to("/usr/bin/python3")
    env = _agent_linked_to(clone, tmp_path)
    before = _listing(venv)
    done = _run(clone / "scripts" / "setup-host", "--no-lab", env=env)
    assert done.returncode == 1
    assert "runs the shim from" in done.stderr and "not rebuilt in place" in done.stderr
    assert _listing(venv) == before
