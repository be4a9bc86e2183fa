"""Fault scenarios: each breaks something during or between backups on the lab, then
checks that every earlier backup still restores bit-identical, that the next backup
succeeds (falling back to a full where it must, and saying so), and that nothing leaked.

Every scenario is a function ``(lab, scratch) -> None`` that raises AssertionError with
what broke; ``FAULTS`` lists them for the test suite and ``scripts/fault-report``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from shim import qemu_img
from shim.lock import LOCK_WAIT_ENV
from shim.nas import Repository
from shim.virt.disks import parse_disks
from shim.virt.jobs import JobMarker
from tests.lab.chains import (
    DROPIN,
    Chain,
    InFlight,
    Run,
    build_argv,
    disk_files,
    repo_values,
    run_dropin,
    verify_backup,
)
from tests.lab.lab import FlakyNas, Lab, LabVM, MiB, compare, restart_libvirtd
from tests.lab.leaks import leaks
from tests.lab.scenarios import Scenario
from tests.lab.system import descendants_running, environment, mount_points

FALLBACK = "INCREMENTAL_FALLBACK=true"


@dataclass
class Points:
    """A chain of backups of one lab VM with, for each, the reference taken right after it."""

    chain: Chain
    refs: dict[str, list[Path]] = field(default_factory=dict)
    excluded: set[str] = field(default_factory=set)
    """Backups a scenario destroyed on purpose: not expected to restore any more."""
    nas: FlakyNas | None = None
    """The slowed NAS that makes a job last until its fault is done (then healed)."""

    @property
    def lab(self) -> Lab:
        return self.chain.lab

    @property
    def vm(self) -> LabVM:
        return self.chain.vm

    def take(self, mode: str = "incremental", **kwargs: str) -> Run:
        """A backup that must succeed, and its reference (no write happens in between)."""
        run, path = self.chain.backup(mode, **kwargs)  # type: ignore[arg-type]
        self.refs[path] = self.vm.reference_backup()
        return run

    def settle(self, flight: InFlight) -> Run:
        """Finish a background run; a success gets its reference like :meth:`take`."""
        if self.nas is not None:
            self.nas.heal()  # the fault happened meanwhile: the rest need not crawl
        run = flight.finish()
        if run.returncode == 0:
            self.refs[flight.path] = self.vm.reference_backup()
        return run

    def write(self, k: int) -> None:
        """Some guest writes, zeroes and discards on every disk."""
        for disk in range(len(self.vm.disks)):
            size = self.vm.disks[disk].size
            self.vm.write(disk, (k * MiB) % (size - MiB), MiB, pattern=(0x20 + 7 * k) % 256)
        self.vm.write_zeroes(0, ((k + 3) * MiB) % (self.vm.disks[0].size - MiB), 512 * 1024)
        self.vm.discard(0, ((k + 5) * MiB) % (self.vm.disks[0].size - MiB), 512 * 1024)

    def survived(self, *, fallback: bool | None) -> None:
        """The three promises after a fault (``fallback``: None when either is fine)."""
        if self.nas is not None:
            self.nas.heal()
        for path, refs in self.refs.items():
            if path not in self.excluded:
                verify_backup(self.lab, self.chain.repo_dir, path, self.vm, refs)
        if not self.vm.is_running():
            self.vm.start()
        self.write(99)
        run = self.take("incremental" if self.chain.bitmaps else "full")
        if fallback is not None:
            assert (FALLBACK in run.stdout) is fallback, f"fallback expected {fallback}: {run}"
        verify_backup(self.lab, self.chain.repo_dir, self.chain.backups[-1], self.vm,
                      self.refs[self.chain.backups[-1]])  # fmt: skip
        assert self.vm.checkpoints() == self.chain.bitmaps[-1:], self.vm.checkpoints()
        assert not self.vm.is_paused(), "the VM was left paused"
        found = leaks(self.lab)
        assert found == [], f"leaked: {found}"

    def one_line_failure(self, run: Run) -> None:
        """A failed run: exit 1 and a single line on stdout, the agent's whole story."""
        assert run.returncode == 1, f"exit {run.returncode}: {run.stdout!r}"
        assert len(run.stdout.splitlines()) == 1, run.stdout


