"""The one planner of every backup (live push, live pull, offline): what it creates, and
whether it is an incremental or falls back to a full.

Planning has two steps, because the first must change nothing: :func:`read_parents` reads
the parent files from the repository (a bad path is refused before anything is touched),
and :func:`plan_backup` decides, asking the method to confirm the parent checkpoint where
the disks are (libvirt's metadata for a running VM, the images' bitmaps for a stopped one).
Only disks that carry bitmaps (qcow2 files) have parents: the others are copied in full by
every backup, incremental or not, so nothing of a parent is read for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shim.chain import Parents, resolve_parents
from shim.gate import Chain
from shim.nas import MountSession
from shim.request import FULL, INCREMENTAL, BackupRequest
from shim.virt.disks import DomainDisk

log = logging.getLogger(__name__)

ParentCheck = Callable[[str, dict[str, Path]], "str | None"]
"""Confirms that checkpoint ``name`` can serve as the parent of the disks (targets) that
have parent files: None when it can, else why not (the backup then falls back to a full)."""


@dataclass
class BackupPlan:
    """What one backup does."""

    checkpoint: str | None = None
    """The checkpoint (bitmap) it creates; None for a ``-m legacy`` copy."""
    incremental_from: str | None = None
    """The parent checkpoint whose changes it copies; None for a full."""
    parents: dict[str, Path] = field(default_factory=dict)
    """Disk target -> its parent file; disks absent here are copied in full."""
    parent_chains: dict[str, Chain] = field(default_factory=dict)
    """Disk target -> its parent file's chain, as the gate walked it."""
    fallback: bool = False
    """An incremental was asked for and is impossible: this is a full (stdout says so)."""

    def describe(self) -> str:
        """``full`` or ``incremental since <checkpoint>``, for the log."""
        return f"incremental since {self.incremental_from}" if self.incremental_from else "full"


def read_parents(
    request: BackupRequest, session: MountSession, disks: Sequence[DomainDisk]
) -> Parents | None:
    """The parent files of an incremental request (None for any other request), read from
    the repository; changes nothing, and raises InputError for a bad parent path."""
    if request.effective_mode != INCREMENTAL or not request.bitmap_parent:
        return None
    return resolve_parents(
        session,
        [d for d in disks if d.carries_bitmaps],
        request.path,
        parent_paths=request.parent_paths,
        parent_path=request.parent_path,
        bitmap_parent=request.bitmap_parent,
    )


def plan_backup(
    request: BackupRequest,
    disks: Sequence[DomainDisk],
    parents: Parents | None,
    check_parent: ParentCheck,
) -> BackupPlan:
    """Plan ``request`` on ``disks``; an impossible incremental becomes a full, logged as a
    warning, with the fallback marker set."""
    plan = BackupPlan(checkpoint=planned_checkpoint(request))
    if parents is None or not request.bitmap_parent:
        return plan
    reason = _incremental_problem(disks, parents) or check_parent(
        request.bitmap_parent, parents.files
    )
    if reason:
        log.warning("incremental backup impossible (%s): taking a full backup", reason)
        plan.fallback = True
        return plan
    plan.incremental_from = request.bitmap_parent
    plan.parents = parents.files
    plan.parent_chains = parents.chains
    new_disks = [d.target for d in disks if d.target not in parents.files]
    if new_disks:
        log.info(
            "disks without a parent (attached since, or without bitmaps), backed up full: %s",
            ", ".join(new_disks),
        )
    return plan


def planned_checkpoint(request: BackupRequest) -> str | None:
    """The checkpoint ``request`` creates (``--bitmap-new`` of a full or incremental)."""
    return request.bitmap_new if request.effective_mode in (FULL, INCREMENTAL) else None


def _incremental_problem(disks: Sequence[DomainDisk], parents: Parents) -> str | None:
    if not any(d.carries_bitmaps for d in disks):
        return "no disk can carry a bitmap (only qcow2 file disks can)"
    if parents.problems:
        return "; ".join(parents.problems)
    if not parents.files:
        return "no disk has a parent backup file"
    return None
