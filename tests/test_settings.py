"""shim/settings.py: one table of settings, from the environment, else the host's settings
file, else defaults; and the README documents each of them."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from shim import settings
from tests.lab import Lab, MiB
from tests.lab.chains import DROPIN, read_manifest

ROOT = Path(__file__).resolve().parent.parent


def _file(tmp_path: Path, text: str, mode: int = 0o644) -> Path:
    path = tmp_path / "cloudstack-nasbackup"
    path.write_text(text)
    path.chmod(mode)
    return path


def _load(path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> list[str]:
    monkeypatch.setenv(settings.SETTINGS_FILE_ENV, str(path))
    return settings.load(env)


def test_the_file_fills_what_the_environment_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _file(
        tmp_path,
        "# the host's settings\n\nNASBACKUP_SHIM_LOCK_WAIT = 5\n"
        "NASBACKUP_SHIM_CHECKSUM='sha256'\nNASBACKUP_SHIM_LOG=/var/log/elsewhere.log\n",
    )
    env = {"NASBACKUP_SHIM_LOG": "/from/the/environment.log"}
    assert _load(path, monkeypatch, env) == []
    assert env == {
        "NASBACKUP_SHIM_LOG": "/from/the/environment.log",  # the environment wins
        "NASBACKUP_SHIM_LOCK_WAIT": "5",
        "NASBACKUP_SHIM_CHECKSUM": "sha256",
    }


def test_unknown_names_are_reported_and_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _file(tmp_path, "PATH=/tmp/evil\nNASBACKUP_SHIM_LOCKWAIT=1\njust words\n")
    env: dict[str, str] = {}
    problems = _load(path, monkeypatch, env)
    assert env == {} and len(problems) == 3
    assert "line 1: not a setting of the shim: 'PATH'" in problems[0]


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_a_file_others_can_write_is_ignored(
    mode: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _file(tmp_path, "NASBACKUP_SHIM_LOCK_WAIT=0\n", mode)
    env: dict[str, str] = {}
    assert "not root's alone" in _load(path, monkeypatch, env)[0] and env == {}


def test_a_link_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = _file(tmp_path, "NASBACKUP_SHIM_LOCK_WAIT=0\n")
    link = tmp_path / "link"
    link.symlink_to(real)
    env: dict[str, str] = {}
    assert "ignored" in _load(link, monkeypatch, env)[0] and env == {}


def test_no_file_is_no_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _load(tmp_path / "absent", monkeypatch, {}) == []


def test_the_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(NASBACKUP_SHIM_[A-Z_]+)` \| `?([^|`]*)`? \|", readme, re.M))
    assert rows == {s.name: s.default or "none" for s in settings.TABLE}


@pytest.mark.lab
def test_the_drop_in_reads_the_hosts_settings_file(lab: Lab, tmp_path: Path) -> None:
    """The agent runs the drop-in with its own environment: the file configures it."""
    vm = lab.create_vm(disks=(4 * MiB,), start=False)
    repo = lab.repository()
    log = tmp_path / "configured.log"
    path = _file(
        tmp_path,
        f"NASBACKUP_SHIM_LOG={log}\nNASBACKUP_SHIM_CHECKSUM=sha256\n"
        "NASBACKUP_SHIM_CHECKSUM_AT=backup\n",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NASBACKUP_SHIM_")}
    env[settings.SETTINGS_FILE_ENV] = str(path)
    backup = f"{vm.name}/2026.12.07.00.00.00"
    argv = ["-o", "backup", "-v", vm.name, "-t", repo.type, "-s", repo.address,
            "-m", repo.options, "-p", backup, "-q", "false",
            "-d", ",".join(str(d.path) for d in vm.disks)]  # fmt: skip
    done = subprocess.run(
        [str(DROPIN), *argv], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout
    assert f"nasbackup operation='backup' vm='{vm.name}'" in log.read_text()
    manifest = read_manifest(Path(repo.address) / backup)
    assert manifest is not None and manifest.checksum_algorithm == "sha256"
    assert all(len(disk.checksum) == 64 for disk in manifest.disks)
