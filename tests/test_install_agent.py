"""scripts/install-agent: in place of the agent's script, surviving upgrades, undone exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import stand_in_deb

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "scripts" / "install-agent"
PACKAGE = "nasbackup-shim-testpkg"
SHIM_PACKAGE = "cloudstack-nasbackup-shim"
ORIGINAL = "#!/bin/bash\n# the agent's own nasbackup.sh, version {v}\necho upstream\n"


# Installs and purges a dpkg package and adds diversions: not for `pytest -m "not lab"`.
pytestmark = [pytest.mark.host, pytest.mark.lab]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INSTALL), *args], capture_output=True, text=True, env=env, check=False
    )


def _build_deb(tmp: Path, scripts_dir: Path, version: str) -> Path:
    script = f"{scripts_dir}/vm/hypervisor/kvm/nasbackup.sh"
    return stand_in_deb(tmp, PACKAGE, version, {script: ORIGINAL.format(v=version).encode()})


@pytest.fixture
def scripts_dir() -> Iterator[Path]:
    path = Path("/var/tmp/nasbackup-shim-install-test/scripts")
    shutil.rmtree(path.parent, ignore_errors=True)
    yield path
    subprocess.run(["dpkg", "--purge", PACKAGE], capture_output=True, check=False)
    target = path / "vm/hypervisor/kvm/nasbackup.sh"
    for owner in (["--local"], ["--package", SHIM_PACKAGE]):
        subprocess.run(
            ["dpkg-divert", *owner, "--rename", "--remove", str(target)],
            capture_output=True,
            check=False,
        )
    shutil.rmtree(path.parent, ignore_errors=True)


def test_dpkg_owned_script_is_diverted_and_survives_an_upgrade(
    scripts_dir: Path, tmp_path: Path
) -> None:
    target = scripts_dir / "vm/hypervisor/kvm/nasbackup.sh"
    subprocess.run(
        ["dpkg", "-i", str(_build_deb(tmp_path, scripts_dir, "1.0"))],
        capture_output=True,
        check=True,
    )
    done = _run("--scripts-dir", str(scripts_dir))
    assert done.returncode == 0, done.stderr
    assert target.is_symlink() and target.resolve() == ROOT / "scripts" / "nasbackup.sh"
    # The agent's way of calling it: an argv list, stdout read.
    usage = subprocess.run([str(target), "-h"], capture_output=True, text=True, check=False)
    assert usage.returncode == 1 and usage.stdout.startswith("Usage: nasbackup.sh")
    assert "installed" in _run("--scripts-dir", str(scripts_dir)).stdout  # idempotent
    # A package upgrade writes beside the drop-in, never over it.
    subprocess.run(
        ["dpkg", "-i", str(_build_deb(tmp_path, scripts_dir, "2.0"))],
        capture_output=True,
        check=True,
    )
    assert target.is_symlink()
    assert Path(f"{target}.cloudstack-orig").read_text() == ORIGINAL.format(v="2.0")
    done = _run("--scripts-dir", str(scripts_dir), "--uninstall")
    assert done.returncode == 0, done.stderr
    assert not target.is_symlink()
    assert target.read_text() == ORIGINAL.format(v="2.0")
    assert (
        subprocess.run(
            ["dpkg-divert", "--list", str(target)], capture_output=True, text=True, check=True
        ).stdout
        == ""
    )


def test_unowned_script_is_kept_and_restored_exactly(scripts_dir: Path) -> None:
    target = scripts_dir / "vm/hypervisor/kvm/nasbackup.sh"
    target.parent.mkdir(parents=True)
    target.write_text(ORIGINAL.format(v="local"))
    target.chmod(0o750)
    os.utime(target, (1_700_000_000, 1_700_000_000))
    before = target.stat()
    assert _run("--scripts-dir", str(scripts_dir)).returncode == 0
    assert target.is_symlink()
    assert "original kept" in _run("--scripts-dir", str(scripts_dir), "--status").stdout
    assert _run("--scripts-dir", str(scripts_dir), "--uninstall").returncode == 0
    after = target.stat()
    assert target.read_text() == ORIGINAL.format(v="local")
    assert (after.st_mode, after.st_mtime, after.st_uid) == (
        before.st_mode,
        before.st_mtime,
        before.st_uid,
    )
    assert sorted(p.name for p in target.parent.iterdir()) == ["nasbackup.sh"]


def test_refuses_where_the_environment_cannot_run(scripts_dir: Path, tmp_path: Path) -> None:
    target = scripts_dir / "vm/hypervisor/kvm/nasbackup.sh"
    target.parent.mkdir(parents=True)
    target.write_text(ORIGINAL.format(v="local"))
    broken = tmp_path / "venv"
    (broken / "bin").mkdir(parents=True)
    (broken / "bin" / "python").symlink_to("/bin/false")
    done = _run("--scripts-dir", str(scripts_dir), env={**os.environ, "SHIM_VENV": str(broken)})
    assert done.returncode == 1
    assert "cannot run here" in done.stderr
    assert target.read_text() == ORIGINAL.format(v="local") and not target.is_symlink()
    missing = _run("--scripts-dir", str(tmp_path / "no-agent"))
    assert missing.returncode == 1 and "is the CloudStack KVM agent installed" in missing.stderr


def test_the_agents_own_configuration_names_the_script(scripts_dir: Path, tmp_path: Path) -> None:
    """kvm.scripts.dir under environment.properties' paths.script, as the agent looks."""
    common = scripts_dir.parent / "common"
    target = common / "scripts/vm/hypervisor/kvm/nasbackup.sh"
    target.parent.mkdir(parents=True)
    target.write_text(ORIGINAL.format(v="packaged"))
    conf = tmp_path / "agent-conf"
    conf.mkdir()
    (conf / "environment.properties").write_text(f"paths.script={common}\n")
    env = {**os.environ, "SHIM_AGENT_CONF_DIR": str(conf)}
    done = _run(env=env)
    assert done.returncode == 0, done.stderr
    assert target.resolve() == ROOT / "scripts" / "nasbackup.sh"
    assert f"installed at {target}" in _run("--status", env=env).stdout
    # An absolute kvm.scripts.dir wins.
    elsewhere = tmp_path / "elsewhere"
    (conf / "agent.properties").write_text(f"kvm.scripts.dir={elsewhere}/\n")
    assert f"not installed at {elsewhere}/nasbackup.sh" in _run("--status", env=env).stdout
    (conf / "agent.properties").unlink()
    assert _run("--uninstall", env=env).returncode == 0
    assert target.read_text() == ORIGINAL.format(v="packaged")
    again = _run("--uninstall", env=env)
    assert again.returncode == 0 and "not installed" in again.stdout
    assert sorted(p.name for p in target.parent.iterdir()) == ["nasbackup.sh"]


