"""Issue 11 without the lab: formats never guessed from guest bytes (stopped VMs), the
backup path owned by its VM (and the sweep of leftovers kept to that VM's directory), and
a parent that must have created ``--bitmap-parent``."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import libvirt
import pytest

from shim import offline, qemu_img
from shim.backupdir import sweep_dead_work
from shim.chain import resolve_parents
from shim.errors import BackupFailed, InputError
from shim.manifest import MANIFEST
from shim.nas import MountSession, Repository
from shim.offline import declared_formats, source_disks
from shim.request import BackupRequest
from shim.virt.disks import DATADISK, ROOT, DomainDisk
from tests.support import vm_directory

MiB = 1024 * 1024
VM = "i-2-3-VM"


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _raw_with_a_qcow2_header(path: Path, scratch: Path) -> bytes:
    """A 4 MiB raw volume whose "guest" wrote a real qcow2 image (64 MiB virtual) at its
    start; returns its bytes."""
    inner = scratch / f"inner-{path.name}.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(inner), "64M")
    _qemu_img("create", "-q", "-f", "raw", str(path), "4M")
    with open(path, "r+b") as fh:
        fh.write(inner.read_bytes())
    assert qemu_img.info(path).format == "qcow2"  # what a probe would believe
    return path.read_bytes()


def _no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def probe(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the source was probed")

    monkeypatch.setattr(offline.qemu_img, "info", probe)
    monkeypatch.setattr(offline.qemu_img, "chain", probe)


# -- item 2: formats ----------------------------------------------------------------------------
def test_a_file_the_domain_declares_raw_is_raw_without_a_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume = tmp_path / "pool" / "5e6f-raw-volume"
    volume.parent.mkdir()
    content = _raw_with_a_qcow2_header(volume, tmp_path)
    link = tmp_path / "mnt-link"
    link.symlink_to(volume.parent)  # -d may name it by another path than the XML
    _no_probe(monkeypatch)
    (disk,) = source_disks([str(link / volume.name)], declared={str(volume): "raw"})
    assert (disk.source_type, disk.driver_type, disk.volume_id) == ("file", "raw", volume.name)
    assert volume.read_bytes() == content


def test_block_and_rbd_sources_are_raw_without_a_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = tmp_path / "cs-a1b2"
    os.mknod(device, stat.S_IFBLK | 0o600, os.makedev(7, 250))  # a node: never opened here
    rbd = "rbd:cloudstack/vol-1:mon_host=127.0.0.1"
    _no_probe(monkeypatch)
    disks = source_disks([str(device), rbd], declared={str(device): "qcow2"})
    assert [(d.source_type, d.driver_type) for d in disks] == [("block", "raw"), ("network", "raw")]


def test_a_file_no_domain_describes_is_probed(tmp_path: Path) -> None:
    qcow2 = tmp_path / "aaaa"
    _qemu_img("create", "-q", "-f", "qcow2", str(qcow2), "1M")
    raw = tmp_path / "bbbb"
    _qemu_img("create", "-q", "-f", "raw", str(raw), "1M")
    disks = source_disks([str(qcow2), str(raw)], declared={str(tmp_path / "other"): "raw"})
    assert [d.driver_type for d in disks] == ["qcow2", "raw"]


def test_a_declared_qcow2_keeps_its_backing_chain_in_its_pool(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    base = elsewhere / "template"
    _qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    pool = tmp_path / "pool"
    pool.mkdir()
    volume = pool / "cccc"
    _qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(volume))
    with pytest.raises(InputError, match="backing file outside its pool"):
        source_disks([str(volume)], declared={str(volume): "qcow2"})


def test_an_unsupported_declared_format_is_refused(tmp_path: Path) -> None:
    volume = tmp_path / "dddd"
    volume.write_bytes(b"\0" * 512)
    with pytest.raises(BackupFailed, match="unsupported format vmdk"):
        source_disks([str(volume)], declared={str(volume): "vmdk"})


class _Dom:
    """What declared_formats asks of a libvirt domain."""

    def __init__(self, xml: str | None) -> None:
        self.xml = xml
        self.flags: list[int] = []

    def XMLDesc(self, flags: int = 0) -> str:
        self.flags.append(flags)
        if self.xml is None:
            raise libvirt.libvirtError("Domain not found")
        return self.xml


def test_declared_formats_come_from_the_inactive_xml_by_real_path(tmp_path: Path) -> None:
    (tmp_path / "pool").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "pool")
    xml = f"""<domain><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='{tmp_path}/link/root'/><target dev='vda'/></disk>
      <disk type='file' device='disk'><driver name='qemu' type='raw'/>
        <source file='{tmp_path}/pool/data'/><target dev='vdb'/></disk>
      <disk type='block' device='disk'><driver name='qemu' type='raw'/>
        <source dev='/dev/drbd/by-res/cs-1/0'/><target dev='vdc'/></disk>
      <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
        <source file='{tmp_path}/pool/iso'/><target dev='hdc'/></disk>
    </devices></domain>"""
    dom = _Dom(xml)
    assert declared_formats(dom) == {  # type: ignore[arg-type]
        f"{tmp_path}/pool/root": "qcow2",
        f"{tmp_path}/pool/data": "raw",
    }
    assert dom.flags == [libvirt.VIR_DOMAIN_XML_INACTIVE]
    assert declared_formats(None) == {}
    assert declared_formats(_Dom(None)) == {}  # type: ignore[arg-type]


# -- item 9: the backup path belongs to the VM --------------------------------------------------
def _request(path: str) -> BackupRequest:
    return BackupRequest(vm=VM, repository=Repository("nfs", "10.0.0.1:/b"), path=path)


@pytest.mark.parametrize("path", [f"{VM}/2026.10.01.00.00.00", f"{VM}/t/", f"./{VM}/t"])
def test_a_backup_path_in_the_vms_directory_is_valid(path: str) -> None:
    _request(path).validate()


@pytest.mark.parametrize(
    "path", ["i-2-4-VM/t", VM, f"{VM}/t/nested", f"x/{VM}/t", f"{VM}-old/t", "t"]
)
def test_any_other_backup_path_is_refused(path: str) -> None:
    with pytest.raises(InputError) as refused:
        _request(path).validate()
    assert str(refused.value) == (
        f"backup path {path} is not a backup of VM {VM}: it must be {VM}/<backup name>"
    )


def test_path_escapes_are_still_named_as_such() -> None:
    with pytest.raises(InputError, match=r"may not contain '\.\.'"):
        _request(f"{VM}/../other/t").validate()
    with pytest.raises(InputError, match="must be relative"):
        _request(f"/{VM}/t").validate()


def _leftovers(vm_dir: Path) -> list[Path]:
    made = [vm_dir / "2026.10.01.00.00.00.partial", vm_dir / ".2026.09.01.00.00.00.deleting"]
    for directory in made:
        directory.mkdir(parents=True)
        (directory / "root.x.qcow2").write_text("x\n")
    (vm_dir / "2026.08.01.00.00.00").mkdir()
    return made


def test_the_sweep_stays_in_the_locked_vms_directory(tmp_path: Path) -> None:
    mine = _leftovers(tmp_path / VM)
    theirs = _leftovers(tmp_path / "i-2-4-VM")
    with vm_directory(tmp_path, VM) as vm_dir:
        assert sorted(sweep_dead_work(vm_dir)) == sorted(mine)
    assert sorted(os.listdir(tmp_path / VM)) == ["2026.08.01.00.00.00"]
    assert all(p.is_dir() for p in theirs)
    with vm_directory(tmp_path, "i-2-5-VM") as vm_dir:
        assert sweep_dead_work(vm_dir) == []  # no directory yet


def test_the_sweep_never_follows_a_vm_directory_symlink(tmp_path: Path) -> None:
    theirs = _leftovers(tmp_path / "i-2-4-VM")
    (tmp_path / VM).symlink_to(tmp_path / "i-2-4-VM")
    with vm_directory(tmp_path, VM) as vm_dir, pytest.raises(InputError, match="symbolic link"):
        sweep_dead_work(vm_dir)
    assert all(p.is_dir() for p in theirs)


# -- item 10: the parent must have created --bitmap-parent --------------------------------------
class _Mounted(MountSession):
    """A "mounted" repository that is a plain directory (no mount needed to resolve)."""

    def __init__(self, root: Path) -> None:
        super().__init__(Repository("none", str(root), "bind"))
        self._root = root


def _parent(root: Path, name: str, manifest: object) -> list[str]:
    """A backup directory ``<VM>/<name>`` with two qcow2 files; its manifest (``None``:
    none, a string: that text, else JSON); returns the files, mount-relative."""
    directory = root / VM / name
    directory.mkdir(parents=True)
    files = [directory / "root.aaaa.qcow2", directory / "datadisk.bbbb.qcow2"]
    for file in files:
        _qemu_img("create", "-q", "-f", "qcow2", str(file), "1M")
    if isinstance(manifest, str):
        (directory / MANIFEST).write_text(manifest)
    elif manifest is not None:
        (directory / MANIFEST).write_text(json.dumps(manifest))
    return [str(f.relative_to(root)) for f in files]


DISKS = [
    DomainDisk("vda", ROOT, "file", "/mnt/p/aaaa", "qcow2", "aaaa"),
    DomainDisk("vdb", DATADISK, "file", "/mnt/p/bbbb", "qcow2", "bbbb"),
]


@pytest.mark.parametrize("form", ["parent_paths", "parent_path"])
def test_a_parent_that_created_another_checkpoint_is_a_reason_for_a_full(
    tmp_path: Path, form: str
) -> None:
    session = _Mounted(tmp_path)
    files = _parent(tmp_path, "b1", {"vm": VM, "bitmap": "backup-1", "mode": "full"})
    given = {"parent_paths": files} if form == "parent_paths" else {"parent_path": f"{VM}/b1"}
    path = f"{VM}/b3"
    same = resolve_parents(session, DISKS, path, bitmap_parent="backup-1", **given)
    assert same.problems == [] and set(same.files) == {"vda", "vdb"}
    other = resolve_parents(session, DISKS, path, bitmap_parent="backup-2", **given)
    assert other.problems == ["parent backup b1 recorded checkpoint backup-1, not backup-2"]
    unchecked = resolve_parents(session, DISKS, path, **given)  # no bitmap named: no check
    assert unchecked.problems == []


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        (None, None),  # upstream's script writes none: nothing contradicts the request
        ({"bitmap": None, "mode": "legacy-full"}, "recorded checkpoint (none), not backup-2"),
        ({"bitmap": "backup-2", "future": {"x": 1}}, None),
        ("{not json", "b1/manifest.json refused: malformed: not JSON"),
        ('["a list"]', "b1/manifest.json refused: malformed: not a JSON object"),
        ({"bitmap": 7}, "b1/manifest.json refused: malformed: manifest.bitmap is not of type"),
    ],
)
def test_what_a_parent_manifest_says(tmp_path: Path, manifest: object, problem: str | None) -> None:
    files = _parent(tmp_path, "b1", manifest)
    parents = resolve_parents(
        _Mounted(tmp_path), DISKS, f"{VM}/b3", parent_paths=files, bitmap_parent="backup-2"
    )
    if problem is None:
        assert parents.problems == []
    else:
        # One problem, or one per parent file (the gate checks each file's manifest).
        assert parents.problems, parents.problems
        assert all(problem in found for found in parents.problems), parents.problems
