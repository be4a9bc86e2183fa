"""Load: lab VMs backed up concurrently through the drop-in and the socket service.

Half the VMs are backed up by ``scripts/nasbackup.sh`` (a process per backup, as the agent
runs it), the other half through a socket service running in this process with the
per-host backup limit; all at once, each VM in its own task, with guest writes between its
backups, until a time or a count bound is reached. Each VM's backups are chains of a full
then incrementals, with the final generation's argv and TakeBackupCommand envelopes
(``--parent-paths`` / ``parentPaths``).

What is checked:

* no failure: every backup succeeds, creates its checkpoint, and no incremental falls back;
* every point restorable: right after each backup, while nothing writes to that VM, a
  reference backup is taken; each disk's backup file must check clean, link to its parent
  relatively, and flattened with ``qemu-img convert`` (through its chain, as the Java
  restore) equal the reference (:func:`tests.lab.chains.verify_backup`); at the end each
  chain's last point is checked again;
* no leak: :func:`tests.lab.leaks.leaks` once everything stopped, and each VM has exactly one
  checkpoint, its last;
* per-VM serialization: no two operations on one VM overlapped. Each socket-driven backup
  is sent together with a delete for the same VM (of a backup that does not exist, which
  succeeds), so the service must run the two one after the other;
* the per-host job limit: never more than ``max_concurrent_backups`` backups in the
  service's engine at the same instant (the drop-in's processes are not the service's:
  they do not count against its limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from commands.envelope import dump
from commands.model import DeleteBackupCommand, TakeBackupCommand
from shim.backupdir import directory_size
from shim.errors import ShimError
from shim.log import LOG_FILE_ENV
from shim.nas import Repository
from tests.lab.chains import DROPIN, Chain, verify_backup
from tests.lab.harness import Running, captured_log, overlap, running
from tests.lab.lab import KiB, Lab, LabVM, MiB
from tests.lab.leaks import leaks

T = TypeVar("T")

CHAIN_LENGTH = 5
"""Backups per chain: a full, then incrementals."""
DISKS = (32 * MiB, 32 * MiB)
HOT_BYTES = 8 * MiB
"""Where the guest writes: a full backup stays small however long the run."""
_BACKUP_TIMEOUT_SECONDS = 300


@dataclass
class LoadResult:
    """What a load run counted, and the lines that explain it."""

    backups: int
    failures: int
    leaks: int
    details: list[str] = field(default_factory=list)
    peak_service_backups: int = 0
    """The most backups the service's engine ran at the same instant."""
    wall_seconds: float = 0.0


@dataclass
class _VmLoad:
    """One VM of the load: its chain of backups, how it is driven, what happened to it."""

    chain: Chain
    via: str  # "cli" or "socket"
    length: int = 0
    """Backups in the current chain (0: the next one is a full)."""
    ends: list[str] = field(default_factory=list)
    """The last point of each chain: their references are kept for the final check."""
    spans: list[tuple[float, float, str]] = field(default_factory=list)
    taken: int = 0

    @property
    def vm(self) -> LabVM:
        return self.chain.vm


