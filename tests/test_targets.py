"""How a backup's files are written (``shim/targets.py``): compressed qcow2 and a cap on
the rate, through every writer (QEMU's push job, the storage daemon's jobs, qemu-img
convert), end to end on the lab. Restores are compared with the disks (qemu-img compare)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import qemu_img, settings
from shim.errors import UsageError
from shim.pull import DEFAULT_SCRATCH, SCRATCH_ENV
from shim.targets import MiB, Targets, compression_type, parse_bandwidth, targets_for
from shim.versions import PUSH_CAP_REFUSED_BY
from shim.virt import host
from tests.lab import Lab, LabVM
from tests.lab.leaks import leaks
from tests.support import Chain, build_argv, disk_files, repo_values, run_dropin, verify_backup

DATA = 16 * MiB
"""Written to the first disk before each full: one byte repeated, so it compresses to
almost nothing (what a compressed file holds is then plain)."""
COMPRESSED_AT_MOST = DATA // 4
"""What a compressed file of :data:`DATA` holds at most: its data stores in a few KiB, a
full's metadata in about 2 MiB (four clusters of 512 KiB); uncompressed, at least DATA."""


def test_options_for_each_writer() -> None:
    targets = Targets(compression="zstd", rate=8 * MiB)
    assert targets.create_options(full=False) == ("compression_type=zstd",)
    assert targets.create_options(full=True) == ("compression_type=zstd", "cluster_size=524288")
    assert targets.convert_options() == ["-c", "-W", "-m", "8", "-r", str(8 * MiB)]
    assert targets.daemon_objects == (f"throttle-group,id=nasbackup-cap,x-bps-write={8 * MiB}",)
    assert targets.file_node("f")["file"] == {"driver": "file", "filename": "f"}
    assert targets.job_options == {"compress": True}
    assert targets.share(2) == 4 * MiB
    assert Targets().convert_options() == [] and Targets().job_options == {}
    assert Targets().daemon_objects == ()
    assert Targets().create_options(full=True) == ()


def test_bandwidth_values() -> None:
    assert parse_bandwidth("50", "-b") == 50
    assert parse_bandwidth("0", "-b") is None
    for bad in ("", "-1", "1.5", "50M", "٣", "9" * 10):
        with pytest.raises(UsageError):
            parse_bandwidth(bad, "-b")


def test_the_request_wins_over_the_host_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.COMPRESS.name, "true")
    monkeypatch.setenv(settings.BANDWIDTH.name, "20")
    assert targets_for(None, None) == Targets(compression_type(), 20 * MiB)
    assert targets_for(False, 0) == Targets()
    monkeypatch.setenv(settings.COMPRESS.name, "zlib")  # where Debian 11 hosts restore
    assert targets_for(None, None).compression == targets_for(True, 0).compression == "zlib"
    assert targets_for(False, None).compression is None
    monkeypatch.setenv(settings.COMPRESS.name, "yes")
    with pytest.raises(UsageError, match=settings.COMPRESS.name):
        targets_for(None, None)


def test_zstd_where_qemu_writes_it(tmp_path: Path) -> None:
    """Debian 11's QEMU was built without zstd: zlib there, zstd on every later release."""
    image = tmp_path / "probe.qcow2"
    try:
        qemu_img.create(image, MiB, options=("compression_type=zstd",))
    except Exception:
        assert compression_type() == "zlib"
    else:
        assert compression_type() == "zstd"


# -- end to end ----------------------------------------------------------------------------


@pytest.fixture
def compressed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compression as the host's setting (the drop-ins started by the test inherit it)."""
    monkeypatch.setenv(settings.COMPRESS.name, "true")


