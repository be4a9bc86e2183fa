"""The pull-mode copy engine (:class:`shim.pull.ExportCopier`) against a real NBD export of
a local image, without libvirt: an incremental copies exactly its selected extents, in one
job per disk, and a selection that does not mark them is refused before any byte moves."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import pull, qemu_img, settings
from shim.errors import CommandFailed
from shim.proc import processes_naming
from shim.pull import DiskCopy, ExportCopier, Extent, selected_bytes
from shim.storage_daemon import QmpError
from shim.targets import Targets

MiB = 1024 * 1024
SIZE = 64 * MiB
EXTENTS = [Extent(1 * MiB, 1 * MiB), Extent(10 * MiB, 3 * MiB), Extent(50 * MiB, 64 * 1024)]
WRITES = [f"write -P {0x10 + k} {k * 4 * MiB} {4 * MiB}" for k in range(8)] + [
    f"write -P 0x77 {48 * MiB} {8 * MiB}"
]
"""The source: 32 MiB of data, a 16 MiB hole, 8 MiB of data, a hole to its end."""


@pytest.fixture
def export(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB qcow2 holding :data:`WRITES`, exported read-only as ``vda`` on a socket."""
    source = tmp_path / "source.qcow2"
    qemu_img.create(source, SIZE)
    commands = [arg for write in WRITES for arg in ("-c", write)]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(source)],
                   check=True, capture_output=True)  # fmt: skip
    socket = tmp_path / "nbd.sock"
    daemon = subprocess.Popen([
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,filename={source},node-name=file,read-only=on",
        "--blockdev", "driver=qcow2,file=file,node-name=vda,read-only=on",
        "--nbd-server", f"addr.type=unix,addr.path={socket}",
        "--export", "type=nbd,id=vda,node-name=vda,name=vda",
    ])  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not socket.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        yield socket
    finally:
        daemon.terminate()
        daemon.wait()


