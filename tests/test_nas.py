"""The NAS mount session: the real mount path, confinement of caller paths, no secrets."""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import tempfile
from pathlib import Path

import pytest

from shim.errors import CommandFailed, InputError, Interrupted, MountError
from shim.nas import MountSession, Repository, redact_options
from shim.proc import Result
from tests.lab import Lab
from tests.lab.system import mount_points


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
            # A link is never followed, even one that stays inside the repository.
            "inside-link/x",
        ]:
            with pytest.raises(InputError):
                session.path(bad)
        assert session.path("i-2-3-VM/2026.10.03.00.00.00") == Path(
            session.root, "i-2-3-VM/2026.10.03.00.00.00"
        )
    assert list(outside.iterdir()) == []


class _FakeRun:
    """Stands in for ``proc.run``: records each argv and timeout; a mount may time out."""

    def __init__(self, *, mount_times_out: bool = False) -> None:
        self.calls: list[tuple[list[str], float | None]] = []
        self.mount_times_out = mount_times_out

    def __call__(self, argv: list[str], *, timeout: float | None = None, **_: object) -> Result:
        self.calls.append((list(argv), timeout))
        if argv[0] == "mount" and self.mount_times_out:
            raise CommandFailed(argv, None, "", timed_out=True)
        return Result(0, "", "")

    def timeout_of(self, program: str) -> float | None:
        return next(t for argv, t in self.calls if argv[0] == program)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private mount registry: faked mounts never touch the host's."""
    path = tmp_path / "mounts"
    monkeypatch.setattr("shim.nas.MOUNT_REGISTRY", path)
    return path


@pytest.mark.parametrize(("mount_timeout", "expected"), [(None, 120), (0, None), (5, 5)])
def test_mount_runs_under_the_repository_timeout(
    monkeypatch: pytest.MonkeyPatch,
    registry: Path,
    tmp_path: Path,
    mount_timeout: int | None,
    expected: int | None,
) -> None:
    fake = _FakeRun()
    monkeypatch.setattr("shim.nas.proc.run", fake)
    repo = Repository("nfs", "10.0.0.1:/b", "vers=4.1", mount_timeout=mount_timeout)
    with MountSession(repo, tmp_dir=str(tmp_path)) as session:
        root = session.root
        assert (registry / root.name).exists()
    assert fake.calls[0][0][:4] == ["mount", "-t", "nfs", "10.0.0.1:/b"]
    assert fake.timeout_of("mount") == expected
    assert not root.exists() and list(registry.iterdir()) == []


def test_timed_out_mount_fails_cleanly(
    monkeypatch: pytest.MonkeyPatch,
    registry: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    fake = _FakeRun(mount_times_out=True)
    monkeypatch.setattr("shim.nas.proc.run", fake)
    repo = Repository("nfs", "10.0.0.1:/slow", "password=hunter2", mount_timeout=3)
    with (
        pytest.raises(MountError, match=r"^Failed to mount nfs store$"),
        MountSession(repo, tmp_dir=str(tmp_path)),
    ):
        pass
    assert fake.timeout_of("mount") == 3
    assert list(tmp_path.glob("csbackup.*")) == [] and list(registry.iterdir()) == []
    assert "mount timed out after 3 s" in caplog.text and "hunter2" not in caplog.text
    assert [argv[0] for argv, _ in fake.calls] == ["mount"]  # it was not mounted: no umount


def test_timed_out_mount_that_mounted_after_all_is_detached(
    monkeypatch: pytest.MonkeyPatch, registry: Path, tmp_path: Path
) -> None:
    fake = _FakeRun(mount_times_out=True)
    monkeypatch.setattr("shim.nas.proc.run", fake)
    # The kernel finished the mount as the helper was killed: the directory is a mount point.
    monkeypatch.setattr("shim.nas.mount_points", lambda: list(tmp_path.glob("csbackup.*")))
    with (
        pytest.raises(MountError, match=r"^Failed to mount nfs store$"),
        MountSession(Repository("nfs", "10.0.0.1:/slow", mount_timeout=1), tmp_dir=str(tmp_path)),
    ):
        pass
    assert [argv[:2] for argv, _ in fake.calls] == [["mount", "-t"], ["umount", "-l"]]
    assert list(tmp_path.glob("csbackup.*")) == [] and list(registry.iterdir()) == []


@pytest.mark.lab
def test_real_mount_without_a_timeout(lab: Lab) -> None:
    repo = dataclasses.replace(lab.repository(), mount_timeout=0)
    with MountSession(repo) as session:
        root = session.root
        assert root in mount_points()
        (session.root / "x").write_text("y")
    assert not root.exists()
    assert (Path(repo.address) / "x").read_text() == "y"


def test_entering_twice_mounts_once(
    monkeypatch: pytest.MonkeyPatch, registry: Path, tmp_path: Path
) -> None:
    fake = _FakeRun()
    monkeypatch.setattr("shim.nas.proc.run", fake)
    session = MountSession(Repository("nfs", "10.0.0.1:/b"), tmp_dir=str(tmp_path))
    session.__enter__()
    with session as again:
        assert again is session
    assert [argv[0] for argv, _ in fake.calls].count("mount") == 1
    assert list(tmp_path.glob("csbackup.*")) == [] and list(registry.iterdir()) == []


def test_mount_interrupted_by_a_signal_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, registry: Path, tmp_path: Path
) -> None:
    def interrupted(argv: list[str], **_: object) -> Result:
        raise Interrupted("interrupted by signal SIGTERM")

    monkeypatch.setattr("shim.nas.proc.run", interrupted)
    with (
        pytest.raises(Interrupted),
        MountSession(Repository("nfs", "10.0.0.1:/slow", mount_timeout=0), tmp_dir=str(tmp_path)),
    ):
        pass
    assert list(tmp_path.glob("csbackup.*")) == [] and list(registry.iterdir()) == []
