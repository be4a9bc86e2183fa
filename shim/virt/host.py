"""The libvirt host side of a backup: versions, the domain, quiescing, its description."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
from lxml import etree

from shim.compat import strict_zip
from shim.errors import VirtError
from shim.versions import MIN_LIBVIRT, MIN_QEMU

log = logging.getLogger(__name__)

AGENT_TIMEOUT_SECONDS = 10
QEMU_PID_DIR = Path("/run/libvirt/qemu")
"""Where the system libvirtd records each running domain's QEMU pid (``<name>.pid``)."""

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "idle",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "in shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


def _version(number: int) -> tuple[int, int, int]:
    return number // 1_000_000, number // 1000 % 1000, number % 1000


def libvirt_version(conn: libvirt.virConnect) -> tuple[int, int, int]:
    """The libvirt version of the daemon behind ``conn``."""
    return _version(conn.getLibVersion())


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def check_versions(conn: libvirt.virConnect, dom: libvirt.virDomain) -> None:
    """The backup-begin gate, refused in upstream's own words (its ``sanity_checks``, which
    operators search for): QEMU >= 4.2 and libvirt >= 7.2, and libvirt's own say that it
    backs up ``dom`` (:func:`live_backup_supported`)."""
    qemu, lib = _version(conn.getVersion()), _version(conn.getLibVersion())
    if not _versions_back_up(qemu, lib) or not live_backup_supported(conn, dom):
        raise VirtError(
            f"Failure... Your QEMU version {_dotted(qemu)} or libvirt version {_dotted(lib)} "
            "is unsupported. Consider upgrading to the required minimum version of QEMU: "
            f"{_dotted(MIN_QEMU)} and Libvirt: {_dotted(MIN_LIBVIRT)}"
        )


def live_backup_supported(conn: libvirt.virConnect, dom: libvirt.virDomain) -> bool:
    """Whether libvirt backs up ``dom`` while it runs: the domain capabilities of its
    emulator, machine and virtualization type say ``<backup supported='yes'/>``.

    The capability, not a version: libvirt 6.0 to 7.1 (Debian 11 has 7.0) ship the backup
    API but refuse it to any domain that did not opt in through a QEMU capability in its
    XML, which CloudStack's never do; from 7.2 on it is on, and reported here.
    """
    root = etree.fromstring(dom.XMLDesc().encode())
    os_type = root.find("os/type")
    return backup_capability(
        conn,
        emulator=root.findtext("devices/emulator"),
        arch=os_type.get("arch") if os_type is not None else None,
        machine=os_type.get("machine") if os_type is not None else None,
        virttype=root.get("type"),
    )


def backup_capability(
    conn: libvirt.virConnect,
    *,
    emulator: str | None = None,
    arch: str | None = None,
    machine: str | None = None,
    virttype: str | None = None,
) -> bool:
    """Whether the domain capabilities of this emulator, machine and virtualization type
    report ``<backup supported='yes'/>`` (libvirt's defaults where not given)."""
    try:
        caps = conn.getDomainCapabilities(emulator, arch, machine, virttype, 0)
    except libvirt.libvirtError as exc:
        log.warning("cannot read the domain capabilities: %s", exc.get_error_message())
        return False
    return etree.fromstring(caps.encode()).find("features/backup[@supported='yes']") is not None


def versions_back_up(conn: libvirt.virConnect) -> bool:
    """Whether this QEMU and libvirt are ones upstream's script backs running VMs up on."""
    return _versions_back_up(_version(conn.getVersion()), _version(conn.getLibVersion()))


def _versions_back_up(qemu: tuple[int, int, int], lib: tuple[int, int, int]) -> bool:
    return qemu >= MIN_QEMU and lib >= MIN_LIBVIRT


def versions(conn: libvirt.virConnect) -> dict[str, str]:
    """QEMU and libvirt versions, dotted."""
    return {
        "qemu": _dotted(_version(conn.getVersion())),
        "libvirt": _dotted(_version(conn.getLibVersion())),
    }


def find_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    """The domain called ``name``, or None when libvirt does not know it."""
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise VirtError(f"cannot look up VM {name}: {exc.get_error_message()}") from None


