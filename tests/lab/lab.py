"""Lab domains, their data, reference backups and image comparison.

Everything a :class:`Lab` creates lives under one directory (``$SHIM_LAB_DIR``, default
``/var/tmp/nasbackup-shim-lab``, then ``lab-XXXXXXXX``) and every domain it creates carries
that directory in its metadata, so :meth:`Lab.close` and :func:`sweep_stale_labs` can find
and remove all of it: domains, checkpoint metadata, mounts, files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import libvirt
import libvirt_qemu
from lxml import etree

from shim import proc, qemu_img
from shim.compat import strict_zip
from shim.errors import CommandFailed
from shim.nas import Repository
from shim.virt.connection import DEFAULT_URI, open_connection, reconnect
from shim.virt.disks import parse_disks, volume_id_of
from shim.virt.host import qemu_monitor
from shim.virt.jobs import BackupJob
from tests.lab import system
from tests.lab.flakyfs import (
    COUNTERS,
    FAIL_FLAG,
    FAIL_FSYNC_FLAG,
    FULL_FLAG,
    HANG_DIR,
    HANG_FLAG,
    RATE_FLAG,
    SLOW_FLAG,
)
from tests.lab.guest_image import GuestImage

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout: the lab is run from a clone, never from an installed package."""
LAB_BASE = Path(os.environ.get("SHIM_LAB_DIR", "/var/tmp/nasbackup-shim-lab"))
LAB_NS = "urn:cloudstack-nasbackup-shim:lab"
_OWNER_FILE = "owner.pid"
_STOP_TIMEOUT_SECONDS = 30
_LIBVIRTD_STOP_SECONDS = 60
_SECTOR = 512
LINSTOR_DIR = Path("/dev/drbd/by-res")
"""Where LINSTOR's udev rules put a resource's devices (``cs-<uuid>/0``); the lab makes
the links itself (no udev here)."""

QCOW2 = "qcow2"
RAW = "raw"
BLOCK = "block"
DISK_KINDS = (QCOW2, RAW, BLOCK)
"""A qcow2 v3 file, a raw file, a raw block device (a loop device named like LINSTOR's)."""


@dataclass(frozen=True)
class LabDisk:
    """A lab volume: a file ``<lab>/<pool-uuid>/<volume-uuid>`` (qcow2 v3 or raw), or a
    raw block device at ``/dev/drbd/by-res/cs-<volume-uuid>/0`` (``kind`` ``block``)."""

    path: Path
    target: str
    size: int
    bus: str = "virtio"
    kind: str = QCOW2

    @property
    def volume_id(self) -> str:
        """The CloudStack volume id (the file's basename, LINSTOR's resource uuid)."""
        return volume_id_of(str(self.path))

    @property
    def format(self) -> str:
        """The image format QEMU opens it with."""
        return QCOW2 if self.kind == QCOW2 else RAW


class LabError(Exception):
    """The lab hypervisor could not do what a test, the demo or a benchmark asked.

    Test equipment, not product: deliberately outside the engine's error hierarchy.
    """


