"""Disks as the contract names them, read from domain XML."""

from __future__ import annotations

from shim.virt.disks import parse_disks, volume_id_of

CLOUDSTACK_XML = """
<domain type='kvm'>
  <name>i-2-3-VM</name>
  <devices>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/mnt/6b1c0e4a/0c9a1c3e-8d1a-4a4b-9a5e-1f2e3d4c5b6a'/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='cloudstack/7e0f5b0c-1111-4222-8333-944445555666'>
        <host name='10.0.0.5' port='6789'/>
      </source>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/drbd/by-res/cs-a1b2c3d4-0000-4000-8000-00000000beef/0'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='floppy'>
      <target dev='fda' bus='fdc'/>
    </disk>
  </devices>
</domain>
"""


def test_only_disks_in_document_order_with_roles() -> None:
    disks = parse_disks(CLOUDSTACK_XML)
    assert [d.target for d in disks] == ["vda", "vdb", "vdc"]
    assert [d.role for d in disks] == ["root", "datadisk", "datadisk"]
    assert [d.source_type for d in disks] == ["file", "network", "block"]
    assert [d.driver_type for d in disks] == ["qcow2", "raw", "raw"]
    assert disks[0].alias == "virtio-disk0" and disks[1].alias is None


def test_volume_ids_per_storage_type() -> None:
    disks = parse_disks(CLOUDSTACK_XML)
    assert [d.volume_id for d in disks] == [
        "0c9a1c3e-8d1a-4a4b-9a5e-1f2e3d4c5b6a",
        "7e0f5b0c-1111-4222-8333-944445555666",
        "a1b2c3d4-0000-4000-8000-00000000beef",
    ]
    assert disks[0].backup_name == "root.0c9a1c3e-8d1a-4a4b-9a5e-1f2e3d4c5b6a.qcow2"
    assert disks[2].backup_name == "datadisk.a1b2c3d4-0000-4000-8000-00000000beef.qcow2"


def test_volume_id_of_agent_disk_sources() -> None:
    # The forms -d carries, per primary storage type (contract §1).
    assert volume_id_of("/mnt/pool-uuid/vol-uuid") == "vol-uuid"
    assert volume_id_of("/var/lib/libvirt/images/vol-uuid") == "vol-uuid"
    assert volume_id_of("rbd:cloudstack/vol-uuid:mon_host=10.0.0.5:auth_supported=none") == (
        "vol-uuid"
    )
    assert volume_id_of("/dev/drbd/by-res/cs-vol-uuid/0") == "vol-uuid"
