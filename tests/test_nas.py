"""The NAS mount session: the real mount path, confinement of caller paths, no secrets."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import re
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.errors import CommandFailed, InputError, Interrupted, MountError
from shim.nas import MountSession, Repository, redact_options
from shim.proc import Result, processes_naming
from shim.runtime import RUN_DIR
from tests.lab import Lab
from tests.lab.chains import DROPIN, Run
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


CONFINED = "nodev,nosuid,noexec"


def test_cifs_gets_nobrl_once_and_every_mount_is_confined() -> None:
    assert Repository("cifs", "//h/s", "vers=3.0").mount_options == f"vers=3.0,{CONFINED},nobrl"
    assert Repository("cifs", "//h/s", "").mount_options == f"{CONFINED},nobrl"
    assert Repository("cifs", "//h/s", "nobrl").mount_options == f"nobrl,{CONFINED}"
    assert Repository("nfs", "h:/e", "vers=4.1").mount_options == f"vers=4.1,{CONFINED}"
    # A device node or a set-uid program on the NAS is someone else's: never honoured.
    assert Repository("nfs", "h:/e", "dev,suid,exec,nodev").mount_options == CONFINED
    with pytest.raises(InputError, match="password2"):
        Repository("cifs", "//h/s", "password=a,password2=b").validate()


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


def _paths_in(fstab: str) -> list[str]:
    return re.findall(r"(?:credentials|secretfile)=([^,\s]+)", fstab)


class _FakeRun:
    """Stands in for ``proc.run``: records each argv and timeout, and the files mount reads;
    a mount may time out."""

    def __init__(self, *, mount_times_out: bool = False) -> None:
        self.calls: list[tuple[list[str], float | None]] = []
        self.mount_times_out = mount_times_out
        self.fstab = ""
        self.modes: dict[str, int] = {}
        self.files: dict[str, str] = {}

    def __call__(self, argv: list[str], *, timeout: float | None = None, **_: object) -> Result:
        self.calls.append((list(argv), timeout))
        if argv[:2] == ["mount", "-T"]:
            # What mount and its helper read, as they read it: while mount runs.
            self.fstab = Path(argv[2]).read_text()
            self.modes = {
                p: stat.S_IMODE(os.stat(p).st_mode) for p in [argv[2], *_paths_in(self.fstab)]
            }
            self.files = {p: Path(p).read_text() for p in self.modes}
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
    mount = fake.calls[0][0]
    assert mount[:2] == ["mount", "-T"] and mount[3] == str(root) and len(mount) == 4
    assert fake.fstab == f"10.0.0.1:/b {root} nfs vers=4.1,{CONFINED} 0 0\n"
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
    assert [argv[:2] for argv, _ in fake.calls] == [["mount", "-T"], ["umount", "-l"]]
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


@pytest.mark.parametrize(
    "case",
    [
        (
            Repository("cifs", "//10.0.0.1/b k", "username=admin,password=p,,S3cr3t,vers=3.0"),
            ["admin", "p,S3cr3t", "p,,S3cr3t"],
            ["username=admin\npassword=p,S3cr3t\n"],
        ),
        (
            Repository("ceph", "10.0.0.1:/", "name=admin,secret=AQBk=="),
            ["AQBk=="],
            ["AQBk=="],
        ),
        (Repository("none", "/srv/nas", "bind,password=S3cr3t"), ["S3cr3t"], []),
    ],
)
def test_no_secret_of_the_options_is_on_a_command_line(
    monkeypatch: pytest.MonkeyPatch,
    registry: Path,
    tmp_path: Path,
    case: tuple[Repository, list[str], list[str]],
) -> None:
    repo, secret_values, expected_files = case
    fake = _FakeRun()
    monkeypatch.setattr("shim.nas.proc.run", fake)
    with MountSession(repo, tmp_dir=str(tmp_path)):
        pass
    ((mount, _),) = fake.calls
    assert all(secret not in " ".join(mount) for secret in secret_values)
    # mount reads its fstab line; a helper's credentials are in the file it reads itself.
    assert set(fake.modes.values()) == {0o600}
    assert sorted(text for path, text in fake.files.items() if path != mount[2]) == expected_files
    fields = fake.fstab.split()
    assert fields[0] == repo.address.replace(" ", "\\040") and fields[2] == repo.type
    if repo.type in ("cifs", "ceph"):
        assert all(secret not in fake.fstab for secret in secret_values)
        assert "nobrl" in fields[3] or repo.type == "ceph"
    assert list(registry.iterdir()) == []  # every file removed once mount returned


# -- through the real mount and a mount helper of the test's own --------------------------------
@contextlib.contextmanager
def _helper(fstype: str, script: str) -> Iterator[list[str]]:
    """``/sbin/mount.<fstype>`` being ``script`` while the block runs; the command prefix to
    run a program with it: none when the helper did not exist (it is made, then removed),
    else a private mount namespace where ``script`` is bound over the host's helper."""
    helper = Path("/sbin") / f"mount.{fstype}"
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as fh:
        fh.write(script)
    os.chmod(fh.name, 0o700)
    try:
        if helper.exists():  # a real one (cifs-utils): shadowed in a namespace, never touched
            bind = 'mount --bind "$0" "$1" && shift 2 && exec "$@"'
            yield ["unshare", "--mount", "--propagation", "private", "sh", "-c", bind, fh.name,
                   str(helper)]  # fmt: skip
            return
        helper.write_text(script)
        helper.chmod(0o700)
        try:
            yield []
        finally:
            helper.unlink()
    finally:
        os.unlink(fh.name)