def test_an_upgrade_that_replaced_the_link_leaves_its_script_as_the_original(
    scripts_dir: Path,
) -> None:
    target = scripts_dir / "vm/hypervisor/kvm/nasbackup.sh"
    target.parent.mkdir(parents=True)
    target.write_text(ORIGINAL.format(v="1"))
    assert _run("--scripts-dir", str(scripts_dir)).returncode == 0
    # An rpm upgrade of the agent writes its new script over the link.
    staged = target.with_name("nasbackup.sh.rpmnew")
    staged.write_text(ORIGINAL.format(v="2"))
    staged.rename(target)
    assert "not installed" in _run("--scripts-dir", str(scripts_dir), "--status").stdout
    assert _run("--scripts-dir", str(scripts_dir)).returncode == 0
    assert _run("--scripts-dir", str(scripts_dir), "--uninstall").returncode == 0
    assert target.read_text() == ORIGINAL.format(v="2")
    assert sorted(p.name for p in target.parent.iterdir()) == ["nasbackup.sh"]


def test_the_agent_always_finds_a_script(scripts_dir: Path) -> None:
    """Install and uninstall replace the script by renames: never a moment without one."""
    target = scripts_dir / "vm/hypervisor/kvm/nasbackup.sh"
    target.parent.mkdir(parents=True)
    target.write_text(ORIGINAL.format(v="1"))
    missing: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not os.path.lexists(target):
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(5):
            assert _run("--scripts-dir", str(scripts_dir)).returncode == 0
            assert _run("--scripts-dir", str(scripts_dir), "--uninstall").returncode == 0
    finally:
        stop.set()
        watcher.join()
    assert missing == []
    assert target.read_text() == ORIGINAL.format(v="1")


