"""Taking a backup: one entry point, :func:`take_backup`, for the drop-in script and the
socket service. It takes the VM's lock, decides whether the VM runs, mounts the repository,
picks the :class:`~shim.method.BackupMethod` (live push, live pull through a scratch
directory, or offline) and returns a :class:`~shim.contract.BackupOutcome`; every failure
is a :class:`~shim.errors.ShimError` raised after this run's traces are gone, and the NAS
unmounted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import libvirt

from shim import settings
from shim.backupdir import PARTIAL_SUFFIX
from shim.contract import BackupOutcome
from shim.errors import BackupFailed, InputError, UsageError
from shim.live import LiveBackup, PullBackup, PushBackup
from shim.lock import VmLock
from shim.nas import MountSession
from shim.offline import OfflineBackup
from shim.pull import (
    DEFAULT_SCRATCH,
    Scratch,
    scratch_dir_problem,
    scratch_room_problem,
    scratch_setting,
)
from shim.request import INCREMENTAL, BackupRequest
from shim.targets import Targets, targets_for
from shim.virt import host
from shim.virt.connection import open_connection
from shim.virt.disks import parse_disks
from shim.virt.jobs import JobObserver

__all__ = ["BackupRequest", "JobObserver", "take_backup"]

log = logging.getLogger(__name__)

AUTO, PUSH, PULL = "auto", "push", "pull"
METHODS = (AUTO, PUSH, PULL)


def take_backup(request: BackupRequest, *, on_job: JobObserver | None = None) -> BackupOutcome:
    """Back up ``request.vm`` to the repository; raise a ShimError on any failure."""
    request.validate()
    targets = targets_for(request.compress, request.bandwidth_mib)
    method = method_setting()
    with VmLock(request.vm):
        conn = open_connection()
        live: LiveBackup | None = None
        try:
            dom = host.find_domain(conn, request.vm)
            if dom is not None and dom.isActive():
                # Running after all (-d is filled when the server believes it stopped): a
                # live backup is the safe one; stdout still follows the -d form.
                host.check_versions(conn, dom)
                scratch = _scratch_for(dom, request, targets, method)
                if scratch is None and targets.compression:
                    log.warning("this backup of %s is not compressed", request.vm)
                    targets = dataclasses.replace(targets, compression=None)
                with MountSession(request.repository) as session:
                    if scratch is None:
                        live = PushBackup(conn, dom, request, session, targets, on_job=on_job)
                    else:
                        live = PullBackup(
                            conn, dom, request, session, targets, scratch=scratch, on_job=on_job
                        )
                    return live.run()
            if not request.disk_paths:
                raise BackupFailed(
                    f"VM {request.vm} is not running on this host and no disk paths were given"
                )
            with MountSession(request.repository) as session:
                return OfflineBackup(request, session, targets, dom).run()
        finally:
            # The live backup may have reconnected (libvirtd restarted): close what is open.
            with contextlib.suppress(libvirt.libvirtError):
                (live.conn if live is not None else conn).close()


def method_setting() -> str:
    """The host's :data:`~shim.settings.METHOD`; UsageError when it is none of them."""
    method = settings.value(settings.METHOD)
    if method not in METHODS:
        raise UsageError(f"{settings.METHOD.name} is auto, push or pull, not {method!r}")
    return method


def _scratch_for(
    dom: libvirt.virDomain, request: BackupRequest, targets: Targets, method: str
) -> Scratch | None:
    """Where a running VM's pull backup keeps its scratch images; None: push mode.

    ``push`` and ``pull`` (:data:`~shim.settings.METHOD`) force a method. ``auto``, the
    default: a scratch directory set (``-S``, the host's setting) means pull mode, as it
    always did. Else pull mode for what push mode serves badly: a full (QEMU's push job
    makes every guest write wait on the NAS, 107 to 158 times the guest's idle p99 in the
    benchmark's P9, and pays for a sparse disk's virtual size, P17) and a compressed or
    capped backup (:attr:`~shim.targets.Targets.pull_reason`); push mode for the rest, an
    incremental (its job holds only the guest writes that land on changed blocks). Pull
    mode without a scratch directory set goes through :data:`shim.pull.DEFAULT_SCRATCH`
    when it can (:func:`_default_scratch`); else ``auto`` takes push mode, a backup rather
    than none, and a forced ``pull`` fails, touching nothing.
    """
    root = request.scratch_dir or scratch_setting()
    if method == PUSH:
        if root:
            log.info("%s=push: the scratch directory %s is not used", settings.METHOD.name, root)
        return None
    if root:
        return Scratch(root, request.vm)
    why = "pull mode is set" if method == PULL else targets.pull_reason
    if why is None and request.effective_mode != INCREMENTAL:
        why = "a full is taken in pull mode (the guest never waits on the NAS)"
    if why is None:
        return None
    scratch, problem = _default_scratch(dom, request.vm)
    if scratch is None:
        if method == PULL:
            raise BackupFailed(f"{settings.METHOD.name}=pull, and {problem}")
        log.warning("%s, and %s: push mode", why, problem)
        return None
    log.info("%s: its scratch in %s", why, DEFAULT_SCRATCH)
    return scratch


def _default_scratch(dom: libvirt.virDomain, vm: str) -> tuple[Scratch | None, str]:
    """The VM's scratch in :data:`shim.pull.DEFAULT_SCRATCH`, or None and why not: no room
    there for every block the disks hold as libvirt counts them (the top image of a qcow2
    chain; the most a guest can overwrite during the backup, but for a template's blocks)
    and a reserve, a path too long for the export's socket, or a QEMU that still holds an
    earlier backup's target (asking it for block sizes could crash it: the method's own
    checks refuse that backup, asking nothing)."""
    if host.files_held_open(dom, PARTIAL_SUFFIX + "/"):
        return None, "QEMU still holds an earlier backup's target"
    problem = scratch_dir_problem(DEFAULT_SCRATCH)  # before QEMU is asked anything
    if problem:
        return None, problem
    try:
        scratch = Scratch(str(DEFAULT_SCRATCH), vm)
        allocated = sum(dom.blockInfo(d.target)[1] for d in parse_disks(dom.XMLDesc()))
    except InputError as exc:
        return None, str(exc)
    except libvirt.libvirtError as exc:
        return None, f"the disks' sizes are unknown ({exc.get_error_message()})"
    problem = scratch_room_problem(DEFAULT_SCRATCH, allocated)
    return (None, problem) if problem else (scratch, "")
