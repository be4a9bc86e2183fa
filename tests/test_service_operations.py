"""The fixtures of the chain operations and stopped-VM backups (delete, rebase, restore,
``volumePaths``), posted to the running service against the lab."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from shim import qemu_img
from shim.compat import strict_zip
from shim.manifest import MANIFEST
from shim.virt.disks import parse_disks
from tests.envelopes import all_cases, fill, mismatches, read
from tests.lab import Lab, LabVM, MiB
from tests.lab.leaks import leaks
from tests.service_support import FixtureRun, Running, backup_directories, running
from tests.support import disk_files, verify_backup

pytestmark = pytest.mark.lab


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Running]:
    async with running(tmp_path) as the_service:
        yield the_service


def _cases(case: str) -> list[str]:
    return [generation for generation, name in all_cases() if name == case]


def _write(vm: LabVM, round_: int) -> None:
    vm.write(0, round_ * MiB, 1 * MiB, pattern=0x40 + round_)
    vm.write(1, round_ * 512 * 1024, 512 * 1024, pattern=0x60 + round_)


async def _post(service: Running, generation: str, case: str, values: dict[str, Any]) -> Any:
    """Post one fixture as ``generation``'s agent; the expected answers and the answers."""
    command, expected = read(generation, case)
    status, answers = await service.post(fill(command, values), generation=generation)
    assert status == 200, answers
    return expected, answers


@pytest.mark.parametrize("generation", _cases("stopped"))
async def test_stopped_vm_fixture(lab: Lab, service: Running, generation: str) -> None:
    vm = lab.create_vm(disks=(32 * MiB, 16 * MiB), persistent=True)
    _write(vm, 1)
    vm.stop()
    run = FixtureRun(lab, vm, lab.repository())
    values = run.values()
    expected, answers = await _post(service, generation, "stopped", values)
    assert all(body["result"] for item in answers for body in item.values()), answers
    # One integer per file written, in the order the engine wrote them: the manifest last.
    directory = run.repo_dir / values["backupPath"]
    names = [*sorted(p.name for p in directory.iterdir() if p.name != MANIFEST), MANIFEST]
    sizes = [(directory / name).stat().st_size for name in names]
    values.update(fileSizeLines="\n".join(map(str, sizes)), fileSizeSum=sum(sizes))
    assert mismatches(expected, answers, values) == []
    # A stopped VM's disks are the truth to compare with.
    verify_backup(lab, run.repo_dir, values["backupPath"], vm, [d.path for d in vm.disks])
    assert leaks(lab) == []


@pytest.mark.live_backup
@pytest.mark.parametrize("generation", _cases("delete"))
async def test_delete_fixture(lab: Lab, service: Running, generation: str) -> None:
    run = FixtureRun(lab, lab.create_vm(disks=(16 * MiB, 16 * MiB)), lab.repository())
    _write(run.vm, 1)
    await run.backup(service, generation, "legacy")
    values = {**run.values(), "backupPath": run.backups[-1]}
    expected, answers = await _post(service, generation, "delete", values)
    assert mismatches(expected, answers, values) == []
    assert backup_directories(run.repo_dir, run.vm) == []
    assert leaks(lab) == []


@pytest.mark.live_backup
async def test_rebase_fixture_repairs_the_chain_before_a_delete(lab: Lab, service: Running) -> None:
    run = FixtureRun(lab, lab.create_vm(disks=(32 * MiB, 16 * MiB)), lab.repository())
    _write(run.vm, 1)
    await run.backup(service, "seed", "full")
    _write(run.vm, 2)
    await run.backup(service, "seed", "incremental")
    _write(run.vm, 3)
    await run.backup(service, "seed", "incremental")
    refs = run.vm.reference_backup()
    first, middle, last = run.backups
    values = run.values()
    for index, (target, backing) in enumerate(
        zip(
            disk_files(run.repo_dir, last, run.vm),
            disk_files(run.repo_dir, first, run.vm),
            strict=True,
        )
    ):
        values[f"rebaseTarget{index}"] = str(target.relative_to(run.repo_dir))
        values[f"rebaseNewBacking{index}"] = str(backing.relative_to(run.repo_dir))
    expected, answers = await _post(service, "seed", "rebase", values)
    assert mismatches(expected, answers, values) == []
    for file in disk_files(run.repo_dir, last, run.vm):
        assert qemu_img.info(file).backing_filename == f"../{Path(first).name}/{file.name}"
    # The middle backup can go: the last one restores without it.
    delete_values = {**values, "backupPath": middle}
    expected, answers = await _post(service, "seed", "delete", delete_values)
    assert mismatches(expected, answers, delete_values) == []
    verify_backup(lab, run.repo_dir, last, run.vm, refs)
    assert leaks(lab) == []


@pytest.mark.live_backup
@pytest.mark.parametrize(
    ("generation", "case"),
    [(g, c) for c in ("restore", "restore-destroyed") for g in _cases(c)],
)
async def test_restore_fixture_writes_the_backup_into_the_volumes(
    lab: Lab, service: Running, generation: str, case: str
) -> None:
    vm = lab.create_vm(disks=(32 * MiB, 16 * MiB), persistent=True)
    run = FixtureRun(lab, vm, lab.repository())
    _write(vm, 1)
    await run.backup(
        service, "merged" if generation in ("seed", "merged") else generation, "legacy"
    )
    refs = vm.reference_backup()
    _write(vm, 2)  # changes the restore must undo
    vm.stop()
    if case == "restore-destroyed":
        for disk in vm.disks:  # the destroyed VM's volumes are written anew
            disk.path.unlink()
    values = {**run.values(), "backupPath": run.backups[-1]}
    expected, answers = await _post(service, generation, case, values)
    assert mismatches(expected, answers, values) == []
    for disk, ref in strict_zip(vm.disks, refs):
        assert qemu_img.compare(disk.path, ref), f"{disk.path} was not restored"
        assert qemu_img.info(disk.path).bitmaps == ()
    assert leaks(lab) == []


