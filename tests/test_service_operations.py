"""The fixtures of the chain operations and stopped-VM backups (delete, rebase, restore,
``volumePaths``), posted to the running service against the lab."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shim import qemu_img
from shim.lab import Lab, LabVM, MiB
from shim.lab.leaks import leaks
from shim.manifest import MANIFEST
from tests.envelopes import all_cases, fill, mismatches, read
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
    command, expected = read(generation, case)
    status, answers = await service.post(fill(command, values))
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
    values.update(fileSizeLines="".join(f"{s}\n" for s in sizes), fileSizeSum=sum(sizes))
    assert mismatches(expected, answers, values) == []
    # A stopped VM's disks are the truth to compare with.
    verify_backup(lab, run.repo_dir, values["backupPath"], vm, [d.path for d in vm.disks])
    assert leaks(lab) == []


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


@pytest.mark.parametrize("generation", _cases("restore"))
async def test_restore_fixture_writes_the_backup_into_the_volumes(
    lab: Lab, service: Running, generation: str
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
    values = {**run.values(), "backupPath": run.backups[-1]}
    values["backupFiles"] = [f.name for f in disk_files(run.repo_dir, run.backups[-1], vm)]
    values["restoreLines"] = "".join(f"{d.path} {d.size}\n" for d in vm.disks)
    expected, answers = await _post(service, generation, "restore", values)
    assert mismatches(expected, answers, values) == []
    for disk, ref in zip(vm.disks, refs, strict=True):
        assert qemu_img.compare(disk.path, ref), f"{disk.path} was not restored"
        assert qemu_img.info(disk.path).bitmaps == ()
    assert leaks(lab) == []