class _Load:
    def __init__(
        self,
        lab: Lab,
        scratch: Path,
        *,
        vms: int,
        duration_s: float,
        max_backups_per_vm: int,
        max_concurrent_backups: int,
        seed: int,
    ) -> None:
        self.lab = lab
        self.scratch = scratch
        self.count = vms
        self.duration_s = duration_s
        self.max_backups_per_vm = max_backups_per_vm
        self.max_concurrent_backups = max_concurrent_backups
        self.rng = random.Random(seed)  # noqa: S311 - reproducible offsets, not secrets
        self.repo: Repository = lab.repository()
        self.pool = ThreadPoolExecutor(max_workers=2 * vms + 2, thread_name_prefix="load")
        self.failures: list[str] = []
        self.backups = 0
        self.log = scratch / "agent.log"
        self.service: Running | None = None
        self.deadline = 0.0
        self.reference_lock = threading.Lock()

    @property
    def repo_dir(self) -> Path:
        return Path(self.repo.address)

    async def blocking(self, call: Callable[..., T], *args: Any) -> T:
        """Run a blocking lab call in the load's own threads."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, call, *args)

    # -- the run ------------------------------------------------------------------------------
    async def run(self) -> LoadResult:
        try:
            return await self._run()
        finally:
            self.pool.shutdown(wait=True)

    async def _run(self) -> LoadResult:
        started = time.monotonic()
        loads = [
            _VmLoad(
                Chain(self.lab, self.lab.create_vm(disks=DISKS), self.repo, self.log),
                "cli" if i % 2 == 0 else "socket",
            )
            for i in range(self.count)
        ]
        async with running(self.scratch, max_backups=self.max_concurrent_backups) as service:
            self.service = service
            self.deadline = time.monotonic() + self.duration_s
            await asyncio.gather(*(self.drive(load) for load in loads))
        wall = time.monotonic() - started
        for load in loads:
            await self.final_check(load)
        found = leaks(self.lab)
        for load in loads:
            expected = load.chain.bitmaps[-1:]
            if load.vm.checkpoints() != expected:
                found.append(
                    f"{load.vm.name} has checkpoints {load.vm.checkpoints()}, not {expected}"
                )
        overlapping = [ld.vm.name for ld in loads if overlap([(s, e) for s, e, _ in ld.spans])]
        overlapping += service.engine.overlapping_vms()
        peak = service.engine.peak_backups
        if overlapping:
            self.failures.append(f"operations on one VM overlapped: {sorted(set(overlapping))}")
        if peak > self.max_concurrent_backups:
            self.failures.append(
                f"the service ran {peak} backups at once (limit {self.max_concurrent_backups})"
            )
        details = [
            f"{len(loads)} VMs ({sum(ld.via == 'cli' for ld in loads)} through the drop-in, "
            f"{sum(ld.via == 'socket' for ld in loads)} through the socket), "
            f"{self.backups} backups in {wall:.0f} s, the repository holding "
            f"{directory_size(self.repo_dir) // MiB} MiB",
            "per VM: " + ", ".join(f"{ld.vm.name} {ld.via} {ld.taken}" for ld in loads),
            f"the service ran at most {peak} backups at once (limit "
            f"{self.max_concurrent_backups}); per-VM serialization "
            + ("broken" if overlapping else "held"),
            *[f"failure: {f}" for f in self.failures],
            *[f"leak: {leak}" for leak in found],
        ]
        return LoadResult(
            backups=self.backups,
            failures=len(self.failures),
            leaks=len(found),
            details=details,
            peak_service_backups=peak,
            wall_seconds=wall,
        )

    def more(self, load: _VmLoad) -> bool:
        return load.taken < self.max_backups_per_vm and time.monotonic() < self.deadline

    async def drive(self, load: _VmLoad) -> None:
        """Write, back up, take the reference, verify; until a bound is reached."""
        while self.more(load):
            await self.timed(load, "write", self.blocking(self.write, load.vm))
            mode = "incremental" if 0 < load.length < CHAIN_LENGTH else "full"
            load.taken += 1
            parents = load.chain.parent_values("paths") if mode == "incremental" else {}
            argv, path, bitmap = load.chain.argv(mode)
            try:
                if load.via == "cli":
                    await self.timed(load, "backup", self.dropin_backup(argv, bitmap))
                else:
                    await self.socket_backup(load, path, mode, bitmap, parents)
            except _Failed as failed:
                self.failures.append(f"{load.vm.name} {path} ({mode}): {failed}")
                load.length = 0  # the next one starts a new chain
                continue
            load.chain.record(mode, path, bitmap)
            self.backups += 1
            load.length = 1 if mode == "full" else load.length + 1
            refs = await self.timed(
                load, "reference", self.blocking(self.reference, load.vm, self.refs_dir(path))
            )
            problem = await self.blocking(self.restorable, load, path, refs)
            if problem:
                self.failures.append(f"{load.vm.name} {path}: {problem}")
            # Only each chain's last point keeps its references (checked again at the end).
            if load.length > 1:
                await self.blocking(shutil.rmtree, self.refs_dir(load.ends.pop()))
            load.ends.append(path)

    def reference(self, vm: LabVM, dest: Path) -> list[Path]:
        """The VM's reference backup, one at a time: they share the lab's connection, which
        takes one backup job's close callback at a time."""
        with self.reference_lock:
            return vm.reference_backup(dest)

    def refs_dir(self, path: str) -> Path:
        return self.scratch / "refs" / path

    async def timed(self, load: _VmLoad, what: str, work: Awaitable[T]) -> T:
        started = time.monotonic()
        try:
            return await work
        finally:
            load.spans.append((started, time.monotonic(), what))

    def write(self, vm: LabVM) -> None:
        """A few guest writes: data, zeroes, a discard now and then (within each disk's
        first :data:`HOT_BYTES`, so that long runs do not fill the repository)."""
        for _ in range(self.rng.randint(1, 3)):
            disk = self.rng.randrange(len(vm.disks))
            length = self.rng.choice((64, 128, 256)) * KiB
            hot = min(HOT_BYTES, vm.disks[disk].size)
            offset = self.rng.randrange(0, hot - length, 64 * KiB)
            action = self.rng.random()
            if action < 0.7:
                vm.write(disk, offset, length, pattern=self.rng.randrange(1, 256))
            elif action < 0.85:
                vm.write_zeroes(disk, offset, length)
            else:
                vm.discard(disk, offset, length)

    def restorable(self, load: _VmLoad, path: str, refs: list[Path]) -> str | None:
        """None when each disk's file checks clean, links relatively, and flattened through
        its chain (``qemu-img convert``) equals the reference; else why not."""
        try:
            verify_backup(self.lab, self.repo_dir, path, load.vm, refs)
        except (AssertionError, ShimError, OSError) as exc:
            return str(exc) or type(exc).__name__
        return None

    async def final_check(self, load: _VmLoad) -> None:
        """Each chain's last point, checked again now that every backup is done."""
        for path in load.ends:
            refs = [self.refs_dir(path) / f"{d.target}.qcow2" for d in load.vm.disks]
            problem = await self.blocking(self.restorable, load, path, refs)
            if problem:
                self.failures.append(f"{load.vm.name} {path} at the end: {problem}")

    # -- the drop-in --------------------------------------------------------------------------
    async def dropin_backup(self, argv: list[str], bitmap: str) -> None:
        process = await asyncio.create_subprocess_exec(
            str(DROPIN),
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, LOG_FILE_ENV: str(self.log)},
        )
        try:
            stdout, _ = await asyncio.wait_for(process.communicate(), _BACKUP_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise _Failed("the drop-in timed out") from None
        text = stdout.decode(errors="replace")
        if process.returncode != 0:
            raise _Failed(f"exit {process.returncode}: {text.strip()}")
        lines = text.splitlines()
        if f"BITMAP_CREATED={bitmap}" not in lines or "INCREMENTAL_FALLBACK=true" in lines:
            raise _Failed(f"unexpected stdout: {text.strip()!r}")

    # -- the socket ---------------------------------------------------------------------------
    async def socket_backup(
        self, load: _VmLoad, path: str, mode: str, bitmap: str, parents: dict[str, str]
    ) -> None:
        """The backup and a delete for the same VM, sent at once."""
        incremental: dict[str, Any] = {}
        if mode == "incremental":
            incremental = {
                "bitmap_parent": load.chain.bitmaps[-1],
                "parent_paths": parents["parent_paths"].split(","),
            }
        take = TakeBackupCommand(
            vm_name=load.vm.name,
            backup_path=path,
            quiesce=False,
            mode=mode,
            bitmap_new=bitmap,
            backup_repo_type=self.repo.type,
            backup_repo_address=self.repo.address,
            mount_options=self.repo.options,
            **incremental,
        )
        delete = DeleteBackupCommand(
            backup_path=f"{load.vm.name}/never-taken",
            backup_repo_type=self.repo.type,
            backup_repo_address=self.repo.address,
            mount_options=self.repo.options,
        )
        assert self.service is not None
        started = time.monotonic()
        (status, answers), (delete_status, deleted) = await asyncio.gather(
            self.service.post(dump([take])), self.service.post(dump([delete]))
        )
        load.spans.append((started, time.monotonic(), "backup"))
        if delete_status != 200 or not _answer(deleted).get("result"):
            details = str(_answer(deleted).get("details", deleted)).strip()
            self.failures.append(f"{load.vm.name}: the delete sent with {path} failed: {details}")
        if status != 200:
            raise _Failed(f"HTTP {status}: {answers}")
        answer = _answer(answers)
        if not answer.get("result"):
            raise _Failed(str(answer.get("details", "")).strip())
        if answer.get("bitmapCreated") != bitmap or answer.get("incrementalFallback"):
            raise _Failed(f"unexpected answer: {answer}")


class _Failed(Exception):
    """A backup of the load did not succeed as it should."""


def _answer(answers: Any) -> dict[str, Any]:
    if isinstance(answers, list) and answers and isinstance(answers[0], dict):
        return next(iter(answers[0].values()))
    return {}


def run_load(
    lab: Lab,
    *,
    vms: int = 8,
    duration_s: float,
    max_backups_per_vm: int,
    max_concurrent_backups: int = 2,
    scratch: Path | None = None,
    seed: int = 11,
) -> LoadResult:
    """Back up ``vms`` lab VMs concurrently (half through the drop-in, half through the
    socket service with a limit of ``max_concurrent_backups``), with writes between
    backups, for ``duration_s`` seconds or ``max_backups_per_vm`` backups per VM, whichever
    comes first; then check what the module's docstring says.

    The service's and the drop-in's log go to ``scratch/agent.log``.
    """
    scratch = scratch or lab.new_dir("load")
    load = _Load(
        lab,
        scratch,
        vms=vms,
        duration_s=duration_s,
        max_backups_per_vm=max_backups_per_vm,
        max_concurrent_backups=max_concurrent_backups,
        seed=seed,
    )
    with captured_log(scratch / "agent.log"):
        return asyncio.run(load.run())
