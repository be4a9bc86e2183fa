"""End to end on a real guest: a booted Linux with qemu-guest-agent (see tests/lab/guest.py).

What no empty TCG machine can show: a VM paused by its own write failing on a full NAS,
filesystems frozen through the agent, a guest writing while it is backed up, and a restored
disk that a guest mounts and reads. One guest is booted for the module; tests that leave it
unusable (an agent stopped for good) boot their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from shim import qemu_img
from shim.pull import SCRATCH_ENV
from tests.lab import Lab, MiB, compare, flatten, system
from tests.lab.chains import InFlight, Run, disk_files
from tests.lab.guest import Guest, SequenceCut, SequenceWriter, boot_guest
from tests.lab.guest_image import DD, FREEZE_LOG, SLOW_FREEZE_FLAG
from tests.lab.lab import FlakyNas, start_libvirtd_if_down, sweep_stale_labs
from tests.lab.leaks import leaks
from tests.support import Chain

DATA_DISK = 1
"""vdb: the raw-used data volume (vda holds the ext4 filesystem)."""


@pytest.fixture(scope="module")
def guest_lab() -> Iterator[Lab]:
    """One lab for the module's guests."""
    sweep_stale_labs()
    with Lab() as lab:
        yield lab
    assert not start_libvirtd_if_down(), "libvirtd died during the guest tests"


@pytest.fixture(scope="module")
def guests(guest_lab: Lab) -> tuple[Guest, Guest]:
    """The module's guest, and a spare one for a test that ruins its agent: booted side by
    side (their boots overlap)."""
    booting = [boot_guest(guest_lab, wait=False), boot_guest(guest_lab, (8 * MiB,), wait=False)]
    started = time.monotonic()
    for booted in booting:
        booted.wait_ready()
    print(f"guests booted side by side in {time.monotonic() - started:.1f} s")
    return booting[0], booting[1]


@pytest.fixture(scope="module")
def guest(guests: tuple[Guest, Guest]) -> Guest:
    """The module's guest, with 16 MiB of data on its raw disk for backups to copy."""
    booted = guests[0]
    booted.run("dd if=/dev/urandom of=/dev/vdb bs=1M count=16 2>/dev/null && sync")
    return booted


@pytest.fixture
def healthy(guest: Guest) -> Iterator[Guest]:
    """The module's guest, checked running, answering and thawed before and after a test."""
    assert guest.vm.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert guest.freeze_status() == "thawed"
    yield guest
    if guest.vm.is_paused():  # a failed test must not take the module's guest with it
        guest.vm.resume()
    assert guest.vm.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert guest.freeze_status() == "thawed"


def _restored(lab: Lab, file: Path) -> Path:
    """The file's chain flattened (as the Java restore does), in the lab."""
    out = lab.dir / f"restored-{time.monotonic_ns()}.qcow2"
    return flatten(file, out)


def _raw(lab: Lab, image: Path) -> Path:
    out = lab.dir / f"raw-{time.monotonic_ns()}.img"
    qemu_img.convert(image, out, target_fmt="raw")
    return out


def _fsck(lab: Lab, image: Path) -> subprocess.CompletedProcess[str]:
    """``e2fsck -n`` of the ext4 filesystem in ``image`` (read-only: it changes nothing)."""
    return subprocess.run(
        ["e2fsck", "-n", "-f", str(_raw(lab, image))], capture_output=True, text=True, check=False
    )


def _md5_in(lab: Lab, image: Path, name: str) -> str:
    """The md5 of ``/<name>`` in the ext4 filesystem of ``image`` (empty when absent),
    read on the host with debugfs."""
    dumped = lab.dir / f"dumped-{time.monotonic_ns()}"
    subprocess.run(
        ["debugfs", "-R", f"dump /{name} {dumped}", str(_raw(lab, image))],
        capture_output=True, check=False,
    )  # fmt: skip
    if not dumped.exists():
        return ""
    return hashlib.md5(dumped.read_bytes()).hexdigest()  # noqa: S324 - the guest's md5sum


