"""verify's walk of a backup's chain (``shim.verify._walk_chain``) on real qcow2 files: each
file is checked alone, so the walk (the gate's) must find what only opening the chain would."""

from __future__ import annotations

import subprocess
from pathlib import Path

from shim import qemu_img, verify
from tests.support import vm_directory

MiB = 1024 * 1024


def test_a_backing_loop_is_a_problem(tmp_path: Path) -> None:
    backup = tmp_path / "vm" / "b1"
    backup.mkdir(parents=True)
    first, second = backup / "first.qcow2", backup / "second.qcow2"
    qemu_img.create(first, 1 * MiB)
    qemu_img.create(second, backing=first.name, backing_fmt="qcow2")
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2",
                    "-b", second.name, str(first)], check=True)  # fmt: skip
    with vm_directory(tmp_path, "vm") as vm_dir:
        problems: list[str] = []
        verify._walk_chain(vm_dir, "b1/second.qcow2", problems, {})
    assert len(problems) == 1 and "backing chain loops back on itself" in problems[0], problems
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "", str(first)],
                   check=True)  # fmt: skip
    with vm_directory(tmp_path, "vm") as vm_dir:
        clean: list[str] = []
        verify._walk_chain(vm_dir, "b1/second.qcow2", clean, {})
    assert clean == []
