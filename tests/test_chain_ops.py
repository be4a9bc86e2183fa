"""Chain operations through the drop-in: delete, rebase, restore, verify, stats."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from shim import qemu_img
from shim.compat import strict_zip
from shim.manifest import MANIFEST
from tests.lab import Lab, MiB, compare, flatten
from tests.lab.flakyfs import FAIL_FSYNC_FLAG
from tests.lab.leaks import leaks
from tests.lab.system import descendants_running
from tests.support import (
    DROPIN,
    Chain,
    break_refcount,
    build_argv,
    disk_files,
    repo_values,
    run_dropin,
)

pytestmark = pytest.mark.lab


def _op(chain: Chain, operation: str, **values: str) -> subprocess.CompletedProcess[str]:
    argv = build_argv("", {"operation": operation, **repo_values(chain.repo), **values}, operation)
    run = run_dropin(argv, log_file=chain.log)
    return subprocess.CompletedProcess(argv, run.returncode, run.stdout, run.stderr)


def _three_deep(chain: Chain) -> list[list[Path]]:
    """full, incremental, incremental of a two-disk VM; the reference after each."""
    refs = []
    for k, mode in enumerate(["full", "incremental", "incremental"]):
        chain.vm.write(0, k * 4 * MiB, 2 * MiB, pattern=0x50 + k)
        chain.vm.write(1, k * MiB, 1 * MiB, pattern=0x60 + k)
        if k:
            chain.vm.write_zeroes(0, 0, 1 * MiB)
        chain.backup(mode)
        refs.append(chain.vm.reference_backup())
    return refs


def _restores(chain: Chain, backup: str, refs: list[Path]) -> bool:
    for file, ref in strict_zip(disk_files(chain.repo_dir, backup, chain.vm), refs):
        flat = chain.lab.dir / "flat.qcow2"
        flatten(file, flat)
        same = compare(flat, ref)
        flat.unlink()
        if not same:
            return False
    return True


def _restores_into(volumes: list[Path], refs: list[Path]) -> bool:
    return all(
        qemu_img.compare(ref, volume, second_fmt="raw") for volume, ref in strict_zip(volumes, refs)
    )


@pytest.mark.live_backup
def test_delete_middle_after_rebase_keeps_every_point(chain: Chain) -> None:
    refs = _three_deep(chain)
    first, middle, last = chain.backups
    refused = _op(chain, "delete", path=middle)
    assert refused.returncode == 1
    assert Path(last).name in refused.stdout and "refusing" in refused.stdout
    assert (chain.repo_dir / middle).is_dir()
    # The seed generation's repair: rebase the child onto the grandparent, then delete.
    done = _op(chain, "rebase", rebase_target=last, rebase_new_backing=first)
    assert (done.returncode, done.stdout) == (0, "")
    for file in disk_files(chain.repo_dir, last, chain.vm):
        assert qemu_img.info(file).backing_filename == f"../{Path(first).name}/{file.name}"
    done = _op(chain, "delete", path=middle)
    assert (done.returncode, done.stdout) == (0, "")
    assert sorted(os.listdir(chain.repo_dir / chain.vm.name)) == sorted(
        [Path(first).name, Path(last).name]
    )
    assert _restores(chain, first, refs[0]) and _restores(chain, last, refs[2])
    verified = _op(chain, "verify", path=last)
    assert verified.returncode == 0, verified.stdout
    assert len(verified.stdout.splitlines()) == 4  # two disks, two files each in the chain
    # Deleting what is gone is success; the next incremental continues from the last.
    assert _op(chain, "delete", path=middle).returncode == 0
    chain.vm.write(0, 0, 1 * MiB, pattern=0x77)
    run, _ = chain.backup("incremental")
    assert "INCREMENTAL_FALLBACK" not in run.stdout
    assert leaks(chain.lab) == []


@pytest.mark.live_backup
def test_delete_refusals(chain: Chain) -> None:
    chain.backup("full")
    for path, message in [
        (chain.vm.name, "must name a backup directory"),
        ("../x/y", "may not contain '..'"),
        ("/etc/x", "must be relative"),
    ]:
        done = _op(chain, "delete", path=path)
        assert done.returncode == 1 and message in done.stdout
    assert (chain.repo_dir / chain.backups[0]).is_dir()


@pytest.mark.live_backup
def test_rebase_refusals(chain: Chain) -> None:
    _three_deep(chain)
    first, _middle, last = chain.backups
    loop = _op(chain, "rebase", rebase_target=first, rebase_new_backing=last)
    assert loop.returncode == 1 and "loop" in loop.stdout
    other = _op(chain, "rebase", rebase_target=last, rebase_new_backing=f"i-2-9-VM/{first}")
    assert other.returncode == 1 and "different VMs" in other.stdout
    root = disk_files(chain.repo_dir, first, chain.vm)[0].name
    mixed = _op(chain, "rebase", rebase_target=last, rebase_new_backing=f"{first}/{root}")
    assert mixed.returncode == 1 and "two existing backup" in mixed.stdout


@pytest.mark.live_backup
def test_rebase_killed_half_way_leaves_the_chain_valid(lab: Lab, tmp_path: Path) -> None:
    vm = lab.create_vm(disks=(1024 * MiB,))
    chain = Chain(lab=lab, vm=vm, repo=lab.repository(), log=tmp_path / "agent.log")
    chain.backup("full")
    vm.write(0, 0, 512 * MiB, pattern=0x11)
    chain.backup("incremental")
    vm.write(0, 512 * MiB, 4 * MiB, pattern=0x22)
    chain.backup("incremental")
    truth = vm.reference_backup()
    first, _middle, last = chain.backups
    top = disk_files(chain.repo_dir, last, vm)[0]
    before = top.stat().st_size
    argv = build_argv(
        "",
        {
            "operation": "rebase",
            **repo_values(chain.repo),
            "rebase_target": last,
            "rebase_new_backing": first,
        },
        "rebase",
    )
    env = {**os.environ, "NASBACKUP_SHIM_LOG": str(chain.log)}
    rebase = subprocess.Popen([str(DROPIN), *argv], stdout=subprocess.PIPE, text=True, env=env)
    # Kill qemu-img once it has copied part of the removed layer into the top file.
    deadline = time.monotonic() + 60
    killed = False
    while not killed and time.monotonic() < deadline and rebase.poll() is None:
        pids = descendants_running("rebase")
        qemu = [p for p in pids if b"qemu-img" in Path(f"/proc/{p}/cmdline").read_bytes()]
        if qemu and top.stat().st_size > before + 64 * MiB:
            os.kill(qemu[0], signal.SIGKILL)
            killed = True
        time.sleep(0.005)
    out, _ = rebase.communicate(timeout=60)
    assert killed, "qemu-img finished before it could be killed half-way"
    assert rebase.returncode == 1, out
    assert top.stat().st_size > before  # half-way: data copied, pointer not yet moved
    assert qemu_img.info(top).backing_filename.startswith(f"../{Path(chain.backups[1]).name}/")
    assert qemu_img.check(top).corruptions == 0
    assert _restores(chain, last, truth)
    assert leaks(lab) == []
    # Run again: it completes, and the chain is sound end to end.
    assert _op(chain, "rebase", rebase_target=last, rebase_new_backing=first).returncode == 0
    assert _restores(chain, last, truth)
    assert _op(chain, "verify", path=last).returncode == 0


@pytest.mark.live_backup
def test_restore_into_qcow2_raw_and_block_volumes(chain: Chain, tmp_path: Path) -> None:
    refs = _three_deep(chain)
    backup = chain.backups[-1]
    volumes = chain.lab.new_dir("restored")
    qcow2_volume = volumes / "vol-qcow2"
    qemu_img.create(qcow2_volume, 32 * MiB)
    subprocess.run(["qemu-img", "bitmap", "--add", str(qcow2_volume), "stale"], check=True)
    raw_volume = volumes / "vol-raw"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "raw", str(raw_volume), str(16 * MiB)], check=True
    )
    raw_volume.chmod(0o640)
    done = _op(
        chain,
        "restore",
        path=backup,
        vm=chain.vm.name,
        restore_paths=f"{qcow2_volume},{raw_volume}",
    )
    assert done.returncode == 0, done.stdout
    assert done.stdout == f"{qcow2_volume} {32 * MiB}\n{raw_volume} {16 * MiB}\n"
    assert compare(qcow2_volume, refs[2][0])
    assert qemu_img.compare(refs[2][1], raw_volume, second_fmt="raw")
    assert qemu_img.info(qcow2_volume).bitmaps == ()  # the next backup is a full
    assert qemu_img.info(raw_volume).format == "raw" and raw_volume.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(volumes)) == ["vol-qcow2", "vol-raw"]  # no staging file left
    # A block device volume (written in place after the chain was checked).
    device_file = volumes / "device"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "raw", str(device_file), str(40 * MiB)], check=True
    )
    small = volumes / "small"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(small), str(8 * MiB)], check=True)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(device_file)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Named by a symlink, as Linstor (/dev/drbd/by-res/...), LVM and /dev/disk/by-id name
    # devices: written, compared and flushed through it.
    named = volumes / "by-res" / "cs-7d2c" / "0"
    named.parent.mkdir(parents=True)
    named.symlink_to(loop)
    try:
        first = chain.backups[0]
        root = disk_files(chain.repo_dir, first, chain.vm)[0].name
        done = _op(chain, "restore", path=first, backup_files=root, restore_paths=str(named))
        assert done.returncode == 0, done.stdout
        assert qemu_img.compare(
            refs[0][0],
            f'json:{{"driver":"raw","size":{32 * MiB},'
            f'"file":{{"driver":"host_device","filename":"{loop}"}}}}',
            second_fmt=None,
        )
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    assert leaks(chain.lab) == []


@pytest.mark.live_backup
def test_restore_refusals_leave_volumes_untouched(chain: Chain) -> None:
    refs = _three_deep(chain)
    backup = chain.backups[-1]
    running = [str(d.path) for d in chain.vm.disks]
    done = _op(chain, "restore", path=backup, restore_paths=",".join(running))
    assert done.returncode == 1 and "running VM" in done.stdout
    spare = chain.lab.new_dir("vols") / "vol"
    qemu_img.create(spare, 32 * MiB)
    original = spare.read_bytes()
    mismatch = _op(chain, "restore", path=backup, restore_paths=str(spare))
    assert mismatch.returncode == 1 and "2 backup file(s) for 1 target" in mismatch.stdout
    # A corrupted parent: the chain fails its check before anything is written.
    middle = disk_files(chain.repo_dir, chain.backups[1], chain.vm)[0]
    with open(middle, "r+b") as fh:
        fh.seek(0x30)  # l1 table offset: point it into nowhere
        fh.write((1 << 40).to_bytes(8, "big"))
    root = disk_files(chain.repo_dir, backup, chain.vm)[0].name
    broken = _op(chain, "restore", path=backup, backup_files=root, restore_paths=str(spare))
    assert broken.returncode == 1
    assert spare.read_bytes() == original
    # The refusals harmed no backup: the full, below the corrupted file, still restores
    # identical to the VM as it was then.
    assert _restores(chain, chain.backups[0], refs[0])
    assert leaks(chain.lab) == []


@pytest.mark.live_backup
def test_a_later_disk_failing_its_check_leaves_every_volume_as_it_was(chain: Chain) -> None:
    # The chains are checked while the first disk is copied beside its volume: that copy is
    # made and compared, but no volume is replaced before every chain has passed its check.
    _three_deep(chain)
    break_refcount(disk_files(chain.repo_dir, chain.backups[1], chain.vm)[1])
    volumes_dir = chain.lab.new_dir("vols")
    volumes = []
    for k, disk in enumerate(chain.vm.disks):
        volume = volumes_dir / f"{k}0c9a1c3e-8d1a-4a4b-9a5e-1f2e3d4c5b6a"
        qemu_img.create(volume, disk.size)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {0x30 + k} 0 1M", str(volume)],
                       check=True, capture_output=True)  # fmt: skip
        volumes.append(volume)
    before = [v.read_bytes() for v in volumes]
    broken = _op(chain, "restore", path=chain.backups[-1],
                 restore_paths=",".join(map(str, volumes)))  # fmt: skip
    assert broken.returncode == 1
    assert f"[{volumes[1].name}] is corrupt" in broken.stdout, broken.stdout
    assert [v.read_bytes() for v in volumes] == before
    assert sorted(volumes_dir.iterdir()) == volumes  # no staged copy left beside them
    assert "fails qemu-img check" in chain.log.read_text()
    assert leaks(chain.lab) == []


@pytest.mark.live_backup
def test_a_restore_is_on_stable_storage_before_it_replaces_the_volume(chain: Chain) -> None:
    # qemu-img convert leaves its target's data in the page cache: the restore flushes the
    # copy before the rename, and a flush that fails (writes succeeded) fails the restore,
    # the volume as it was. Raw volumes: creating one flushes nothing that could fail first.
    _three_deep(chain)
    nas = chain.lab.flaky_repository()
    volumes = []
    for k, disk in enumerate(chain.vm.disks):
        volume = Path(nas.repository.address) / f"{k}0c9a1c3e-8d1a-4a4b-9a5e-1f2e3d4c5b6a"
        volume.write_bytes(bytes([0x40 + k]) * disk.size)
        volumes.append(volume)
    nas.fail_fsync()
    failed = _op(chain, "restore", path=chain.backups[-1],
                 restore_paths=",".join(map(str, volumes)))  # fmt: skip
    assert failed.returncode == 1
    assert f"backup volume [{volumes[0].name}]" in failed.stdout, failed.stdout
    for k, volume in enumerate(volumes):
        assert volume.read_bytes() == bytes([0x40 + k]) * chain.vm.disks[k].size
    left = {p.name for p in volumes[0].parent.iterdir()} - {FAIL_FSYNC_FLAG}
    assert left == {v.name for v in volumes}  # the unflushed copy removed
    nas.heal()
    done = _op(chain, "restore", path=chain.backups[-1],
               restore_paths=",".join(map(str, volumes)))  # fmt: skip
    assert done.returncode == 0, done.stdout
    assert _restores_into(volumes, chain.vm.reference_backup())
    assert leaks(chain.lab) == []


@pytest.mark.live_backup
def test_verify_catches_flips_missing_manifests_and_absolute_links(chain: Chain) -> None:
    _three_deep(chain)
    first, middle, last = chain.backups
    ok = _op(chain, "verify", path=last)
    assert ok.returncode == 0
    assert all(line.startswith("ok ") for line in ok.stdout.splitlines())
    # A flipped byte in the data of a parent: the checksum says so.
    data_file = disk_files(chain.repo_dir, middle, chain.vm)[1]
    with open(data_file, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))
    flipped = _op(chain, "verify", path=last)
    assert flipped.returncode == 1 and "checksum differs" in flipped.stdout
    with open(data_file, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        fh.write(byte)
    assert _op(chain, "verify", path=last).returncode == 0
    # No manifest: an incomplete backup.
    manifest = chain.repo_dir / first / MANIFEST
    saved = manifest.read_bytes()
    manifest.unlink()
    missing = _op(chain, "verify", path=last)
    assert missing.returncode == 1 and "no manifest" in missing.stdout
    manifest.write_bytes(saved)
    # An absolute backing path (the script upstream never writes one, but a hand would).
    top = disk_files(chain.repo_dir, last, chain.vm)[0]
    parent = disk_files(chain.repo_dir, middle, chain.vm)[0]
    subprocess.run(
        [
            "qemu-img",
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            str(parent.resolve()),
            str(top),
        ],
        check=True,
    )
    absolute = _op(chain, "verify", path=last)
    assert absolute.returncode == 1 and "absolute backing path" in absolute.stdout


def test_stats_prints_df_figures(lab: Lab, tmp_path: Path) -> None:
    # A quiet filesystem of its own, so that df and the shim see the same figures.
    vm = lab.create_vm(disks=(8 * MiB,), start=False)
    chain = Chain(lab=lab, vm=vm, repo=lab.repository(size=64 * MiB), log=tmp_path / "a.log")
    (Path(chain.repo.address) / "data").write_bytes(b"x" * 3 * MiB)
    done = _op(chain, "stats")
    assert done.returncode == 0
    mount_point, sizes = done.stdout.splitlines()
    assert Path(mount_point).name.startswith("csbackup.") and not Path(mount_point).exists()
    df = (
        subprocess.run(["df", "-P", chain.repo.address], capture_output=True, text=True, check=True)
        .stdout.splitlines()[1]
        .split()
    )
    assert sizes.split() == [df[1], df[2]]
    assert leaks(chain.lab) == []
