"""qemu-storage-daemon with a minimal QMP client: block jobs on images no VM has open.

Used for stopped VMs: the daemon opens each source qcow2 read-write with image locking,
so a VM that starts meanwhile fails to get its write lock instead of writing under the
backup; one QMP transaction adds the new bitmap and starts the copy at the same instant;
the daemon holds the images until it quits, which also stores the bitmaps. QEMU moves
the data; Python only speaks QMP.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import os
import select
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from shim import cancel, proc
from shim.errors import CommandFailed, ShimError

log = logging.getLogger(__name__)

QSD = "qemu-storage-daemon"
"""Its name in messages."""
BINARY = "qemu-storage-daemon"
"""The program run (a test puts a stand-in here)."""

# Nothing waits for the daemon forever: a daemon stuck on a dead NAS (or in the kernel)
# fails the operation, named, and is killed; the context managers around it then release
# the VM's lock and, with the process, its image locks.
START_TIMEOUT_SECONDS = 30.0
"""From starting the daemon until its monitor is connected and greeted."""
QMP_TIMEOUT_SECONDS = 60.0
"""For any one QMP answer (a command on a hung NAS may take a while, never this long)."""
JOB_STALL_SECONDS = 300.0
"""A block job whose progress stays still this long is taken for hung (its NAS is dead)."""
JOB_PROGRESS_SECONDS = 5.0
"""How often block jobs' progress is asked for while waiting for them."""
CANCEL_TIMEOUT_SECONDS = 3.0
"""How long cancelled jobs may take to end before the daemon is killed instead.

QEMU ends a cancelled job only once its writes in flight have drained (up to tens of MiB:
a minute on a slow NAS), and so does ``quit``. A stop must not wait for that, so the
daemon is then killed: whatever bitmaps it had open read-write are left flagged in use,
and the next incremental of that VM falls back to a full one (saying so), the shim's safe
path for inconsistent bitmaps. A healthy NAS drains well within this."""
QUIT_TIMEOUT_SECONDS = 120.0
"""For quitting: the daemon closes the images, storing bitmaps, flushing targets."""
POLL_SECONDS = 0.2
"""How often the cancellation token is looked at while waiting for the daemon."""
_STDERR_LINES = 200
"""The daemon's last output lines kept for an error message (the rest only logged)."""


class QmpError(ShimError):
    """QEMU answered a QMP command with an error, or the monitor failed."""


class DaemonHung(QmpError):
    """The daemon did not answer in time: it has been (or is about to be) killed."""