def is_paused(dom: libvirt.virDomain) -> bool:
    """Whether the guest's vCPUs are paused."""
    try:
        return bool(dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED)
    except libvirt.libvirtError:
        return False


def paused_by_io_error(dom: libvirt.virDomain) -> bool:
    """Whether the guest is paused because a write failed (e.g. a full backup target)."""
    try:
        state, reason = dom.state()
    except libvirt.libvirtError:
        return False
    return bool(state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR)


def _agent_timeout(dom: libvirt.virDomain, seconds: int) -> None:
    try:
        dom.agentSetResponseTimeout(seconds, 0)
    except libvirt.libvirtError as exc:
        log.debug("agent timeout not set: %s", exc.get_error_message())


def freeze(dom: libvirt.virDomain) -> bool:
    """Freeze the guest's filesystems through its agent; False (crash-consistent) without one.

    The agent's response timeout is shortened for the freeze (a hung agent must not hold
    the backup) and put back to libvirt's default by :func:`thaw`, or here when nothing
    was frozen: other users of the agent (CloudStack's own) expect the default.
    """
    log.info("freezing the guest's filesystems (the agent has %d s)", AGENT_TIMEOUT_SECONDS)
    _agent_timeout(dom, AGENT_TIMEOUT_SECONDS)
    try:
        frozen = dom.fsFreeze()
    except libvirt.libvirtError as exc:
        log.warning(
            "quiesce requested but the guest agent cannot freeze (%s): the backup is "
            "crash-consistent",
            exc.get_error_message(),
        )
        _agent_timeout(dom, libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT)
        return False
    log.info("guest filesystems frozen (%d)", frozen)
    return True


def thaw(dom: libvirt.virDomain) -> None:
    """Thaw the guest's filesystems and put the agent's response timeout back; failures
    are logged (the agent thaws on its own timer)."""
    try:
        dom.fsThaw()
        log.info("guest filesystems thawed")
    except libvirt.libvirtError as exc:
        log.warning("thaw failed: %s", exc.get_error_message())
    finally:
        _agent_timeout(dom, libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT)


def qemu_monitor(dom: libvirt.virDomain, command: str, **arguments: object) -> Any:
    """Run a QMP command in the domain's QEMU and return its answer, or raise VirtError.

    For what libvirt has no API for. libvirt marks the domain tainted (custom-monitor).
    """
    request = json.dumps({"execute": command, "arguments": arguments})
    try:
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, request, 0))
    except libvirt.libvirtError as exc:
        raise VirtError(f"QEMU monitor {command}: {exc.get_error_message()}") from None
    if "error" in reply:
        raise VirtError(f"QEMU monitor {command}: {reply['error'].get('desc', reply['error'])}")
    return reply["return"]


def describe(dom: libvirt.virDomain) -> dict[str, str]:
    """The metadata files stored with a running backup (contract §3), by file name."""
    xml = dom.XMLDesc()
    return {
        "domain-config.xml": xml,
        "dominfo.xml": _dominfo(dom),
        "domiflist.xml": _domiflist(xml),
        "domblklist.xml": _domblklist(xml),
    }


def _dominfo(dom: libvirt.virDomain) -> str:
    state, max_mem, mem, vcpus, cpu_time = dom.info()
    persistent = bool(dom.isPersistent())
    autostart = persistent and bool(dom.autostart())
    rows = [
        ("Id", str(dom.ID())),
        ("Name", dom.name()),
        ("UUID", dom.UUIDString()),
        ("OS Type", dom.OSType()),
        ("State", _STATES.get(state, "unknown")),
        ("CPU(s)", str(vcpus)),
        ("CPU time", f"{cpu_time / 1e9:.1f}s"),
        ("Max memory", f"{max_mem} KiB"),
        ("Used memory", f"{mem} KiB"),
        ("Persistent", "yes" if persistent else "no"),
        ("Autostart", "enable" if autostart else "disable"),
    ]
    return "".join(f"{label + ':':<15} {value}\n" for label, value in rows) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return " " + "   ".join(c.ljust(w) for c, w in strict_zip(cells, widths)).rstrip()

    ruler = "-" * (sum(widths) + 3 * (len(widths) - 1) + 2)
    return "\n".join([line(header), ruler, *(line(r) for r in rows)]) + "\n\n"


