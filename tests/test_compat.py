"""The oldest supported Python (3.9) and the newest APIs the shim would like from it."""

from __future__ import annotations

import pytest

from commands.model import DeleteBackupCommand, TakeBackupCommand
from shim.compat import strict_zip


def test_strict_zip_pairs_like_zip() -> None:
    assert list(strict_zip([1, 2], "ab")) == [(1, "a"), (2, "b")]
    assert list(strict_zip(iter([1]), [2], (3,))) == [(1, 2, 3)]
    assert list(strict_zip([], [])) == []


@pytest.mark.parametrize("lengths", [(1, 2), (2, 1), (0, 1)])
def test_strict_zip_refuses_unequal_lengths(lengths: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="same length"):
        list(strict_zip(range(lengths[0]), range(lengths[1])))


def test_a_command_without_a_required_field_is_refused() -> None:
    # kw_only dataclasses are 3.10: the model's own check stands in for __init__'s.
    with pytest.raises(TypeError, match="backup_repo_type, backup_repo_address, backup_path"):
        DeleteBackupCommand()
    with pytest.raises(TypeError, match="vm_name"):
        TakeBackupCommand(backup_repo_type="nfs", backup_repo_address="h:/e", backup_path="v/b")
    command = DeleteBackupCommand(
        backup_repo_type="nfs", backup_repo_address="h:/e", backup_path="v/b"
    )
    assert command.vm == "v"
