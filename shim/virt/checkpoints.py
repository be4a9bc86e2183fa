"""Checkpoints and their bitmaps, kept consistent through libvirt's checkpoint API.

The rule (contract §4): after any successful backup a VM has exactly one live checkpoint,
the one just created, and one bitmap of that name per disk. Measured on libvirt 9.0:

* a transient domain forgets its checkpoints when it stops; the bitmaps stay in the qcow2
  and must be *redefined*, never created anew ("Bitmap already exists");
* a redefinition validates only the disks its XML names (a name-only XML checks nothing),
  so the XML always names every disk;
* a checkpoint naming a disk that cannot carry a bitmap (a raw file, a block device, a
  network disk) as ``bitmap`` is refused as a whole ("checkpoint for disk vdb unsupported
  for storage type raw"): such disks are named ``checkpoint='no'``;
* deleting a checkpoint fails as a whole ("bitmap ... not found in backing chain") when one
  named disk lacks the bitmap, so a stale bitmap is removed by redefining its checkpoint
  with exactly the disks that carry it, then deleting that;
* a bitmap created since QEMU started is not in the image header until QEMU stops; one that
  is deleted leaves the header at once. Headers are read with ``qemu-img info -U``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import libvirt
from lxml import etree

from shim import qemu_img
from shim.errors import CommandFailed, VirtError
from shim.virt.disks import DomainDisk

log = logging.getLogger(__name__)

_REDEFINE = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
_VALIDATE = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
_EPOCH_NAME = re.compile(r"(\d{9,})$")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint libvirt knows: its name, parent, creation time and per-disk bitmaps."""

    name: str
    parent: str | None
    creation_time: int
    bitmaps: dict[str, str]
    """Disk target -> bitmap name, for the disks that have one."""


def checkpoint_xml(
    name: str, carriers: Iterable[str], targets: Iterable[str], *, creation_time: int | None = None
) -> str:
    """A checkpoint XML naming every disk: ``bitmap`` for ``carriers``, ``no`` for the rest."""
    root = etree.Element("domaincheckpoint")
    etree.SubElement(root, "name").text = name
    if creation_time is not None:
        etree.SubElement(root, "creationTime").text = str(creation_time)
    disks = etree.SubElement(root, "disks")
    carrying = set(carriers)
    for target in targets:
        if target in carrying:
            etree.SubElement(disks, "disk", name=target, checkpoint="bitmap", bitmap=name)
        else:
            etree.SubElement(disks, "disk", name=target, checkpoint="no")
    return etree.tostring(root, encoding="unicode")


def creation_time_of(name: str) -> int:
    """The creation time a redefinition states: the epoch in ``backup-<epoch>``, else now."""
    match = _EPOCH_NAME.search(name)
    return int(match.group(1)) if match else int(time.time())


