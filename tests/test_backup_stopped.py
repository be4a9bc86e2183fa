"""Stopped-VM backups (the agent passes -d), end to end on the lab."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import time
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from shim import qemu_img
from shim.compat import strict_zip
from tests.lab import Lab, LabVM, MiB, compare
from tests.lab.chains import read_manifest
from tests.lab.leaks import leaks
from tests.support import (
    DROPIN,
    GENERATIONS,
    Chain,
    assert_size_parses,
    build_argv,
    disk_files,
    repo_values,
    run_dropin,
    verify_backup,
)

pytestmark = pytest.mark.lab


def _disks(vm: LabVM) -> str:
    return ",".join(str(d.path) for d in vm.disks)


def _offline(chain: Chain, mode: str, **kwargs: object) -> tuple[str, str]:
    run, path = chain.backup(mode, disks=_disks(chain.vm), **kwargs)  # type: ignore[arg-type]
    # The caller sums every line: integers only, and they add up to what was written.
    assert run.stdout and all(line.isdigit() for line in run.stdout.splitlines()), run.stdout
    for generation in ("4.20.x", "4.21", "seed", "merged"):
        assert_size_parses(
            GENERATIONS[generation]["parser"], run.stdout, chain.repo_dir / path, disks_given=True
        )
    return run.stdout, path


def _truth(vm: LabVM) -> list[Path]:
    """The stopped VM's disks are the truth (no QEMU has them open)."""
    return [d.path for d in vm.disks]


@pytest.mark.live_backup
def test_stopped_full_then_live_incremental_continues(chain: Chain) -> None:
    vm = chain.vm
    vm.write(0, 0, 4 * MiB, pattern=0x21)
    vm.write(1, 2 * MiB, 1 * MiB, pattern=0x22)
    vm.stop()
    _, full = _offline(chain, "full")
    verify_backup(chain.lab, chain.repo_dir, full, vm, _truth(vm))
    assert [vm.bitmaps(i) for i in range(2)] == [(chain.bitmaps[-1],)] * 2
    manifest = read_manifest(chain.repo_dir / full)
    assert manifest is not None and manifest.offline and manifest.mode == "full"
    vm.start()
    vm.write(0, 8 * MiB, 1 * MiB, pattern=0x23)
    run, incremental = chain.backup("incremental")
    assert "INCREMENTAL_FALLBACK" not in run.stdout
    verify_backup(chain.lab, chain.repo_dir, incremental, vm, vm.reference_backup())
    sizes = [f.stat().st_size for f in disk_files(chain.repo_dir, incremental, vm)]
    assert sum(sizes) < 3 * MiB
    assert leaks(chain.lab) == []


def test_offline_incremental_chain_restores_identical(chain: Chain) -> None:
    vm = chain.vm
    vm.write(0, 0, 2 * MiB, pattern=0x31)
    vm.stop()
    _offline(chain, "full")
    for k in range(1, 4):
        vm.start()
        vm.write(0, k * 4 * MiB, 1 * MiB, pattern=0x31 + k)
        vm.write_zeroes(0, 0, 512 * 1024)
        vm.discard(1, 0, 1 * MiB)
        vm.write(1, k * MiB, 512 * 1024, pattern=0x41 + k)
        vm.stop()
        _, path = _offline(chain, "incremental")
        verify_backup(chain.lab, chain.repo_dir, path, vm, _truth(vm))
        files = disk_files(chain.repo_dir, path, vm)
        assert all(qemu_img.info(f).backing_filename for f in files)
        assert sum(f.stat().st_size for f in files) < 4 * MiB  # only the dirty clusters
        # Rotated: the new bitmap only, on every disk.
        assert [vm.bitmaps(i) for i in range(2)] == [(chain.bitmaps[-1],)] * 2
        manifest = read_manifest(chain.repo_dir / path)
        assert manifest is not None and manifest.mode == "incremental"
        assert manifest.parent == Path(chain.backups[-2]).name
    assert leaks(chain.lab) == []


