"""Running VMs whose disks cannot all carry a bitmap: a qcow2 root beside a raw file or a
raw block device (LINSTOR-like), backed up full then incremental, end to end on the lab."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim import qemu_img
from shim.virt import checkpoints
from tests.lab import Lab, MiB
from tests.lab.chains import read_manifest
from tests.lab.lab import BLOCK, RAW
from tests.lab.leaks import leaks
from tests.support import Chain, assert_size_parses, disk_files, verify_backup

pytestmark = pytest.mark.lab

DATA_DISK_SIZE = 32 * MiB


def _after_backup(chain: Chain, path: str) -> None:
    """Every point restores identical to a reference taken at that point, and the VM keeps
    exactly one checkpoint, the one just created, with a bitmap on the qcow2 root only."""
    verify_backup(chain.lab, chain.repo_dir, path, chain.vm, chain.vm.reference_backup())
    assert chain.vm.checkpoints() == chain.bitmaps[-1:]
    [checkpoint] = checkpoints.listed(chain.vm.dom)
    assert checkpoint.bitmaps == {"vda": chain.bitmaps[-1]}
    assert leaks(chain.lab) == []


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


@pytest.mark.live_backup
@pytest.mark.parametrize("kind", [RAW, BLOCK])
def test_qcow2_root_with_a_disk_without_bitmaps(lab: Lab, tmp_path: Path, kind: str) -> None:
    vm = lab.create_vm(disks=(16 * MiB, DATA_DISK_SIZE), kinds=("qcow2", kind))
    chain = Chain(lab=lab, vm=vm, repo=lab.repository(), log=tmp_path / "agent.log")
    vm.write(0, 0, 1 * MiB, pattern=0x11)
    vm.write(1, 2 * MiB, 1 * MiB, pattern=0x22)
    run, first = chain.backup("full")
    # libvirt took the checkpoint: the raw disk is named in it with checkpoint='no'.
    assert run.stdout.splitlines()[0] == f"BITMAP_CREATED={chain.bitmaps[-1]}"
    _after_backup(chain, first)

    vm.write(0, 4 * MiB, 1 * MiB, pattern=0x33)
    vm.write(1, 8 * MiB, 1 * MiB, pattern=0x44)
    # The data disk's file in the parent is never read: damaged, it changes nothing.
    parent_data = disk_files(chain.repo_dir, first, vm)[1]
    parent_data.write_bytes(b"not a qcow2 image")
    run, second = chain.backup("incremental")
    assert "INCREMENTAL_FALLBACK" not in run.stdout
    assert_size_parses("merged", run.stdout, chain.repo_dir / second, disks_given=False)
    _after_backup(chain, second)

    root, data = disk_files(chain.repo_dir, second, vm)
    assert qemu_img.info(root).backing_filename == f"../{Path(first).name}/{root.name}"
    assert qemu_img.info(data).backing_filename is None  # a full inside the incremental
    assert root.stat().st_size < 2 * MiB  # only the root's changed clusters
    manifest = read_manifest(chain.repo_dir / second)
    assert manifest is not None
    assert (manifest.mode, manifest.parent) == ("incremental", Path(first).name)
    assert manifest.bitmap == chain.bitmaps[-1]
    backing = f"../{Path(first).name}/{root.name}"
    # Named after the volume ids (a LINSTOR device's: the uuid of its resource cs-<uuid>).
    described = [(d.file, d.volume_id, d.source, d.virtual_size, d.backing) for d in manifest.disks]
    assert described == [
        (root.name, vm.disks[0].volume_id, str(vm.disks[0].path), 16 * MiB, backing),
        (data.name, vm.disks[1].volume_id, str(vm.disks[1].path), DATA_DISK_SIZE, None),
    ]
    assert [d.stored_size for d in manifest.disks] == [root.stat().st_size, data.stat().st_size]
    # The data disk's copy holds the 2 MiB written, not the 32 MiB device: a raw file
    # reports its holes, a block device's copy is re-sparsified after the job.
    assert _allocated(data) < 2 * MiB + 512 * 1024
    assert data.stat().st_size < 2 * MiB + 512 * 1024