def listed(dom: libvirt.virDomain) -> list[Checkpoint]:
    """The checkpoints libvirt knows for ``dom``, oldest first."""
    found = []
    try:
        checkpoints = dom.listAllCheckpoints()
    except libvirt.libvirtError as exc:
        raise VirtError(f"cannot list checkpoints: {exc.get_error_message()}") from None
    for checkpoint in checkpoints:
        doc = etree.fromstring(checkpoint.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
        bitmaps = {
            d.get("name", ""): d.get("bitmap") or doc.findtext("name") or ""
            for d in doc.iterfind("disks/disk")
            if d.get("checkpoint") == "bitmap"
        }
        found.append(
            Checkpoint(
                name=doc.findtext("name", ""),
                parent=doc.findtext("parent/name"),
                creation_time=int(doc.findtext("creationTime", "0")),
                bitmaps=bitmaps,
            )
        )
    return sorted(found, key=lambda c: (c.creation_time, c.name))


def redefine(
    dom: libvirt.virDomain,
    name: str,
    carriers: Iterable[str],
    targets: Iterable[str],
    *,
    validate: bool,
) -> None:
    """Make libvirt know checkpoint ``name`` again; with ``validate`` QEMU must hold a
    consistent bitmap of that name on every carrier, or :class:`VirtError` is raised."""
    xml = checkpoint_xml(name, carriers, targets, creation_time=creation_time_of(name))
    flags = _REDEFINE | (_VALIDATE if validate else 0)
    try:
        dom.checkpointCreateXML(xml, flags)
    except libvirt.libvirtError as exc:
        raise VirtError(exc.get_error_message()) from None


def delete(dom: libvirt.virDomain, name: str, *, metadata_only: bool = False) -> None:
    """Delete checkpoint ``name`` (its bitmaps too unless ``metadata_only``)."""
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0
    try:
        dom.checkpointLookupByName(name).delete(flags)
    except libvirt.libvirtError as exc:
        raise VirtError(exc.get_error_message()) from None


def header_bitmaps(disks: Sequence[DomainDisk]) -> dict[str, list[str]]:
    """Bitmap name -> targets whose qcow2 header lists it (file-backed qcow2 disks only)."""
    found: dict[str, list[str]] = {}
    for disk in disks:
        if not disk.carries_bitmaps:
            continue
        try:
            names = qemu_img.info(disk.source, fmt="qcow2", force_share=True).bitmaps
        except CommandFailed as exc:
            log.debug("cannot read the bitmaps of %s: %s", disk.source, exc)
            continue
        for name in names:
            found.setdefault(name, []).append(disk.target)
    return found


def discard(
    dom: libvirt.virDomain,
    disks: Sequence[DomainDisk],
    name: str,
    headers: dict[str, list[str]] | None = None,
) -> list[str]:
    """Remove checkpoint ``name`` and its bitmap from every disk, whatever state they are in.

    ``headers`` is a :func:`header_bitmaps` reading to use (and keep up to date) instead of
    reading every image again. Returns warnings instead of raising: housekeeping must never
    make the next backup impossible (a half-failed delete is the classic way to block every
    later backup).
    """
    if headers is None:
        headers = header_bitmaps(disks)
    warnings: list[str] = []
    targets = [d.target for d in disks]
    if any(c.name == name for c in listed(dom)):
        try:
            delete(dom, name)
            headers.pop(name, None)  # a deleted bitmap leaves the header at once
        except VirtError as exc:
            log.info("checkpoint %s: %s; removing its metadata and stray bitmaps", name, exc)
            try:
                delete(dom, name, metadata_only=True)
            except VirtError as meta_exc:
                warnings.append(f"checkpoint {name}: {meta_exc}")
                return warnings
    carriers = headers.get(name)
    if carriers:
        try:
            redefine(dom, name, carriers, targets, validate=False)
            delete(dom, name)
            headers.pop(name, None)
        except VirtError as exc:
            warnings.append(f"bitmap {name} on {', '.join(carriers)}: {exc}")
            with contextlib.suppress(VirtError):
                delete(dom, name, metadata_only=True)
    return warnings


def retire_all_except(
    dom: libvirt.virDomain,
    disks: Sequence[DomainDisk],
    keep: str | None,
    headers: dict[str, list[str]] | None = None,
) -> list[str]:
    """Leave ``keep`` as the only checkpoint and bitmap; return what could not be removed.

    ``headers``: as for :func:`discard`.
    """
    if headers is None:
        headers = header_bitmaps(disks)
    names = [c.name for c in listed(dom)] + sorted(headers)
    warnings: list[str] = []
    seen: set[str] = set()
    for name in names:  # oldest first: nothing is merged into a checkpoint about to go
        if name == keep or name in seen:
            continue
        seen.add(name)
        log.info("retiring checkpoint %s", name)
        warnings += discard(dom, disks, name, headers)
    for warning in warnings:
        log.warning("housekeeping: %s", warning)
    return warnings
