"""The parent must be the parent (issue 11, item 10), through the drop-in on the lab: an
incremental whose named parent backup created another checkpoint than ``--bitmap-parent``
falls back to a full, says so, and restores identical; it never chains onto that backup."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim import qemu_img
from tests.lab import LabVM, MiB
from tests.lab.chains import read_manifest
from tests.lab.leaks import leaks
from tests.support import (
    GENERATIONS,
    Chain,
    Run,
    assert_size_parses,
    build_argv,
    disk_files,
    repo_values,
    run_dropin,
    verify_backup,
)

pytestmark = pytest.mark.lab

NEW_BITMAP = "backup-1799999999"


def _incremental_onto_the_first(chain: Chain, *, disks: str = "") -> tuple[Run, str]:
    """An incremental since the last checkpoint whose parent paths name the first backup
    (one checkpoint older): what a management server with a stale parent row would send."""
    first = chain.backups[0]
    files = [p.relative_to(chain.repo_dir) for p in disk_files(chain.repo_dir, first, chain.vm)]
    path = f"{chain.vm.name}/2026.10.31.00.00.00"
    values = {
        "operation": "backup",
        "vm": chain.vm.name,
        "path": path,
        "quiesce": "false",
        "disks": disks,
        "mode": "incremental",
        "bitmap_new": NEW_BITMAP,
        "bitmap_parent": chain.bitmaps[-1],
        "parent_paths": ",".join(map(str, files)),
        "parent_path": first,  # the seed generation's form: the parent directory
        **repo_values(chain.repo),
    }
    run = run_dropin(build_argv(chain.generation, values), log_file=chain.log)
    assert run.returncode == 0, run.stdout + run.stderr
    return run, path


def _is_a_fallback_full(chain: Chain, path: str) -> None:
    for file in disk_files(chain.repo_dir, path, chain.vm):
        assert qemu_img.info(file).backing_filename is None, file
    manifest = read_manifest(chain.repo_dir / path)
    assert manifest is not None
    assert (manifest.mode, manifest.fallback, manifest.parent) == ("full", True, None)
    assert manifest.bitmap == NEW_BITMAP


def _write(vm: LabVM, k: int) -> None:
    vm.write(0, k * 2 * MiB, 1 * MiB, pattern=0x60 + k)
    vm.write(1, k * MiB, 512 * 1024, pattern=0x70 + k)


@pytest.mark.live_backup
@pytest.mark.parametrize("generation", ["merged", "seed"])
def test_running_vm_parent_of_another_checkpoint_falls_back(chain: Chain, generation: str) -> None:
    vm = chain.vm
    chain.generation = generation
    _write(vm, 0)
    chain.backup("full")  # B1
    _write(vm, 1)
    chain.backup("full")  # B2, to another path: B1 is retired
    _write(vm, 2)
    run, path = _incremental_onto_the_first(chain)
    lines = run.stdout.splitlines()
    assert "INCREMENTAL_FALLBACK=true" in lines and f"BITMAP_CREATED={NEW_BITMAP}" in lines
    parser = GENERATIONS[generation]["parser"]
    parsed = assert_size_parses(parser, run.stdout, chain.repo_dir / path, disks_given=False)
    assert parsed.incremental_fallback
    _is_a_fallback_full(chain, path)
    verify_backup(chain.lab, chain.repo_dir, path, vm, vm.reference_backup())
    assert vm.checkpoints() == [NEW_BITMAP]
    assert "recorded checkpoint" in chain.log.read_text()  # the log says why
    assert leaks(chain.lab) == []


def test_stopped_vm_parent_of_another_checkpoint_falls_back(chain: Chain) -> None:
    vm = chain.vm
    disks = ",".join(str(d.path) for d in vm.disks)
    _write(vm, 0)
    vm.stop()
    chain.backup("full", disks=disks)  # B1
    vm.start()
    _write(vm, 1)
    vm.stop()
    chain.backup("full", disks=disks)  # B2: the disks now carry B2 only
    vm.start()
    _write(vm, 2)
    vm.stop()
    run, path = _incremental_onto_the_first(chain, disks=disks)
    assert run.stdout and all(line.isdigit() for line in run.stdout.splitlines()), run.stdout
    _is_a_fallback_full(chain, path)
    verify_backup(chain.lab, chain.repo_dir, path, vm, [d.path for d in vm.disks])
    assert [vm.bitmaps(i) for i in range(2)] == [(NEW_BITMAP,)] * 2
    # The first backup is untouched and still restores as the VM was then; the chain
    # continues from the fallback full.
    assert read_manifest(chain.repo_dir / chain.backups[0]) is not None
    chain.backups.append(path)
    chain.bitmaps.append(NEW_BITMAP)
    vm.start()
    _write(vm, 3)
    vm.stop()
    run, following = chain.backup("incremental", disks=disks)
    manifest = read_manifest(chain.repo_dir / following)
    assert manifest is not None and (manifest.mode, manifest.fallback) == ("incremental", False)
    assert manifest.parent == Path(path).name
    verify_backup(chain.lab, chain.repo_dir, following, vm, [d.path for d in vm.disks])
    assert leaks(chain.lab) == []
