"""The NAS mount session: the real mount path, confinement of caller paths, no secrets."""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from pathlib import Path

import pytest

from shim.errors import InputError, MountError
from shim.lab import Lab
from shim.lab.system import mount_points
from shim.nas import MountSession, Repository, redact_options


def _csbackup_dirs() -> set[str]:
    return set(glob.glob(f"{tempfile.gettempdir()}/csbackup.*"))


@pytest.mark.lab
def test_local_repository_goes_through_mount(lab: Lab) -> None:
    repo = lab.repository()
    before = _csbackup_dirs()
    with MountSession(repo) as session:
        root = session.root
        assert root.name.startswith("csbackup.")
        assert root in mount_points()
        (session.path("i-2-3-VM/2026.10.03.00.00.00", what="-p")).mkdir(parents=True)
        (root / "i-2-3-VM/2026.10.03.00.00.00/file").write_text("x")
    assert root not in mount_points()
    assert not root.exists()
    assert _csbackup_dirs() == before
    assert (Path(repo.address) / "i-2-3-VM/2026.10.03.00.00.00/file").read_text() == "x"


def test_failed_mount_says_so_and_leaves_no_directory() -> None:
    before = _csbackup_dirs()
    # This kernel has no NFS client: the mount fails for real.
    with (
        pytest.raises(MountError, match=r"^Failed to mount nfs store$"),
        MountSession(Repository("nfs", "127.0.0.1:/nowhere", "vers=3,password=hunter2")),
    ):
        pass
    assert _csbackup_dirs() == before


def test_mount_options_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with (
        pytest.raises(MountError),
        MountSession(
            Repository("cifs", "//127.0.0.1/share", "username=admin,password=hunter2,vers=3.0")
        ),
    ):
        pass
    assert "hunter2" not in caplog.text and "admin" not in caplog.text
    assert "password=***" in caplog.text and "nobrl" in caplog.text


def test_cifs_gets_nobrl_once() -> None:
    assert Repository("cifs", "//h/s", "vers=3.0").mount_options == "vers=3.0,nobrl"
    assert Repository("cifs", "//h/s", "").mount_options == "nobrl"
    assert Repository("cifs", "//h/s", "nobrl").mount_options == "nobrl"
    assert Repository("nfs", "h:/e", "vers=4.1").mount_options == "vers=4.1"


def test_redaction() -> None:
    assert redact_options("vers=3,username=u,password=p,credentials=/etc/c") == (
        "vers=3,username=***,password=***,credentials=***"
    )


@pytest.mark.parametrize(
    ("repo", "message"),
    [
        (Repository("nfs", "-oremount", ""), "address"),
        (Repository("nfs", "h:/e", "-o remount"), "may not start"),
        (Repository("nfs;rm", "h:/e", ""), "type"),
        (Repository("nfs", "h:/e\nx", ""), "control"),
        (Repository("nfs", "", ""), "address"),
    ],
)
def test_values_that_mount_would_misread_are_refused(repo: Repository, message: str) -> None:
    before = _csbackup_dirs()
    with pytest.raises(InputError, match=message):
        MountSession(repo)
    assert _csbackup_dirs() == before


@pytest.mark.lab
def test_caller_paths_stay_inside_the_mount(lab: Lab, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    with MountSession(lab.repository()) as session:
        os.symlink(outside, session.root / "escape")
        os.symlink("i-2-3-VM", session.root / "inside-link")
        (session.root / "i-2-3-VM").mkdir()
        for bad in [
            "",
            ".",
            "./",
            "/etc/passwd",
            "../x",
            "i-2-3-VM/../../x",
            "a/\0b",
            "escape",
            "escape/file",
            "a\nb",
        ]:
            with pytest.raises(InputError):
                session.path(bad)
        assert session.path("i-2-3-VM/2026.10.03.00.00.00") == Path(
            os.path.realpath(session.root), "i-2-3-VM/2026.10.03.00.00.00"
        )
        assert session.path("inside-link/x").parent.name == "i-2-3-VM"
    assert list(outside.iterdir()) == []