def _dropin(prefix: list[str], argv: list[str], env: dict[str, str], log: Path) -> Run:
    done = subprocess.run(
        [*prefix, str(DROPIN), *argv],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, **env, "NASBACKUP_SHIM_LOG": str(log)},
    )  # fmt: skip
    return Run(done.returncode, done.stdout, done.stderr)


RECORDING_CIFS = """#!/bin/sh
# mount.cifs SOURCE DIR -o OPTIONS: records what ps would show of it and of mount, and what
# it reads from the credentials file, then mounts the lab's export there.
{
  echo "helper: $*"
  echo "mount: $(tr '\\0' ' ' < /proc/$PPID/cmdline)"
  creds=$(echo "$*" | sed -n 's/.*credentials=\\([^, ]*\\).*/\\1/p')
  [ -n "$creds" ] && echo "credentials $(stat -c %a "$creds"): $(cat "$creds" | tr '\\n' ' ')"
} >> "$NASBACKUP_TEST_RECORD"
exec mount -i --bind "$NASBACKUP_TEST_EXPORT" "$2"
"""


@pytest.mark.lab
def test_cifs_credentials_reach_the_helper_by_file_never_by_argv(lab: Lab, tmp_path: Path) -> None:
    export = lab.repository().address
    record = tmp_path / "record"
    options = "username=admin,password=p,,S3cr3t,vers=3.0"
    env = {"NASBACKUP_TEST_RECORD": str(record), "NASBACKUP_TEST_EXPORT": export}
    with _helper("cifs", RECORDING_CIFS) as prefix:
        run = _dropin(prefix, ["-o", "stats", "-t", "cifs", "-s", "//127.0.0.1/share", "-m",
                               options], env, tmp_path / "agent.log")  # fmt: skip
    assert run.returncode == 0, run
    seen = record.read_text()
    helper, mount, credentials = seen.splitlines()
    assert "S3cr3t" not in helper + mount and "admin" not in helper + mount
    assert mount.startswith("mount: mount -T ") and "nobrl" in helper and "vers=3.0" in helper
    # The password as mount.cifs reads it: the ",," of the option string is one comma.
    assert credentials.endswith(" username=admin password=p,S3cr3t ")
    assert credentials.startswith("credentials 600:")
    fstab = mount.split()[3]  # "mount: mount -T FILE DIR"
    assert fstab.startswith(str(RUN_DIR)) and not Path(fstab).exists()  # removed
    assert "S3cr3t" not in (tmp_path / "agent.log").read_text()


HANGING = """#!/bin/sh
# A mount helper that never returns, and forks a child that would outlive it.
sleep "$NASBACKUP_TEST_SLEEP" &
exec sleep "$NASBACKUP_TEST_SLEEP"
"""


@pytest.mark.lab
def test_a_mount_past_its_deadline_is_killed_with_its_helpers(tmp_path: Path) -> None:
    marker = f"299.{time.monotonic_ns() % 1000000}"  # a sleep no other process has
    env = {"NASBACKUP_TEST_SLEEP": marker}
    started = time.monotonic()
    with _helper("nasbackuphang", HANGING) as prefix:
        run = _dropin(prefix, ["-o", "stats", "-t", "nasbackuphang", "-s", "x", "-m", "",
                               "-w", "4"], env, tmp_path / "agent.log")  # fmt: skip
    took = time.monotonic() - started
    assert run.returncode == 1 and run.stdout == "Failed to mount nasbackuphang store\n", run
    assert took < 10, f"the mount's deadline was 4 s; the drop-in took {took:.1f} s"
    assert processes_naming(marker) == []
    assert _csbackup_dirs() == set() or all(not Path(d).is_mount() for d in _csbackup_dirs())