# -- 1. the NAS fills while the guest writes ------------------------------------------------
def _failing_full(chain: Chain, nas: FlakyNas, guest: Guest, log: Path) -> tuple[int, str]:
    """A full backup during which the NAS fills while the guest overwrites its raw disk
    (areas not yet copied: each write waits for its copy-before-write); returns the exit
    code and stdout."""
    # Data for the job to copy, whatever earlier tests left on the disk, in the half the
    # guest's writes below do not zero before the job starts (QEMU 6.2's guest does): the
    # job lasts while the guest writes and the NAS fills.
    guest.run(f"{DD} if=/dev/urandom of=/dev/vdb bs=1M seek=16 count=16 oflag=direct")
    nas.throttle(1_000_000)  # the job lasts, so the guest's writes meet it
    guest.spawn(
        "rm -f /run/w.stop /run/w.done; while [ ! -e /run/w.stop ]; do "
        f"{DD} if=/dev/zero of=/dev/vdb bs=64k count=256 oflag=direct 2>/dev/null; done; "
        "touch /run/w.done"
    )
    try:
        in_flight = chain.start("full", log)
        in_flight.wait_for("backup job of")
        time.sleep(1)
        nas.fill()
        run = in_flight.finish()
    finally:
        guest.run("touch /run/w.stop")
    return run.returncode, run.stdout


@pytest.mark.live_backup
@pytest.mark.lab
def test_a_full_nas_pauses_the_guest_and_the_failed_backup_resumes_it(
    guest_lab: Lab, healthy: Guest, tmp_path: Path, push_mode: None
) -> None:
    lab, guest = guest_lab, healthy
    nas = lab.flaky_repository()
    chain = Chain(lab=lab, vm=guest.vm, repo=nas.repository, log=tmp_path / "first.log")
    chain.backup("full")
    earlier = _restored(lab, disk_files(chain.repo_dir, chain.backups[0], guest.vm)[DATA_DISK])
    checkpoints = guest.vm.checkpoints()
    qemu = system.qemu_pid(guest.vm.name)

    with guest.watch_pauses() as pauses:
        code, stdout = _failing_full(chain, nas, guest, tmp_path / "failing.log")

    # The guest's own write failed on the full NAS and QEMU paused it (werror=enospc):
    # the failure CloudStack issue 12821 saw last for hours. The backup resumed it.
    assert pauses.io_error_pauses >= 1, "the guest never paused: the test did not happen"
    assert pauses.paused_at is None
    assert guest.vm.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert system.qemu_pid(guest.vm.name) == qemu
    assert stdout.count("\n") == 1
    assert "resumed" in (tmp_path / "failing.log").read_text()
    again = _restored(lab, disk_files(chain.repo_dir, chain.backups[0], guest.vm)[DATA_DISK])
    assert compare(earlier, again), "the earlier backup no longer restores identical"
    nas.heal()
    guest.run("sync")
    if code == 20:
        _after_a_stuck_target(lab, guest, chain, stdout, tmp_path)
        return
    assert code == 1, stdout
    assert "No space left on device" in stdout
    assert leaks(lab) == []
    assert guest.vm.checkpoints() == checkpoints
    assert sorted(p.name for p in (chain.repo_dir / guest.vm.name).iterdir()) == [
        Path(chain.backups[0]).name
    ]
    chain.log = tmp_path / "after.log"
    chain.backup("incremental")
    assert leaks(lab) == []