def _domain_xml(
    name: str,
    dom_uuid: str,
    lab_dir: Path,
    disks: Sequence[LabDisk],
    *,
    cdrom: bool,
    guest_agent: bool,
    boot: GuestImage | None = None,
) -> str:
    E = etree.Element
    dom = E("domain", type="qemu")
    etree.SubElement(dom, "name").text = name
    etree.SubElement(dom, "uuid").text = dom_uuid
    meta = etree.SubElement(dom, "metadata")
    etree.SubElement(meta, f"{{{LAB_NS}}}lab", nsmap={"lab": LAB_NS}, dir=str(lab_dir))
    # A booted guest's kernel, initramfs and page cache want more than an empty machine.
    etree.SubElement(dom, "memory", unit="MiB").text = "256" if boot else "128"
    etree.SubElement(dom, "vcpu").text = "1"
    os_el = etree.SubElement(dom, "os")
    etree.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    if boot:
        # Direct kernel boot: the distribution kernel and the lab's initramfs.
        etree.SubElement(os_el, "kernel").text = str(boot.kernel)
        etree.SubElement(os_el, "initrd").text = str(boot.initrd)
        etree.SubElement(os_el, "cmdline").text = "console=ttyS0 quiet panic=-1"
    # ACPI: PCI hot-plug on i440fx goes through it.
    etree.SubElement(etree.SubElement(dom, "features"), "acpi")
    etree.SubElement(dom, "on_crash").text = "destroy"
    devices = etree.SubElement(dom, "devices")
    etree.SubElement(devices, "emulator").text = system.emulator()
    # virtio-scsi: its disks hot-unplug without a guest OS acknowledging it.
    etree.SubElement(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    if cdrom:
        # CloudStack domains carry an (empty) CD-ROM: it is not a disk to back up.
        cd = etree.SubElement(devices, "disk", type="file", device="cdrom")
        etree.SubElement(cd, "driver", name="qemu", type="raw")
        etree.SubElement(cd, "target", dev="hdc", bus="ide")
        etree.SubElement(cd, "readonly")
    for disk in disks:
        devices.append(_disk_element(disk))
    serial = etree.SubElement(devices, "serial", type="file")
    etree.SubElement(serial, "source", path=str(lab_dir / f"{name}.serial"))
    if guest_agent:
        channel = etree.SubElement(devices, "channel", type="unix")
        etree.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    video = etree.SubElement(devices, "video")
    etree.SubElement(video, "model", type="none")
    etree.SubElement(devices, "memballoon", model="none")
    return etree.tostring(dom, encoding="unicode")


def _disk_element(disk: LabDisk) -> etree._Element:
    block = disk.kind == BLOCK
    el = etree.Element("disk", type="block" if block else "file", device="disk")
    # discard=unmap: a guest's discards reach the image (by default QEMU ignores them).
    etree.SubElement(el, "driver", name="qemu", type=disk.format, discard="unmap")
    etree.SubElement(el, "source", {"dev" if block else "file": str(disk.path)})
    etree.SubElement(el, "target", dev=disk.target, bus=disk.bus)
    return el


class LabVM:
    """A lab domain and its volumes; ``disks`` are in domain order (root first)."""

    def __init__(
        self,
        lab: Lab,
        name: str,
        dom_uuid: str,
        xml: str,
        disks: list[LabDisk],
        *,
        persistent: bool,
    ) -> None:
        self.lab = lab
        self.name = name
        self.uuid = dom_uuid
        self.xml = xml
        self.disks = disks
        self.persistent = persistent

    # -- state ------------------------------------------------------------------------------
    @property
    def dom(self) -> libvirt.virDomain:
        """The libvirt domain (raises LabError when it does not exist)."""
        try:
            return self.lab.conn.lookupByUUIDString(self.uuid)
        except libvirt.libvirtError:
            raise LabError(f"domain {self.name} does not exist") from None

    def exists(self) -> bool:
        """Whether libvirt knows the domain (a stopped transient domain does not exist)."""
        try:
            self.lab.conn.lookupByUUIDString(self.uuid)
        except libvirt.libvirtError:
            return False
        return True

    def is_running(self) -> bool:
        """Whether QEMU runs (paused counts as running)."""
        return self.exists() and bool(self.dom.isActive())

    def is_paused(self) -> bool:
        """Whether the domain is paused."""
        return self.is_running() and self.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED

    def start(self) -> None:
        """Start the VM (a transient one is created anew from its XML, as CloudStack does)."""
        if self.persistent:
            self.dom.create()
        else:
            self.lab.conn.createXML(self.xml, 0)

    def stop(self) -> None:
        """Power the VM off (destroy): a transient domain then no longer exists."""
        self.dom.destroy()

    def pause(self) -> None:
        """Suspend the guest's vCPUs."""
        self.dom.suspend()

    def resume(self) -> None:
        """Resume the guest's vCPUs."""
        self.dom.resume()

    def kill(self) -> None:
        """SIGKILL the VM's QEMU and wait until libvirt has noticed."""
        stopped = threading.Event()

        def on_event(_c: object, _d: object, event: int, _detail: int, _o: object) -> None:
            if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED):
                stopped.set()

        conn = self.lab.conn
        callback = conn.domainEventRegisterAny(
            self.dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_event, None
        )
        try:
            os.kill(system.qemu_pid(self.name), signal.SIGKILL)
            if not stopped.wait(_STOP_TIMEOUT_SECONDS):
                raise LabError(f"libvirt did not notice that {self.name}'s QEMU died")
        finally:
            conn.domainEventDeregisterAny(callback)

    # -- guest data -------------------------------------------------------------------------
    def _qemu_io(self, disk: int, command: str) -> None:
        target = self.disks[disk].target
        aliases = {d.target: d.alias for d in parse_disks(self.dom.XMLDesc())}
        alias = aliases.get(target)
        if not alias:
            raise LabError(f"{self.name}: disk {target} is not attached to a running domain")
        # Through the device: the block node itself refuses (permission conflict). A
        # virtio-blk device holds its drive in its "virtio-backend" child.
        device = f"{alias}/virtio-backend" if self.disks[disk].bus == "virtio" else alias
        hmp = f'qemu-io -d {device} "{command}"'
        reply = libvirt_qemu.qemuMonitorCommand(
            self.dom, hmp, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        )
        # qemu-io's own output goes to the domain log; the reply carries only errors.
        if reply.strip():
            raise LabError(f"{self.name}: qemu-io {command!r}: {reply.strip()}")

    def _check_range(self, disk: int, offset: int, length: int) -> None:
        size = self.disks[disk].size
        if offset % _SECTOR or length % _SECTOR or length <= 0:
            raise LabError(f"offset and length must be positive multiples of {_SECTOR}")
        if offset + length > size:
            raise LabError(f"{offset}+{length} is beyond the end of disk {disk} ({size} bytes)")

    def write(self, disk: int, offset: int, length: int, pattern: int = 0xAB) -> None:
        """Write ``length`` bytes of ``pattern`` at ``offset`` through QEMU's block layer."""
        if not 0 <= pattern <= 0xFF:
            raise LabError("pattern is one byte")
        self._check_range(disk, offset, length)
        self._qemu_io(disk, f"write -P {pattern:#x} {offset} {length}")

    def write_zeroes(self, disk: int, offset: int, length: int) -> None:
        """Write zeroes (``write -z``) over a range."""
        self._check_range(disk, offset, length)
        self._qemu_io(disk, f"write -z {offset} {length}")

    def discard(self, disk: int, offset: int, length: int) -> None:
        """Discard a range, as a guest's fstrim would."""
        self._check_range(disk, offset, length)
        self._qemu_io(disk, f"discard {offset} {length}")

    # -- disks ------------------------------------------------------------------------------
    def attach_disk(self, size: int, *, bus: str = "scsi") -> LabDisk:
        """Hot-plug a new qcow2 volume (``disks`` then follows libvirt's order).

        SCSI by default: only SCSI disks can be unplugged again from a guest without an OS.
        """
        used = {d.target for d in parse_disks(self.dom.XMLDesc())}
        prefix = "vd" if bus == "virtio" else "sd"
        target = next(f"{prefix}{c}" for c in "abcdefghijklmnop" if f"{prefix}{c}" not in used)
        disk = self.lab.new_volume(target, size, bus=bus)
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        if self.persistent:
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        self.dom.attachDeviceFlags(etree.tostring(_disk_element(disk), encoding="unicode"), flags)
        self.disks.append(disk)
        self._remember_live_xml()
        return disk

    def detach_disk(self, disk: int) -> LabDisk:
        """Hot-unplug a SCSI disk (a virtio one would wait for a guest OS to let it go)."""
        removed = self.disks[disk]
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        if self.persistent:
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        self.dom.detachDeviceFlags(
            etree.tostring(_disk_element(removed), encoding="unicode"), flags
        )
        del self.disks[disk]
        self._remember_live_xml()
        return removed

    def _remember_live_xml(self) -> None:
        # libvirt keeps disks grouped by bus in its XML, not in plug order: follow its order.
        by_path = {str(d.path): d for d in self.disks}
        self.disks = [by_path[d.source] for d in parse_disks(self.dom.XMLDesc())]
        # A transient domain restarted later comes back with the disks it has now.
        if not self.persistent:
            self.xml = self.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)

    # -- inspection -------------------------------------------------------------------------
    def checkpoints(self) -> list[str]:
        """Names of the checkpoints libvirt knows for this domain."""
        if not self.exists():
            return []
        return sorted(c.getName() for c in self.dom.listAllCheckpoints())

    def bitmaps(self, disk: int) -> tuple[str, ...]:
        """The persistent bitmaps in a disk's qcow2 (read with -U while QEMU runs)."""
        return qemu_img.info(self.disks[disk].path, fmt="qcow2", force_share=True).bitmaps

    def leave_temporary_bitmap(self, disk: int) -> None:
        """Leave in QEMU the temporary bitmap (``backup-<target>``, not persistent) that
        libvirt 9.0 forgets when libvirtd restarts while the disk's backup block job ends."""
        target = self.disks[disk].target
        path = str(self.disks[disk].path)
        nodes = qemu_monitor(self.dom, "query-named-block-nodes", flat=True)
        node = next(n["node-name"] for n in nodes if n["drv"] == "qcow2" and n["file"] == path)
        name = f"backup-{target}"
        qemu_monitor(self.dom, "block-dirty-bitmap-add", node=node, name=name, persistent=False)

    def drop_temporary_bitmaps(self) -> None:
        """Remove every non-persistent bitmap QEMU holds on this VM's disks."""
        for n in qemu_monitor(self.dom, "query-named-block-nodes", flat=True):
            for b in n.get("dirty-bitmaps", []):
                if not b.get("persistent"):
                    qemu_monitor(
                        self.dom, "block-dirty-bitmap-remove", node=n["node-name"], name=b["name"]
                    )

    def temporary_bitmaps(self) -> list[str]:
        """Names of the non-persistent bitmaps QEMU holds on this VM's disks."""
        return [
            b["name"]
            for n in qemu_monitor(self.dom, "query-named-block-nodes", flat=True)
            for b in n.get("dirty-bitmaps", [])
            if not b.get("persistent")
        ]

    def reference_backup(self, dest: Path | None = None) -> list[Path]:
        """A full push backup of every disk, with no checkpoint: the truth to compare with.

        Returns the files in disk order. The VM may be running or paused.
        """
        dest = dest or self.lab.new_dir("ref")
        dest.mkdir(parents=True, exist_ok=True)
        files = [dest / f"{d.target}.qcow2" for d in self.disks]
        backup = etree.Element("domainbackup", mode="push")
        disks_el = etree.SubElement(backup, "disks")
        for disk, file in strict_zip(self.disks, files):
            el = etree.SubElement(disks_el, "disk", name=disk.target, backup="yes", type="file")
            etree.SubElement(el, "target", file=str(file))
            etree.SubElement(el, "driver", type="qcow2")
        with BackupJob(self.lab.conn, self.dom) as job:
            job.begin(etree.tostring(backup, encoding="unicode"))
            job.wait()
        return files


