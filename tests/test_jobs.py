"""The job marker's discipline, branch by branch (fakes: the lab proves the whole in
the fault suite's libvirtd scenarios)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import libvirt
import pytest

from shim.errors import BackupFailed
from shim.virt import jobs
from shim.virt.jobs import BackupJob, JobMarker, recover_interrupted_job


class FakeConn:
    def __init__(self) -> None:
        self.alive = True

    def domainEventRegisterAny(self, *_args: object) -> int:
        return 1

    def domainEventDeregisterAny(self, _id: int) -> None:
        pass

    def registerCloseCallback(self, *_args: object) -> None:
        pass

    def unregisterCloseCallback(self) -> None:
        pass

    def isAlive(self) -> bool:
        return self.alive


class FakeDom:
    def __init__(self, begin_error: str | None = None) -> None:
        self.begin_error = begin_error

    def name(self) -> str:
        return "i-2-7-VM"

    def backupBegin(self, *_args: object) -> None:
        if self.begin_error:
            raise libvirt.libvirtError(self.begin_error)

    def jobStats(self, _flags: int = 0) -> dict[str, Any]:
        return {"type": libvirt.VIR_DOMAIN_JOB_NONE}

    def isActive(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _markers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "JOB_MARKERS", tmp_path / "jobs")


def test_a_completed_job_clears_its_marker() -> None:
    with BackupJob(FakeConn(), FakeDom()) as job:  # type: ignore[arg-type]
        job.begin("<domainbackup/>")
        assert JobMarker("i-2-7-VM").present
        job._on_job_completed(None, None, {"success": True}, None)
        job.wait()
    assert not JobMarker("i-2-7-VM").present


def test_a_lost_connection_keeps_the_marker() -> None:
    conn = FakeConn()
    job = BackupJob(conn, FakeDom())  # type: ignore[arg-type]
    with pytest.raises(BackupFailed, match="connection to libvirt was lost"), job:
        job.begin("<domainbackup/>")
        conn.alive = False
        job._on_close(None, 0, None)
        job.wait()
    assert JobMarker("i-2-7-VM").present


def test_a_refused_begin_clears_the_marker_a_dead_connection_does_not() -> None:
    with pytest.raises(BackupFailed, match="could not start"):
        BackupJob(FakeConn(), FakeDom("bitmap")).begin("<domainbackup/>")  # type: ignore[arg-type]
    assert not JobMarker("i-2-7-VM").present
    conn = FakeConn()
    conn.alive = False
    with pytest.raises(BackupFailed, match="could not start"):
        BackupJob(conn, FakeDom("eof")).begin("<domainbackup/>")  # type: ignore[arg-type]
    assert JobMarker("i-2-7-VM").present


def test_recovery_touches_the_monitor_only_after_an_interrupted_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def monitor(_dom: object, command: str, **_args: object) -> Any:
        calls.append(command)
        if command == "query-named-block-nodes":
            return [
                {"node-name": "libvirt-1-format", "dirty-bitmaps": [
                    {"name": "backup-vdb", "persistent": False, "busy": False},
                    {"name": "backup-vda", "persistent": True, "busy": False},  # a checkpoint
                ]},
            ]  # fmt: skip
        return {}

    monkeypatch.setattr(jobs, "qemu_monitor", monitor)
    recover_interrupted_job(FakeConn(), FakeDom(), ["vda", "vdb"])  # type: ignore[arg-type]
    assert calls == []
    JobMarker("i-2-7-VM").set()
    recover_interrupted_job(FakeConn(), FakeDom(), ["vda", "vdb"])  # type: ignore[arg-type]
    assert calls == ["query-named-block-nodes", "block-dirty-bitmap-remove"]
    assert not JobMarker("i-2-7-VM").present