def test_offline_incremental_without_the_parent_bitmap_is_a_full(
    chain: Chain, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = chain.vm
    vm.stop()
    _offline(chain, "full")
    subprocess.run(
        ["qemu-img", "bitmap", "--remove", str(vm.disks[0].path), chain.bitmaps[-1]], check=True
    )
    stdout, path = _offline(chain, "incremental")
    assert "INCREMENTAL_FALLBACK" not in stdout  # integers only by default
    for file in disk_files(chain.repo_dir, path, vm):
        assert qemu_img.info(file).backing_filename is None
    manifest = read_manifest(chain.repo_dir / path)
    assert manifest is not None and manifest.fallback and manifest.mode == "full"
    verify_backup(chain.lab, chain.repo_dir, path, vm, _truth(vm))
    # A seed-generation manager strips markers before summing: it may ask for them.
    monkeypatch.setenv("NASBACKUP_SHIM_DISK_PATH_MARKERS", "true")
    subprocess.run(
        ["qemu-img", "bitmap", "--remove", str(vm.disks[1].path), chain.bitmaps[-1]], check=True
    )
    run, path = chain.backup("incremental", disks=_disks(vm))
    lines = run.stdout.splitlines()
    assert lines[:2] == ["INCREMENTAL_FALLBACK=true", f"BITMAP_CREATED={chain.bitmaps[-1]}"]
    parsed = assert_size_parses("seed", run.stdout, chain.repo_dir / path, disks_given=True)
    assert parsed.incremental_fallback and parsed.bitmap_created == chain.bitmaps[-1]


def test_raw_file_and_block_device_sources(lab: Lab, tmp_path: Path) -> None:
    vm = lab.create_vm(disks=(16 * MiB,), start=False)
    raw = lab.pool / "7d2c1e00-0000-4000-8000-00000000raw0"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), str(16 * MiB)], check=True)
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 2M", str(raw)],
        check=True,
        capture_output=True,
    )
    device_file = lab.pool / "drbd-backing"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "raw", str(device_file), str(8 * MiB)], check=True
    )
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x6b 0 1M", str(device_file)],
        check=True,
        capture_output=True,
    )
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(device_file)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    linstor = Path("/dev/drbd/by-res/cs-a1b2c3d4-0000-4000-8000-00000000beef/0")
    try:
        linstor.parent.mkdir(parents=True, exist_ok=True)
        linstor.symlink_to(loop)
        chain = Chain(lab=lab, vm=vm, repo=lab.repository(), log=tmp_path / "agent.log")
        sources = f"{vm.disks[0].path},{raw},{linstor}"
        run, path = chain.backup("full", disks=sources)
        assert all(line.isdigit() for line in run.stdout.splitlines())
        directory = chain.repo_dir / path
        files = {
            "root": directory / f"root.{vm.disks[0].volume_id}.qcow2",
            "raw": directory / f"datadisk.{raw.name}.qcow2",
            "drbd": directory / "datadisk.a1b2c3d4-0000-4000-8000-00000000beef.qcow2",
        }
        assert compare(files["root"], vm.disks[0].path)
        assert qemu_img.compare(files["raw"], raw, second_fmt="raw")
        assert qemu_img.compare(files["drbd"], loop, second_fmt="raw")
        # Re-sparsified: 1 MiB of data on an 8 MiB device stores as ~1 MiB.
        assert files["drbd"].stat().st_size < 2 * MiB
        # A raw disk carries no bitmap: no checkpoint is reported as created.
        manifest = read_manifest(directory)
        assert manifest is not None and manifest.bitmap is None
        assert [d.role for d in manifest.disks] == ["root", "datadisk", "datadisk"]
    finally:
        linstor.unlink(missing_ok=True)
        subprocess.run(["losetup", "-d", loop], check=False)
        for parent in (linstor.parent, linstor.parent.parent, linstor.parent.parent.parent):
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
    assert leaks(lab) == []