@dataclass
class FlakyNas:
    """A repository served through :mod:`tests.lab.flakyfs`: its writes fail or slow down,
    and its lookups hang, on command."""

    repository: Repository
    backing: Path
    process: subprocess.Popen[bytes]

    def fail_writes(self) -> None:
        """From now on every write and fsync on this NAS fails with EIO."""
        (self.backing / FAIL_FLAG).touch()

    def fail_fsync(self) -> None:
        """From now on every fsync on this NAS fails with EIO; writes still succeed."""
        (self.backing / FAIL_FSYNC_FLAG).touch()

    def slow_writes(self, seconds: float) -> None:
        """From now on every write on this NAS first sleeps ``seconds``."""
        (self.backing / SLOW_FLAG).write_text(f"{seconds}\n", encoding="ascii")

    def fill(self) -> None:
        """From now on this NAS is full: every write and fsync fails with ENOSPC."""
        (self.backing / FULL_FLAG).touch()

    def throttle(self, bytes_per_second: int) -> None:
        """From now on writes on this NAS pass at ``bytes_per_second`` in all."""
        (self.backing / RATE_FLAG).write_text(f"{bytes_per_second}\n", encoding="ascii")

    def hang_lookups(self) -> Repository:
        """From now on looking up ``hang`` (and below) blocks, as on a dead NFS server;
        returns a repository at that address, whose mount hangs until :meth:`heal`."""
        (self.backing / HANG_DIR).mkdir(exist_ok=True)
        (self.backing / HANG_FLAG).touch()
        repo = self.repository
        return Repository(repo.type, f"{repo.address}/{HANG_DIR}", repo.options)

    def traffic(self) -> tuple[int, int]:
        """Bytes read and written through this NAS so far, as of the last file closed (a
        NAS made ``counting`` only)."""
        try:
            counts = json.loads((self.backing / COUNTERS).read_text(encoding="ascii"))
        except FileNotFoundError:
            return 0, 0
        return int(counts["read"]), int(counts["written"])

    def heal(self) -> None:
        """The NAS works normally again: every flag removed (hung lookups go on)."""
        for flag in (FAIL_FLAG, FAIL_FSYNC_FLAG, SLOW_FLAG, HANG_FLAG, FULL_FLAG, RATE_FLAG):
            (self.backing / flag).unlink(missing_ok=True)


