"""Pull-mode backups (``shim/pull.py``) end to end on the lab: libvirt exports each disk
with a local scratch, a storage daemon copies it to the NAS; what lands there, and what
stdout says, is what push mode gives; nothing is left in the scratch directory."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.backupdir import directory_size
from shim.proc import processes_naming
from shim.pull import DEFAULT_SCRATCH, SCRATCH_ENV, Scratch
from tests.envelopes import fill, mismatches, read
from tests.lab import FlakyNas, Lab, LabVM, MiB
from tests.lab.chains import InFlight
from tests.lab.leaks import leaks
from tests.service_support import FixtureRun, running
from tests.support import (
    PARSERS,
    Chain,
    Run,
    assert_size_parses,
    run_dropin,
    verify_backup,
)

pytestmark = pytest.mark.lab


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A scratch directory with a short path (the export's socket lives in it)."""
    path = Path(tempfile.mkdtemp(prefix="scratch.", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pull(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Pull mode as the host's setting (the drop-ins started by the test inherit it)."""
    monkeypatch.setenv(SCRATCH_ENV, str(scratch))
    return scratch


def _changes(vm: LabVM, k: int) -> None:
    vm.write(0, (k % 8) * 2 * MiB, 1 * MiB, pattern=0x10 + k)
    vm.write(0, 20 * MiB + k * 192 * 1024, 64 * 1024, pattern=0x30 + k)  # one cluster
    vm.write(1, (k % 4) * MiB, 512 * 1024, pattern=0x80 + k)
    vm.write_zeroes(0, 4 * MiB + k * MiB, 1 * MiB)
    vm.discard(1, 8 * MiB, 512 * 1024)


def _checked(chain: Chain, run: Run, path: str, scratch: Path) -> None:
    """Restores identical; every generation's parser reads stdout as push mode's; the
    job's report says completed; one checkpoint; nothing left in the scratch directory."""
    verify_backup(chain.lab, chain.repo_dir, path, chain.vm, chain.vm.reference_backup())
    for parser in PARSERS:
        assert_size_parses(parser, run.stdout, chain.repo_dir / path, disks_given=False)
    assert "Completed" in run.stdout and "Error message" not in run.stdout, run.stdout
    assert f"BITMAP_CREATED={chain.bitmaps[-1]}" in run.stdout.splitlines()
    assert chain.vm.checkpoints() == [chain.bitmaps[-1]]
    assert list(scratch.iterdir()) == []
    assert leaks(chain.lab) == []


@pytest.mark.live_backup
def test_full_then_incrementals_restore_identical(chain: Chain, pull: Path) -> None:
    for k in range(3):
        _changes(chain.vm, k)
        run, path = chain.backup("full" if k == 0 else "incremental")
        _checked(chain, run, path, pull)
    log = chain.log.read_text()
    assert log.count("pull through") == 3, log
    # The incrementals hold what changed, not the disks: about 2.6 MiB each.
    incremental = chain.repo_dir / chain.backups[-1]
    assert sum(f.stat().st_size for f in incremental.glob("*.qcow2")) < 8 * MiB


@pytest.mark.live_backup
def test_scratch_dir_option_selects_pull_mode(chain: Chain, scratch: Path) -> None:
    """``-S DIR`` (apache/cloudstack PR 14194's option) for one run, no host setting."""
    _changes(chain.vm, 1)
    for mode in ("full", "incremental"):
        argv, path, bitmap = chain.argv(mode)
        run = run_dropin([*argv, "-S", str(scratch)], log_file=chain.log)
        assert run.returncode == 0, run.stdout + run.stderr
        chain.record(mode, path, bitmap)
        _checked(chain, run, path, scratch)
        _changes(chain.vm, 2)
    assert chain.log.read_text().count("pull through") == 2


@pytest.mark.parametrize("value", ["relative/dir", "/nonexistent/scratch"])
def test_a_bad_scratch_dir_is_refused_before_anything(chain: Chain, value: str) -> None:
    argv, _, _ = chain.argv("full")
    run = run_dropin([*argv, "-S", value], log_file=chain.log)
    assert run.returncode == 1 and "scratch directory" in run.stdout, run.stdout
    assert chain.vm.checkpoints() == [] and not (chain.repo_dir / chain.vm.name).exists()
    assert leaks(chain.lab) == []


def _slow_pull(lab: Lab, log: Path) -> tuple[Chain, FlakyNas, InFlight]:
    """A pull full caught mid-copy: its NAS passes 2 MiB/s (healed by the caller)."""
    vm = lab.create_vm(disks=(64 * MiB, 16 * MiB))
    vm.write(0, 0, 32 * MiB, pattern=0x5A)
    nas = lab.flaky_repository()
    nas.throttle(2 * MiB)
    chain = Chain(lab=lab, vm=vm, repo=nas.repository, log=log)
    in_flight = chain.start("full", log)
    in_flight.wait_for("backup job of")
    return chain, nas, in_flight


@pytest.mark.live_backup
def test_sigterm_mid_copy_cleans_up_everything(lab: Lab, pull: Path, tmp_path: Path) -> None:
    chain, nas, in_flight = _slow_pull(lab, tmp_path / "agent.log")
    in_flight.proc.send_signal(signal.SIGTERM)
    nas.heal()
    run = in_flight.finish()
    assert (run.returncode, run.stdout) == (1, "interrupted by signal SIGTERM\n"), run
    assert chain.vm.checkpoints() == []
    assert list(pull.iterdir()) == [] and leaks(lab) == []
    _changes(chain.vm, 1)
    run, path = chain.backup("full")
    _checked(chain, run, path, pull)


@pytest.mark.live_backup
def test_a_killed_run_is_recovered_by_the_next(lab: Lab, pull: Path, tmp_path: Path) -> None:
    """SIGKILL mid-copy leaves libvirt's job, its scratch image and socket, and the storage
    daemon copying; the next run ends them all and succeeds."""
    chain, nas, in_flight = _slow_pull(lab, tmp_path / "agent.log")
    vm_scratch = pull / chain.vm.name
    deadline = time.monotonic() + 30
    while not processes_naming(str(vm_scratch / "nbd.sock")):  # the copy under way
        assert time.monotonic() < deadline and in_flight.proc.poll() is None
        time.sleep(0.05)
    in_flight.proc.kill()
    nas.heal()
    in_flight.finish()
    assert sorted(p.name for p in vm_scratch.iterdir()) == [
        "nbd.sock",
        "vda.scratch.qcow2",
        "vdb.scratch.qcow2",
    ]
    chain.counter = 1
    run, path = chain.backup("full")
    assert "aborting a backup job left running by a run that died" in chain.log.read_text()
    _checked(chain, run, path, pull)  # leaks() counts daemons copying from the scratch too


def test_a_daemon_a_dead_run_left_is_killed(scratch: Path) -> None:
    """The daemon of a killed run usually dies when the export vanishes (its output pipe is
    gone with the run); one that lives on is found by the socket it names, and killed."""
    holder = Scratch(str(scratch), "i-2-1-VM")
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", str(holder.socket)]
    )
    try:
        deadline = time.monotonic() + 10
        while orphan.pid not in processes_naming(str(holder.socket)):  # until it has exec'd
            assert time.monotonic() < deadline
            time.sleep(0.01)
        holder.prepare()
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert holder.dir.is_dir() and list(holder.dir.iterdir()) == []
    finally:
        orphan.kill()
        orphan.wait()


@pytest.mark.live_backup
async def test_progress_and_abort_over_the_socket(lab: Lab, pull: Path, tmp_path: Path) -> None:
    """The service reports a pull copy's progress (the copy's own bytes: libvirt does not
    see them) and its abort stops the copy at once, cleaned up as after any failure."""
    vm = lab.create_vm(disks=(64 * MiB,))
    vm.write(0, 0, 48 * MiB, pattern=0x5A)
    nas = lab.flaky_repository()
    nas.throttle(2 * MiB)
    run = FixtureRun(lab, vm, nas.repository)
    async with running(tmp_path, max_backups=1) as service:
        _, accepted = await service.post(
            fill(read("merged", "full")[0], run.values()), run_async=True
        )
        job = accepted["jobId"]
        deadline = time.monotonic() + 60
        while True:  # the copy's progress is read every few seconds
            body = await service.job(job)
            if body["state"] == "running" and body["progress"]["processed"] > 0:
                break
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.1)
        assert body["progress"]["total"] == 64 * MiB
        status, took, aborted = await service.abort(job)
        assert status in (200, 202) and took < 1.5, (status, took)
        assert aborted["state"] == "aborted", aborted
        ((_, answer),) = aborted["answers"][0].items()
        assert answer["result"] is False, answer
    nas.heal()
    assert vm.checkpoints() == [] and list(pull.iterdir()) == []
    assert not list(Path(nas.repository.address).glob("*/*.partial"))
    assert leaks(lab) == []


@pytest.mark.live_backup
def test_by_default_fulls_go_pull_and_incrementals_push(chain: Chain) -> None:
    """No scratch directory set: a full through the default one (the guest never waits on
    the NAS), an incremental in push mode; both restore identical."""
    for k, mode in enumerate(("full", "incremental", "full")):
        _changes(chain.vm, k)
        before = chain.log.read_text() if chain.log.exists() else ""
        _run, path = chain.backup(mode)
        verify_backup(chain.lab, chain.repo_dir, path, chain.vm, chain.vm.reference_backup())
        logged = chain.log.read_text()[len(before) :]
        method = f"pull through {DEFAULT_SCRATCH}/{chain.vm.name}" if mode == "full" else "push"
        assert f", {method}, " in logged, logged
    assert not (DEFAULT_SCRATCH / chain.vm.name).exists()
    assert leaks(chain.lab) == []


@pytest.mark.live_backup
@pytest.mark.lab
async def test_the_default_full_answers_as_its_fixture(
    lab: Lab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the service, in the default configuration (a full: pull mode), the answer is
    the fixture's, its job report the shim's own, completed, in virsh's form."""
    caplog.set_level(logging.INFO, logger="shim")
    run = FixtureRun(lab, lab.create_vm(disks=(32 * MiB,)), lab.repository())
    run.vm.write(0, 0, 4 * MiB, pattern=0x5A)
    command, expected = read("merged", "full")
    values = run.values()
    async with running(tmp_path) as service:
        status, answers = await service.post(fill(command, values))
    assert status == 200, answers
    ((_, answer),) = answers[0].items()
    lines = answer["details"].split("\n")
    values["jobinfo"] = "\n".join(lines[1:-1]) + "\n"
    values["size"] = directory_size(run.repo_dir / values["backupPath"])
    assert values["jobinfo"].startswith("Job type:         Completed   \n"), answer
    assert "Operation:        Backup      \n" in values["jobinfo"]
    assert mismatches(expected, answers, values) == []
    assert f"pull through {DEFAULT_SCRATCH}/{run.vm.name}" in caplog.text
    assert not (DEFAULT_SCRATCH / run.vm.name).exists()
    assert leaks(lab) == []