@pytest.mark.live_backup
@pytest.mark.parametrize("generation", _cases("restore-volume"))
async def test_a_single_volume_is_restored_into_a_new_volume_of_the_running_vm(
    lab: Lab, service: Running, generation: str
) -> None:
    vm = lab.create_vm(disks=(32 * MiB, 16 * MiB))
    run = FixtureRun(lab, vm, lab.repository())
    _write(vm, 1)
    await run.backup(
        service, "merged" if generation in ("seed", "merged") else generation, "legacy"
    )
    refs = vm.reference_backup()
    _write(vm, 2)
    new_volume = lab.pool / str(uuid.uuid4())
    values = {
        **run.values(),
        "backupPath": run.backups[-1],
        "dataVolumeId": vm.disks[1].volume_id,
        "dataVolumeSize": vm.disks[1].size,
        "newVolumePath": str(new_volume),
        "newVolumeId": new_volume.name,
    }
    expected, answers = await _post(service, generation, "restore-volume", values)
    assert mismatches(expected, answers, values) == []
    # The running VM has the volume (qcow2, cache none), holding the data disk's backup.
    attached = [d for d in parse_disks(vm.dom.XMLDesc()) if d.source == str(new_volume)]
    assert [(d.driver_type, d.target) for d in attached] == [("qcow2", "vdc")]
    assert "cache='none'" in etree.tostring(
        etree.fromstring(vm.dom.XMLDesc()).xpath(f"//disk[source/@file='{new_volume}']")[0]
    ).decode().replace('"', "'")
    assert qemu_img.compare(new_volume, refs[1], force_share=True)
    # The VM's own disks were not touched: they still hold the later writes. Read as the VM
    # reads them (a backup through its QEMU), not from the file under it: QEMU 6.2, 8.2 and
    # 10.0 keep the later writes' qcow2 metadata in memory until a flush, so the file alone
    # still reads as the backup did.
    now = vm.reference_backup()
    assert not qemu_img.compare(now[1], refs[1])
    assert leaks(lab) == []


@pytest.mark.live_backup
async def test_restore_failures_answer_the_java_messages(lab: Lab, service: Running) -> None:
    vm = lab.create_vm(disks=(16 * MiB, 16 * MiB), persistent=True)
    run = FixtureRun(lab, vm, lab.repository())
    _write(vm, 1)
    await run.backup(service, "merged", "legacy")
    vm.stop()
    values = {**run.values(), "backupPath": run.backups[-1]}
    command, _ = read("merged", "restore")
    body = fill(command, values)[0]["org.apache.cloudstack.backup.RestoreBackupCommand"]
    before = [d.path.read_bytes() for d in vm.disks]

    async def answer(**changes: Any) -> Any:
        status, answers = await service.post(
            [{"org.apache.cloudstack.backup.RestoreBackupCommand": {**body, **changes}}]
        )
        assert status == 200, answers
        ((_, reply),) = answers[0].items()
        return reply["result"], reply.get("details")

    missing = [values["volumeIds"][0], "no-such-volume"]
    assert await answer(backupFiles=missing) == (
        False,
        f"Backup file for the volume [{values['volumeIds'][1]}] does not exist.",
    )
    data_file = run.repo_dir / run.backups[-1] / f"datadisk.{values['volumeIds'][1]}.qcow2"
    with data_file.open("r+b") as fh:  # a broken qcow2 header: qemu-img check fails
        fh.seek(0)
        fh.write(b"\0" * 512)
    assert await answer() == (
        False,
        f"Backup qcow2 file for the volume [{values['volumeIds'][1]}] is corrupt.",
    )
    assert await answer(backupRepoAddress=str(run.repo_dir / "nowhere")) == (
        False,
        "Failed to mount the backup repository on the KVM host",
    )
    assert [d.path.read_bytes() for d in vm.disks] == before  # refusals wrote nothing
    assert leaks(lab) == []


@pytest.mark.live_backup
@pytest.mark.parametrize("generation", _cases("timeout"))
async def test_timeout_fixture_stops_the_backup_and_answers_timeout(
    lab: Lab, service: Running, generation: str
) -> None:
    vm = lab.create_vm(disks=(32 * MiB,))
    vm.write(0, 0, 4 * MiB, pattern=0x5A)
    nas = lab.flaky_repository()
    nas.slow_writes(0.5)  # 64 clusters of 64 KiB: half a minute, far past the deadline
    run = FixtureRun(lab, vm, nas.repository)
    values = {**run.values(), "wait": 2}
    started = time.monotonic()
    expected, answers = await _post(service, generation, "timeout", values)
    assert mismatches(expected, answers, values) == []
    assert time.monotonic() - started < 30  # stopped, not waited out
    # Cleaned up as after any failure: no partial directory, no checkpoint, VM running.
    assert backup_directories(run.repo_dir, vm) == []
    assert vm.checkpoints() == [] and vm.is_running()
    assert leaks(lab) == []