class Lab:
    """A set of throwaway domains, volumes and repositories, removed by :meth:`close`."""

    def __init__(self, base: Path = LAB_BASE, uri: str = DEFAULT_URI) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="lab-", dir=base))
        (self.dir / _OWNER_FILE).write_text(str(os.getpid()))
        self.pool = self.dir / str(uuid.uuid4())
        self.pool.mkdir()
        self.conn = open_connection(uri)
        self.vms: list[LabVM] = []
        self._counter = 0
        self._processes: list[subprocess.Popen[bytes]] = []
        self._flaky: list[FlakyNas] = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def reconnect(self) -> None:
        """A fresh connection (after libvirtd restarted, the old one is dead)."""
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()
        self.conn = reconnect(_STOP_TIMEOUT_SECONDS)

    def new_dir(self, prefix: str) -> Path:
        """A fresh directory inside the lab."""
        self._counter += 1
        path = self.dir / f"{prefix}-{self._counter}"
        path.mkdir()
        return path

    def new_volume(
        self,
        target: str,
        size: int,
        *,
        bus: str = "virtio",
        kind: str = QCOW2,
        template: Path | None = None,
    ) -> LabDisk:
        """A fresh volume named like a CloudStack volume: a qcow2 v3 or raw file in the
        pool, or (``block``) a loop device over a sparse file, linked where LINSTOR puts
        its devices; :meth:`close` detaches it."""
        if kind not in DISK_KINDS:
            raise LabError(f"unknown disk kind {kind!r}: one of {', '.join(DISK_KINDS)}")
        volume_id = str(uuid.uuid4())
        if template is not None:
            # A copy of a template volume (the guest's ext4 ROOT), as CloudStack deploys one.
            path = self.pool / volume_id
            shutil.copyfile(template, path)
            size = qemu_img.info(path).virtual_size
            return LabDisk(path=path, target=target, size=size, bus=bus, kind=QCOW2)
        if kind != BLOCK:
            path = self.pool / volume_id
            qemu_img.create(path, size, fmt=kind)
            return LabDisk(path=path, target=target, size=size, bus=bus, kind=kind)
        backing = self.dir / f"device-{volume_id}"
        qemu_img.create(backing, size, fmt=RAW)
        loop = proc.run(["losetup", "--find", "--show", str(backing)]).stdout.strip()
        path = LINSTOR_DIR / f"cs-{volume_id}" / "0"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(loop)
        return LabDisk(path=path, target=target, size=size, bus=bus, kind=kind)

    def create_vm(
        self,
        disks: Sequence[int] = (64 * MiB, 32 * MiB),
        *,
        kinds: Sequence[str] = (),
        persistent: bool = False,
        cdrom: bool = True,
        guest_agent: bool = False,
        start: bool = True,
        boot: GuestImage | None = None,
        volumes: Sequence[LabDisk] = (),
    ) -> LabVM:
        """A TCG domain with one volume per size given; started unless ``start=False``.

        ``kinds`` gives each volume's kind in the same order (``qcow2``, ``raw``, ``block``);
        the volumes it does not reach are qcow2. ``volumes`` (made beforehand, from a
        template say) come first. With ``boot`` the domain boots that kernel and initramfs:
        the lab's real guest (see :mod:`tests.lab.guest`).
        """
        name = self._free_name()
        kind_of = list(kinds) + [QCOW2] * (len(disks) - len(kinds))
        volumes = list(volumes) + [
            self.new_volume(f"vd{chr(ord('a') + i)}", s, kind=kind_of[i - len(volumes)])
            for i, s in enumerate(disks, start=len(volumes))
        ]
        dom_uuid = str(uuid.uuid4())
        xml = _domain_xml(
            name, dom_uuid, self.dir, volumes, cdrom=cdrom, guest_agent=guest_agent, boot=boot
        )
        vm = LabVM(self, name, dom_uuid, xml, volumes, persistent=persistent)
        self.vms.append(vm)
        if persistent:
            self.conn.defineXML(xml)
        if start:
            vm.start()
        return vm

    def _free_name(self) -> str:
        taken = {d.name() for d in self.conn.listAllDomains()}
        while True:
            name = f"i-2-{random.randint(1000, 99999)}-VM"  # noqa: S311 - a name, not a secret
            if name not in taken:
                return name

    def repository(self, size: int | None = None) -> Repository:
        """A local repository reached exactly as an NFS one: ``mount -t none ADDR DIR -o bind``.

        With ``size`` the exported directory is a tmpfs of that many bytes, so that a test
        can fill the "NAS".
        """
        export = self.new_dir("nas")
        if size is not None:
            proc.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "labnas", str(export)])
        return Repository(type="none", address=str(export), options="bind")

    def flaky_repository(self, *, counting: bool = False, big_writes: bool = False) -> FlakyNas:
        """A repository whose writes can be made to fail with EIO (a FUSE passthrough);
        ``counting``, it counts its traffic (:meth:`FlakyNas.traffic`), uncached;
        ``big_writes``, it takes 128 KiB writes (the kernel's default is 4 KiB)."""
        backing = self.new_dir("flaky-backing")
        export = self.new_dir("nas")
        flags = ["--count"] if counting else []
        flags += ["--big-writes"] if big_writes else []
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.lab.flakyfs", str(backing), str(export), *flags],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=REPO_ROOT,
        )  # fmt: skip
        self._processes.append(process)
        deadline = time.monotonic() + 30
        while export not in system.mount_points():  # the lab waiting for its own FUSE server
            if process.poll() is not None or time.monotonic() > deadline:
                raise LabError("the flaky NAS did not mount")
            time.sleep(0.01)
        nas = FlakyNas(Repository("none", str(export), "bind"), backing, process)
        self._flaky.append(nas)
        return nas

    def close(self) -> None:
        """Remove every domain, checkpoint, mount and file of this lab."""
        problems: list[str] = []
        for nas in self._flaky:
            # A hanging or slow NAS would hold up every unmount and removal below.
            with _collect(problems, f"flaky NAS {nas.backing}"):
                nas.heal()
        for vm in self.vms:
            with _collect(problems, f"domain {vm.name}"):
                _remove_domain(self.conn, vm.uuid)
        for mount in system.mounts_under(self.dir):
            with _collect(problems, f"mount {mount}"):
                _unmount(mount)
        with _collect(problems, "loop devices"):
            _detach_loops_under(self.dir)
        for process in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
                process.wait()
        with _collect(problems, f"directory {self.dir}"):
            shutil.rmtree(self.dir)
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()
        if problems:
            raise LabError("lab cleanup failed: " + "; ".join(problems))