def _guest_wrote_a_qcow2_header(volume: str | Path, scratch: Path) -> None:
    """What a guest can do to its raw disk: write a real qcow2 image (64 MiB virtual, its
    own data) at the start, then data of its own past it."""
    inner = scratch / "inner.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(inner), "64M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5c 0 256k", str(inner)],
        check=True,
        capture_output=True,
    )
    with open(volume, "r+b") as fh:
        fh.write(inner.read_bytes())
        fh.flush()
        os.fsync(fh.fileno())
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x6d 12M 1M", str(volume)],
        check=True,
        capture_output=True,
    )
    assert qemu_img.info(volume).format == "qcow2"  # what a probe of it believes


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _restored_bytes(chain: Chain, path: str, name: str, size: int) -> str:
    """The shim's own restore of one backup file into a fresh raw volume: its checksum."""
    target = chain.lab.new_dir("restored") / "raw-volume"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(target), str(size)], check=True)
    values = {
        "operation": "restore",
        "path": path,
        "backup_files": name,
        "restore_paths": str(target),
        **repo_values(chain.repo),
    }
    run = run_dropin(build_argv("", values, "restore"), log_file=chain.log)
    assert (run.returncode, run.stdout) == (0, f"{target} {size}\n"), run.stdout
    return _sha256(target)


def test_block_device_with_a_qcow2_header_is_backed_up_as_its_raw_bytes(
    lab: Lab, tmp_path: Path
) -> None:
    vm = lab.create_vm(disks=(8 * MiB,), start=False)
    device_file = lab.pool / "drbd-header-backing"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "raw", str(device_file), str(16 * MiB)], check=True
    )
    _guest_wrote_a_qcow2_header(device_file, tmp_path)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(device_file)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    volume_id = "a1b2c3d4-0000-4000-8000-0000000head"
    linstor = Path(f"/dev/drbd/by-res/cs-{volume_id}/0")
    try:
        linstor.parent.mkdir(parents=True, exist_ok=True)
        linstor.symlink_to(loop)
        before = _sha256(loop)
        chain = Chain(lab=lab, vm=vm, repo=lab.repository(), log=tmp_path / "agent.log")
        run, path = chain.backup("full", disks=f"{vm.disks[0].path},{linstor}")
        assert all(line.isdigit() for line in run.stdout.splitlines()), run.stdout
        name = f"datadisk.{volume_id}.qcow2"
        backup = chain.repo_dir / path / name
        assert qemu_img.info(backup).virtual_size == 16 * MiB  # the device, not the image in it
        assert qemu_img.compare(backup, loop, second_fmt="raw")
        assert _restored_bytes(chain, path, name, 16 * MiB) == before
        assert _sha256(loop) == before  # never opened for writing
    finally:
        linstor.unlink(missing_ok=True)
        subprocess.run(["losetup", "-d", loop], check=False)
        for parent in (linstor.parent, linstor.parent.parent, linstor.parent.parent.parent):
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
    assert leaks(lab) == []