def test_a_drop_in_that_does_not_answer_changes_nothing(scripts_dir: Path, tmp_path: Path) -> None:
    target = scripts_dir / "vm/hypervisor/kvm/nasbackup.sh"
    target.parent.mkdir(parents=True)
    target.write_text(ORIGINAL.format(v="1"))
    inode = target.stat().st_ino
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "scripts", clone / "scripts", symlinks=True)
    # Imports fine (install-agent's check), but the drop-in's own start fails.
    python = clone / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\n[ "$1" = -m ] && exit 3\nexec {ROOT}/.venv/bin/python "$@"\n')
    python.chmod(0o755)
    done = subprocess.run(
        [str(clone / "scripts" / "install-agent"), "--scripts-dir", str(scripts_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 1 and "does not answer -h" in done.stderr
    assert not target.is_symlink() and target.stat().st_ino == inode
    assert sorted(p.name for p in target.parent.iterdir()) == ["nasbackup.sh"]


@pytest.mark.parametrize("holder", ["clone", "package"])
def test_one_kind_of_install_never_takes_the_script_from_the_other(
    scripts_dir: Path, holder: str
) -> None:
    """A clone install and the package each refuse the agent's script the other holds."""
    target = scripts_dir / "vm/hypervisor/kvm/nasbackup.sh"
    target.parent.mkdir(parents=True)
    target.write_text(ORIGINAL.format(v="local"))
    if holder == "clone":
        assert _run("--scripts-dir", str(scripts_dir)).returncode == 0
        other = ["--package"]
    else:  # as the package's postinst leaves it (its drop-in is not on this host)
        subprocess.run(
            ["dpkg-divert", "--package", SHIM_PACKAGE, "--no-rename", "--divert",
             f"{target}.cloudstack-orig", "--add", str(target)],
            capture_output=True, check=True,
        )  # fmt: skip
        other = []
    before = {p.name: (p.is_symlink(), os.readlink(p) if p.is_symlink() else p.read_text())
              for p in target.parent.iterdir()}  # fmt: skip
    done = _run("--scripts-dir", str(scripts_dir), *other)
    assert done.returncode == 1, done.stdout
    expected = "clone install" if holder == "clone" else "package runs the agent's script"
    assert expected in done.stderr
    after = {p.name: (p.is_symlink(), os.readlink(p) if p.is_symlink() else p.read_text())
             for p in target.parent.iterdir()}  # fmt: skip
    assert after == before
    assert "not installed" in _run("--scripts-dir", str(scripts_dir), *other, "--uninstall").stdout


def test_a_diversion_without_its_diverted_file_keeps_the_script_there(
    scripts_dir: Path, tmp_path: Path
) -> None:
    """Killed between diverting and naming the original (or the original put back by hand):
    the script in place is the original, kept under the diverted name before any rename."""
    subprocess.run(
        ["dpkg", "-i", str(_build_deb(tmp_path, scripts_dir, "1.0"))],
        capture_output=True, check=True,
    )  # fmt: skip
    target = scripts_dir / "vm/hypervisor/kvm/nasbackup.sh"
    subprocess.run(
        ["dpkg-divert", "--local", "--no-rename", "--divert", f"{target}.cloudstack-orig",
         "--add", str(target)],
        capture_output=True, check=True,
    )  # fmt: skip
    assert _run("--scripts-dir", str(scripts_dir)).returncode == 0
    assert target.is_symlink()
    assert Path(f"{target}.cloudstack-orig").read_text() == ORIGINAL.format(v="1.0")
    assert _run("--scripts-dir", str(scripts_dir), "--uninstall").returncode == 0
    assert target.read_text() == ORIGINAL.format(v="1.0") and not target.is_symlink()


def test_a_moved_clones_install_is_seen_and_undone(scripts_dir: Path) -> None:
    """The clone moved away: its link dangles (the agent gets 127); --status says so and
    --uninstall, from the clone where it is now, still puts the original back."""
    target = scripts_dir / "vm/hypervisor/kvm/nasbackup.sh"
    target.parent.mkdir(parents=True)
    target.write_text(ORIGINAL.format(v="local"))
    assert _run("--scripts-dir", str(scripts_dir)).returncode == 0
    target.unlink()
    target.symlink_to("/nonexistent/old-clone/scripts/nasbackup.sh")
    assert "which is gone" in _run("--scripts-dir", str(scripts_dir), "--status").stdout
    done = _run("--scripts-dir", str(scripts_dir), "--uninstall")
    assert done.returncode == 0, done.stderr
    assert target.read_text() == ORIGINAL.format(v="local") and not target.is_symlink()