@contextlib.contextmanager
def _pull_mode(size: str) -> Iterator[Path]:
    """Pull mode for the drop-ins started meanwhile, through a scratch directory on a tmpfs
    of ``size`` (a full local disk on demand)."""
    path = Path(tempfile.mkdtemp(prefix="scratch.", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        with system.environment(SCRATCH_ENV, str(path)):
            yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


@pytest.mark.live_backup
@pytest.mark.lab
def test_in_pull_mode_a_full_nas_fails_the_backup_never_the_guest(
    guest_lab: Lab, healthy: Guest, tmp_path: Path
) -> None:
    """The same fault as above, in pull mode: the guest's writes only ever wait on the
    local scratch, so the VM never pauses; the backup fails in one line and the next one
    succeeds."""
    lab, guest = guest_lab, healthy
    with _pull_mode("64m"):
        nas = lab.flaky_repository()
        chain = Chain(lab=lab, vm=guest.vm, repo=nas.repository, log=tmp_path / "first.log")
        chain.backup("full")
        checkpoints = guest.vm.checkpoints()
        with guest.watch_pauses() as pauses:
            code, stdout = _failing_full(chain, nas, guest, tmp_path / "failing.log")
        assert "pull through" in (tmp_path / "failing.log").read_text()
        assert pauses.io_error_pauses == 0, "the guest paused in pull mode"
        assert (code, stdout.count("\n")) == (1, 1), stdout
        assert "No space left on device" in stdout
        nas.heal()
        assert leaks(lab) == []
        assert guest.vm.checkpoints() == checkpoints
        chain.log = tmp_path / "after.log"
        chain.backup("incremental")
        assert leaks(lab) == []


@pytest.mark.live_backup
@pytest.mark.lab
def test_in_pull_mode_a_full_scratch_fails_the_backup_never_the_guest(
    guest_lab: Lab, healthy: Guest, tmp_path: Path
) -> None:
    """libvirt 9.0's scratch node fails the guest's write when the scratch directory is
    full (QEMU pauses the VM): the shim ends the job at once and resumes the VM, whose write
    is retried and succeeds. The guest sees a stall, never an error."""
    lab, guest = guest_lab, healthy
    nas = lab.flaky_repository()
    chain = Chain(lab=lab, vm=guest.vm, repo=nas.repository, log=tmp_path / "agent.log")
    checkpoints = guest.vm.checkpoints()
    with _pull_mode("4m") as scratch:
        nas.throttle(1_000_000)  # the copy lasts while the guest rewrites its disk
        in_flight = chain.start("full", tmp_path / "failing.log")
        in_flight.wait_for("backup job of")
        with guest.watch_pauses() as pauses:
            # 16 MiB of rewrites of data not yet copied: their old data fills the scratch.
            guest.spawn(
                f"rm -f /run/dd.rc; {DD} if=/dev/urandom of=/dev/vdb bs=64k count=256 "
                "oflag=direct 2>/dev/null; echo $? > /run/dd.rc"
            )
            run = in_flight.finish()
            nas.heal()
            assert _wait_for_file(guest, "/run/dd.rc") == "0", "the guest saw a write fail"
        assert pauses.io_error_pauses >= 1, "the scratch never filled: the test did not happen"
        assert pauses.paused_at is None and sum(pauses.intervals) < 2, pauses.intervals
        assert run.returncode == 1 and "scratch directory" in run.stdout, run.stdout
        assert list(scratch.iterdir()) == []
    assert guest.vm.checkpoints() == checkpoints
    assert leaks(lab) == []
    chain.backup("full")  # push mode again: the NAS healed
    assert leaks(lab) == []


def _wait_for_file(guest: Guest, path: str, seconds: float = 60) -> str:
    """The contents of a file a spawned guest command writes when it ends."""
    deadline = time.monotonic() + seconds
    while True:
        result = guest.run(f"cat {path} 2>/dev/null", check=False)
        if result.out.strip() or time.monotonic() > deadline:
            return result.out.strip()
        time.sleep(0.2)


def _after_a_stuck_target(
    lab: Lab, guest: Guest, chain: Chain, stdout: str, tmp_path: Path
) -> None:
    """QEMU 7.2 kept the failed job's filter, holding the target open (about one run in
    ten; see shim.live.LiveBackup._stuck_target_problem): the VM must stay up, untouched, the
    operator told to restart it, and the next backup refused until then."""
    print("QEMU kept the failed copy-before-write filter: checking the restart path")
    assert stdout == "Backup cleanup failed\n"  # exit 20's line: the reason is in the log
    log = (tmp_path / "failing.log").read_text()
    assert "still holds" in log
    assert "stop and start the VM" in log
    assert [line for line in leaks(lab) if not line.startswith("partial directory")] == []
    chain.log = tmp_path / "refused.log"
    refused, _ = chain.backup("incremental", expect_exit=1)
    assert "earlier failed backup" in refused.stdout
    assert guest.vm.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    guest.vm.stop()
    guest.vm.start()
    guest.wait_ready()
    chain.log = tmp_path / "after-restart.log"
    chain.backup("full")
    assert leaks(lab) == [] or all(line.startswith("partial directory") for line in leaks(lab))


@pytest.mark.live_backup
@pytest.mark.lab
def test_a_vm_the_operator_paused_stays_paused(
    guest_lab: Lab, healthy: Guest, tmp_path: Path
) -> None:
    lab, guest = guest_lab, healthy
    nas = lab.flaky_repository()
    chain = Chain(lab=lab, vm=guest.vm, repo=nas.repository, log=tmp_path / "agent.log")
    guest.vm.pause()
    try:
        chain.backup("full")
        assert guest.vm.is_paused()
        nas.throttle(2_000_000)
        in_flight = chain.start("full", tmp_path / "failing.log")
        in_flight.wait_for("backup job of")
        nas.fill()
        run = in_flight.finish()
        assert run.returncode == 1
        assert guest.vm.is_paused(), "the backup resumed a VM the operator had paused"
        assert guest.vm.dom.state()[1] == libvirt.VIR_DOMAIN_PAUSED_USER
    finally:
        guest.vm.resume()
    nas.heal()
    assert [line for line in leaks(lab)] == []


# -- 2. quiesce ------------------------------------------------------------------------------
@pytest.mark.live_backup
@pytest.mark.lab
def test_quiesce_freezes_the_guest_filesystem_for_the_job_start(
    guest_lab: Lab, healthy: Guest, tmp_path: Path
) -> None:
    lab, guest = guest_lab, healthy
    chain = Chain(lab=lab, vm=guest.vm, repo=lab.repository(), log=tmp_path / "agent.log")
    guest.run(f"rm -f {FREEZE_LOG}")
    # Written through the page cache and not synced: only a freeze puts it on the disk.
    md5 = guest.dirty_file("dirty-quiesced", 256)
    chain.backup("full", quiesce="true")

    assert guest.freeze_log() == ["freeze", "thaw"]
    assert guest.freeze_status() == "thawed"
    log = chain.log.read_text()
    assert log.index("guest filesystems frozen") < log.index("backup job of")
    assert log.index("backup job of") > log.index("guest filesystems frozen")
    assert "guest filesystems thawed" in log
    root = _restored(lab, disk_files(chain.repo_dir, chain.backups[0], guest.vm)[0])
    fsck = _fsck(lab, root)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert _md5_in(lab, root, "dirty-quiesced") == md5


@pytest.mark.live_backup
@pytest.mark.lab
def test_without_quiesce_the_same_write_is_not_in_the_backup(
    guest_lab: Lab, healthy: Guest, tmp_path: Path
) -> None:
    """The contrast that shows the quiesce test can fail: crash-consistent misses it."""
    lab, guest = guest_lab, healthy
    chain = Chain(lab=lab, vm=guest.vm, repo=lab.repository(), log=tmp_path / "agent.log")
    guest.run("sync")
    md5 = guest.dirty_file("dirty-crash", 256)
    chain.backup("full", quiesce="false")
    root = _restored(lab, disk_files(chain.repo_dir, chain.backups[0], guest.vm)[0])
    assert _md5_in(lab, root, "dirty-crash") != md5
    guest.run("sync")


def _interrupt_a_slow_freeze(
    guest: Guest, chain: Chain, mode: str, log: Path, act: Callable[[InFlight], None]
) -> Run:
    """Run a quiesced backup whose freeze takes three seconds (the guest's hook), doing
    ``act`` while the agent freezes; returns the run."""
    guest.run(f"rm -f {FREEZE_LOG} && touch {SLOW_FREEZE_FLAG}")
    try:
        in_flight = chain.start(mode, log, quiesce="true")
        in_flight.wait_for("freezing the guest's filesystems")
        # The shim logs that line just before it asks; a second later the agent is surely
        # inside its three-second freeze (a signal sooner may beat the request itself).
        time.sleep(1.0)
        act(in_flight)
        return in_flight.finish()
    finally:
        guest.run(f"rm -f {SLOW_FREEZE_FLAG}")


@pytest.mark.live_backup
@pytest.mark.lab
def test_a_job_that_fails_to_begin_still_thaws(
    guest_lab: Lab, healthy: Guest, tmp_path: Path
) -> None:
    lab, guest = guest_lab, healthy
    chain = Chain(lab=lab, vm=guest.vm, repo=lab.repository(), log=tmp_path / "agent.log")
    chain.backup("full")
    checkpoints = guest.vm.checkpoints()

    def remove_the_targets(in_flight: InFlight) -> None:
        # Made, then gone while the agent freezes: libvirt cannot begin the job.
        partial = chain.repo_dir / f"{in_flight.path}.partial"
        for target in partial.glob("*.qcow2"):
            target.unlink()

    run = _interrupt_a_slow_freeze(
        guest, chain, "incremental", tmp_path / "failing.log", remove_the_targets
    )
    assert run.returncode == 1, run.stdout
    assert "could not start" in run.stdout
    assert guest.freeze_log() == ["freeze", "thaw"]
    assert guest.freeze_status() == "thawed"
    assert guest.vm.checkpoints() == checkpoints
    assert leaks(lab) == []


@pytest.mark.live_backup
@pytest.mark.lab
def test_a_signal_during_the_freeze_still_thaws(
    guest_lab: Lab, healthy: Guest, tmp_path: Path
) -> None:
    """The agent's timeout (SIGTERM) landing while the agent freezes: the signal is handled
    once the freeze returns, and the filesystems must not stay frozen (qemu-ga never thaws
    on its own)."""
    lab, guest = guest_lab, healthy
    chain = Chain(lab=lab, vm=guest.vm, repo=lab.repository(), log=tmp_path / "agent.log")
    run = _interrupt_a_slow_freeze(
        guest, chain, "full", tmp_path / "failing.log",
        lambda in_flight: in_flight.proc.send_signal(signal.SIGTERM),
    )  # fmt: skip
    assert run.returncode == 1, run.stdout
    assert "SIGTERM" in run.stdout
    assert guest.freeze_log() == ["freeze", "thaw"]
    assert guest.freeze_status() == "thawed"
    assert guest.vm.checkpoints() == []
    assert leaks(lab) == []


@pytest.mark.live_backup
@pytest.mark.lab
def test_an_agent_that_does_not_answer_gives_a_crash_consistent_backup(
    guest_lab: Lab, guests: tuple[Guest, Guest], tmp_path: Path
) -> None:
    lab, mute = guest_lab, guests[1]
    mute.stop_agent()  # for good: this guest serves no other test
    chain = Chain(lab=lab, vm=mute.vm, repo=lab.repository(), log=tmp_path / "agent.log")
    started = time.monotonic()
    chain.backup("full", quiesce="true")
    assert time.monotonic() - started < 30
    log = chain.log.read_text()
    assert "crash-consistent" in log
    assert "guest filesystems frozen" not in log
    assert leaks(lab) == []


# -- 3. point in time ------------------------------------------------------------------------
SEQUENCE_BLOCKS = 128
"""The writer's ring on vdb: 512 KiB, eight 64 KiB clusters it keeps rewriting, at the end
of the disk, which a job copies last: the writes during a job meet copy-before-write."""
SEQUENCE_FIRST = 32 * MiB // 4096 - SEQUENCE_BLOCKS


@pytest.mark.live_backup
@pytest.mark.lab
def test_each_backup_is_the_disk_at_its_start_while_the_guest_writes(
    guest_lab: Lab, healthy: Guest, tmp_path: Path
) -> None:
    lab, guest = guest_lab, healthy
    nas = lab.flaky_repository()
    nas.throttle(4_000_000)  # each job lasts seconds: the writer laps its ring meanwhile
    chain = Chain(lab=lab, vm=guest.vm, repo=nas.repository, log=tmp_path / "agent.log")
    cuts = []
    with guest.sequence_writer("/dev/vdb", SEQUENCE_BLOCKS, SEQUENCE_FIRST) as writer:
        for mode in ("full", "incremental"):
            # The root disk copies longest: from QEMU 8.2 a job that ends while another
            # copies drains every node, guest writes included, until the other's writes in
            # flight have landed (an unchanged disk's job ends at once); the data disk's job,
            # the one the writes meet, must not wait behind that.
            guest.write_files(f"before-{mode}", 4, 1024)
            writer.wait_for(writer.written() + SEQUENCE_BLOCKS)  # a lap since the last backup
            before = writer.written()
            in_flight = chain.start(mode, tmp_path / f"{mode}.log")
            in_flight.wait_for("backup job of")
            begun = writer.written()
            run = in_flight.finish()
            after = writer.written()
            assert run.returncode == 0, run.stdout
            files = disk_files(chain.repo_dir, chain.backups[-1], guest.vm)
            cut = writer.cut(_raw(lab, _restored(lab, files[DATA_DISK])))
            assert cut.consistent, f"{mode}: not one point in time: {cut.problems}"
            # A write the job saw happen and kept out: counted from the cut, not from the
            # shim's "started" line, which QEMU 8.2 and later can hold back until the copy
            # is nearly done (a job that ends early drains the others' writes in flight).
            # How many more the guest completes is its latency under push mode, not this
            # property: each of the ring's 8 clusters waits for its copy-before-write behind
            # the job's own writes to the NAS, and on QEMU 6.2 to 10.0 those 8 waits can take
            # the whole job (1 to 7 writes in some runs, 25 to 60 in others; "Supported hosts").
            assert after > cut.latest, f"{mode}: no guest write completed during the job"
            # The cut lies between the last write before the job was asked for and the
            # first the shim could see after libvirt had begun it.
            assert before <= cut.latest <= begun + 1, (before, cut.latest, begun)
            cuts.append(cut.latest)
    assert cuts[0] < cuts[1], "the incremental does not hold the writes after the full"
    assert leaks(lab) == []


# -- 4. a restored disk works ---------------------------------------------------------------
@pytest.mark.live_backup
@pytest.mark.lab
def test_a_restored_root_volume_boots_a_fresh_guest_with_its_files_intact(
    guest_lab: Lab, healthy: Guest, tmp_path: Path
) -> None:
    lab, guest = guest_lab, healthy
    chain = Chain(lab=lab, vm=guest.vm, repo=lab.repository(), log=tmp_path / "agent.log")
    guest.write_files("set-full", 4, 256)
    chain.backup("full", quiesce="true")
    guest.write_files("set-incremental", 4, 256)
    chain.backup("incremental", quiesce="true")
    root = _restored(lab, disk_files(chain.repo_dir, chain.backups[-1], guest.vm)[0])

    fresh = boot_guest(lab, data_disks=(), root=root)
    try:
        for directory in ("set-full", "set-incremental"):
            check = fresh.check_files(directory)
            assert check.code == 0, check.out + check.err
            assert check.out.count(": OK") == 4
    finally:
        fresh.vm.stop()


def test_the_point_in_time_check_finds_a_torn_image(tmp_path: Path) -> None:
    """The checker the point-in-time test relies on, on images made by hand: one cut
    passes, a block newer than its neighbours (a copy made while the writer ran) fails."""
    writer = SequenceWriter(guest=None, device="/dev/vdb", blocks=4, first=1)  # type: ignore[arg-type]

    def image(sequences: list[int | None]) -> Path:
        path = tmp_path / f"image-{time.monotonic_ns()}"
        blocks = [b"\0" * 4096] + [
            (f"seq {s:012d}\n".encode() if s is not None else b"").ljust(4096, b"\0")
            for s in sequences
        ]
        path.write_bytes(b"".join(blocks))
        return path

    assert writer.cut(image([8, 9, 6, 7])) == SequenceCut(9, True)
    assert writer.cut(image([0, 1, None, None])).consistent
    torn = writer.cut(image([8, 5, 6, 11]))
    assert not torn.consistent
    assert torn.latest == 11