def _data_extents(image: Path) -> list[Extent]:
    out = subprocess.run(["qemu-img", "map", "--output=json", str(image)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    found: list[Extent] = []
    for entry in json.loads(out):
        if entry["data"] and entry["depth"] == 0:
            start, length = entry["start"], entry["length"]
            if found and found[-1].start + found[-1].length == start:
                found[-1] = Extent(found[-1].start, found[-1].length + length)
            else:
                found.append(Extent(start, length))
    return found


def _node(target: Path) -> dict[str, object]:
    """The target as the storage daemon opens it (a method's ``target_node``, no parent)."""
    file = {"driver": "file", "filename": str(target)}
    return {"driver": "qcow2", "detect-zeroes": "unmap", "discard": "unmap", "file": file}


def test_an_incremental_copies_exactly_its_selected_extents(export: Path, tmp_path: Path) -> None:
    target = tmp_path / "target.qcow2"
    qemu_img.create(target, SIZE)
    copy = DiskCopy("vda", target, EXTENTS, tmp_path / "vda.selection.qcow2", _node(target))
    seen: list[tuple[int, int]] = []
    copier = ExportCopier(
        export, [copy], [SIZE], Targets(), lambda done, total: seen.append((done, total))
    )
    assert copier.run() == selected_bytes(EXTENTS) == 4 * MiB + 64 * 1024
    assert _data_extents(target) == EXTENTS
    assert seen[-1] == (copier.total, copier.total)


def test_a_disk_without_changes_is_not_copied(export: Path, tmp_path: Path) -> None:
    target = tmp_path / "target.qcow2"
    qemu_img.create(target, SIZE)
    selection = tmp_path / "vda.selection.qcow2"
    assert (
        ExportCopier(export, [DiskCopy("vda", target, [], selection)], [SIZE], Targets()).run() == 0
    )
    assert _data_extents(target) == []
    assert not selection.exists()


def test_a_selection_that_misses_an_extent_is_refused(
    export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = pull.write_selection

    def loses_one(path: Path, size: int, extents: list[Extent]) -> None:
        written(path, size, extents[:-1])

    monkeypatch.setattr(pull, "write_selection", loses_one)
    target = tmp_path / "target.qcow2"
    qemu_img.create(target, SIZE)
    copy = DiskCopy("vda", target, EXTENTS, tmp_path / "vda.selection.qcow2", _node(target))
    with pytest.raises(QmpError, match="marks 4194304 bytes, not the 4259840"):
        ExportCopier(export, [copy], [SIZE], Targets()).run()
    assert _data_extents(target) == []


def test_a_full_copies_the_view_in_order_and_sparse(export: Path, tmp_path: Path) -> None:
    """Every byte, holes kept, and the clusters stored in the disk's order (a restore reads
    the file straight through)."""
    target = tmp_path / "target.qcow2"
    qemu_img.create(target, SIZE)
    seen: list[tuple[int, int]] = []
    copier = ExportCopier(
        export,
        [DiskCopy("vda", target)],
        [SIZE],
        Targets(),
        lambda done, total: seen.append((done, total)),
    )
    assert copier.run() == SIZE
    assert seen[-1] == (SIZE, SIZE)
    assert qemu_img.compare(target, tmp_path / "source.qcow2")
    assert _data_extents(target) == [Extent(0, 32 * MiB), Extent(48 * MiB, 8 * MiB)]
    out = subprocess.run(["qemu-img", "map", "--output=json", str(target)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    offsets = [entry["offset"] for entry in json.loads(out) if entry["data"]]
    assert offsets == sorted(offsets), "clusters stored out of order"


def test_selected_bytes_counts_each_grain_once() -> None:
    grain = pull.SELECTION_GRANULARITY
    assert selected_bytes([]) == 0
    assert selected_bytes([Extent(0, 1)]) == grain
    assert selected_bytes([Extent(grain - 1, 2)]) == 2 * grain
    assert selected_bytes([Extent(10, 20), Extent(100, 20)]) == grain  # one shared grain
    assert selected_bytes([Extent(5 * grain, grain), Extent(0, 1)]) == 2 * grain  # unsorted
    assert selected_bytes([Extent(0, 1 << 40)]) == 1 << 40  # 1 TiB: counted, not listed


def test_a_full_that_stops_moving_is_stopped_and_fails(
    export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy stuck on a dead NAS or export (here: a qemu-img that stops itself before it
    copies anything) fails after the stall time, and its process is gone."""
    stuck = tmp_path / "stuck-qemu-img"
    stuck.write_text('#!/bin/sh\nkill -STOP $$\nexec qemu-img "$@"\n', encoding="ascii")
    stuck.chmod(0o755)
    monkeypatch.setattr(pull, "QEMU_IMG", str(stuck))
    monkeypatch.setattr(pull, "COPY_STALL_SECONDS", 1.0)
    target = tmp_path / "target.qcow2"
    qemu_img.create(target, SIZE)
    started = time.monotonic()
    with pytest.raises(CommandFailed, match="no progress in 1 s"):
        ExportCopier(export, [DiskCopy("vda", target)], [SIZE], Targets()).run()
    assert time.monotonic() - started < 5
    assert processes_naming(str(target)) == []


def test_a_full_s_targets_are_written_back_as_it_goes_unless_checksums_read_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "target.qcow2"
    target.write_bytes(b"x" * 8192)
    written_back: list[Path] = []

    def write_back(path: Path) -> int:
        written_back.append(path)
        return 8192

    monkeypatch.setattr(pull, "_write_back", write_back)
    monkeypatch.setattr(pull, "_WATCH_SECONDS", 0.0)
    assert pull._Watch([(target, SIZE)], 0).poll([]) == 8192
    assert written_back == [target]
    # The checksums taken as the backup ends read the targets from the page cache.
    monkeypatch.setenv(settings.CHECKSUM_AT.name, "backup")
    assert pull._Watch([(target, SIZE)], 0).poll([]) == os.stat(target).st_blocks * 512
    assert written_back == [target]
