"""The commonest path regressions, in well under a second and with no hypervisor: the
relative backing link an incremental stores, and how a caller's mount-relative path is
resolved (and refused) inside the mounted repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shim.chain import relative_backing
from shim.errors import InputError
from shim.nas import MountSession, Repository


def test_an_incrementals_backing_link_is_relative_to_its_own_directory() -> None:
    mount = Path("/tmp/csbackup.x")
    parent = mount / "i-2-3-VM/2026.10.03.00.00.00/root.v1.qcow2"
    final = mount / "i-2-3-VM/2026.10.04.00.00.00"
    assert relative_backing(parent, final) == "../2026.10.03.00.00.00/root.v1.qcow2"
    # What the Java restore follows from the file's own directory, wherever it is mounted.
    elsewhere = Path("/mnt/other")
    assert relative_backing(
        elsewhere / "i-2-3-VM/a/root.v1.qcow2", elsewhere / "i-2-3-VM/b"
    ) == relative_backing(parent.parent.parent / "a/root.v1.qcow2", final.parent / "b")


@pytest.fixture
def session(tmp_path: Path) -> MountSession:
    """A session whose mount point is a plain directory (path resolution needs no mount)."""
    root = tmp_path / "csbackup.unit"
    (root / "i-2-3-VM" / "2026.10.03.00.00.00").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "i-2-3-VM" / "escape")
    os.symlink("2026.10.03.00.00.00", root / "i-2-3-VM" / "inside")
    repo = MountSession(Repository("none", "/srv/nas", "bind"))
    repo._root = root
    return repo


def test_mount_relative_paths_resolve_inside_the_repository(session: MountSession) -> None:
    root = session.root
    assert session.path("i-2-3-VM/2026.10.03.00.00.00") == root / "i-2-3-VM/2026.10.03.00.00.00"
    assert session.path("i-2-3-VM/2026.10.03.00.00.00/x") == root / "i-2-3-VM/2026.10.03.00.00.00/x"


@pytest.mark.parametrize(
    "bad",
    # A link is refused wherever it leads, into the repository too ("inside").
    [
        "",
        ".",
        "/",
        "/etc/passwd",
        "../x",
        "i-2-3-VM/../../x",
        "i-2-3-VM/escape/x",
        "a\nb",
        "i-2-3-VM/inside/x",
        "i-2-3-VM/inside",
    ],
)
def test_paths_leaving_the_repository_are_refused(session: MountSession, bad: str) -> None:
    with pytest.raises(InputError):
        session.path(bad)
