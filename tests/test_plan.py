"""The one planner every backup method uses: what it decides, without a hypervisor (the
lab tests prove each method follows it end to end)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.chain import Parents
from shim.nas import Repository
from shim.plan import BackupPlan, plan_backup, planned_checkpoint
from shim.request import BackupRequest
from shim.virt.disks import DATADISK, ROOT, DomainDisk

QCOW2 = DomainDisk("vda", ROOT, "file", "/pool/root", "qcow2", "r1")
DATA = DomainDisk("vdb", DATADISK, "file", "/pool/data", "qcow2", "d1")
BLOCK = DomainDisk("vdc", DATADISK, "block", "/dev/drbd1000", "raw", "b1")


def _request(
    mode: str | None,
    bitmap_new: str | None = None,
    bitmap_parent: str | None = None,
    parent_path: str | None = None,
) -> BackupRequest:
    return BackupRequest(
        vm="i-2-1-VM",
        repository=Repository("nfs", "nas:/backups"),
        path="i-2-1-VM/t",
        mode=mode,
        bitmap_new=bitmap_new,
        bitmap_parent=bitmap_parent,
        parent_path=parent_path,
    )


def _incremental() -> BackupRequest:
    return _request("incremental", bitmap_new="b2", bitmap_parent="b1", parent_path="i-2-1-VM/p")


def _never_asked(parent: str, files: dict[str, Path]) -> str | None:
    raise AssertionError("the parent checkpoint was checked")


@pytest.mark.parametrize(
    ("mode", "checkpoint"), [("full", "b2"), (None, None), ("incremental", "b2")]
)
def test_the_checkpoint_created_follows_the_mode(mode: str | None, checkpoint: str | None) -> None:
    request = _request(mode, bitmap_new="b2", bitmap_parent="b1" if mode else None)
    assert planned_checkpoint(request) == checkpoint
    assert plan_backup(request, [QCOW2], None, _never_asked) == BackupPlan(checkpoint=checkpoint)


def test_an_incremental_copies_since_the_parent_and_new_disks_full() -> None:
    files = {"vda": Path("/nas/i-2-1-VM/p/root.r1.qcow2")}
    asked: list[tuple[str, dict[str, Path]]] = []

    def confirm(parent: str, given: dict[str, Path]) -> str | None:
        asked.append((parent, given))
        return None

    plan = plan_backup(_incremental(), [QCOW2, DATA, BLOCK], Parents(files=files), confirm)
    assert asked == [("b1", files)]
    assert plan == BackupPlan(checkpoint="b2", incremental_from="b1", parents=files)
    assert plan.describe() == "incremental since b1"


@pytest.mark.parametrize(
    ("disks", "parents", "reason"),
    [
        ([BLOCK], Parents(), None),
        ([QCOW2], Parents(problems=["parent of vda: root.r1.qcow2 is missing"]), None),
        ([QCOW2], Parents(), None),
        ([QCOW2], Parents(files={"vda": Path("/nas/p/root.r1.qcow2")}), "no bitmap b1"),
    ],
    ids=["no-carrier", "parent-problem", "no-parent-file", "checkpoint-refused"],
)
def test_an_impossible_incremental_is_a_full_with_the_marker(
    disks: list[DomainDisk], parents: Parents, reason: str | None
) -> None:
    def confirm(parent: str, files: dict[str, Path]) -> str | None:
        assert reason is not None, "asked although the repository already said no"
        return reason

    plan = plan_backup(_incremental(), disks, parents, confirm)
    assert plan == BackupPlan(checkpoint="b2", fallback=True)
    assert plan.describe() == "full"
