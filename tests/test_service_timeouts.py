"""Deadlines over the socket: ``wait`` (else the configured default) stops a command, with
the cleanup of any failure, and answers ``timeout``; restore mounts honour ``mountTimeout``.

The repository is the fault suite's FUSE NAS, slowed (every write sleeps) or hanging (a
lookup under ``hang`` blocks, as on a dead NFS server, so that mounting it hangs).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from shim import qemu_img
from shim.nas import Repository
from shim.service import ServiceConfig, StartupRefused
from shim.service.__main__ import config_from, parse_args
from tests.envelopes import fill, read
from tests.lab import Lab, MiB, system
from tests.lab.leaks import leaks
from tests.service_support import FixtureRun, Running, backup_directories, running

TAKE = "org.apache.cloudstack.backup.TakeBackupCommand"
STATS = "org.apache.cloudstack.backup.GetBackupStorageStatsCommand"
RESTORE = "org.apache.cloudstack.backup.RestoreBackupCommand"
TIMED_OUT_BACKUP = {
    "org.apache.cloudstack.backup.BackupAnswer": {
        "contextMap": {},
        "wait": 0,
        "bypassHostMaintenance": False,
        "result": False,
        "details": "timeout",
    }
}
BOUND_SECONDS = 30
"""An answer past its deadline must come this soon: the work was stopped, not waited out."""
ABORT_SECONDS = 8
"""An aborted job's answer (given once it has cleaned up) must come this soon: the stop
begins at once, and a copy that does not drain its writes in flight within
``storage_daemon.CANCEL_TIMEOUT_SECONDS`` is killed."""


def _envelope(case: str, values: dict[str, Any], **fields: Any) -> list[Any]:
    """The merged generation's fixture ``case``, filled, with ``fields`` changed."""
    ((name, body),) = fill(read("merged", case)[0], values)[0].items()
    return [{name: {**body, **fields}}]


def _stats_values(repository: Repository) -> dict[str, Any]:
    return {
        "repoType": repository.type,
        "repoAddress": repository.address,
        "mountOptions": repository.options,
    }


def _only_answer(answers: list[dict[str, Any]]) -> dict[str, Any]:
    ((_, body),) = answers[0].items()
    return body


async def _timed_post(service: Running, envelope: list[Any]) -> tuple[list[Any], float]:
    started = time.monotonic()
    status, answers = await service.post(envelope)
    assert status == 200, answers
    return answers, time.monotonic() - started


def _no_shim_mounts() -> list[Path]:
    return [m for m in system.mount_points() if m.name.startswith("csbackup.")]