def test_raw_file_with_a_qcow2_header_takes_its_format_from_the_domain(
    lab: Lab, tmp_path: Path
) -> None:
    vm = lab.create_vm(disks=(8 * MiB,), persistent=True, start=False)
    raw = lab.pool / "7d2c1e00-0000-4000-8000-0000000head"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), str(16 * MiB)], check=True)
    _guest_wrote_a_qcow2_header(raw, tmp_path)
    # The stopped (persistent) domain says what the volume is: raw.
    xml = etree.fromstring(vm.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    disk = etree.SubElement(xml.find("devices"), "disk", type="file", device="disk")
    etree.SubElement(disk, "driver", name="qemu", type="raw")
    etree.SubElement(disk, "source", file=str(raw))
    etree.SubElement(disk, "target", dev="vdb", bus="virtio")
    lab.conn.defineXML(etree.tostring(xml, encoding="unicode"))
    before = _sha256(raw)
    chain = Chain(lab=lab, vm=vm, repo=lab.repository(), log=tmp_path / "agent.log")
    run, path = chain.backup("full", disks=f"{vm.disks[0].path},{raw}")
    assert all(line.isdigit() for line in run.stdout.splitlines()), run.stdout
    name = f"datadisk.{raw.name}.qcow2"
    backup = chain.repo_dir / path / name
    assert qemu_img.info(backup).virtual_size == 16 * MiB  # the volume, not the image in it
    assert qemu_img.compare(backup, raw, second_fmt="raw")
    assert _restored_bytes(chain, path, name, 16 * MiB) == before
    assert _sha256(raw) == before  # no bitmap written into the "image"
    assert compare(chain.repo_dir / path / f"root.{vm.disks[0].volume_id}.qcow2", vm.disks[0].path)
    manifest = read_manifest(chain.repo_dir / path)
    assert manifest is not None and manifest.bitmap is None  # a raw disk carries none
    assert [d.virtual_size for d in manifest.disks] == [8 * MiB, 16 * MiB]
    assert leaks(lab) == []


def test_bitmap_that_cannot_be_added_fails_the_backup(lab: Lab, tmp_path: Path) -> None:
    vm = lab.create_vm(disks=(8 * MiB,), start=False)
    old = lab.pool / "0c0c0c0c-0000-4000-8000-0000000000v2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(old), str(8 * MiB)],
        check=True,
    )  # qcow2 v2: no persistent bitmaps
    chain = Chain(lab=lab, vm=vm, repo=lab.repository(), log=tmp_path / "agent.log")
    run, _ = chain.backup("full", disks=f"{vm.disks[0].path},{old}", expect_exit=1)
    assert "bitmap" in run.stdout.lower()
    assert not (chain.repo_dir / vm.name).exists()  # the VM directory this run made is gone
    assert vm.bitmaps(0) == ()  # the transaction added nothing anywhere
    assert leaks(lab) == []


