"""The restore's check of the chains it reads (``shim.restore._first_corrupt``), on real
qcow2 chains: a file that opens but fails ``qemu-img check``, deep in a chain, is found and
named by its disk; every file of a clean chain is checked once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from shim import qemu_img, restore
from shim.errors import CommandFailed

MiB = 1024 * 1024


def _chain(directory: Path, name: str, depth: int) -> list[Path]:
    files = [directory / f"{name}0.qcow2"]
    qemu_img.create(files[0], 8 * MiB)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(files[0])],
                   check=True, capture_output=True)  # fmt: skip
    for k in range(1, depth + 1):
        files.append(directory / f"{name}{k}.qcow2")
        qemu_img.create(files[k], backing=files[k - 1].name, backing_fmt="qcow2")
    return files


def _zero_refcount_of_the_header(image: Path) -> None:
    """Cluster 0's refcount set to 0: the image still opens, ``qemu-img check`` finds it."""
    with open(image, "r+b") as fh:
        fh.seek(48)  # the header's refcount_table_offset
        table = int.from_bytes(fh.read(8), "big")
        fh.seek(table)
        block = int.from_bytes(fh.read(8), "big")
        fh.seek(block)
        fh.write(b"\0\0")  # 16-bit refcounts: the first is cluster 0's
    assert qemu_img.info(image).format == "qcow2"
    assert not qemu_img.check(image).clean


def test_clean_chains_pass_and_each_file_is_checked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, data = _chain(tmp_path, "root", 30), _chain(tmp_path, "data", 3)
    checked: list[str] = []
    real_check_many = qemu_img.check_many

    def counting(paths: list[str], *, at_once: int) -> list[qemu_img.CheckResult | CommandFailed]:
        checked.extend(map(str, paths))
        return real_check_many(paths, at_once=at_once)

    monkeypatch.setattr(qemu_img, "check_many", counting)
    assert restore._first_corrupt([root[-1], data[-1], root[-1]]) is None
    assert sorted(checked) == sorted(str(f) for f in [*root, *data])


def test_a_corrupt_file_deep_in_a_chain_names_its_disk(tmp_path: Path) -> None:
    root, data = _chain(tmp_path, "root", 2), _chain(tmp_path, "data", 30)
    _zero_refcount_of_the_header(data[0])
    assert restore._first_corrupt([root[-1], data[-1]]) == 1
    assert restore._first_corrupt([data[-1], root[-1]]) == 0
