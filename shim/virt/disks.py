"""The disks of a domain, read from its XML the way the contract names them, and the one
table of the kinds of disk source.

Only ``device='disk'`` elements count (CD-ROMs and floppies do not), in document order: the
first is the ``root`` disk, the others ``datadisk``. A disk's volume id is what CloudStack
names the volume by: the basename of a file source, the image name of an rbd source, the
uuid inside a LINSTOR ``/dev/drbd/by-res/cs-<uuid>/0`` device.

What differs between a file, a block device and a network image (how the source is named,
how QEMU opens it, whether it can hold a dirty bitmap, whether its copy comes out fully
allocated) is in :data:`SOURCE_KINDS`; code that acts on a kind reads it there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from lxml import etree

ROOT = "root"
DATADISK = "datadisk"

_LINSTOR = re.compile(r"^/dev/drbd/by-res/cs-(?P<uuid>[^/]+)/\d+$")


@dataclass(frozen=True)
class SourceKind:
    """One kind of disk source (libvirt's ``<disk type=...>``) and what the shim does with it."""

    name: str
    """libvirt's name of it: ``file``, ``block``, ``network`` or ``volume``."""
    source_of: Callable[[etree._Element], str]
    """The source, from the disk's ``<source>`` element."""
    host_driver: str | None
    """QEMU's driver for opening it on this host (``file``, ``host_device``); None when it is
    not a local path (an ``rbd:`` image: ``qemu-img convert`` opens it by its name)."""
    may_carry_bitmaps: bool
    """Whether a qcow2 image of this kind can hold a persistent dirty bitmap (a checkpoint):
    only a file. The others are copied in full by every backup."""
    resparsify: bool
    """Whether its copy comes out fully allocated and is rewritten sparse afterwards, as
    upstream does: QEMU sees a block device (LINSTOR/DRBD) as all data. Files and ``rbd:``
    images report their holes."""


FILE = SourceKind("file", lambda s: s.get("file", ""), "file", True, False)
BLOCK = SourceKind("block", lambda s: s.get("dev", ""), "host_device", False, True)
NETWORK = SourceKind(
    "network", lambda s: f"{s.get('protocol', '')}:{s.get('name', '')}", None, False, False
)
VOLUME = SourceKind(
    "volume", lambda s: f"{s.get('pool', '')}/{s.get('volume', '')}", None, False, False
)
SOURCE_KINDS = {kind.name: kind for kind in (FILE, BLOCK, NETWORK, VOLUME)}
_UNKNOWN = SourceKind("unknown", lambda s: "", None, False, False)


@dataclass(frozen=True)
class DomainDisk:
    """One ``device='disk'`` of a domain."""

    target: str
    """The guest device name (``vda``): how libvirt's backup and checkpoint XML name it."""
    role: str
    """``root`` for the first disk, ``datadisk`` for the others."""
    source_type: str
    """``file``, ``block``, ``network`` or ``volume``, as in ``<disk type=...>``."""
    source: str
    """The file or device path, or for a network disk ``protocol:name``."""
    driver_type: str
    """The image format (``qcow2``, ``raw``)."""
    volume_id: str
    """The CloudStack volume id the backup file is named after."""
    alias: str | None = None
    """The device alias of a running domain (``virtio-disk0``), None when inactive."""

    @property
    def kind(self) -> SourceKind:
        """Its row of :data:`SOURCE_KINDS` (a kind not in it is treated as nothing local)."""
        return SOURCE_KINDS.get(self.source_type, _UNKNOWN)

    @property
    def carries_bitmaps(self) -> bool:
        """Whether the disk can hold a persistent dirty bitmap (a checkpoint's): only a qcow2
        file can. Raw files, block devices (LINSTOR/DRBD) and network disks (``rbd:``)
        cannot; they are copied in full by every backup."""
        return self.kind.may_carry_bitmaps and self.driver_type == "qcow2"

    @property
    def backup_name(self) -> str:
        """The file name of this disk's backup: ``root.<volId>.qcow2`` or ``datadisk...``."""
        return f"{self.role}.{self.volume_id}.qcow2"


def volume_id_of(source: str) -> str:
    """The CloudStack volume id of a disk source (a path, ``rbd:pool/image:...`` or a name).

    >>> volume_id_of("/mnt/6b1c/0c9a1c3e-8d1a-4a4b-9a5e-1f2e3d4c5b6a")
    '0c9a1c3e-8d1a-4a4b-9a5e-1f2e3d4c5b6a'
    >>> volume_id_of("rbd:cloudstack/3f1e:mon_host=10.0.0.5")
    '3f1e'
    >>> volume_id_of("/dev/drbd/by-res/cs-7d2c/0")
    '7d2c'
    """
    if source.startswith("rbd:"):
        image = source[len("rbd:") :].split(":", 1)[0]
        return PurePosixPath(image).name
    linstor = _LINSTOR.match(source)
    if linstor:
        return linstor.group("uuid")
    return PurePosixPath(source).name


def parse_disks(domain_xml: str | bytes) -> list[DomainDisk]:
    """The ``device='disk'`` disks of ``domain_xml``, in document order, with their roles."""
    root = etree.fromstring(domain_xml.encode() if isinstance(domain_xml, str) else domain_xml)
    disks: list[DomainDisk] = []
    for element in root.iterfind("devices/disk"):
        if element.get("device", "disk") != "disk":
            continue
        target = element.find("target")
        if target is None or not target.get("dev"):
            continue
        source_type = element.get("type", "file")
        src = element.find("source")
        kind = SOURCE_KINDS.get(source_type, _UNKNOWN)
        source = kind.source_of(src) if src is not None else ""
        driver = element.find("driver")
        alias = element.find("alias")
        if kind is NETWORK:
            volume_id = PurePosixPath(source.split(":", 1)[1]).name
        else:
            volume_id = volume_id_of(source)
        disks.append(
            DomainDisk(
                target=target.get("dev", ""),
                role=ROOT if not disks else DATADISK,
                source_type=source_type,
                source=source,
                driver_type=(driver.get("type") if driver is not None else None) or "raw",
                volume_id=volume_id,
                alias=alias.get("name") if alias is not None else None,
            )
        )
    return disks
