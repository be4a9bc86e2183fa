"""The restore's check of the chains it reads (``shim.restore._first_corrupt``), on real
qcow2 chains: a file that opens but fails ``qemu-img check``, deep in a chain, is found and
named by its disk; every file of a clean chain is checked once; the checks' worker thread
(``shim.restore._ChainChecks``) stops with the restore and logs under its log id. And the
comparison that proves a restored copy equal to its chain (``_compare_flushing``) finds a
difference anywhere, data its backing file holds included."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shim import cancel, gate, proc, qemu_img, restore
from shim.errors import BackupFailed, CommandFailed
from shim.gate import Chain, Damaged, VmDirectory
from shim.log import _LogIdFilter, log_id
from shim.runtime import RUN_DIR
from shim.targets import compression_type
from tests.support import break_refcount, vm_directory

MiB = 1024 * 1024


def _chain(directory: Path, name: str, depth: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = [directory / f"{name}0.qcow2"]
    qemu_img.create(files[0], 8 * MiB)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(files[0])],
                   check=True, capture_output=True)  # fmt: skip
    for k in range(1, depth + 1):
        files.append(directory / f"{name}{k}.qcow2")
        qemu_img.create(files[k], backing=files[k - 1].name, backing_fmt="qcow2")
    return files


def _gated(vm_dir: VmDirectory, *tops: Path) -> list[Chain]:
    return [vm_dir.chain(f"{top.parent.name}/{top.name}") for top in tops]


def test_clean_chains_pass_and_each_file_is_checked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, data = _chain(tmp_path / "vm/b", "root", 30), _chain(tmp_path / "vm/b", "data", 3)
    checked: list[qemu_img.Spec] = []
    real_check_many = qemu_img.check_many

    def counting(
        specs: list[qemu_img.Spec], *, at_once: int
    ) -> list[qemu_img.CheckResult | CommandFailed]:
        checked.extend(specs)
        return real_check_many(specs, at_once=at_once)

    monkeypatch.setattr(qemu_img, "check_many", counting)
    with vm_directory(tmp_path, "vm") as vm_dir:
        assert restore._first_corrupt(_gated(vm_dir, root[-1], data[-1], root[-1])) is None
    # Each file once, alone (no backing), by the gate's descriptor.
    assert len(checked) == len(root) + len(data)
    assert all('"backing": null' in spec.text and "/dev/fd/" in spec.text for spec in checked)


def test_a_corrupt_file_deep_in_a_chain_names_its_disk(tmp_path: Path) -> None:
    root, data = _chain(tmp_path / "vm/b", "root", 2), _chain(tmp_path / "vm/b", "data", 30)
    break_refcount(data[0])
    with vm_directory(tmp_path, "vm") as vm_dir:
        assert restore._first_corrupt(_gated(vm_dir, root[-1], data[-1])) == 1
        assert restore._first_corrupt(_gated(vm_dir, data[-1], root[-1])) == 0


def test_a_missing_backing_file_is_found_by_the_gate_and_each_file_checked_alone(
    tmp_path: Path,
) -> None:
    # The gate walks each chain first (a missing backing file is refused there); the
    # checks then open one file each, not the whole chain below it.
    files = _chain(tmp_path / "vm/b", "root", 2)
    files[0].unlink()
    with pytest.raises(CommandFailed):
        qemu_img.check(files[-1])
    with vm_directory(tmp_path, "vm") as vm_dir:
        with pytest.raises(Damaged, match=r"its backing file vm/b/root0\.qcow2 is missing"):
            vm_dir.chain("b/root2.qcow2")
        (verdict,) = qemu_img.check_many([gate.alone(vm_dir.image("b/root2.qcow2"))], at_once=1)
    assert isinstance(verdict, qemu_img.CheckResult) and verdict.clean


def test_stopping_a_restore_stops_its_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    # The checks run in a worker thread: leaving the restore (a failure, a signal) kills
    # their programs and waits for the thread; cancelling the operation stops them too.
    marker = f"30.{os.getpid()}"  # a sleep of its own: named by its argument

    def slow_checks(_sources: object) -> None:
        proc.run(["sleep", marker])

    monkeypatch.setattr(restore, "_first_corrupt", slow_checks)
    started = time.monotonic()
    with pytest.raises(RuntimeError), restore._ChainChecks([], []):
        _wait_for(lambda: proc.processes_naming(marker))
        (pid,) = proc.processes_naming(marker)
        # At the lowest CPU priority, below the copies (field 19 of /proc/<pid>/stat).
        stat = Path(f"/proc/{pid}/stat").read_text()
        assert int(stat.rsplit(")", 1)[1].split()[16]) == restore.CHECKS_NICE
        raise RuntimeError("the copy failed")
    assert proc.processes_naming(marker) == []
    token = cancel.CancelToken()
    with cancel.bound(token), restore._ChainChecks([], []) as checks:
        _wait_for(lambda: proc.processes_naming(marker))
        token.cancel("aborted")
        with pytest.raises(cancel.Cancelled, match="aborted"):
            checks.require()
        assert not token.take()  # delivered: the cleanup's programs run undisturbed
    assert proc.processes_naming(marker) == []
    assert time.monotonic() - started < 10


def test_the_checks_log_with_the_operations_log_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (top,) = _chain(tmp_path / "vm/b", "root", 0)
    break_refcount(top)
    caplog.set_level(logging.ERROR, logger="shim")
    caplog.handler.addFilter(_LogIdFilter())  # as the agent log's handler stamps records
    with (
        vm_directory(tmp_path, "vm") as vm_dir,
        log_id("job-7"),
        restore._ChainChecks(_gated(vm_dir, top), ["vol-1"]) as checks,
        pytest.raises(BackupFailed, match=r"volume \[vol-1\] is corrupt"),
    ):
        checks.require()
    (record,) = [r for r in caplog.records if "fails qemu-img check" in r.getMessage()]
    assert getattr(record, "logid", None) == "job-7"


def _wait_for(condition: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _qemu_io(path: Path, fmt: str, command: str) -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", command, str(path)], check=True,
                   capture_output=True)  # fmt: skip


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
def test_the_comparison_finds_a_difference_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compressed: bool
) -> None:
    """Where the chain's data is in the full under an unallocated top, in the top, at the
    very end; a compressed chain (zstd, where this QEMU writes it) in slices side by side
    (the last one shorter, and not a whole MiB), a plain one whole."""
    size = 256 * MiB + 3584
    kind = compression_type() if compressed else "zlib"
    options = (f"compression_type={kind}",)
    full, top = tmp_path / "vm/b/root0.qcow2", tmp_path / "vm/b/root1.qcow2"
    full.parent.mkdir(parents=True)
    qemu_img.create(full, size, options=options)
    _qemu_io(full, "qcow2", f"write -c -P 0x44 {200 * MiB} 1M")  # a compressed cluster
    _qemu_io(full, "qcow2", f"write -P 0x11 {size - 1536} 1536")
    qemu_img.create(top, backing=full.name, backing_fmt="qcow2", options=options)
    _qemu_io(top, "qcow2", f"write -P 0x22 {70 * MiB} 64k")
    copy, kept = tmp_path / "restored.raw", tmp_path / "kept.raw"
    # The device restore's readable form: a raw window of the virtual size, as json.
    device = "json:" + json.dumps(
        {"driver": "raw", "size": size, "file": {"driver": "file", "filename": str(copy)}}
    )
    slices: list[int] = []
    sliced = qemu_img.compare_slices

    def counting(*args: Any, **kwargs: Any) -> Any:
        slices.append(kwargs["slices"])
        return sliced(*args, **kwargs)

    monkeypatch.setattr(qemu_img, "compare_slices", counting)
    with vm_directory(tmp_path, "vm") as vm_dir:
        chain = vm_dir.chain("b/root1.qcow2")
        assert chain.zstd == (kind == "zstd")
        qemu_img.convert(chain.spec(), copy, target_fmt="raw")
        shutil.copyfile(copy, kept)
        with sliced(chain.spec(), copy, size=size, copy_fmt="raw", slices=4) as argvs:
            assert len(argvs) == 4
            assert proc.processes_naming(str(RUN_DIR / qemu_img.COMPARE_DIR_PREFIX))

        def same() -> tuple[bool, bool]:
            spec = chain.spec()
            return (
                restore._compare_flushing(chain, spec, copy, "raw", copy),
                restore._compare_flushing(chain, spec, device, None, copy),
            )

        assert same() == (True, True)
        for offset in (0, 70 * MiB + 4096, 130 * MiB, 200 * MiB + 4096, size - 1024, size - 512):
            _qemu_io(copy, "raw", f"write -P 0x33 {offset} 512")
            assert same() == (False, False), offset
            shutil.copyfile(kept, copy)
        # And a copy missing data (a hole where the chain holds data, in the top, in the
        # full under the unallocated top, in a compressed cluster): never "same".
        for offset in (70 * MiB, 200 * MiB, size - 1536):
            _qemu_io(copy, "raw", f"write -z -u {offset} 512")
            assert same() == (False, False), offset
            shutil.copyfile(kept, copy)
        assert same() == (True, True)
    assert set(slices) == {qemu_img.COMPARE_SLICES if chain.zstd else 1}
    # Each server ended with its comparison.
    assert not proc.processes_naming(str(RUN_DIR / qemu_img.COMPARE_DIR_PREFIX))