def flatten(top: Path, out: Path) -> Path:
    """Flatten an image and its backing chain into one qcow2, as the Java restore does."""
    qemu_img.convert(top, out)
    return out


def compare(first: Path, second: Path) -> bool:
    """Whether two qcow2 images (through their chains) read identical."""
    return qemu_img.compare(first, second)


@contextlib.contextmanager
def _collect(problems: list[str], what: str) -> Iterator[None]:
    try:
        yield
    except (OSError, libvirt.libvirtError, CommandFailed, LabError) as exc:
        problems.append(f"{what}: {exc}")


def _remove_domain(conn: libvirt.virConnect, dom_uuid: str) -> None:
    try:
        dom = conn.lookupByUUIDString(dom_uuid)
    except libvirt.libvirtError:
        return
    persistent = dom.isPersistent()
    if dom.isActive():
        with contextlib.suppress(libvirt.libvirtError):
            dom.abortJob()
        dom.destroy()
    if persistent:
        for checkpoint in dom.listAllCheckpoints():
            checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)


def _detach_loops_under(directory: Path) -> list[str]:
    """Detach the loop devices over files under ``directory`` (the domains using them are
    gone) and remove the LINSTOR-like links to them; return the devices detached."""
    listing = proc.run(["losetup", "--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE"])
    devices = []
    for line in listing.stdout.splitlines():
        name, _, back_file = line.partition(" ")
        # A backing file removed meanwhile is listed with a " (deleted)" suffix (--raw
        # escapes the space).
        back_file = back_file.removesuffix(r"\x20(deleted)")
        if Path(os.path.realpath(back_file)).parent == Path(os.path.realpath(directory)):
            devices.append(name)
    for link in LINSTOR_DIR.glob("cs-*/0") if devices else []:
        if link.is_symlink() and os.readlink(link) in devices:
            link.unlink()
            with contextlib.suppress(OSError):  # another lab's links may still be there
                for parent in (link.parent, LINSTOR_DIR, LINSTOR_DIR.parent):
                    parent.rmdir()
    for device in devices:
        proc.run(["losetup", "--detach", device])
    return devices


