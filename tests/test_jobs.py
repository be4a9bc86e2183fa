"""The job marker's discipline, branch by branch (fakes: the lab proves the whole in
the fault suite's libvirtd scenarios); the service scheduler's abort and shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from commands.model import GetBackupStorageStatsCommand
from shim.cancel import Cancelled, CancelToken
from shim.errors import BackupFailed
from shim.service.jobs import Job, JobState, Scheduler
from shim.virt import jobs
from shim.virt.jobs import BackupJob, JobMarker, recover_interrupted_job
from tests import support


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


# -- the scheduler's abort and shutdown (a fake engine that cleans up for a second) -----------
CLEANUP_SECONDS = 1.0


def _engine(seen: list[float]) -> Callable[..., None]:
    """An engine that runs until its token is cancelled, then cleans up for a second."""

    def run(request: object, *, cancel: CancelToken, **_kw: object) -> None:
        cancel.wait()
        seen.append(time.monotonic())
        time.sleep(CLEANUP_SECONDS)  # what a backup's cleanup takes (libvirt, NAS, unmount)
        raise Cancelled(["qemu-img"], cancel.reason)

    return run


def _stats(address: str) -> GetBackupStorageStatsCommand:
    # Distinct repositories: distinct runs (identical stats requests would share one).
    return GetBackupStorageStatsCommand(backup_repo_type="nfs", backup_repo_address=address)


async def _running(submitted: list[Job]) -> None:
    while not all(job.executing for job in submitted):
        await asyncio.sleep(0.01)


async def test_shutdown_aborts_every_job_at_once_each_with_its_cleanup() -> None:
    seen: list[float] = []
    scheduler = Scheduler(max_backups=2, runner=_engine(seen))
    submitted = [scheduler.submit([_stats(f"10.0.0.{i}:/b")]) for i in range(4)]
    await _running(submitted)
    started = time.monotonic()
    await scheduler.shutdown()
    took = time.monotonic() - started
    # Together, not one after the other (that would be 4 cleanups: 4 s).
    assert CLEANUP_SECONDS <= took < 2 * CLEANUP_SECONDS, took
    assert len(seen) == 4 and max(seen) - started < 0.5  # every stop began at once
    assert [job.state for job in submitted] == [JobState.ABORTED] * 4
    assert all(job.answers and not job.answers[0].result for job in submitted)


async def test_an_abort_begins_the_stop_at_once_and_answers_after_the_cleanup() -> None:
    seen: list[float] = []
    scheduler = Scheduler(max_backups=2, runner=_engine(seen))
    job = scheduler.submit([_stats("10.0.0.9:/b")])
    await _running([job])
    started = time.monotonic()
    await scheduler.abort(job)
    assert seen and seen[0] - started < 0.2
    assert time.monotonic() - started >= CLEANUP_SECONDS  # answered once cleaned up
    assert job.state == JobState.ABORTED
    assert job.answers is not None and "stopped: aborted" in job.answers[0].details
    await scheduler.shutdown()


def test_a_stop_is_not_taken_for_a_bad_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # verify, restore and the parent lookup turn a failed qemu-img into a finding, an
    # answer ("corrupt") or a fallback to a full: a stopped one must stop them instead.
    from shim import chain, qemu_img, restore, verify

    def stopped(*_args: object, **_kw: object) -> None:
        raise Cancelled(["qemu-img"], "aborted")

    backup = tmp_path / "vm" / "b1"
    backup.mkdir(parents=True)
    qemu_img.create(backup / "root.x.qcow2", 1024 * 1024)
    monkeypatch.setattr(qemu_img, "check", stopped)
    monkeypatch.setattr(qemu_img, "check_many", stopped)
    monkeypatch.setattr(qemu_img, "info", stopped)
    with support.vm_directory(tmp_path, "vm") as vm_dir:
        with pytest.raises(Cancelled, match="qemu-img stopped: aborted"):
            verify._walk_chain(vm_dir, "b1/root.x.qcow2", [], {})
        with pytest.raises(Cancelled, match="qemu-img stopped: aborted"):
            restore._first_corrupt([vm_dir.chain("b1/root.x.qcow2")])
        with pytest.raises(Cancelled, match="qemu-img stopped: aborted"):
            chain._usable(vm_dir, "b1/root.x.qcow2")
        (tmp_path / "volume").write_bytes(b"\0" * 512)
        chain_b1 = vm_dir.chain("b1/root.x.qcow2")
        with pytest.raises(Cancelled, match="qemu-img stopped: aborted"):
            restore._replace_file(
                chain_b1,
                chain_b1.spec(),
                tmp_path / "volume",
                exists=True,
                require_clean=lambda: None,
            )
