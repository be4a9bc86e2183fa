"""The disks of a domain, read from its XML the way the contract names them.

Only ``device='disk'`` elements count (CD-ROMs and floppies do not), in document order: the
first is the ``root`` disk, the others ``datadisk``. A disk's volume id is what CloudStack
names the volume by: the basename of a file source, the image name of an rbd source, the
uuid inside a LINSTOR ``/dev/drbd/by-res/cs-<uuid>/0`` device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from lxml import etree

ROOT = "root"
DATADISK = "datadisk"

_LINSTOR = re.compile(r"^/dev/drbd/by-res/cs-(?P<uuid>[^/]+)/\d+$")


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
    def carries_bitmaps(self) -> bool:
        """Whether the disk can hold a persistent dirty bitmap (a checkpoint's): only a qcow2
        file can. Raw files, block devices (LINSTOR/DRBD) and network disks (``rbd:``)
        cannot; they are copied in full by every backup."""
        return self.source_type == "file" and self.driver_type == "qcow2"

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


def _source_of(disk: etree._Element, source_type: str) -> str:
    src = disk.find("source")
    if src is None:
        return ""
    if source_type == "file":
        return src.get("file", "")
    if source_type == "block":
        return src.get("dev", "")
    if source_type == "network":
        return f"{src.get('protocol', '')}:{src.get('name', '')}"
    if source_type == "volume":
        return f"{src.get('pool', '')}/{src.get('volume', '')}"
    return ""


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
        source = _source_of(element, source_type)
        driver = element.find("driver")
        alias = element.find("alias")
        if source_type == "network":
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