def _unmount(mount: Path) -> None:
    try:
        proc.run(["umount", str(mount)], timeout=60)
    except CommandFailed:
        proc.run(["umount", "-l", str(mount)], timeout=60)


def _lab_dir_of(dom: libvirt.virDomain) -> Path | None:
    try:
        meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, LAB_NS)
    except libvirt.libvirtError:
        return None
    lab_dir = etree.fromstring(meta).get("dir")
    return Path(lab_dir) if lab_dir else None


def sweep_stale_labs(base: Path = LAB_BASE, uri: str = DEFAULT_URI) -> list[str]:
    """Remove what labs of dead processes left behind (a test run that was killed).

    Only domains carrying a lab's metadata and directories under ``base`` are touched.
    Returns what was removed.
    """
    removed: list[str] = []
    stale_dirs = []
    for lab_dir in sorted(base.glob("lab-*")) if base.is_dir() else []:
        try:
            owner = int((lab_dir / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            owner = -1
        if owner <= 0 or not system.pid_alive(owner):
            stale_dirs.append(lab_dir)
    conn = open_connection(uri)
    try:
        for dom in conn.listAllDomains():
            dom_dir = _lab_dir_of(dom)
            if dom_dir is not None and (dom_dir in stale_dirs or not dom_dir.exists()):
                name = dom.name()
                _remove_domain(conn, dom.UUIDString())
                removed.append(f"domain {name}")
    finally:
        conn.close()
    for lab_dir in stale_dirs:
        for mount in system.mounts_under(lab_dir):
            _unmount(mount)
            removed.append(f"mount {mount}")
        removed += [f"loop device {d}" for d in _detach_loops_under(lab_dir)]
        shutil.rmtree(lab_dir, ignore_errors=True)
        removed.append(f"directory {lab_dir}")
    return removed


def restart_libvirtd() -> None:
    """Stop libvirtd (SIGTERM, as a service manager would) and start it again; running
    domains live on, connections to it die. Only ever on a lab hypervisor.

    libvirtd may take its time to stop (it waits for its workers); past a minute it is
    killed. It is started again whatever happened, so that one scenario cannot take the
    hypervisor away from the ones after it.
    """
    pids = [int(p) for p in proc.run(["pgrep", "-x", "libvirtd"], check=False).stdout.split()]
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _LIBVIRTD_STOP_SECONDS
        while any(system.pid_alive(pid) for pid in pids):  # a daemon going down: no event
            if time.monotonic() > deadline:
                log.warning("libvirtd did not stop in %d s: killing it", _LIBVIRTD_STOP_SECONDS)
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + _STOP_TIMEOUT_SECONDS
            time.sleep(0.05)
    finally:
        start_libvirtd_if_down()
    reconnect(_STOP_TIMEOUT_SECONDS).close()


def start_libvirtd_if_down() -> bool:
    """Start libvirtd when none runs (after a restart, or a crash); True if it had to. Only
    ever on a lab hypervisor."""
    found = proc.run(["pgrep", "-x", "libvirtd"], check=False).stdout.split()
    if any(system.pid_alive(int(pid)) for pid in found):
        return False
    proc.run([str(REPO_ROOT / "scripts" / "lab-libvirtd")])
    return True
