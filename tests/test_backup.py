"""Which method takes a running VM's backup (``shim/backup.py``): the rule's branches that
the lab cannot reach on demand (no room in the default scratch directory, a VM name too
long for its socket, a QEMU holding an earlier target), against a stand-in domain. The
rule's common paths run end to end in ``tests/test_pull.py`` and ``tests/test_targets.py``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from shim import backup, pull, settings
from shim.errors import BackupFailed
from shim.nas import Repository
from shim.request import BackupRequest
from shim.targets import Targets

MiB = 1024 * 1024
XML = """<domain><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='/var/lib/images/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
</devices></domain>"""


class _Domain:
    """What the rule asks of a libvirt domain, no more."""

    def __init__(self, name: str, allocation: int) -> None:
        self._name = name
        self.allocation = allocation
        self.asked = 0

    def name(self) -> str:
        return self._name

    def XMLDesc(self) -> str:
        return XML

    def blockInfo(self, _target: str) -> list[int]:
        self.asked += 1
        return [64 * MiB, self.allocation, self.allocation]


@pytest.fixture
def default_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "scratch"
    monkeypatch.setattr(backup, "DEFAULT_SCRATCH", root)
    return root


def _request(mode: str = "full", vm: str = "i-2-3-VM") -> BackupRequest:
    return BackupRequest(
        vm=vm, repository=Repository("nfs", "10.0.0.1:/b", ""), path=f"{vm}/b", mode=mode,
        bitmap_new="b1",
    )  # fmt: skip


def test_auto_takes_fulls_in_pull_mode_and_incrementals_in_push(default_scratch: Path) -> None:
    dom = _Domain("i-2-3-VM", MiB)
    scratch = backup._scratch_for(dom, _request(), Targets(), backup.AUTO)  # type: ignore[arg-type]
    assert scratch is not None and scratch.root == default_scratch
    assert os.stat(default_scratch).st_mode & 0o777 == 0o700
    incremental = _request("incremental")
    assert backup._scratch_for(dom, incremental, Targets(), backup.AUTO) is None  # type: ignore[arg-type]
    capped = backup._scratch_for(dom, incremental, Targets(rate=MiB), backup.AUTO)  # type: ignore[arg-type]
    assert capped is not None


def test_no_room_is_push_mode_in_auto_and_a_failure_when_pull_is_forced(
    default_scratch: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dom = _Domain("i-2-3-VM", 1 << 60)
    caplog.set_level(logging.WARNING, logger="shim")
    assert backup._scratch_for(dom, _request(), Targets(), backup.AUTO) is None  # type: ignore[arg-type]
    assert "kept free: push mode" in caplog.text
    with pytest.raises(BackupFailed, match="NASBACKUP_SHIM_METHOD=pull, and the scratch"):
        backup._scratch_for(dom, _request(), Targets(), backup.PULL)  # type: ignore[arg-type]


def test_a_name_too_long_for_the_socket_is_push_mode(default_scratch: Path) -> None:
    vm = "i-2-3-" + "v" * 120
    dom = _Domain(vm, MiB)
    assert backup._scratch_for(dom, _request(vm=vm), Targets(), backup.AUTO) is None  # type: ignore[arg-type]


def test_a_qemu_holding_an_earlier_target_is_asked_nothing(
    default_scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its backup goes to push mode, whose own check refuses it before any QEMU query."""
    monkeypatch.setattr(backup.host, "files_held_open", lambda _dom, _part: ["/nas/x.partial/y"])
    dom = _Domain("i-2-3-VM", MiB)
    assert backup._scratch_for(dom, _request(), Targets(), backup.AUTO) is None  # type: ignore[arg-type]
    assert dom.asked == 0


def test_push_ignores_a_scratch_directory_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(settings.SCRATCH_DIR.name, str(tmp_path))
    caplog.set_level(logging.INFO, logger="shim")
    dom = _Domain("i-2-3-VM", MiB)
    assert backup._scratch_for(dom, _request(), Targets(), backup.PUSH) is None  # type: ignore[arg-type]
    assert f"the scratch directory {tmp_path} is not used" in caplog.text


def test_the_default_scratch_must_be_a_private_directory(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)  # noqa: S103 - the permissive directory is the case
    assert "alone" in (pull.scratch_dir_problem(loose) or "")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    assert "alone" in (pull.scratch_dir_problem(link) or "")
    fresh = tmp_path / "a" / "fresh"
    assert pull.scratch_dir_problem(fresh) is None
    assert os.stat(fresh).st_mode & 0o777 == 0o700


def test_an_unknown_method_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.METHOD.name, "fast")
    with pytest.raises(backup.UsageError, match="auto, push or pull"):
        backup.method_setting()
