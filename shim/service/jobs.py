"""Jobs: an envelope's commands run in order, in worker threads, one VM at a time.

Every request becomes a :class:`Job`, synchronous or not. Its commands run one after the
other (CloudStack's executeInSequence); each waits for its VM (two requests for one VM
run one after the other instead of failing) and, if it is a backup, for one of the
host's backup slots. The engine is blocking: it runs in a thread pool of its own, so that
the event loop, and the progress and health requests it serves, are never held up.

Every command runs under a deadline, as under the agent: its ``wait`` when > 0, else the
configured default (the agent's ``cmds.timeout``). A command past its deadline is stopped,
and so is a running command whose job is aborted: its cancellation token
(:mod:`shim.cancel`) kills the program the engine waits for, cancels a stopped VM's block
jobs in qemu-storage-daemon, ends a wait for the VM's lock, and a running backup's libvirt
job is aborted; the engine then cleans up exactly as after any failure and raises.
A timed-out command answers what the agent's ``Script`` makes of a timeout (``timeout``);
an aborted one answers the engine's failure. Aborting a job that waits removes it from the
queue; commands not yet started are answered as aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from commands.model import Answer, Command
from shim import log as shim_log
from shim import operations
from shim.cancel import CancelToken
from shim.contract import BackupOutcome
from shim.errors import EXIT_ERROR, Aborted, ShimError, VirtError
from shim.service.config import DEFAULT_COMMAND_TIMEOUT
from shim.virt.jobs import BackupJob

log = logging.getLogger(__name__)

ABORTED_MESSAGE = "aborted before it started"

Runner = Callable[..., operations.Result]
"""What runs a request: :func:`shim.operations.run` (the engine), a test's spy around it."""


class JobState(str, enum.Enum):
    """Where a job is: waiting, running, or finished one of three ways."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def finished(self) -> bool:
        """Whether the job has its answers."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.ABORTED)


@dataclass(frozen=True)
class Progress:
    """Bytes the current backup has copied, of the bytes it will copy (libvirt's numbers)."""

    processed: int = 0
    total: int = 0


class Job:
    """One request's commands, their state, progress and answers."""

    def __init__(self, commands: Sequence[Command]) -> None:
        self.id = uuid.uuid4().hex
        self.commands = list(commands)
        self.state = JobState.QUEUED
        self.answers: list[Answer] | None = None
        self.progress = Progress()
        self.created = time.time()
        self.abort_requested = False
        self.abort_task: asyncio.Future[None] | None = None
        """The abort under way (DELETE answers before its cleanup may have ended)."""
        self.executing = False
        """A command runs in a worker thread (the task must then not be cancelled)."""
        self._backup_job: BackupJob | None = None
        self._cancel = CancelToken()
        """The running command's: cancelled when it is aborted or past its deadline."""
        self._done = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    # -- called from the worker thread ------------------------------------------------------
    def attach(self, backup_job: BackupJob) -> None:
        """The engine's ``on_job``: the libvirt job now exists (progress, abort)."""
        self._backup_job = backup_job
        if self._cancel.cancelled:
            # Stopped before the job existed: it will not begin, and that stops the engine.
            self._cancel.take()
            backup_job.abort()

    # -- progress and abort (threads) -------------------------------------------------------
    def read_progress(self) -> Progress:
        """The running backup's progress from libvirt, else the last known (blocking)."""
        backup_job = self._backup_job
        if backup_job is not None and self.executing:
            try:
                stats = backup_job.progress()
            except VirtError:
                return self.progress  # the job just ended
            if stats.total:
                self.progress = Progress(stats.processed, stats.total)
        return self.progress

    def stop_running(self, reason: str) -> None:
        """Cancel the running command's token and abort its libvirt job (blocking).

        The engine stops at its next safe point and cleans up. A libvirt job it has not
        created yet is aborted by :meth:`attach`, one it has not begun refuses to begin.
        The token is cancelled first, without blocking: callers on the event loop do that
        themselves (:meth:`cancel_running`) before they come here in a thread.
        """
        self.cancel_running(reason)
        backup_job = self._backup_job
        if backup_job is None:
            return
        if _not_ended(backup_job):
            # The abort stops the engine (its wait, or its begin, fails): the token must not
            # stop the programs of the cleanup that follows (a umount) in turn.
            self._cancel.take()
        backup_job.abort()

    def cancel_running(self, reason: str) -> None:
        """Cancel the running command's token (never blocks: fine on the event loop).

        Every program the engine waits for, its lock wait and qemu-storage-daemon's block
        jobs look at the token within a fraction of a second: the stop begins now.
        """
        self._cancel.cancel(reason)

    # -- state ------------------------------------------------------------------------------
    async def wait(self) -> list[Answer]:
        """The answers, once the job has finished."""
        await self._done.wait()
        assert self.answers is not None  # noqa: S101 - set before _done
        return self.answers

    def _begin_command(self) -> CancelToken:
        self.state = JobState.RUNNING
        self.executing = True
        self._backup_job = None
        self._cancel = CancelToken()
        return self._cancel

    def _end_command(self) -> None:
        self.executing = False
        self._backup_job = None

    def _finish(self, answers: list[Answer]) -> None:
        self.answers = answers
        if all(answer.result for answer in answers):
            # Even when an abort was asked: the commands finished first, and did their work
            # (a backup published): the state says what the answers say.
            self.state = JobState.SUCCEEDED
        elif self.abort_requested:
            self.state = JobState.ABORTED
        else:
            self.state = JobState.FAILED
        self._done.set()


