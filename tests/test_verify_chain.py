"""verify's walk of a backup's chain (``shim.verify._walk_chain``) on real qcow2 files: each
file is checked alone, so the walk itself must find what only opening the chain would."""

from __future__ import annotations

import subprocess
from pathlib import Path

from shim import qemu_img, verify

MiB = 1024 * 1024


def test_a_backing_loop_is_a_problem(tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    first, second = vm / "first.qcow2", vm / "second.qcow2"
    qemu_img.create(first, 1 * MiB)
    qemu_img.create(second, backing=first.name, backing_fmt="qcow2")
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2",
                    "-b", second.name, str(first)], check=True)  # fmt: skip
    problems: list[str] = []
    verify._walk_chain(second, vm, problems, {})
    assert len(problems) == 1 and "backing chain loops back to" in problems[0], problems
    clean: list[str] = []
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "", str(first)],
                   check=True)  # fmt: skip
    verify._walk_chain(second, vm, clean, {})
    assert clean == []