class StorageDaemon:
    """One ``qemu-storage-daemon`` process and its QMP monitor, as a context manager.

    ``blockdevs`` are ``--blockdev`` option strings, ``objects`` ``--object`` ones (created
    first: a throttle group the nodes name). Leaving the block quits the daemon
    (bitmaps are written to the images then); on an exception it is asked to quit, and
    killed if it does not answer. Every wait is bounded (see the module's constants), and
    :meth:`wait_jobs` stops at the thread's cancellation token (:mod:`shim.cancel`).
    """

    def __init__(self, blockdevs: Sequence[str], objects: Sequence[str] = ()) -> None:
        self._blockdevs = list(blockdevs)
        self._objects = list(objects)
        self._dir = Path(tempfile.mkdtemp(prefix="shim-qsd."))
        self._socket_path = self._dir / "qmp.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._output: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._drain: threading.Thread | None = None
        self._hung: str | None = None
        """Why the monitor is no longer trusted: later commands fail at once, exit kills."""
        self.events: list[dict[str, Any]] = []

    @property
    def pid(self) -> int | None:
        """The daemon's process id, once started."""
        return None if self._proc is None else self._proc.pid

    def __enter__(self) -> StorageDaemon:
        argv = [BINARY]
        for obj in self._objects:
            argv += ["--object", obj]
        for blockdev in self._blockdevs:
            argv += ["--blockdev", blockdev]
        # The daemon connects to us: accepting is an event to wait for, not a file to poll.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self._socket_path))
        listener.listen(1)
        argv += [
            "--chardev", f"socket,path={self._socket_path},server=off,id=qmp0",
            "--monitor", "chardev=qmp0",
        ]  # fmt: skip
        log.debug("run: %s", " ".join(argv))
        try:
            # One pipe for both streams, always drained by a thread: a daemon whose output
            # filled an unread pipe would block in its write, and look hung.
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            self._drain = threading.Thread(
                target=self._drain_output, args=(self._proc.stdout,), name="qsd-output",
                daemon=True,
            )  # fmt: skip
            self._drain.start()
            self._accept(listener)
            self.command("qmp_capabilities")
        except FileNotFoundError:
            if self._proc is not None:
                self._kill()
                raise
            self._remove_dir()
            raise CommandFailed([QSD], 127, f"{QSD}: command not found") from None
        except BaseException:
            if self._proc is None:
                # A signal (SIGTERM: the agent's timeout) while Popen waited for the exec:
                # the daemon may run, its pid never returned. It names our monitor's socket.
                for pid in proc.processes_naming(str(self._socket_path)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self._remove_dir()
            else:
                self._kill()
            raise
        finally:
            listener.close()
        return self

    def _drain_output(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            self._output.append(line)
            log.debug("%s: %s", QSD, line)
        stream.close()

    def _output_text(self) -> str:
        """The daemon's output so far (all of it once the process has exited)."""
        if self._drain is not None:
            self._drain.join(timeout=5)  # end of file follows the exit at once
        return "\n".join(self._output)

    def _accept(self, listener: socket.socket) -> None:
        proc = self._process
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        token = cancel.current()
        # Either the daemon connects, or it exits, or the deadline passes, or we are told
        # to stop: looked at every POLL_SECONDS.
        while True:
            ready, _, _ = select.select([listener], [], [], POLL_SECONDS)
            if ready:
                break
            if proc.poll() is not None:
                raise CommandFailed([QSD], proc.returncode, self._output_text())
            if token is not None and token.take():
                raise cancel.Cancelled([QSD], token.reason)
            if time.monotonic() >= deadline:
                raise DaemonHung(
                    f"{QSD} did not connect its monitor within {START_TIMEOUT_SECONDS:g} s"
                )
        self._sock, _ = listener.accept()
        greeting = self._read("with its QMP greeting", deadline, START_TIMEOUT_SECONDS)
        if "QMP" not in greeting:
            raise QmpError(f"unexpected QMP greeting: {greeting}")

    def _read(
        self, what: str, deadline: float, seconds: float, *, wait: bool = True
    ) -> dict[str, Any]:
        """The monitor's next message; past ``deadline``, :class:`DaemonHung` saying that
        it did not answer ``what`` within ``seconds`` (or, with ``wait=False``, {})."""
        sock = self._sock
        if sock is None:
            raise QmpError(f"{QSD} is not running")
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if not wait:
                    return {}
                self._hung = f"{QSD} did not answer {what} within {seconds:g} s"
                raise DaemonHung(self._hung)
            ready, _, _ = select.select([sock], [], [], remaining)
            if not ready:
                continue
            chunk = sock.recv(65536)
            if not chunk:
                raise QmpError(f"{QSD} closed its monitor")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    @functools.cached_property
    def qemu_version(self) -> tuple[int, int, int]:
        """The daemon's QEMU version (``query-version``)."""
        found = self.command("query-version")["qemu"]
        return int(found["major"]), int(found["minor"]), int(found["micro"])

    def command(self, execute: str, /, **arguments: Any) -> Any:
        """Execute one QMP command and return its result; events seen meanwhile are kept.

        Its answer must come within :data:`QMP_TIMEOUT_SECONDS`; a daemon that did not
        answer once is not asked again (every later command fails at once).
        """
        if self._sock is None:
            raise QmpError(f"{QSD} is not running")
        if self._hung is not None:
            raise DaemonHung(self._hung)
        message: dict[str, Any] = {"execute": execute}
        if arguments:
            message["arguments"] = arguments
        self._sock.sendall(json.dumps(message).encode() + b"\n")
        deadline = time.monotonic() + QMP_TIMEOUT_SECONDS
        while True:
            reply = self._read(execute, deadline, QMP_TIMEOUT_SECONDS)
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QmpError(f"{execute}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def _next_event(self, until: float) -> dict[str, Any] | None:
        """A kept event, else the monitor's next message by ``until``, else None."""
        if self.events:
            return self.events.pop(0)
        if self._hung is not None:
            raise DaemonHung(self._hung)
        return self._read("an event", until, POLL_SECONDS, wait=False) or None

    def wait_jobs(
        self, job_ids: Sequence[str], on_progress: Callable[[int], None] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Block until every job ended; return each job's BLOCK_JOB_COMPLETED data.

        ``on_progress`` is called with the bytes the jobs have done whenever their progress
        is read (every :data:`JOB_PROGRESS_SECONDS`).

        A job that failed or was cancelled raises :class:`QmpError` with QEMU's reason.
        Jobs whose progress stays still for :data:`JOB_STALL_SECONDS` are cancelled and
        :class:`DaemonHung` raised; when the thread's operation is cancelled
        (:mod:`shim.cancel`), the jobs are cancelled and :class:`~shim.cancel.Cancelled`
        raised. Either way the caller's cleanup then runs with the daemon still answering.
        """
        pending = set(job_ids)
        done: dict[str, dict[str, Any]] = {}
        token = cancel.current()
        progress: object = None
        moved = time.monotonic()
        next_look = moved + JOB_PROGRESS_SECONDS
        while pending:
            now = time.monotonic()
            # The token's state, not take(): a stop that something swallowed on the way
            # (a probe that logged and went on) must still stop the copy.
            if token is not None and token.cancelled:
                token.take()
                self._cancel_jobs(pending, token.reason)
                raise cancel.Cancelled([QSD], token.reason)
            if now >= next_look:
                current = self._progress(pending)
                if on_progress is not None:
                    on_progress(sum(done_bytes for _, done_bytes, _ in current))
                if current != progress:
                    progress, moved = current, now
                elif now - moved >= JOB_STALL_SECONDS:
                    stalled = ", ".join(sorted(pending))
                    message = (
                        f"{QSD} block job {stalled} made no progress for {JOB_STALL_SECONDS:g} s"
                    )
                    self._cancel_jobs(pending, "no progress")
                    raise DaemonHung(message)
                next_look = now + JOB_PROGRESS_SECONDS
            event = self._next_event(min(now + POLL_SECONDS, next_look))
            if event is None:
                continue
            self._job_ended(event, pending, done)
        return done

    @staticmethod
    def _job_ended(
        event: dict[str, Any], pending: set[str], done: dict[str, dict[str, Any]]
    ) -> None:
        kind, data = event.get("event"), event.get("data", {})
        if kind in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") and data.get("device") in pending:
            pending.discard(data["device"])
            done[data["device"]] = data
            if kind == "BLOCK_JOB_CANCELLED" or data.get("error"):
                raise QmpError(f"block job {data['device']}: {data.get('error') or 'cancelled'}")

    def _progress(self, pending: set[str]) -> list[tuple[str, int, str]]:
        """The pending jobs' (id, bytes done, status): the same twice means no progress."""
        jobs = self.command("query-jobs")
        return sorted(
            (job["id"], int(job.get("current-progress", 0)), str(job.get("status")))
            for job in jobs
            if job.get("id") in pending
        )

    def _cancel_jobs(self, pending: set[str], reason: str) -> None:
        """Cancel ``pending`` jobs and wait (bounded) until QEMU says they ended.

        Their cancellation drains the writes in flight; a daemon that does not end them in
        time is marked hung, so that leaving the context kills it rather than asking it.
        """
        log.info("cancelling block job(s) %s: %s", ", ".join(sorted(pending)), reason)
        for job_id in sorted(pending):
            try:
                self.command("job-cancel", id=job_id)
            except DaemonHung:
                return
            except QmpError as exc:  # ended meanwhile: its event says how
                log.debug("job-cancel %s: %s", job_id, exc)
        deadline = time.monotonic() + CANCEL_TIMEOUT_SECONDS
        while pending:
            event = self._next_event(min(deadline, time.monotonic() + POLL_SECONDS))
            if event is not None:
                kind, data = event.get("event"), event.get("data", {})
                if kind in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                    pending.discard(data.get("device"))
                continue
            if time.monotonic() >= deadline:
                self._hung = (
                    f"{QSD} did not end cancelled block job(s) {', '.join(sorted(pending))} "
                    f"within {CANCEL_TIMEOUT_SECONDS:g} s"
                )
                log.warning(
                    "%s: killing it (bitmaps it holds read-write will be inconsistent)",
                    self._hung,
                )
                return

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            if self._hung is not None:
                self._kill()
                return
            # Quit cleanly when the daemon still answers: a killed daemon leaves the images'
            # persistent bitmaps flagged in use, i.e. inconsistent at the next open.
            try:
                self._quit()
            except (QmpError, CommandFailed, OSError, ValueError):
                self._kill()
            return
        self._quit()

    def kill(self) -> None:
        """Kill the daemon now, without a clean close: for a caller whose targets are
        discarded anyway (a cancelled job would first drain its writes to a slow NAS).
        Leaving the context afterwards does nothing more."""
        self._hung = self._hung or f"{QSD} was killed"
        self._kill()

    def _quit(self) -> None:
        if self._hung is not None:  # asking again would only wait again
            self._kill()
            raise DaemonHung(self._hung)
        try:
            self._close_images()
            self.command("quit")
        except DaemonHung:
            self._kill()
            raise
        except (QmpError, OSError):
            pass  # the daemon may close the monitor as it quits
        proc = self._process
        try:
            proc.wait(timeout=QUIT_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self._kill()
            raise DaemonHung(f"{QSD} did not quit within {QUIT_TIMEOUT_SECONDS:g} s") from None
        finally:
            self._close()
        if proc.returncode != 0:
            raise CommandFailed([QSD], proc.returncode, self._output_text())

    def _close_images(self) -> None:
        """Close the command line's images, the last opened first, before quitting.

        Closing is what stores an image's persistent bitmaps, and QEMU 5.2's daemon (Debian
        11) quits without closing them: a bitmap added there would be lost. Later daemons
        close them as they quit; closing first changes nothing for them. Jobs still running
        (a stop came while they copied) are cancelled first: a node in a job's use cannot
        be closed, and a bitmap left open read-write is inconsistent at the next open. A
        node still in use otherwise is left to the quit."""
        running = {
            job["id"]
            for job in self.command("query-jobs")
            if job.get("status") not in ("concluded", "null", "aborting")
        }
        if running:
            self._cancel_jobs(running, "closing the images")
            if self._hung is not None:
                raise DaemonHung(self._hung)
        for option in reversed(self._blockdevs):
            node = _node_name(option)
            if node is None:
                continue
            try:
                self.command("blockdev-del", **{"node-name": node})
            except DaemonHung:
                raise
            except QmpError as exc:
                log.debug("%s stays open until the daemon quits: %s", node, exc)

    @property
    def _process(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise QmpError(f"{QSD} is not running")
        return self._proc

    def _kill(self) -> None:
        # SIGKILL, then reap it: the kernel then drops its image locks with its files.
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._drain is not None:
            self._drain.join(timeout=5)
        self._remove_dir()

    def _remove_dir(self) -> None:
        for path in (self._socket_path, self._dir):
            with contextlib.suppress(OSError):
                path.unlink() if path.is_socket() else path.rmdir()


def node_bitmaps(daemon: StorageDaemon, node: str) -> dict[str, bool]:
    """Persistent bitmap name -> consistent, for one node (an inconsistent one survived a
    crash)."""
    return {
        b["name"]: not b.get("inconsistent", False)
        for b in _dirty_bitmaps(daemon, node)
        if b.get("persistent", True)
    }


def bitmap_count(daemon: StorageDaemon, node: str, name: str) -> int:
    """The bytes the bitmap ``name`` of ``node`` marks dirty."""
    for bitmap in _dirty_bitmaps(daemon, node):
        if bitmap.get("name") == name:
            return int(bitmap["count"])
    raise QmpError(f"node {node} has no bitmap {name}")


def _dirty_bitmaps(daemon: StorageDaemon, node: str) -> list[dict[str, Any]]:
    for info in daemon.command("query-named-block-nodes", flat=True):
        if info.get("node-name") == node:
            return list(info.get("dirty-bitmaps", []))
    return []


def blockdev_file(node: str, path: str | os.PathLike[str], *, read_only: bool = False) -> str:
    """A ``--blockdev`` for a file node with image locking on."""
    ro = ",read-only=on" if read_only else ""
    return f"driver=file,filename={_escape(os.fspath(path))},node-name={node},locking=on{ro}"


def blockdev_qcow2(node: str, file_node: str, *, read_only: bool = False) -> str:
    """A ``--blockdev`` for a qcow2 node over ``file_node`` (its backing chain opened too)."""
    ro = ",read-only=on" if read_only else ""
    return f"driver=qcow2,file={file_node},node-name={node}{ro}"


def blockdev_nbd(socket: str | os.PathLike[str], export: str, *, node: str = "",
                 bitmap: str = "") -> str:  # fmt: skip
    """A read-only ``--blockdev`` (or ``qemu-img --image-opts``) for an NBD export on a Unix
    socket; with ``bitmap``, block status reports that dirty-bitmap context (a dirty extent
    reads as a hole, through QEMU's NBD client)."""
    opts = [
        "driver=nbd", "server.type=unix", f"server.path={_escape(os.fspath(socket))}",
        f"export={_escape(export)}", "read-only=on",
    ]  # fmt: skip
    opts += [f"node-name={node}"] if node else []
    opts += [f"x-dirty-bitmap=qemu:dirty-bitmap:{_escape(bitmap)}"] if bitmap else []
    return ",".join(opts)


def _node_name(option: str) -> str | None:
    """The ``node-name`` of a ``--blockdev`` option string (``,,`` is a comma in a value)."""
    for part in option.replace(",,", "\0").split(","):
        key, _, value = part.partition("=")
        if key == "node-name":
            return value.replace("\0", ",")
    return None


def _escape(value: str) -> str:
    # QEMU's option syntax: a comma inside a value is written twice.
    return value.replace(",", ",,")