@dataclass
class _SharedRun:
    """A run several identical requests wait for; stopped only when all stopped waiting."""

    future: asyncio.Future[operations.Result]
    cancel: CancelToken
    waiters: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def join(self, token: CancelToken) -> None:
        """One more waiter, whose token's cancellation withdraws it."""
        with self._lock:
            self.waiters += 1
        token.on_cancel(lambda: self._leave(token.reason))

    def _leave(self, reason: str) -> None:
        # Called in the thread that cancels a waiter's token: a run nobody waits for any
        # more is stopped, for the reason the last one stopped waiting.
        with self._lock:
            self.waiters -= 1
            last = self.waiters == 0
        if last:
            self.cancel.cancel(reason)


class _VmLocks:
    """One asyncio lock per VM name, dropped when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, vm: str | None) -> AsyncIterator[None]:
        if vm is None:
            yield
            return
        lock, users = self._locks.get(vm, (asyncio.Lock(), 0))
        self._locks[vm] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[vm]
            if users == 1:
                del self._locks[vm]
            else:
                self._locks[vm] = (lock, users - 1)


class Scheduler:
    """Runs jobs: in order within a job, one at a time per VM, ``max_backups`` backups."""

    def __init__(
        self,
        *,
        max_backups: int,
        keep_finished: int = 256,
        runner: Runner = operations.run,
        command_timeout: int = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        self.max_backups = max_backups
        self.command_timeout = command_timeout
        """Seconds a command may run when its ``wait`` does not say (is 0)."""
        self._backup_slots = asyncio.Semaphore(max_backups)
        self._vm_locks = _VmLocks()
        self._keep_finished = keep_finished
        self._runner = runner
        # Its own pool: long backups never starve progress or health reads (default pool).
        self._executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="shim-op")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._shared_reads: dict[operations.Request, _SharedRun] = {}
        self.closed = False
        """Shutting down: no new job is accepted."""

    # -- jobs -------------------------------------------------------------------------------
    def submit(self, commands: Sequence[Command]) -> Job:
        """Queue a job for ``commands`` (already loaded and validated) and start it."""
        if self.closed:
            raise RuntimeError("the scheduler is shut down")
        job = Job(commands)
        self._jobs[job.id] = job
        self._forget_old_jobs()
        job.task = asyncio.get_running_loop().create_task(self._run(job), name=f"job-{job.id}")
        return job

    def get(self, job_id: str) -> Job | None:
        """The job called ``job_id``, if it is known (finished ones are kept for a while)."""
        return self._jobs.get(job_id)

    def in_flight(self) -> list[Job]:
        """Jobs not finished yet."""
        return [job for job in self._jobs.values() if not job.state.finished]

    def _forget_old_jobs(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.state.finished]
        for job_id in finished[: max(0, len(finished) - self._keep_finished)]:
            del self._jobs[job_id]

    async def abort(self, job: Job) -> None:
        """Abort ``job`` and wait until it has finished (its cleanup done).

        The stop begins before the first await: the running command's token is cancelled
        here, on the event loop, so neither a busy thread pool nor a slow libvirt abort
        delays it; only the wait for the engine's cleanup takes time.
        """
        if job.state.finished:
            return
        job.abort_requested = True
        log.info("job %s: abort requested", job.id)
        if job.executing:
            job.cancel_running("aborted")
            # Blocking (libvirt confirms its abort): in a thread, then wait for the engine.
            await asyncio.to_thread(job.stop_running, "aborted")
        elif job.task is not None:
            job.task.cancel()  # waiting for a VM or a slot: nothing runs, nothing to clean
        await job.wait()

    async def progress(self, job: Job) -> Progress:
        """The job's progress, read from libvirt while a backup runs."""
        if job.executing:
            return await asyncio.to_thread(job.read_progress)
        return job.progress

    async def shutdown(self) -> None:
        """Abort every job in flight at once, wait for them, stop the worker threads.

        All at the same time, not one after the other: each cleanup (a libvirt abort, a
        storage daemon draining, an unmount) takes its own time, and together they must
        fit in the systemd unit's ``TimeoutStopSec``.
        """
        self.closed = True
        jobs = self.in_flight()
        # Every stop begins here, before any await: no queued job can start in the slot or
        # VM a stopped one frees, and no running one waits for another's cleanup.
        for job in jobs:
            job.abort_requested = True
            if job.executing:
                job.cancel_running("aborted")
            elif job.task is not None:
                job.task.cancel()
        await asyncio.gather(*(self.abort(job) for job in jobs))
        self._executor.shutdown(wait=True)

    # -- running ----------------------------------------------------------------------------
    async def _run(self, job: Job) -> None:
        answers: list[Answer] = []
        try:
            for command in job.commands:
                if job.abort_requested:
                    answers.append(command.failure(ABORTED_MESSAGE, EXIT_ERROR))
                    continue
                answers.append(await self._run_command(job, command))
        except asyncio.CancelledError:
            # Cancelled only while waiting (never while a command runs): answer the rest.
            answers += [
                command.failure(ABORTED_MESSAGE, EXIT_ERROR)
                for command in job.commands[len(answers) :]
            ]
        job._finish(answers)
        log.info("job %s %s", job.id, job.state.value)

    def deadline(self, command: Command) -> int:
        """Seconds ``command`` may run: its ``wait`` when > 0, else the configured default."""
        return command.wait if command.wait > 0 else self.command_timeout

    async def _run_command(self, job: Job, command: Command) -> Answer:
        # An empty AsyncExitStack: Python 3.9's nullcontext cannot be entered with async with.
        slot = self._backup_slots if command.is_backup else contextlib.AsyncExitStack()
        async with self._vm_locks.hold(command.vm), slot:
            token = job._begin_command()
            log.info("job %s: %s", job.id, command.describe())
            try:
                # In a thread: a Ceph volume's source needs its key from libvirt.
                request = await asyncio.to_thread(command.to_request)
                run, run_cancel = self._execute(
                    request, job, token, command.context_map.get("logid")
                )
                seconds = self.deadline(command)
                try:
                    result = await asyncio.wait_for(asyncio.shield(run), seconds)
                except asyncio.TimeoutError:  # not the builtin before Python 3.11
                    await self._stop_at_deadline(job, command, seconds, run, run_cancel)
                    return command.timed_out()
                answer = command.answer(result)
            except (ShimError, Aborted) as exc:
                how = "stopped" if isinstance(exc, Aborted) else "failed"
                log.error("job %s: %s (exit %d): %s", job.id, how, exc.exit_code, exc)
                return command.failure(exc.message, exc.exit_code)
            except Exception as exc:  # a bug: still an answer, never a dead job
                log.exception("job %s: unexpected error", job.id)
                return command.failure(f"internal error: {type(exc).__name__}: {exc}", EXIT_ERROR)
            finally:
                job._end_command()
            if isinstance(result.outcome, BackupOutcome) and result.outcome.job_stats:
                stats = result.outcome.job_stats
                job.progress = Progress(
                    _count(stats, "disk_processed"), _count(stats, "disk_total")
                )
            return answer

    def _forget_shared(self, request: operations.Request, shared: _SharedRun, _f: object) -> None:
        if self._shared_reads.get(request) is shared:  # not a newer run of the same request
            del self._shared_reads[request]

    async def _stop_at_deadline(
        self,
        job: Job,
        command: Command,
        seconds: int,
        run: asyncio.Future[operations.Result],
        run_cancel: CancelToken,
    ) -> None:
        """Stop a command past its deadline and wait until the engine has cleaned up."""
        log.error("job %s: %s timed out after %d s", job.id, type(command).__name__, seconds)
        # Blocking (a libvirt abort waits for libvirt to confirm): not on the event loop.
        await asyncio.to_thread(job.stop_running, f"timed out after {seconds} s")
        if not run_cancel.cancelled:
            return  # a stats run other requests still wait for: it goes on, for them
        try:
            await asyncio.shield(run)
        except (Exception, Aborted) as exc:  # the answer is "timeout" whatever the run ended with
            log.info("job %s: the stopped command ended with: %s", job.id, exc)
        else:
            log.warning("job %s: the command finished after its deadline", job.id)

    def _execute(
        self, request: operations.Request, job: Job, token: CancelToken, logid: str | None = None
    ) -> tuple[asyncio.Future[operations.Result], CancelToken]:
        """Run ``request`` in a worker thread; the run and the token that stops it.

        Identical stats requests in flight share one run: a stats is a mount, a statvfs and
        an unmount, and fifty clients asking at once need one answer, not fifty mounts
        (measured: p99 at 50 clients from 186 ms to a few ms). A waiter's answer is then at
        most one stats old. Such a run is stopped once every waiter has stopped waiting.
        """
        loop = asyncio.get_running_loop()
        if not isinstance(request, operations.StatsRequest):
            call = partial(self._runner, request, on_job=job.attach, cancel=token)
            return loop.run_in_executor(self._executor, partial(_tagged, logid, call)), token
        shared = self._shared_reads.get(request)
        if shared is None or shared.cancel.cancelled:  # a stopped run answers nobody new
            shared_cancel = CancelToken()
            call = partial(self._runner, request, cancel=shared_cancel)
            future = loop.run_in_executor(self._executor, partial(_tagged, logid, call))
            shared = self._shared_reads[request] = _SharedRun(future, shared_cancel)
            future.add_done_callback(partial(self._forget_shared, request, shared))
        shared.join(token)
        return shared.future, shared.cancel


def _tagged(logid: str | None, call: Callable[[], operations.Result]) -> operations.Result:
    # The engine's lines carry the command's log id: one grep finds the command in the
    # agent's log and the shim's.
    with shim_log.log_id(logid):
        return call()


def _not_ended(backup_job: BackupJob) -> bool:
    """Whether libvirt has not ended ``backup_job`` yet (it runs, or has not begun)."""
    # BackupJob says it nowhere publicly: its outcome is set once libvirt ended the job.
    return not backup_job._outcome.finished.is_set()


def _count(stats: Mapping[str, object], key: str) -> int:
    value = stats.get(key, 0)
    return int(value) if isinstance(value, (int, float)) else 0
