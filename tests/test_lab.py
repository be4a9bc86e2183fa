"""The lab itself: domains start, data lands where it was written, comparison sees it."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from shim import qemu_img
from shim.compat import strict_zip
from shim.virt.disks import parse_disks
from tests.lab import Lab, LabError, MiB, compare, flatten
from tests.lab.system import mounts_under

pytestmark = pytest.mark.lab


def test_vm_is_shaped_like_cloudstacks(lab: Lab) -> None:
    vm = lab.create_vm(disks=(64 * MiB, 32 * MiB))
    assert vm.is_running()
    assert not vm.dom.isPersistent()
    name_parts = vm.name.split("-")
    assert name_parts[0] == "i" and name_parts[1] == "2" and name_parts[3] == "VM"
    disks = parse_disks(vm.dom.XMLDesc())
    # The CD-ROM is in the XML but is not a disk.
    assert [d.target for d in disks] == ["vda", "vdb"]
    assert [d.role for d in disks] == ["root", "datadisk"]
    for disk, lab_disk in strict_zip(disks, vm.disks):
        path = Path(disk.source)
        assert disk.volume_id == path.name == lab_disk.volume_id
        assert len(path.name) == 36 and len(path.parent.name) == 36  # <pool-uuid>/<vol-uuid>
        info = qemu_img.info(path, fmt="qcow2", force_share=True)
        assert info.raw["format-specific"]["data"]["compat"] == "1.1"


@pytest.mark.live_backup
def test_written_data_is_in_the_reference_backup(lab: Lab) -> None:
    vm = lab.create_vm()
    before = vm.reference_backup()
    vm.write(0, 1 * MiB, 2 * MiB, pattern=0x5A)
    vm.write(1, 0, 1 * MiB, pattern=0xC3)
    after = vm.reference_backup()
    # Negative control: the writes must show up as a difference on both disks.
    assert not compare(before[0], after[0])
    assert not compare(before[1], after[1])
    # Positive control: the data read back from a stopped VM equals the reference.
    vm.stop()
    for disk, ref in strict_zip(vm.disks, after):
        assert compare(disk.path, ref)


@pytest.mark.live_backup
def test_paused_vm_takes_writes_and_backups(lab: Lab) -> None:
    vm = lab.create_vm()
    vm.pause()
    assert vm.is_paused()
    first = vm.reference_backup()
    vm.write(0, 0, 64 * 1024, pattern=0x01)
    second = vm.reference_backup()
    assert vm.is_paused()
    assert not compare(first[0], second[0])
    assert compare(first[1], second[1])
    vm.resume()
    assert not vm.is_paused()


@pytest.mark.live_backup
def test_zeroes_and_discards_read_back_as_zeroes(lab: Lab) -> None:
    vm = lab.create_vm(disks=(16 * MiB,))
    empty = vm.reference_backup()
    vm.write(0, 0, 4 * MiB, pattern=0xEE)
    vm.write_zeroes(0, 0, 2 * MiB)
    vm.discard(0, 2 * MiB, 2 * MiB)
    # A discarded qcow2 cluster with no backing reads as zeroes.
    assert compare(vm.reference_backup()[0], empty[0])


@pytest.mark.live_backup
def test_flattened_chain_compares_with_reference(lab: Lab, tmp_path: Path) -> None:
    vm = lab.create_vm(disks=(16 * MiB,))
    vm.write(0, 0, 1 * MiB, pattern=0x11)
    base = vm.reference_backup()[0]
    vm.write(0, 1 * MiB, 1 * MiB, pattern=0x22)
    truth = vm.reference_backup()[0]
    # A two-link chain by hand: an overlay holding the second write on top of the base.
    overlay = tmp_path / "overlay.qcow2"
    qemu_img.create(overlay, backing=str(base))
    flat_truth = flatten(truth, tmp_path / "flat.qcow2")
    assert not compare(overlay, flat_truth)  # the overlay lacks the second write
    assert compare(flatten(base, tmp_path / "base-flat.qcow2"), base)


def test_stop_start_and_kill(lab: Lab) -> None:
    vm = lab.create_vm()
    vm.write(0, 0, 1 * MiB, pattern=0x77)
    vm.stop()
    assert not vm.exists()  # transient: gone once stopped, like CloudStack's
    vm.start()
    assert vm.is_running()
    vm.kill()
    assert not vm.exists()
    vm.start()
    assert vm.is_running()


@pytest.mark.live_backup
def test_persistent_vm_and_hotplug(lab: Lab) -> None:
    vm = lab.create_vm(disks=(16 * MiB,), persistent=True)
    assert vm.dom.isPersistent()
    disk = vm.attach_disk(8 * MiB)
    assert [d.target for d in parse_disks(vm.dom.XMLDesc())] == ["vda", "sda"]
    vm.write(1, 0, 1 * MiB, pattern=0x42)
    ref = vm.reference_backup()
    vm.attach_disk(8 * MiB, bus="virtio")
    # libvirt groups disks by bus in its XML: the contract's "disk order" is that order.
    assert [d.target for d in parse_disks(vm.dom.XMLDesc())] == ["vda", "vdb", "sda"]
    assert [d.target for d in vm.disks] == ["vda", "vdb", "sda"]
    vm.detach_disk(2)
    assert [d.target for d in parse_disks(vm.dom.XMLDesc())] == ["vda", "vdb"]
    vm.stop()
    assert vm.exists() and not vm.is_running()
    assert [d.target for d in parse_disks(vm.dom.XMLDesc())] == ["vda", "vdb"]
    assert compare(disk.path, ref[1])
    vm.start()
    vm.write(1, 0, 512, pattern=0x43)


def test_bad_writes_are_refused(lab: Lab) -> None:
    vm = lab.create_vm(disks=(16 * MiB,))
    with pytest.raises(LabError, match="beyond the end"):
        vm.write(0, 16 * MiB, 512)
    with pytest.raises(LabError, match="multiples"):
        vm.write(0, 1, 512)


@pytest.mark.live_backup
def test_close_leaves_nothing_behind(hypervisor: libvirt.virConnect) -> None:
    lab = Lab()
    transient = lab.create_vm()
    persistent = lab.create_vm(persistent=True)
    stopped = lab.create_vm(start=False, persistent=True)
    # Checkpoint metadata and a bitmap, as a backup would leave them.
    for vm in (transient, persistent):
        vm.dom.checkpointCreateXML("<domaincheckpoint><name>backup-1</name></domaincheckpoint>")
        assert vm.checkpoints() == ["backup-1"]
    repo = lab.repository(size=8 * MiB)
    lab_dir = lab.dir
    assert mounts_under(lab_dir)
    lab.close()
    for vm in (transient, persistent, stopped):
        with pytest.raises(libvirt.libvirtError):
            hypervisor.lookupByUUIDString(vm.uuid)
        assert not Path("/var/lib/libvirt/qemu/checkpoint", vm.name).exists()
    assert not mounts_under(lab_dir)
    assert not lab_dir.exists()
    assert not Path(repo.address).exists()


def test_close_after_a_failing_test_still_cleans(hypervisor: libvirt.virConnect) -> None:
    lab_dir = None
    with pytest.raises(RuntimeError), Lab() as lab:
        lab_dir = lab.dir
        lab.create_vm()
        raise RuntimeError("a test failed here")
    assert lab_dir is not None and not lab_dir.exists()
