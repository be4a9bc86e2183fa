"""Running-VM backups through the drop-in, end to end on the lab, under every generation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim import cli, qemu_img
from shim.backupdir import directory_size
from shim.compat import strict_zip
from shim.contract import jobinfo_text
from shim.errors import VirtError
from shim.lock import LOCK_WAIT_ENV
from shim.manifest import CHECKSUM_AT_ENV, UNSEALED, checksums
from shim.nas import Repository
from shim.virt import checkpoints
from tests.lab import FlakyNas, Lab, LabVM, MiB
from tests.lab.chains import read_manifest
from tests.lab.leaks import leaks
from tests.lab.system import mount_points
from tests.support import (
    DROPIN,
    GENERATIONS,
    MODE_GENERATIONS,
    PARSERS,
    Chain,
    Run,
    assert_size_parses,
    build_argv,
    disk_files,
    repo_values,
    run_dropin,
    verify_backup,
)

pytestmark = pytest.mark.lab


def _write_round(vm: LabVM, k: int) -> None:
    vm.write(0, (k % 8) * 2 * MiB, 1 * MiB, pattern=0x10 + k)
    vm.write(1, (k % 4) * 1 * MiB, 512 * 1024, pattern=0x80 + k)
    if k % 2:
        vm.write_zeroes(0, 0, 1 * MiB)
        vm.discard(1, 0, 512 * 1024)


def _after_backup(chain: Chain, run: Run, path: str, *, fallback: bool = False) -> None:
    refs = chain.vm.reference_backup()
    verify_backup(chain.lab, chain.repo_dir, path, chain.vm, refs)
    # Whatever generation asked, every generation's parser reads this stdout right.
    for parser in PARSERS:
        parsed = assert_size_parses(parser, run.stdout, chain.repo_dir / path, disks_given=False)
        if parser in ("seed", "merged"):
            assert parsed.incremental_fallback is fallback
            created = chain.bitmaps[-1] if "BITMAP_CREATED" in run.stdout else None
            assert parsed.bitmap_created == created
    # One live checkpoint: the one just created.
    assert chain.vm.checkpoints() == chain.bitmaps[-1:]
    assert leaks(chain.lab) == []


@pytest.mark.live_backup
@pytest.mark.parametrize("generation", MODE_GENERATIONS)
def test_full_then_three_incrementals(chain: Chain, generation: str) -> None:
    chain.generation = generation
    _write_round(chain.vm, 0)
    run, path = chain.backup("full")
    _after_backup(chain, run, path)
    styles = (
        ["paths"] * 3 if "parent_paths" in str(GENERATIONS[generation]) else ["dir", "file", "dir"]
    )
    for k, style in enumerate(styles, start=1):
        _write_round(chain.vm, k)
        run, path = chain.backup("incremental", parent_style=style)
        assert "INCREMENTAL_FALLBACK" not in run.stdout
        _after_backup(chain, run, path)
        # Only changed clusters: far below the disks' 48 MiB.
        sizes = [f.stat().st_size for f in disk_files(chain.repo_dir, path, chain.vm)]
        assert sum(sizes) < 6 * MiB
    # Every earlier point still restores (their files were never touched).
    for backup in chain.backups:
        for file in disk_files(chain.repo_dir, backup, chain.vm):
            assert qemu_img.check(file).clean


@pytest.mark.live_backup
@pytest.mark.parametrize("generation", [g for g in GENERATIONS if not g.startswith(("_", "other"))])
def test_legacy_full_under_every_generation(chain: Chain, generation: str) -> None:
    chain.generation = generation
    for k in range(2):
        _write_round(chain.vm, k)
        run, path = chain.backup("legacy-full" if k and GENERATIONS[generation]["modes"] else "")
        assert not run.stdout.startswith(("BITMAP_CREATED", "INCREMENTAL_FALLBACK"))
        _after_backup(chain, run, path)
    assert chain.vm.checkpoints() == []


@pytest.mark.live_backup
def test_stdout_is_markers_then_virsh_jobinfo_then_size(chain: Chain, push_mode: None) -> None:
    run, path = chain.backup("full")
    lines = run.stdout.split("\n")
    assert lines[0] == f"BITMAP_CREATED={chain.bitmaps[-1]}"
    assert lines[-1] == ""  # ends with a newline
    assert int(lines[-2]) == directory_size(chain.repo_dir / path)
    # The job statistics read exactly as virsh prints them for the same job.
    virsh = subprocess.run(
        [
            "virsh",
            "-c",
            "qemu:///system",
            "domjobinfo",
            chain.vm.name,
            "--completed",
            "--keep-completed",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "\n".join(lines[1:-2]) + "\n" == virsh
    stats = {
        "type": 3,
        "operation": 9,
        "time_elapsed": 12,
        "disk_total": 3 * 1024**3,
        "disk_processed": 1536,
        "disk_remaining": 0,
    }
    assert jobinfo_text(stats)[2:] == [
        "Time elapsed:     12           ms",
        "File processed:   1.500 KiB",
        "File remaining:   0.000 B",
        "File total:       3.000 GiB",
        "",
    ]


@pytest.mark.live_backup
def test_restarted_transient_vm_continues_the_chain(chain: Chain) -> None:
    _write_round(chain.vm, 0)
    run, path = chain.backup("full")
    _after_backup(chain, run, path)
    chain.vm.stop()
    chain.vm.start()
    assert chain.vm.checkpoints() == []  # libvirt forgot; the bitmaps are in the qcow2
    _write_round(chain.vm, 1)
    run, path = chain.backup("incremental")
    assert "INCREMENTAL_FALLBACK" not in run.stdout
    _after_backup(chain, run, path)
    assert sum(f.stat().st_size for f in disk_files(chain.repo_dir, path, chain.vm)) < 4 * MiB


@pytest.mark.live_backup
def test_bitmap_missing_on_one_disk_falls_back_to_full(chain: Chain) -> None:
    run, path = chain.backup("full")
    _after_backup(chain, run, path)
    chain.vm.stop()
    subprocess.run(
        ["qemu-img", "bitmap", "--remove", str(chain.vm.disks[1].path), chain.bitmaps[-1]],
        check=True,
    )
    chain.vm.start()
    _write_round(chain.vm, 1)
    run, path = chain.backup("incremental")
    assert run.stdout.splitlines()[0] == "INCREMENTAL_FALLBACK=true"
    _after_backup(chain, run, path, fallback=True)
    # A full: no backing files; the stale parent bitmap is gone from the other disk too.
    for file in disk_files(chain.repo_dir, path, chain.vm):
        assert qemu_img.info(file).backing_filename is None
    chain.vm.stop()
    assert [chain.vm.bitmaps(i) for i in range(2)] == [(chain.bitmaps[-1],)] * 2
    chain.vm.start()
    _write_round(chain.vm, 2)
    run, path = chain.backup("incremental")
    assert "INCREMENTAL_FALLBACK" not in run.stdout
    _after_backup(chain, run, path)


@pytest.mark.live_backup
def test_hot_plugged_disk_is_backed_up_full_inside_the_incremental(chain: Chain) -> None:
    _write_round(chain.vm, 0)
    run, path = chain.backup("full")
    _after_backup(chain, run, path)
    chain.vm.attach_disk(8 * MiB)
    chain.vm.write(2, 0, 1 * MiB, pattern=0x3C)
    _write_round(chain.vm, 1)
    run, path = chain.backup("incremental")
    assert "INCREMENTAL_FALLBACK" not in run.stdout
    _after_backup(chain, run, path)
    files = disk_files(chain.repo_dir, path, chain.vm)
    assert qemu_img.info(files[0]).backing_filename is not None
    assert qemu_img.info(files[2]).backing_filename is None  # the new disk: full
    _write_round(chain.vm, 2)
    chain.vm.write(2, 2 * MiB, 1 * MiB, pattern=0x3D)
    run, path = chain.backup("incremental")
    _after_backup(chain, run, path)
    assert qemu_img.info(disk_files(chain.repo_dir, path, chain.vm)[2]).backing_filename


@pytest.mark.live_backup
def test_nas_full_mid_job_leaves_nothing_and_harms_nothing(lab: Lab, tmp_path: Path) -> None:
    vm = lab.create_vm(disks=(64 * MiB, 16 * MiB))
    chain = Chain(lab=lab, vm=vm, repo=lab.repository(size=48 * MiB), log=tmp_path / "a.log")
    vm.write(0, 0, 8 * MiB, pattern=0x11)
    run, first = chain.backup("full")
    first_refs = vm.reference_backup()
    verify_backup(lab, chain.repo_dir, first, vm, first_refs)
    vm.write(0, 8 * MiB, 48 * MiB, pattern=0x22)  # more than the NAS has left
    run, _ = chain.backup("incremental", expect_exit=1)
    assert len(run.stdout.splitlines()) == 1
    assert leaks(lab) == []
    assert not vm.is_paused()
    assert vm.checkpoints() == [chain.bitmaps[-1]]  # the parent survives, no orphan
    assert sorted(os.listdir(chain.repo_dir / vm.name)) == [Path(first).name]
    verify_backup(lab, chain.repo_dir, first, vm, first_refs)
    # Room again: the next incremental (since the surviving parent) succeeds.
    vm.discard(0, 8 * MiB, 40 * MiB)
    run, path = chain.backup("incremental")
    assert "INCREMENTAL_FALLBACK" not in run.stdout
    _after_backup(chain, run, path)


@pytest.mark.live_backup
def test_running_vm_with_disk_paths_prints_integers_only(chain: Chain) -> None:
    disks = ",".join(str(d.path) for d in chain.vm.disks)
    run, path = chain.backup("full", disks=disks)
    assert all(line.isdigit() for line in run.stdout.splitlines())
    for generation in ("4.20.x", "4.21", "seed", "merged"):
        assert_size_parses(
            GENERATIONS[generation]["parser"],
            run.stdout,
            chain.repo_dir / path,
            disks_given=True,
        )


@pytest.mark.live_backup
def test_quiesce_without_guest_agent_is_crash_consistent(lab: Lab, tmp_path: Path) -> None:
    for with_channel in (False, True):
        vm = lab.create_vm(disks=(16 * MiB,), guest_agent=with_channel)
        # A log per iteration: the second check must not be satisfied by the first run's line.
        log = tmp_path / f"agent-{with_channel}.log"
        chain = Chain(lab=lab, vm=vm, repo=lab.repository(), log=log)
        vm.write(0, 0, 1 * MiB)
        run, path = chain.backup("full", quiesce="true")
        _after_backup(chain, run, path)
        assert "crash-consistent" in chain.log.read_text()


def _start_dropin(argv: list[str], log: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "NASBACKUP_SHIM_LOG": str(log)}
    return subprocess.Popen([str(DROPIN), *argv], stdout=subprocess.PIPE, text=True, env=env)


def _wait_for_log(log: Path, text: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while text not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and proc.poll() is None, "the run ended early"
        time.sleep(0.01)


def _full_argv(vm: LabVM, repo: Repository, path: str) -> list[str]:
    return build_argv(
        "merged",
        {
            "operation": "backup",
            "vm": vm.name,
            "path": f"{vm.name}/{path}",
            "quiesce": "false",
            "disks": "",
            "mode": "full",
            "bitmap_new": "backup-1790000001",
            **repo_values(repo),
        },
    )


@dataclass
class InFlight:
    """A full backup caught while its job runs: its NAS passes 2 MiB/s until healed."""

    vm: LabVM
    nas: FlakyNas
    proc: subprocess.Popen[str]

    @property
    def repo(self) -> Repository:
        return self.nas.repository

    def finish(self) -> tuple[int, str]:
        self.nas.heal()  # what the test did to the job is done: the rest need not crawl
        out, _ = self.proc.communicate(timeout=120)
        return self.proc.returncode, out

    def backups(self) -> list[str]:
        vm_dir = Path(self.repo.address) / self.vm.name
        return sorted(os.listdir(vm_dir)) if vm_dir.exists() else []


def _backup_in_flight(lab: Lab, log: Path, path: str = "2026.10.01.00.00.00") -> InFlight:
    # A slowed NAS, not hundreds of MiB, makes the job last: 32 MiB take 16 s to land.
    vm = lab.create_vm(disks=(64 * MiB,))
    vm.write(0, 0, 32 * MiB, pattern=0x5A)
    nas = lab.flaky_repository()
    nas.throttle(2 * MiB)
    proc = _start_dropin(_full_argv(vm, nas.repository, path), log)
    _wait_for_log(log, "backup job of", proc)
    return InFlight(vm, nas, proc)


@pytest.mark.live_backup
def test_second_backup_of_the_same_vm_fails_fast(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _backup_in_flight(lab, tmp_path / "first.log", "first")
    monkeypatch.setenv(LOCK_WAIT_ENV, "0.2")  # the second waits this long for the first's lock
    started = time.monotonic()
    second = run_dropin(_full_argv(first.vm, first.repo, "second"), log_file=tmp_path / "2.log")
    assert time.monotonic() - started < 5
    assert second.returncode == 1
    assert second.stdout.startswith(f"another operation on VM {first.vm.name} is in progress")
    code, out = first.finish()
    assert code == 0, out
    assert first.backups() == ["first"]
    assert leaks(lab) == []


@pytest.mark.live_backup
def test_sigterm_mid_job_cleans_up(lab: Lab, tmp_path: Path) -> None:
    job = _backup_in_flight(lab, tmp_path / "agent.log")
    job.proc.terminate()  # what the agent's timeout sends
    assert job.finish() == (1, "interrupted by signal SIGTERM\n")
    assert leaks(lab) == []
    assert job.vm.checkpoints() == []
    assert job.backups() == []


@pytest.mark.live_backup
def test_log_is_appended_and_has_no_secrets(chain: Chain) -> None:
    chain.log.write_text("earlier agent lines\n")
    chain.repo = Repository(chain.repo.type, chain.repo.address, "bind,password=hunter2")
    chain.backup("full")
    text = chain.log.read_text()
    assert text.startswith("earlier agent lines\n")
    assert "hunter2" not in text and "password=***" in text
    assert all(line[:20].count("-") == 4 and line[19] == ">" for line in text.splitlines()[1:])


@pytest.mark.live_backup
def test_vm_killed_mid_job_leaves_nothing(lab: Lab, tmp_path: Path) -> None:
    job = _backup_in_flight(lab, tmp_path / "agent.log")
    job.vm.kill()
    code, out = job.finish()
    assert code == 1 and out == "the VM stopped during the backup\n"
    assert leaks(lab) == []
    assert job.backups() == []


@pytest.mark.live_backup
def test_backup_directory_describes_the_domain(chain: Chain) -> None:
    _, path = chain.backup("full")
    names = sorted(os.listdir(chain.repo_dir / path))
    assert names == sorted(
        [
            "domain-config.xml", "dominfo.xml", "domiflist.xml", "domblklist.xml",
            "manifest.json", *(f.name for f in disk_files(chain.repo_dir, path, chain.vm)),
        ]
    )  # fmt: skip
    config = (chain.repo_dir / path / "domain-config.xml").read_text()
    assert f"<name>{chain.vm.name}</name>" in config
    assert f"Name:           {chain.vm.name}" in (chain.repo_dir / path / "dominfo.xml").read_text()
    blklist = (chain.repo_dir / path / "domblklist.xml").read_text()
    assert all(str(d.path) in blklist for d in chain.vm.disks)


@pytest.mark.live_backup
def test_manifest_describes_the_backup(chain: Chain) -> None:
    _, first = chain.backup("full")
    chain.vm.write(0, 0, 1 * MiB, pattern=0x42)
    _, second = chain.backup("incremental")
    manifest = read_manifest(chain.repo_dir / second)
    assert manifest is not None
    assert (manifest.vm, manifest.mode, manifest.offline) == (chain.vm.name, "incremental", False)
    assert manifest.bitmap == chain.bitmaps[-1] and manifest.parent == Path(first).name
    files = disk_files(chain.repo_dir, second, chain.vm)
    assert [d.file for d in manifest.disks] == [f.name for f in files]
    assert [d.role for d in manifest.disks] == ["root", "datadisk"]
    for record, file, disk in strict_zip(manifest.disks, files, chain.vm.disks):
        assert record.checksum == UNSEALED  # left to the first verify: nothing read back
        assert record.stored_size == file.stat().st_size
        assert record.virtual_size == disk.size and record.source == str(disk.path)
        assert record.backing == f"../{Path(first).name}/{file.name}"


@pytest.mark.live_backup
def test_shim_killed_mid_backup_is_recovered_by_the_next_run(lab: Lab, tmp_path: Path) -> None:
    job = _backup_in_flight(lab, tmp_path / "killed.log", "killed")
    job.proc.kill()  # SIGKILL: no cleanup at all
    job.finish()
    vm_dir = Path(job.repo.address) / job.vm.name
    assert (vm_dir / "killed.partial").is_dir()  # what it left: a partial directory,
    assert any(m.name.startswith("csbackup.") for m in mount_points())  # a mount,
    assert job.vm.checkpoints() == ["backup-1790000001"]  # an orphan checkpoint,
    chain = Chain(lab=lab, vm=job.vm, repo=job.repo, log=tmp_path / "next.log")
    chain.counter = 1
    _, path = chain.backup("full")
    log = chain.log.read_text()
    assert "left mounted by a run that died" in log and "left by a run that died" in log
    assert sorted(os.listdir(vm_dir)) == [Path(path).name]
    assert job.vm.checkpoints() == [chain.bitmaps[-1]]
    assert leaks(lab) == []
    verify_backup(lab, chain.repo_dir, path, job.vm, job.vm.reference_backup())


@pytest.mark.live_backup
def test_the_first_verify_records_the_checksums_and_later_ones_compare(chain: Chain) -> None:
    chain.vm.write(0, 0, 1 * MiB, pattern=0x3C)
    _, path = chain.backup("full")
    files = disk_files(chain.repo_dir, path, chain.vm)

    def verify() -> Run:
        values = {"operation": "verify", **repo_values(chain.repo), "path": path}
        return run_dropin(build_argv("", values, "verify"), log_file=chain.log)

    assert verify().returncode == 0
    manifest = read_manifest(chain.repo_dir / path)
    assert manifest is not None
    for record, file in strict_zip(manifest.disks, files):
        assert record.checksum == checksums([file], manifest.checksum_algorithm)[file]
    # Storage corruption after the first verify: a byte of guest data flipped (qcow2's
    # metadata intact, so only the checksum can tell), sizes unchanged.
    layout = subprocess.run(["qemu-img", "map", "--output=json", str(files[0])],
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    offset = next(e["offset"] for e in json.loads(layout) if e["data"]) + 100
    with open(files[0], "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    flipped = verify()
    assert flipped.returncode == 1 and "checksum differs" in flipped.stdout


@pytest.mark.live_backup
def test_a_file_resized_before_its_first_verify_fails_it(chain: Chain) -> None:
    """Its checksum is not recorded yet: its size, recorded by the backup, still tells (a
    torn or appended write on the NAS), and the damage is not sealed as its checksum."""
    chain.vm.write(0, 0, 1 * MiB, pattern=0x3D)
    _, path = chain.backup("full")
    file = disk_files(chain.repo_dir, path, chain.vm)[0]
    with open(file, "ab") as fh:
        fh.write(b"\xa5" * 4096)
    values = {"operation": "verify", **repo_values(chain.repo), "path": path}
    cut = run_dropin(build_argv("", values, "verify"), log_file=chain.log)
    assert cut.returncode == 1 and "bytes, its manifest" in cut.stdout, cut.stdout
    manifest = read_manifest(chain.repo_dir / path)
    assert manifest is not None and all(d.checksum == UNSEALED for d in manifest.disks)


@pytest.mark.live_backup
def test_sha256_checksums_when_asked(chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NASBACKUP_SHIM_CHECKSUM", "sha256")
    monkeypatch.setenv(CHECKSUM_AT_ENV, "backup")  # computed as the backup ends
    _, path = chain.backup("full")
    manifest = read_manifest(chain.repo_dir / path)
    assert manifest is not None and manifest.checksum_algorithm == "sha256"
    file = disk_files(chain.repo_dir, path, chain.vm)[0]
    sha = subprocess.run(["sha256sum", str(file)], capture_output=True, text=True, check=True)
    assert manifest.disks[0].checksum == sha.stdout.split()[0]
    monkeypatch.delenv("NASBACKUP_SHIM_CHECKSUM")
    chain.vm.write(0, 0, 1 * MiB, pattern=0x12)
    _, second = chain.backup("incremental")  # a cksum backup on a sha256 parent
    verified = run_dropin(
        build_argv(
            "", {"operation": "verify", **repo_values(chain.repo), "path": second}, "verify"
        ),
        log_file=chain.log,
    )
    assert verified.returncode == 0, verified.stdout


DOWNSTREAM_IDS = ("0c9a1c3e-root-volume-uuid", "7d2c4b1a-data-volume-uuid")


@pytest.mark.live_backup
def test_downstream_volume_ids_name_the_files_and_the_chain_continues(chain: Chain) -> None:
    chain.generation, chain.volume_ids, chain.mount_timeout = "downstream", DOWNSTREAM_IDS, "30"
    names = ["root.0c9a1c3e-root-volume-uuid.qcow2", "datadisk.7d2c4b1a-data-volume-uuid.qcow2"]
    _write_round(chain.vm, 0)
    run, first = chain.backup("full")
    for k in (1, 2):
        if k == 2:
            chain.mount_timeout = "0"  # no timeout at all
        argv_tail = chain.argv("incremental")[0][-4:]
        chain.counter -= 1  # that argv was only looked at
        assert argv_tail == ["-w", chain.mount_timeout, "-u", ",".join(DOWNSTREAM_IDS)]
        _write_round(chain.vm, k)
        run, path = chain.backup("incremental")
        assert "INCREMENTAL_FALLBACK" not in run.stdout
        refs = chain.vm.reference_backup()
        # Named after the ids, never the sources' basenames; restores identical.
        disk_names = sorted(p.name for p in (chain.repo_dir / path).glob("*.qcow2"))
        assert disk_names == sorted(names)
        verify_backup(chain.lab, chain.repo_dir, path, chain.vm, refs, volume_ids=DOWNSTREAM_IDS)
        parsed = assert_size_parses("merged", run.stdout, chain.repo_dir / path, disks_given=False)
        assert parsed.bitmap_created == chain.bitmaps[-1]
        # Each file is backed by its own disk's -u named parent: the chain continued.
        parent = Path(chain.backups[-2]).name
        files = disk_files(chain.repo_dir, path, chain.vm, DOWNSTREAM_IDS)
        assert [qemu_img.info(f).backing_filename for f in files] == [
            f"../{parent}/{name}" for name in names
        ]
        assert sum(f.stat().st_size for f in files) < 6 * MiB
        manifest = read_manifest(chain.repo_dir / path)
        assert manifest is not None and manifest.mode == "incremental"
        assert [d.volume_id for d in manifest.disks] == list(DOWNSTREAM_IDS)
        assert [d.source for d in manifest.disks] == [str(d.path) for d in chain.vm.disks]
    assert (chain.repo_dir / first / names[0]).is_file()
    assert chain.vm.checkpoints() == chain.bitmaps[-1:]
    assert leaks(chain.lab) == []


@pytest.mark.live_backup
def test_downstream_volume_id_count_must_match_the_domain(chain: Chain) -> None:
    chain.generation = "downstream"
    chain.volume_ids = ("only-one",)
    run, _ = chain.backup("full", expect_exit=1)
    assert run.stdout == ("--volumeuuids names 1 volume(s) but there are 2 disks in the domain\n")
    # Refused before anything was written or any checkpoint created.
    assert chain.vm.checkpoints() == []
    assert os.listdir(chain.repo_dir) == []
    assert leaks(chain.lab) == []


@pytest.mark.live_backup
def test_retry_to_an_existing_path_is_refused_before_the_checkpoint_is_touched(
    chain: Chain,
) -> None:
    _write_round(chain.vm, 0)
    argv, path, bitmap = chain.argv("full")
    first = run_dropin(argv, log_file=chain.log)
    assert first.returncode == 0, first.stdout
    chain.record("full", path, bitmap)
    again = run_dropin(argv, log_file=chain.log)  # the agent retrying a run that succeeded
    assert (again.returncode, again.stdout) == (1, f"backup path {path} already exists\n")
    # The checkpoint and its bitmaps, the next incremental's parent, are untouched.
    assert [(c.name, c.bitmaps) for c in checkpoints.listed(chain.vm.dom)] == [
        (bitmap, {"vda": bitmap, "vdb": bitmap})
    ]
    assert leaks(chain.lab) == []
    _write_round(chain.vm, 1)
    run, second = chain.backup("incremental")
    assert "INCREMENTAL_FALLBACK" not in run.stdout
    _after_backup(chain, run, second)
    for file in disk_files(chain.repo_dir, second, chain.vm):
        assert qemu_img.info(file).backing_filename == f"../{Path(path).name}/{file.name}"


@pytest.mark.live_backup
def test_housekeeping_failure_after_publishing_is_a_warning(
    chain: Chain,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _write_round(chain.vm, 0)
    chain.backup("full")
    _write_round(chain.vm, 1)

    def broken(*_args: object, **_kwargs: object) -> list[str]:
        raise VirtError("cannot list checkpoints: libvirt went away")

    argv, path, bitmap = chain.argv("incremental")
    with monkeypatch.context() as patched:
        patched.setattr(checkpoints, "retire_all_except", broken)
        patched.setattr(signal, "signal", lambda *_: None)  # the drop-in's handlers: not here
        patched.setenv("NASBACKUP_SHIM_LOG", str(chain.log))
        code = cli.main(argv)  # in this process, to break its housekeeping
    out = capsys.readouterr().out
    assert code == 0, out
    chain.record("incremental", path, bitmap)
    assert out.splitlines()[-1] == str(directory_size(chain.repo_dir / path))
    assert "housekeeping: cannot list checkpoints: libvirt went away" in chain.log.read_text()
    verify_backup(chain.lab, chain.repo_dir, path, chain.vm, chain.vm.reference_backup())
    assert chain.vm.checkpoints() == chain.bitmaps  # the parent could not be retired
    # The next run finishes the housekeeping: one checkpoint again.
    _write_round(chain.vm, 2)
    run, third = chain.backup("incremental")
    assert "INCREMENTAL_FALLBACK" not in run.stdout
    _after_backup(chain, run, third)


@pytest.mark.no_live_backup
@pytest.mark.parametrize("mode", ["full", ""])
def test_a_host_that_cannot_back_up_a_running_vm_refuses_as_upstream(
    chain: Chain, mode: str
) -> None:
    # libvirt 7.0 (Debian 11): upstream's sanity_checks line, exit 1, and nothing touched;
    # the same VM stopped is backed up (tests/test_backup_stopped.py runs there too).
    run, path = chain.backup(mode, expect_exit=1)
    assert run.stdout.startswith("Failure... Your QEMU version "), run.stdout
    assert run.stdout.endswith(
        "is unsupported. Consider upgrading to the required minimum version of QEMU: "
        "4.2.0 and Libvirt: 7.2.0\n"
    ), run.stdout
    assert run.stdout.count("\n") == 1
    assert chain.vm.checkpoints() == []
    assert not (chain.repo_dir / path).exists()
    assert leaks(chain.lab) == []


@pytest.mark.live_backup
def test_five_drop_ins_at_once_each_back_up_their_own_vm(lab: Lab, tmp_path: Path) -> None:
    # CloudStack's change to run several take-backup commands per host at once (PR 12847):
    # five agents' drop-ins, five VMs, one NAS, each run mounting it on its own.
    repo = lab.repository()
    chains = []
    for i in range(5):
        vm = lab.create_vm(disks=(16 * MiB, 8 * MiB))
        vm.write(0, 0, MiB, pattern=0x60 + i)
        chains.append(Chain(lab=lab, vm=vm, repo=repo, log=tmp_path / f"agent-{i}.log"))
    for mode in ("full", "incremental"):
        flights = [c.start(mode, tmp_path / f"{mode}-{i}.log") for i, c in enumerate(chains)]
        runs = [flight.finish() for flight in flights]
        assert [r.returncode for r in runs] == [0] * 5, runs
        assert not [r for r in runs if "INCREMENTAL_FALLBACK" in r.stdout], runs
        for i, (c, flight) in enumerate(strict_zip(chains, flights)):
            verify_backup(lab, c.repo_dir, flight.path, c.vm, c.vm.reference_backup())
            c.vm.write(1, 0, MiB, pattern=0x70 + i)
        assert [c.vm.checkpoints() for c in chains] == [c.bitmaps[-1:] for c in chains]
    assert leaks(lab) == []