def _domiflist(xml: str) -> str:
    rows = []
    for iface in etree.fromstring(xml.encode()).iterfind("devices/interface"):
        source = iface.find("source")
        src = "-"
        if source is not None:
            src = source.get("bridge") or source.get("network") or source.get("dev") or "-"
        target, model, mac = iface.find("target"), iface.find("model"), iface.find("mac")
        rows.append(
            [
                target.get("dev", "-") if target is not None else "-",
                iface.get("type", "-"),
                src,
                model.get("type", "-") if model is not None else "-",
                mac.get("address", "-") if mac is not None else "-",
            ]
        )
    return _table(["Interface", "Type", "Source", "Model", "MAC"], rows)


def _domblklist(xml: str) -> str:
    rows = []
    for disk in etree.fromstring(xml.encode()).iterfind("devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        src = "-"
        if source is not None:
            src = source.get("file") or source.get("dev") or source.get("name") or "-"
        rows.append([target.get("dev", "-") if target is not None else "-", src])
    return _table(["Target", "Source"], rows)


def _next_target(used: set[str]) -> str:
    # As the agent does: the letter after the VM's last virtio disk (vdb -> vdc).
    for letter in "abcdefghijklmnopqrstuvwxyz":
        name = f"vd{letter}"
        if name not in used and all(u < name for u in used if u.startswith("vd")):
            return name
    raise VirtError("no free virtio disk name left on the VM")


def attach_volume(vm: str, volume: str) -> str:
    """Attach ``volume`` (a file, qcow2; or a block device, raw) to running VM ``vm`` as the
    agent attaches a restored volume: virtio, cache none. Return the guest device name."""
    from shim.virt.connection import open_connection  # noqa: PLC0415 - restores only
    from shim.virt.disks import parse_disks  # noqa: PLC0415

    conn = open_connection()
    try:
        dom = find_domain(conn, vm)
        if dom is None or not dom.isActive():
            raise VirtError(f"Failed to attach volume to VM: {vm} is not running")
        target = _next_target({d.target for d in parse_disks(dom.XMLDesc())})
        block = volume.startswith("/dev/")
        disk = etree.Element("disk", type="block" if block else "file", device="disk")
        etree.SubElement(
            disk, "driver", name="qemu", type="raw" if block else "qcow2", cache="none"
        )
        etree.SubElement(disk, "source", {"dev" if block else "file": volume})
        etree.SubElement(disk, "target", dev=target, bus="virtio")
        try:
            dom.attachDeviceFlags(
                etree.tostring(disk, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE
            )
        except libvirt.libvirtError as exc:
            raise VirtError(f"Failed to attach volume to VM: {exc.get_error_message()}") from None
        log.info("attached %s to %s as %s", volume, vm, target)
        return target
    finally:
        conn.close()


def files_held_open(dom: libvirt.virDomain, containing: str) -> list[str]:
    """Paths the domain's QEMU process holds open that contain ``containing``.

    Read from ``/proc`` (the pid from libvirt's pid file), never through QEMU's monitor:
    the reason to ask is a QEMU that a monitor query could crash. Empty when it cannot be
    read (not root, another libvirt instance): the caller then learns nothing.
    """
    try:
        pid = int((QEMU_PID_DIR / f"{dom.name()}.pid").read_text(encoding="ascii").strip())
        fds = os.listdir(f"/proc/{pid}/fd")
    except (OSError, ValueError, libvirt.libvirtError) as exc:
        log.debug("cannot read what QEMU holds open: %s", exc)
        return []
    held = []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if containing in target:
            held.append(target)
    return sorted(held)


def files_still_held(dom: libvirt.virDomain, containing: str, grace: float) -> list[str]:
    """Like :func:`files_held_open`, given ``grace`` seconds to become empty: libvirt
    closes a job's targets shortly after the job ends (an aborted one's a moment later)."""
    deadline = time.monotonic() + grace
    while True:
        held = files_held_open(dom, containing)
        if not held or time.monotonic() >= deadline:
            return held
        time.sleep(0.1)
