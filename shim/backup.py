"""Taking a backup: one entry point, :func:`take_backup`, for the drop-in script and the
socket service. It takes the VM's lock, decides whether the VM runs, mounts the repository,
picks the :class:`~shim.method.BackupMethod` (live push, live pull through a scratch
directory, or offline) and returns a :class:`~shim.contract.BackupOutcome`; every failure
is a :class:`~shim.errors.ShimError` raised after this run's traces are gone, and the NAS
unmounted.
"""

from __future__ import annotations

import contextlib

import libvirt

from shim.contract import BackupOutcome
from shim.errors import BackupFailed
from shim.live import LiveBackup, PullBackup, PushBackup
from shim.lock import VmLock
from shim.nas import MountSession
from shim.offline import OfflineBackup
from shim.pull import Scratch, scratch_setting
from shim.request import BackupRequest
from shim.virt import host
from shim.virt.connection import open_connection
from shim.virt.jobs import JobObserver

__all__ = ["BackupRequest", "JobObserver", "take_backup"]


def take_backup(request: BackupRequest, *, on_job: JobObserver | None = None) -> BackupOutcome:
    """Back up ``request.vm`` to the repository; raise a ShimError on any failure."""
    request.validate()
    with VmLock(request.vm):
        conn = open_connection()
        live: LiveBackup | None = None
        try:
            dom = host.find_domain(conn, request.vm)
            if dom is not None and dom.isActive():
                # Running after all (-d is filled when the server believes it stopped): a
                # live backup is the safe one; stdout still follows the -d form.
                host.check_versions(conn, dom)
                scratch_root = request.scratch_dir or scratch_setting()
                scratch = Scratch(scratch_root, request.vm) if scratch_root else None
                with MountSession(request.repository) as session:
                    if scratch is None:
                        live = PushBackup(conn, dom, request, session, on_job=on_job)
                    else:
                        live = PullBackup(
                            conn, dom, request, session, scratch=scratch, on_job=on_job
                        )
                    return live.run()
            if not request.disk_paths:
                raise BackupFailed(
                    f"VM {request.vm} is not running on this host and no disk paths were given"
                )
            with MountSession(request.repository) as session:
                return OfflineBackup(request, session, dom).run()
        finally:
            # The live backup may have reconnected (libvirtd restarted): close what is open.
            with contextlib.suppress(libvirt.libvirtError):
                (live.conn if live is not None else conn).close()