@pytest.fixture
def scratch(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Pull mode through a scratch directory of the test's own."""
    path = Path(tempfile.mkdtemp(prefix="scratch.", dir="/tmp"))
    monkeypatch.setenv(SCRATCH_ENV, str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _stored(chain: Chain, path: str, vm: LabVM) -> list[int]:
    """The bytes each disk's new file holds (its blocks, not its virtual size)."""
    files = [f for f in disk_files(chain.repo_dir, path, vm) if f.exists()]
    return [os.stat(f).st_blocks * 512 for f in files]


def _chain_checked(chain: Chain, *, offline: bool = False) -> None:
    """A full then an incremental, each restored identical (qemu-img convert, as the Java
    restore) and stored compressed: clusters and header."""
    vm = chain.vm
    disks = ",".join(str(d.path) for d in vm.disks) if offline else ""
    _write(vm, 0, DATA, 0x5A, offline=offline)
    for mode in ("full", "incremental"):
        run, path = chain.backup(mode, disks=disks)
        refs = [d.path for d in vm.disks] if offline else vm.reference_backup()
        verify_backup(chain.lab, chain.repo_dir, path, vm, refs)
        for file in disk_files(chain.repo_dir, path, vm):
            info = qemu_img.info(file).raw
            assert info["format-specific"]["data"]["compression-type"] == compression_type()
            # A full's clusters are large (few writes to the NAS); an incremental's are not.
            assert info["cluster-size"] == (512 * 1024 if mode == "full" else 64 * 1024), mode
        assert max(_stored(chain, path, vm)) < COMPRESSED_AT_MOST, run.stdout
        _write(vm, 4 * MiB, 4 * MiB, 0x6B, offline=offline)
    # The shim's own verify and restore read the incremental's chain through the gate.
    values = {"operation": "verify", **repo_values(chain.repo), "path": path}
    verified = run_dropin(build_argv("", values, "verify"), log_file=chain.log)
    assert verified.returncode == 0 and verified.stdout.startswith("ok "), verified.stdout
    file = disk_files(chain.repo_dir, path, vm)[0]
    volume = chain.lab.new_dir("restored") / "volume"
    qemu_img.create(volume, vm.disks[0].size, fmt="raw")
    values = {
        "operation": "restore",
        "path": path,
        "backup_files": file.name,
        "restore_paths": str(volume),
        **repo_values(chain.repo),
    }
    restored = run_dropin(build_argv("", values, "restore"), log_file=chain.log)
    assert restored.returncode == 0, restored.stdout
    assert qemu_img.compare(volume, refs[0], first_fmt="raw")
    assert leaks(chain.lab) == []


def _write(vm: LabVM, offset: int, length: int, pattern: int, *, offline: bool) -> None:
    """Write to the first disk; a stopped VM is started for it, and stopped again."""
    if offline and not vm.is_running():
        vm.start()
    vm.write(0, offset, length, pattern=pattern)
    if offline:
        vm.stop()


@pytest.mark.lab
@pytest.mark.live_backup
def test_compressed_running_vm_goes_pull_through_the_default_scratch(
    chain: Chain, compressed: None
) -> None:
    """QEMU's push job cannot compress: with no scratch directory set, the default one."""
    _chain_checked(chain)
    log = chain.log.read_text()
    assert f"pull through {DEFAULT_SCRATCH}/{chain.vm.name}" in log
    assert not (DEFAULT_SCRATCH / chain.vm.name).exists()


@pytest.mark.lab
@pytest.mark.live_backup
def test_compressed_pull_through_the_set_scratch(
    chain: Chain, compressed: None, scratch: Path
) -> None:
    _chain_checked(chain)
    assert f"pull through {scratch}/{chain.vm.name}" in chain.log.read_text()
    assert list(scratch.iterdir()) == []


@pytest.mark.lab
def test_compressed_stopped_vm(chain: Chain, compressed: None) -> None:
    _chain_checked(chain, offline=True)


@pytest.mark.lab
@pytest.mark.live_backup
def test_c_and_b_on_the_command_line(chain: Chain) -> None:
    """The proposal's flags: ``-c`` alone (or ``-c true``) and ``-b MiB/s``."""
    chain.vm.write(0, 0, DATA, pattern=0x5A)
    argv, path, bitmap = chain.argv("full")
    run = run_dropin([*argv, "-c", "-b", "1000"], log_file=chain.log)
    assert run.returncode == 0, run.stdout + run.stderr
    chain.record("full", path, bitmap)
    assert max(_stored(chain, path, chain.vm)) < COMPRESSED_AT_MOST
    assert "capped at 1000 MiB/s" in chain.log.read_text()
    argv, path, bitmap = chain.argv("full")
    run = run_dropin([*argv, "-c", "false"], log_file=chain.log)
    assert run.returncode == 0, run.stdout + run.stderr
    assert max(_stored(chain, path, chain.vm)) >= DATA


# -- the cap -------------------------------------------------------------------------------

CAP_MIB = 4
"""The cap the tests set: the copy of :data:`DATA` then takes about 4 s, uncapped well
under one (a lower bound is the behaviour proved, never a speed)."""


def _capped_seconds(chain: Chain, mode: str = "full", *, offline: bool = False) -> float:
    disks = ",".join(str(d.path) for d in chain.vm.disks) if offline else ""
    started = time.monotonic()
    chain.backup(mode, disks=disks)
    return time.monotonic() - started


@pytest.fixture
def capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.BANDWIDTH.name, str(CAP_MIB))


def _at_most_the_cap(seconds: float, data: int = DATA) -> None:
    # QEMU lets a first slice through at once: three quarters of the copy's time at least.
    assert seconds >= 0.75 * data / (CAP_MIB * MiB), f"{data} bytes copied in {seconds:.2f} s"


@pytest.mark.lab
@pytest.mark.live_backup
def test_a_capped_running_vm_goes_pull(chain: Chain, capped: None) -> None:
    chain.vm.write(0, 0, DATA)
    _at_most_the_cap(_capped_seconds(chain))
    assert f"pull through {DEFAULT_SCRATCH}/{chain.vm.name}" in chain.log.read_text()


PUSH_IN_FLIGHT = 64 * MiB
"""What QEMU's push job has in flight before libvirt lets the cap apply (64 requests of up
to 1 MiB): it lands uncapped."""


@pytest.mark.lab
@pytest.mark.live_backup
def test_push_is_capped_when_forced(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.METHOD.name, "push")
    monkeypatch.setenv(settings.BANDWIDTH.name, str(8 * CAP_MIB))
    vm = lab.create_vm(disks=(192 * MiB,))
    chain = Chain(lab=lab, vm=vm, repo=lab.repository(), log=lab.dir / "agent.log")
    data = 160 * MiB
    vm.write(0, 0, data)
    seconds = _capped_seconds(chain)
    log = chain.log.read_text()
    assert f"capped at {8 * CAP_MIB} MiB/s" in log and "pull through" not in log
    if host.libvirt_version(lab.conn) >= PUSH_CAP_REFUSED_BY:
        # This libvirt refuses a push job a speed: said, and the backup taken.
        assert "refuses a speed for a push backup's jobs" in log
        return
    # Half the capped time at least: the cap may land a few tens of MiB after the job began.
    assert seconds >= 0.5 * (data - PUSH_IN_FLIGHT) / (8 * CAP_MIB * MiB), (seconds, log)


@pytest.mark.lab
@pytest.mark.live_backup
def test_pull_full_and_incremental_are_capped(chain: Chain, capped: None, scratch: Path) -> None:
    chain.vm.write(0, 0, DATA)
    _at_most_the_cap(_capped_seconds(chain))
    chain.vm.write(0, 0, DATA, pattern=0x11)
    _at_most_the_cap(_capped_seconds(chain, "incremental"))


@pytest.mark.lab
def test_stopped_vm_is_capped(chain: Chain, capped: None) -> None:
    chain.vm.write(0, 0, DATA)
    chain.vm.stop()
    _at_most_the_cap(_capped_seconds(chain, "full", offline=True))


@pytest.mark.lab
def test_an_unknown_method_setting_is_refused_before_anything(
    chain: Chain, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(settings.METHOD.name, "fast")
    argv, _path, _bitmap = chain.argv("full")
    run = run_dropin(argv, log_file=chain.log)
    assert (run.returncode, run.stdout) == (
        1,
        "NASBACKUP_SHIM_METHOD is auto, push or pull, not 'fast'\n",
    )
    assert not (chain.repo_dir / chain.vm.name).exists()