def test_vm_starting_during_an_offline_backup_is_refused(lab: Lab, tmp_path: Path) -> None:
    vm = lab.create_vm(disks=(1024 * MiB,))
    vm.write(0, 0, 768 * MiB, pattern=0x7E)
    vm.stop()
    chain = Chain(lab=lab, vm=vm, repo=lab.repository(), log=tmp_path / "agent.log")
    env = {**os.environ, "NASBACKUP_SHIM_LOG": str(chain.log)}
    argv = [
        "-o",
        "backup",
        "-v",
        vm.name,
        "-t",
        chain.repo.type,
        "-s",
        chain.repo.address,
        "-m",
        chain.repo.options,
        "-p",
        f"{vm.name}/2026.10.01.00.00.00",
        "-q",
        "false",
        "-d",
        _disks(vm),
        "-M",
        "full",
        "--bitmap-new",
        "backup-1790000001",
    ]
    backup = subprocess.Popen([str(DROPIN), *argv], stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while "offline copy of" not in (chain.log.read_text() if chain.log.exists() else ""):
        assert time.monotonic() < deadline and backup.poll() is None
        time.sleep(0.01)
    with pytest.raises(libvirt.libvirtError, match="lock"):
        vm.start()  # the backup holds the image: QEMU cannot take its write lock
    out, _ = backup.communicate(timeout=120)
    assert backup.returncode == 0, out
    assert compare(
        disk_files(chain.repo_dir, f"{vm.name}/2026.10.01.00.00.00", vm)[0], vm.disks[0].path
    )
    vm.start()  # and once it is done, the VM starts
    assert leaks(lab) == []


def test_missing_source_and_running_vm_with_d(chain: Chain) -> None:
    vm = chain.vm
    vm.stop()
    run, _ = chain.backup("full", disks=f"{vm.disks[0].path},/nonexistent/vol", expect_exit=1)
    assert "/nonexistent/vol" in run.stdout
    assert not (chain.repo_dir / vm.name).exists()  # refused before anything was written
    run = run_dropin(
        [
            "-o",
            "backup",
            "-v",
            vm.name,
            "-t",
            chain.repo.type,
            "-s",
            chain.repo.address,
            "-m",
            chain.repo.options,
            "-p",
            f"{vm.name}/x",
            "-q",
            "false",
            "-d",
            "",
        ],
        log_file=chain.log,
    )
    assert run.returncode == 1 and "not running" in run.stdout
    assert leaks(chain.lab) == []


def test_sigterm_during_an_offline_incremental_keeps_the_parent(lab: Lab, tmp_path: Path) -> None:
    vm = lab.create_vm(disks=(1024 * MiB,))
    chain = Chain(lab=lab, vm=vm, repo=lab.repository(), log=tmp_path / "agent.log")
    vm.stop()
    _offline(chain, "full")
    vm.start()
    vm.write(0, 0, 768 * MiB, pattern=0x3A)
    vm.stop()
    parent = chain.bitmaps[-1]
    values = {
        "operation": "backup",
        "vm": vm.name,
        "path": f"{vm.name}/interrupted",
        "quiesce": "false",
        "disks": _disks(vm),
        "mode": "incremental",
        "bitmap_new": "backup-1799999999",
        "bitmap_parent": parent,
        "parent_paths": str(
            disk_files(chain.repo_dir, chain.backups[-1], vm)[0].relative_to(chain.repo_dir)
        ),
        **repo_values(chain.repo),
    }
    log = tmp_path / "interrupted.log"  # its own: the full above logged the same words
    env = {**os.environ, "NASBACKUP_SHIM_LOG": str(log)}
    backup = subprocess.Popen(
        [str(DROPIN), *build_argv("merged", values)], stdout=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 60
    while "offline copy of" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and backup.poll() is None
        time.sleep(0.01)
    backup.terminate()
    out, _ = backup.communicate(timeout=120)
    assert (backup.returncode, out) == (1, "interrupted by signal SIGTERM\n")
    assert leaks(lab) == []
    assert sorted(os.listdir(chain.repo_dir / vm.name)) == [Path(chain.backups[-1]).name]
    # The parent bitmap is intact and consistent: the next run is a real incremental.
    assert vm.bitmaps(0) == (parent,)
    _, path = _offline(chain, "incremental")
    manifest = read_manifest(chain.repo_dir / path)
    assert manifest is not None and not manifest.fallback and manifest.mode == "incremental"
    verify_backup(lab, chain.repo_dir, path, vm, _truth(vm))


@pytest.mark.live_backup
def test_downstream_volume_ids_name_offline_files_and_live_continues(chain: Chain) -> None:
    vm = chain.vm
    ids = ("5e6f-root-volume-uuid", "9a8b-data-volume-uuid")
    chain.generation, chain.volume_ids = "downstream", ids
    names = [f"root.{ids[0]}.qcow2", f"datadisk.{ids[1]}.qcow2"]
    vm.write(0, 0, 4 * MiB, pattern=0x71)
    vm.write(1, 1 * MiB, 1 * MiB, pattern=0x72)
    vm.stop()
    _, full = _offline(chain, "full")
    assert sorted(p.name for p in (chain.repo_dir / full).glob("*.qcow2")) == sorted(names)
    verify_backup(chain.lab, chain.repo_dir, full, vm, _truth(vm), volume_ids=ids)
    manifest = read_manifest(chain.repo_dir / full)
    assert manifest is not None and [d.volume_id for d in manifest.disks] == list(ids)
    # An offline incremental with -u finds its parents by the ids.
    vm.start()
    vm.write(0, 8 * MiB, 1 * MiB, pattern=0x73)
    vm.stop()
    _, incremental = _offline(chain, "incremental")
    files = disk_files(chain.repo_dir, incremental, vm, ids)
    assert [qemu_img.info(f).backing_filename for f in files] == [
        f"../{Path(full).name}/{name}" for name in names
    ]
    verify_backup(chain.lab, chain.repo_dir, incremental, vm, _truth(vm), volume_ids=ids)
    # ... and a live one after it too.
    vm.start()
    vm.write(1, 4 * MiB, 1 * MiB, pattern=0x74)
    run, live = chain.backup("incremental")
    assert "INCREMENTAL_FALLBACK" not in run.stdout
    assert sorted(p.name for p in (chain.repo_dir / live).glob("*.qcow2")) == sorted(names)
    verify_backup(chain.lab, chain.repo_dir, live, vm, vm.reference_backup(), volume_ids=ids)
    assert qemu_img.info(disk_files(chain.repo_dir, live, vm, ids)[1]).backing_filename == (
        f"../{Path(incremental).name}/{names[1]}"
    )
    assert leaks(chain.lab) == []


@pytest.mark.live_backup
def test_downstream_restore_and_verify_of_volume_id_files(chain: Chain) -> None:
    vm = chain.vm
    ids = ("5e6f-root-volume-uuid", "9a8b-data-volume-uuid")
    chain.generation, chain.volume_ids = "downstream", ids
    names = [f"root.{ids[0]}.qcow2", f"datadisk.{ids[1]}.qcow2"]
    vm.write(0, 0, 2 * MiB, pattern=0x75)
    chain.backup("full")
    vm.write(1, 0, 1 * MiB, pattern=0x76)
    _, path = chain.backup("incremental")
    refs = vm.reference_backup()
    common = {"path": path, "mount_timeout": "0", **repo_values(chain.repo)}
    verified = run_dropin(
        build_argv("downstream", {"operation": "verify", **common}, "verify"), log_file=chain.log
    )
    assert verified.returncode == 0, verified.stdout
    lines = verified.stdout.splitlines()
    assert all(line.startswith("ok ") for line in lines), verified.stdout
    assert {f"ok {backup}/{n}" for backup in chain.backups for n in names} <= set(lines)
    # The shim's own restore (downstream argv, -w) flattens them into fresh volumes.
    volumes = chain.lab.new_dir("restored")
    targets = [volumes / "r0", volumes / "r1"]
    for target, disk in strict_zip(targets, vm.disks):
        qemu_img.create(target, disk.size)
    values = {
        "operation": "restore",
        "backup_files": ",".join(names),
        "restore_paths": ",".join(map(str, targets)),
        **common,
    }
    restored = run_dropin(build_argv("downstream", values, "restore"), log_file=chain.log)
    assert restored.returncode == 0, restored.stdout
    assert all(compare(t, r) for t, r in strict_zip(targets, refs))
    assert leaks(chain.lab) == []


def test_downstream_volume_id_count_must_match_the_disk_paths(chain: Chain) -> None:
    chain.vm.stop()
    chain.generation, chain.volume_ids = "downstream", ("a", "b", "c")
    run, _ = chain.backup("full", disks=_disks(chain.vm), expect_exit=1)
    assert run.stdout == "--volumeuuids names 3 volume(s) but there are 2 disk paths (-d)\n"
    assert os.listdir(chain.repo_dir) == [] and chain.vm.bitmaps(0) == ()
    assert not chain.log.exists()  # refused before anything, even the log


def _bitmap_flags(path: Path) -> dict[str, list[str]]:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", str(path)],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    found = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {b["name"]: b["flags"] for b in found}


def _bitmaps_extension(header: bytes) -> int:
    """The offset of a qcow2 v3 header's bitmaps extension."""
    offset = struct.unpack(">I", header[100:104])[0]  # v3: extensions after the header
    while True:
        kind, length = struct.unpack(">II", header[offset : offset + 8])
        if kind == 0x23852875:
            return offset
        assert kind != 0, "no bitmaps extension"
        offset += 8 + ((length + 7) & ~7)


def _lose_bitmap_directory(path: Path) -> None:
    """Point the bitmap directory past the end of the file: QEMU then opens the image for
    nothing, not even ``qemu-img check`` or ``convert``."""
    with path.open("r+b") as image:
        extension = _bitmaps_extension(image.read(4096))
        image.seek(extension + 8 + 16)
        image.write(struct.pack(">Q", 1 << 40))


def _lose_bitmap_tables(path: Path) -> None:
    """Point every bitmap's table past the end of the file, as a torn write of the bitmap
    directory would: ``qemu-img check`` then reports the image corrupt."""
    with path.open("r+b") as image:
        header = image.read(4096)
        extension = _bitmaps_extension(header)
        count, _, _, directory = struct.unpack(">IIQQ", header[extension + 8 : extension + 32])
        image.seek(directory)
        for _ in range(count):
            entry = image.tell()
            fields = struct.unpack(">QIIBBHI", image.read(24))
            image.seek(entry)
            image.write(struct.pack(">Q", 1 << 40))
            # The entry: 24 bytes, extra data, the name, padded to 8 bytes.
            image.seek(entry + ((24 + fields[6] + fields[5] + 7) & ~7))


@pytest.mark.parametrize("damage", ["qemu-killed", "bitmap-tables-lost"])
def test_a_stopped_vm_with_a_damaged_parent_bitmap_is_backed_up_in_full(
    chain: Chain, damage: str
) -> None:
    # Field reports (virtnbdbackup 225, 237, 266; Launchpad 1814418): a QEMU killed while it
    # had the image open leaves its bitmaps flagged in use; a torn bitmap directory makes
    # qemu-img check fail. Either way the next backup is a full that says so, the damaged
    # bitmap is gone, the data is intact, and the chain goes on from the new bitmap.
    vm = chain.vm
    vm.write(0, 0, 2 * MiB, pattern=0x51)
    vm.stop()
    _offline(chain, "full")
    parent = chain.bitmaps[-1]
    if damage == "qemu-killed":
        vm.start()
        vm.write(0, 4 * MiB, MiB, pattern=0x52)
        vm.kill()
        assert "in-use" in _bitmap_flags(vm.disks[0].path)[parent]
    else:
        _lose_bitmap_tables(vm.disks[0].path)
        check = subprocess.run(["qemu-img", "check", str(vm.disks[0].path)], check=False,
                               capture_output=True)  # fmt: skip
        assert check.returncode != 0
    _, path = _offline(chain, "incremental")
    manifest = read_manifest(chain.repo_dir / path)
    assert manifest is not None and manifest.fallback and manifest.mode == "full"
    verify_backup(chain.lab, chain.repo_dir, path, vm, _truth(vm))
    for disk in (0, 1):
        assert _bitmap_flags(vm.disks[disk].path) == {chain.bitmaps[-1]: ["auto"]}
    vm.start()
    vm.write(1, 0, MiB, pattern=0x53)
    vm.stop()
    _, path = _offline(chain, "incremental")
    manifest = read_manifest(chain.repo_dir / path)
    assert manifest is not None and not manifest.fallback and manifest.mode == "incremental"
    verify_backup(chain.lab, chain.repo_dir, path, vm, _truth(vm))
    assert leaks(chain.lab) == []


def test_a_stopped_vm_whose_disk_qemu_cannot_open_fails_clearly_and_loses_nothing(
    chain: Chain,
) -> None:
    # A bitmap directory so broken that no QEMU tool opens the image (not check, not
    # convert; the VM cannot start either): one line naming the disk and QEMU's reason,
    # exit 1, and the earlier backup, the other disk and the repository untouched.
    vm = chain.vm
    vm.write(0, 0, 2 * MiB, pattern=0x54)
    vm.stop()
    _, full = _offline(chain, "full")
    _lose_bitmap_directory(vm.disks[0].path)
    before = sorted(os.listdir(chain.repo_dir / vm.name))
    other = hashlib.sha256(vm.disks[1].path.read_bytes()).hexdigest()
    run, _ = chain.backup("incremental", disks=_disks(vm), expect_exit=1)
    assert len(run.stdout.splitlines()) == 1, run.stdout
    assert str(vm.disks[0].path) in run.stdout and "constraints" in run.stdout, run.stdout
    assert sorted(os.listdir(chain.repo_dir / vm.name)) == before
    assert hashlib.sha256(vm.disks[1].path.read_bytes()).hexdigest() == other
    assert vm.bitmaps(1) == (chain.bitmaps[-1],)
    for file in disk_files(chain.repo_dir, full, vm):
        assert qemu_img.check(file).clean
    assert leaks(chain.lab) == []