def _points(
    lab: Lab,
    scratch: Path,
    *,
    disks: tuple[int, ...] = (32 * MiB, 16 * MiB),
    repo: Repository | None = None,
    persistent: bool = False,
    guest_agent: bool = False,
) -> Points:
    vm = lab.create_vm(disks=disks, persistent=persistent, guest_agent=guest_agent)
    chain = Chain(lab=lab, vm=vm, repo=repo or lab.repository(), log=scratch / "agent.log")
    return Points(chain)


BIG_WRITE = 32 * MiB
SLOW_NAS_RATE = 2 * MiB
"""Bytes per second: the incremental's 32 MiB would take about 16 s to land; each scenario
heals the NAS as soon as its fault is done, so none waits for that."""


def _big(lab: Lab, scratch: Path) -> Points:
    """A VM whose incremental is caught mid-job: a slowed NAS, not a big disk, makes it
    last (writing and copying hundreds of MiB costs the suite seconds per scenario)."""
    nas = lab.flaky_repository()
    points = _points(lab, scratch, disks=(64 * MiB, 16 * MiB), repo=nas.repository)
    points.nas = nas
    points.vm.write(0, 0, BIG_WRITE, pattern=0x44)
    return points


def _full_then_start_big_incremental(points: Points, scratch: Path) -> InFlight:
    """An incremental caught mid-copy, whatever the QEMU.

    Both disks get half of the changes: from QEMU 8.2 on, a backup job that ends while
    another copies (an unchanged disk's ends inside backupBegin itself) makes QEMU drain
    every node, waiting for all the writes the other job has in flight (up to 64 MiB, here
    all of it, at the slow NAS's rate); the monitor, and libvirt with it, answer nothing
    meanwhile. With equal shares the jobs end together, so the faults below land while the
    job copies on every generation, which the start time checked here proves."""
    points.take("full")
    for disk in (0, 1):
        points.vm.write(disk, 0, BIG_WRITE // 2, pattern=0x45)
    assert points.nas is not None
    points.nas.throttle(SLOW_NAS_RATE)
    started = time.monotonic()
    flight = points.chain.start("incremental", scratch / "flight.log")
    flight.wait_for("backup job of")
    took = time.monotonic() - started
    copy_seconds = BIG_WRITE / SLOW_NAS_RATE
    assert took < copy_seconds / 2, f"the job started {took:.1f} s in: the copy is over"
    return flight


# -- the scenarios ---------------------------------------------------------------------------
def qemu_killed_mid_backup(lab: Lab, scratch: Path) -> None:
    points = _big(lab, scratch)
    flight = _full_then_start_big_incremental(points, scratch)
    points.vm.kill()
    points.one_line_failure(points.settle(flight))
    points.vm.start()
    points.survived(fallback=True)  # the parent bitmap died with QEMU


def qemu_killed_between_backups(lab: Lab, scratch: Path) -> None:
    points = _points(lab, scratch)
    points.write(1)
    points.take("full")
    points.vm.stop()  # the bitmap is stored in the qcow2 ...
    points.vm.start()
    points.vm.kill()  # ... and left flagged in use: inconsistent at the next start
    points.vm.start()
    points.write(2)
    points.survived(fallback=True)


def nas_full_mid_job(lab: Lab, scratch: Path) -> None:
    points = _points(lab, scratch, disks=(64 * MiB, 16 * MiB), repo=lab.repository(48 * MiB))
    points.vm.write(0, 0, 8 * MiB, pattern=0x11)
    points.take("full")
    points.vm.write(0, 8 * MiB, 48 * MiB, pattern=0x22)  # more than the NAS has left
    run, _ = points.chain.backup("incremental", expect_exit=1)
    points.one_line_failure(run)
    assert leaks(lab) == [], leaks(lab)
    points.vm.discard(0, 8 * MiB, 48 * MiB)  # room again
    points.survived(fallback=False)


def nas_unmounted_mid_job(lab: Lab, scratch: Path) -> None:
    points = _big(lab, scratch)
    before = set(mount_points())
    flight = _full_then_start_big_incremental(points, scratch)
    mounted = [m for m in mount_points() if m not in before and m.name.startswith("csbackup.")]
    assert mounted, "the run's mount was not found"
    subprocess.run(["umount", "-l", str(mounted[0])], check=True)
    points.one_line_failure(points.settle(flight))
    points.survived(fallback=None)


def nas_eio_mid_job(lab: Lab, scratch: Path) -> None:
    nas = lab.flaky_repository()
    points = _points(lab, scratch, disks=(128 * MiB, 16 * MiB), repo=nas.repository)
    points.take("full")
    points.vm.write(0, 0, 96 * MiB, pattern=0x46)
    flight = points.chain.start("incremental", scratch / "flight.log")
    flight.wait_for("backup job of")
    nas.fail_writes()
    run = points.settle(flight)
    nas.heal()
    points.one_line_failure(run)
    points.survived(fallback=False)


def shim_killed_then_run_again(lab: Lab, scratch: Path) -> None:
    points = _big(lab, scratch)
    flight = _full_then_start_big_incremental(points, scratch)
    flight.proc.kill()  # SIGKILL: no cleanup at all; the next run recovers
    flight.proc.communicate()
    points.survived(fallback=None)


def sigterm_from_the_agent(lab: Lab, scratch: Path) -> None:
    points = _big(lab, scratch)
    flight = _full_then_start_big_incremental(points, scratch)
    flight.proc.terminate()
    run = points.settle(flight)
    assert (run.returncode, run.stdout) == (1, "interrupted by signal SIGTERM\n"), run
    assert leaks(lab) == [], leaks(lab)
    points.survived(fallback=False)


def libvirtd_restarted_mid_job(lab: Lab, scratch: Path) -> None:
    points = _big(lab, scratch)
    flight = _full_then_start_big_incremental(points, scratch)
    restart_libvirtd()
    lab.reconnect()
    points.one_line_failure(points.settle(flight))
    points.survived(fallback=False)


def job_bitmaps_left_by_libvirtd(lab: Lab, scratch: Path) -> None:
    # What libvirtd-restarted-mid-job leaves when a disk's block job ends while libvirtd
    # is down (a race there; certain here): libvirt's temporary bitmap stays in QEMU, and
    # the run that saw the job interrupted left its marker. Unhandled, the next incremental
    # begin fails on the bitmap and libvirtd 9.0 crashes.
    points = _points(lab, scratch)
    points.write(1)
    points.take("full")
    points.vm.leave_temporary_bitmap(1)
    JobMarker(points.vm.name).set()
    points.write(2)
    points.survived(fallback=False)
    assert points.vm.temporary_bitmaps() == [], points.vm.temporary_bitmaps()


def vm_stopped_and_started(lab: Lab, scratch: Path) -> None:
    points = _points(lab, scratch)
    points.write(1)
    points.take("full")
    points.vm.stop()
    points.vm.start()
    points.write(2)
    points.survived(fallback=False)


def domain_recreated_with_same_disks(lab: Lab, scratch: Path) -> None:
    points = _points(lab, scratch, persistent=True)
    points.write(1)
    points.take("full")
    vm = points.vm
    vm.stop()
    # As after a migration: a new definition (new uuid) of the same name and disks.
    vm.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    old_uuid = vm.uuid
    vm.uuid = str(__import__("uuid").uuid4())
    vm.xml = vm.xml.replace(old_uuid, vm.uuid)
    lab.conn.defineXML(vm.xml)
    vm.start()
    assert vm.checkpoints() == []
    points.write(2)
    points.survived(fallback=False)


def disk_hot_plugged_and_unplugged(lab: Lab, scratch: Path) -> None:
    points = _points(lab, scratch)
    points.write(1)
    points.take("full")
    points.vm.attach_disk(8 * MiB)
    points.write(2)
    run = points.take("incremental")  # the new disk: full inside the incremental
    assert FALLBACK not in run.stdout, run.stdout
    scsi = next(i for i, d in enumerate(points.vm.disks) if d.bus == "scsi")
    points.vm.detach_disk(scsi)
    # Earlier points hold a disk the VM no longer has: check them by their own disks.
    points.excluded.update(points.refs)
    points.survived(fallback=False)


def parent_bitmap_removed_from_one_disk(lab: Lab, scratch: Path) -> None:
    points = _points(lab, scratch)
    points.write(1)
    points.take("full")
    points.vm.stop()
    subprocess.run(
        ["qemu-img", "bitmap", "--remove", str(points.vm.disks[1].path),
         points.chain.bitmaps[-1]],
        check=True, capture_output=True,
    )  # fmt: skip
    points.survived(fallback=True)
    points.vm.stop()
    remaining = [points.vm.bitmaps(i) for i in range(2)]
    assert remaining == [(points.chain.bitmaps[-1],)] * 2, remaining


def parent_directory_deleted(lab: Lab, scratch: Path) -> None:
    points = _points(lab, scratch)
    points.write(1)
    points.take("full")
    points.write(2)
    points.take("incremental")
    gone = points.chain.backups[-1]
    shutil.rmtree(points.chain.repo_dir / gone)
    points.excluded.add(gone)
    points.survived(fallback=True)


def parent_file_corrupted(lab: Lab, scratch: Path) -> None:
    points = _points(lab, scratch)
    points.write(1)
    points.take("full")
    parent = disk_files(points.chain.repo_dir, points.chain.backups[-1], points.vm)[0]
    with open(parent, "r+b") as fh:
        fh.seek(0x28)  # the L1 table's offset, pointed far beyond the file
        fh.write((1 << 50).to_bytes(8, "big"))
    points.excluded.add(points.chain.backups[-1])
    points.survived(fallback=True)


SHORT_LOCK_WAIT = "0"
"""Seconds a contending run waits for the VM's lock in these scenarios (60 by default): none,
so that the contender meets the run in flight (which lasts about half a second on the lab)
and fails, saying why. The wait itself is proven by tests/test_lock.py and the service's
lock test."""


@contextlib.contextmanager
def _short_lock_wait() -> Iterator[None]:
    """Drop-in runs started in the block wait :data:`SHORT_LOCK_WAIT` for a VM's lock."""
    with environment(LOCK_WAIT_ENV, SHORT_LOCK_WAIT):
        yield


def two_backups_of_one_vm_at_once(lab: Lab, scratch: Path) -> None:
    points = _big(lab, scratch)
    with _service(scratch) as send:
        flight = _full_then_start_big_incremental(points, scratch)
        # CLI + CLI: the second fails, saying why.
        started = time.monotonic()
        with _short_lock_wait():
            second, _ = points.chain.backup("full", expect_exit=1)
        assert time.monotonic() - started < 5 and "in progress" in second.stdout, second
        # CLI + socket: the service's request fails the same way.
        repo = points.chain.repo
        answer = send({
            "vmName": points.vm.name, "backupPath": f"{points.vm.name}/via-socket",
            "backupRepoType": repo.type, "backupRepoAddress": repo.address,
            "mountOptions": repo.options, "quiesce": False, "mode": "full",
            "bitmapNew": "backup-1799999998", "contextMap": {}, "wait": 0,
        })  # fmt: skip
        assert answer["result"] is False and "in progress" in answer["details"], answer
    assert points.settle(flight).returncode == 0
    points.survived(fallback=False)


@contextlib.contextmanager
def _service(scratch: Path) -> Iterator[Callable[[dict[str, object]], dict[str, Any]]]:
    """``scripts/serve`` on a scratch socket; yields a function that sends one
    TakeBackupCommand (with ``shim.service.client``) and returns its answer."""
    socket_path = scratch / "run" / "shim.sock"
    socket_path.parent.mkdir(mode=0o700, exist_ok=True)
    env = {
        **os.environ,
        "NASBACKUP_SHIM_LOG": str(scratch / "service.log"),
        LOCK_WAIT_ENV: SHORT_LOCK_WAIT,
    }
    server = subprocess.Popen([str(DROPIN.parent / "serve"), "--socket", str(socket_path)], env=env)

    def send(command: dict[str, object]) -> dict[str, Any]:
        envelope = scratch / "envelope.json"
        envelope.write_text(
            json.dumps([{"org.apache.cloudstack.backup.TakeBackupCommand": command}])
        )
        client = subprocess.run(
            [sys.executable, "-m", "shim.service.client", "--socket", str(socket_path), "send",
             str(envelope)],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        return dict(next(iter(json.loads(client.stdout)[0].values())))

    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists():  # a scenario waiting for its own server
            assert server.poll() is None and time.monotonic() < deadline, "no service"
            time.sleep(0.01)
        yield send
    finally:
        server.terminate()
        server.wait(timeout=60)


def delete_during_a_backup(lab: Lab, scratch: Path) -> None:
    points = _big(lab, scratch)
    flight = _full_then_start_big_incremental(points, scratch)
    values = {"operation": "delete", "path": points.chain.backups[-1],
              **repo_values(points.chain.repo)}  # fmt: skip
    with _short_lock_wait():  # by default it would wait for the backup, and then succeed
        refused = run_dropin(build_argv("", values, "delete"), log_file=scratch / "delete.log")
    points.one_line_failure(refused)
    assert "in progress" in refused.stdout, refused
    assert points.settle(flight).returncode == 0
    points.survived(fallback=False)


def restore_onto_a_running_disk(lab: Lab, scratch: Path) -> None:
    points = _points(lab, scratch)
    points.write(1)
    points.take("full")
    points.write(2)
    disk = points.vm.disks[0].path
    before = qemu_img.info(disk, force_share=True).actual_size
    values = {"operation": "restore", "path": points.chain.backups[-1],
              "restore_paths": f"{disk},{points.vm.disks[1].path}",
              **repo_values(points.chain.repo)}  # fmt: skip
    refused = run_dropin(build_argv("", values, "restore"), log_file=scratch / "restore.log")
    points.one_line_failure(refused)
    assert "running VM" in refused.stdout, refused
    assert qemu_img.info(disk, force_share=True).actual_size == before
    points.survived(fallback=False)


def rebase_killed_half_way(lab: Lab, scratch: Path) -> None:
    points = _points(lab, scratch, disks=(512 * MiB, 16 * MiB))
    points.take("full")
    points.vm.write(0, 0, 384 * MiB, pattern=0x31)
    points.take("incremental")
    points.vm.write(0, 400 * MiB, 1 * MiB, pattern=0x32)
    points.take("incremental")
    first, _, last = points.chain.backups
    top = disk_files(points.chain.repo_dir, last, points.vm)[0]
    before = top.stat().st_size
    values = {"operation": "rebase", "rebase_target": last, "rebase_new_backing": first,
              **repo_values(points.chain.repo)}  # fmt: skip
    env = {**os.environ, "NASBACKUP_SHIM_LOG": str(scratch / "rebase.log")}
    rebase = subprocess.Popen([str(DROPIN), *build_argv("", values, "rebase")],
                              stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    killed = False
    deadline = time.monotonic() + 60
    while not killed and rebase.poll() is None and time.monotonic() < deadline:
        qemu = [p for p in descendants_running("rebase")
                if b"qemu-img" in Path(f"/proc/{p}/cmdline").read_bytes()]  # fmt: skip
        if qemu and top.stat().st_size > before + 32 * MiB:
            os.kill(qemu[0], signal.SIGKILL)
            killed = True
        time.sleep(0.005)
    rebase.communicate(timeout=60)
    assert killed, "qemu-img finished before it could be killed half-way"
    assert rebase.returncode == 1
    assert qemu_img.check(top).corruptions == 0
    points.survived(fallback=False)  # every point (the rebased one too) reads as before


def quiesce_without_and_with_a_silent_agent(lab: Lab, scratch: Path) -> None:
    for with_channel in (False, True):
        points = _points(lab, scratch / str(with_channel), guest_agent=with_channel)
        (scratch / str(with_channel)).mkdir(exist_ok=True)
        points.write(1)
        points.take("full", quiesce="true")
        assert "crash-consistent" in points.chain.log.read_text()
        points.write(2)
        points.take("incremental", quiesce="true")
        points.survived(fallback=False)


def clock_jumped_back(lab: Lab, scratch: Path) -> None:
    points = _points(lab, scratch)
    points.write(1)
    points.take("full")
    # The management server's clock went back: the new bitmap's epoch is the older one.
    points.chain.counter -= 50
    points.write(2)
    run = points.take("incremental")
    assert FALLBACK not in run.stdout, run.stdout
    assert int(points.chain.bitmaps[-1].split("-")[1]) < int(points.chain.bitmaps[-2].split("-")[1])
    points.survived(fallback=False)


def read_only_nas(lab: Lab, scratch: Path) -> None:
    points = _points(lab, scratch)
    writable = points.chain.repo
    points.take("full")
    points.chain.repo = Repository(writable.type, writable.address, "bind,ro")
    points.write(1)
    run, _ = points.chain.backup("incremental", expect_exit=1)
    points.one_line_failure(run)
    assert leaks(lab) == [], leaks(lab)
    points.chain.repo = writable
    points.survived(fallback=False)


FAULTS: list[Scenario] = [
    Scenario(name, run)
    for name, run in [
        ("qemu-killed-mid-backup", qemu_killed_mid_backup),
        ("qemu-killed-between-backups", qemu_killed_between_backups),
        ("nas-full-mid-job", nas_full_mid_job),
        ("nas-unmounted-mid-job", nas_unmounted_mid_job),
        ("nas-eio-mid-job", nas_eio_mid_job),
        ("shim-sigkilled-then-run-again", shim_killed_then_run_again),
        ("sigterm-from-the-agent", sigterm_from_the_agent),
        ("libvirtd-restarted-mid-job", libvirtd_restarted_mid_job),
        ("job-bitmaps-left-by-libvirtd", job_bitmaps_left_by_libvirtd),
        ("vm-stopped-and-started", vm_stopped_and_started),
        ("domain-recreated-with-same-disks", domain_recreated_with_same_disks),
        ("disk-hot-plugged-and-unplugged", disk_hot_plugged_and_unplugged),
        ("parent-bitmap-removed-from-one-disk", parent_bitmap_removed_from_one_disk),
        ("parent-directory-deleted", parent_directory_deleted),
        ("parent-file-corrupted", parent_file_corrupted),
        ("two-backups-of-one-vm-at-once", two_backups_of_one_vm_at_once),
        ("delete-during-a-backup", delete_during_a_backup),
        ("restore-onto-a-running-disk", restore_onto_a_running_disk),
        ("rebase-killed-half-way", rebase_killed_half_way),
        ("quiesce-without-and-with-a-silent-agent", quiesce_without_and_with_a_silent_agent),
        ("clock-jumped-back", clock_jumped_back),
        ("read-only-nas", read_only_nas),
    ]
]

__all__ = ["FAULTS", "Points", "compare", "parse_disks"]