@pytest.mark.live_backup
@pytest.mark.lab
async def test_a_backup_past_its_wait_is_stopped_cleaned_up_and_answers_timeout(
    lab: Lab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shim")
    vm = lab.create_vm(disks=(32 * MiB,))
    vm.write(0, 0, 8 * MiB, pattern=0x5A)
    nas = lab.flaky_repository()
    # FUSE writes 4 KiB at a time: creating the target (~80 writes) takes well under the
    # deadline, copying 8 MiB (~2000 writes) well over it. The libvirt job is running then.
    nas.slow_writes(0.005)
    run = FixtureRun(lab, vm, nas.repository)
    async with running(tmp_path) as service:
        answers, took = await _timed_post(service, _envelope("full", run.values(), wait=2))
        assert answers == [TIMED_OUT_BACKUP]  # exactly: no needsCleanup, no size
        assert 2 <= took < BOUND_SECONDS
        assert f"aborting the backup job of {vm.name}" in caplog.text
        assert "detaching lazily" not in caplog.text  # the cleanup ran undisturbed
        # Cleaned up as after any failure, before the answer was given.
        assert backup_directories(run.repo_dir, vm) == []
        assert vm.is_running() and vm.checkpoints() == []
        assert leaks(lab) == []
        nas.heal()
        await run.backup(service, "merged", "full")
        assert vm.checkpoints() == run.bitmaps
        assert leaks(lab) == []


@pytest.mark.lab
async def test_the_configured_default_applies_when_wait_is_zero(lab: Lab, tmp_path: Path) -> None:
    nas = lab.flaky_repository()
    hanging = nas.hang_lookups()
    async with running(tmp_path, command_timeout=2) as service:
        answers, took = await _timed_post(service, _envelope("stats", _stats_values(hanging)))
        body = _only_answer(answers)
        assert (body["result"], body["details"]) == (False, "timeout")
        assert 2 <= took < BOUND_SECONDS
        assert _no_shim_mounts() == []
        nas.heal()
        # A command that ends before the (small) default deadline is not affected by it.
        answers, _ = await _timed_post(service, _envelope("stats", _stats_values(nas.repository)))
        body = _only_answer(answers)
        assert body["result"] is False and body["totalSize"] > 0, body  # false: as Java
    assert leaks(lab) == []


@pytest.mark.lab
async def test_a_stats_whose_mount_hangs_is_stopped_at_its_wait(lab: Lab, tmp_path: Path) -> None:
    nas = lab.flaky_repository()
    hanging = nas.hang_lookups()
    async with running(tmp_path) as service:
        started = time.monotonic()
        envelope = _envelope("stats", _stats_values(hanging), wait=2)
        status, accepted = await service.post(envelope, run_async=True)
        assert status == 202, accepted
        job = await service.wait_job(accepted["jobId"], timeout=BOUND_SECONDS)
        assert 2 <= time.monotonic() - started < BOUND_SECONDS
        assert job["state"] == "failed"
        body = _only_answer(job["answers"])
        assert (body["result"], body["details"]) == (False, "timeout")
        assert (body["totalSize"], body["usedSize"]) == (0, 0)
        assert _no_shim_mounts() == []  # the killed mount left nothing mounted
        nas.heal()  # before looking for partial directories: a lookup under hang blocks
        assert leaks(lab) == []


@pytest.mark.lab
async def test_a_restore_mount_honours_mount_timeout(lab: Lab, tmp_path: Path) -> None:
    vm = lab.create_vm(disks=(16 * MiB, 8 * MiB), persistent=True, start=False)
    nas = lab.flaky_repository()
    run = FixtureRun(lab, vm, nas.hang_lookups())
    async with running(tmp_path) as service:  # wait 0, the default deadline: 7200 s
        envelope = _envelope("restore", run.values(), mountTimeout=1, wait=0)
        answers, took = await _timed_post(service, envelope)
        body = _only_answer(answers)
        assert (body["result"], body["details"]) == (
            False,
            "Failed to mount the backup repository on the KVM host",
        )
        assert took < BOUND_SECONDS  # one second, not the 120 s of a mount without one
        assert _no_shim_mounts() == []
    nas.heal()
    assert leaks(lab) == []


@pytest.mark.lab
async def test_an_aborted_stopped_vm_backup_stops_at_once_and_cleans_up(
    lab: Lab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shim")
    vm = lab.create_vm(disks=(64 * MiB,), persistent=True)
    vm.write(0, 0, 48 * MiB, pattern=0x3C)
    vm.stop()
    nas = lab.flaky_repository()
    nas.slow_writes(0.005)  # 48 MiB in 4 KiB writes: about a minute of copying
    run = FixtureRun(lab, vm, nas.repository)
    values = run.values()
    async with running(tmp_path) as service:
        status, accepted = await service.post(
            fill(read("merged", "stopped")[0], values), run_async=True
        )
        assert status == 202, accepted
        deadline = time.monotonic() + BOUND_SECONDS
        while f"offline copy of 1 disk(s) of {vm.name} started" not in caplog.text:
            assert time.monotonic() < deadline, "the copy did not start"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # copying: qemu-storage-daemon's block job runs
        started = time.monotonic()
        status, answered, aborted = await service.abort(accepted["jobId"])
        took = time.monotonic() - started
        # DELETE answers within a second (202 while the cleanup goes on), the stop at once.
        assert status in (200, 202) and answered < 1.5, (status, answered)
        assert aborted["state"] == "aborted", aborted
        body = _only_answer(aborted["answers"])
        assert (body["result"], body["details"]) == (
            False,
            "qemu-storage-daemon stopped: aborted",
        )
        # The job has ended and cleaned up within seconds.
        assert took < ABORT_SECONDS, f"the abort took {took:.1f} s"
        assert "cancelling block job(s) src0-job: aborted" in caplog.text
    assert backup_directories(run.repo_dir, vm) == []  # no partial, no published directory
    assert leaks(lab) == []
    assert system.descendants_running("qemu-storage-daemon") == []
    nas.heal()
    source = vm.disks[0].path
    info = subprocess.run(["qemu-img", "info", str(source)], capture_output=True, check=False)
    assert info.returncode == 0, info.stderr  # without -U: no image lock is left
    assert values["bitmapNew"] not in qemu_img.info(source).bitmaps  # nor the new bitmap


def test_the_default_deadline_is_configured_and_at_least_one_second() -> None:
    assert ServiceConfig().command_timeout == 7200  # the agent's cmds.timeout
    assert config_from(parse_args(["--command-timeout", "30"])).command_timeout == 30
    with pytest.raises(StartupRefused, match="at least 1 second"):
        config_from(parse_args(["--command-timeout", "0"]))
