"""The one way the shim runs external programs: an argv list, never a shell.

Every call is logged (with secrets masked), has stdin closed, runs in the C locale so that
messages can be matched, and raises :class:`~shim.errors.CommandFailed` on a non-zero exit
or a timeout. The child's output is captured: nothing it prints reaches the shim's stdout,
which belongs to the agent contract.

Each program starts a process group of its own, and a program stopped (timeout,
cancellation, signal) is killed with its whole group: ``mount`` forks ``mount.cifs``, which
would otherwise live on, holding the pipes the wait reads until it ends by itself. Files
the gate opened (:mod:`shim.gate`) reach a program as inherited descriptors
(``pass_fds``), named ``/dev/fd/N`` on its command line. A program that reads what the NAS
holds can be run without a network (``network=False``: a network namespace of its own,
where nothing is reachable): should a file change between the gate's look and the program's
open, to name ``nbd:`` or ``http:`` somewhere, there is no network for it to reach.

A server a call needs for a while (:func:`serving`) is this process's child for the block
only, and dies with it: a run killed meanwhile leaves none holding the NAS's files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from shim import cancel
from shim.errors import CommandFailed
from shim.redact import redact

log = logging.getLogger(__name__)

_ENV = {**os.environ, "LC_ALL": "C", "LANG": "C"}
_POLL_SECONDS = 0.1
"""How often a running program's cancellation token is looked at."""
_MANY_POLL_SECONDS = 0.02
"""How often :func:`run_many` looks at its children."""


@dataclass(frozen=True)
class Result:
    """What a finished program printed, and how it exited."""

    returncode: int
    stdout: str
    stderr: str


def mask(text: str, secrets: Sequence[str]) -> str:
    """Return ``text`` with every non-empty secret replaced by ``***``, and the secrets a
    source string carries (a Ceph ``key=``) masked by the shared rule."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return redact(text)


def run(
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    check: bool = True,
    secrets: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    network: bool = True,
) -> Result:
    """Run ``argv`` to completion and return its output.

    ``secrets`` are masked in the log and in any error raised; ``pass_fds`` stay open in
    the child under their numbers; without ``network`` it has none. With ``check`` (the default)
    a non-zero exit raises :class:`CommandFailed`; a timeout always does. When the
    thread's operation has a cancellation token (:mod:`shim.cancel`) and it is cancelled,
    the child is killed and :class:`~shim.cancel.Cancelled` (an ``Interrupted``) raised.
    """
    shown = mask(" ".join(argv), secrets)
    log.debug("run: %s", shown)
    token = cancel.current()
    if token is not None and token.take():
        raise cancel.Cancelled(argv, token.reason)  # cancelled in between: stop before it
    try:
        child = subprocess.Popen(
            _confined(argv, network),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env={**_ENV, **env} if env else _ENV,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
        )
    except FileNotFoundError:
        raise CommandFailed(argv, 127, f"{argv[0]}: command not found") from None
    with child:
        try:
            out, err = _communicate(child, argv, timeout, token, secrets)
        except BaseException:
            # A signal's Interrupted (the drop-in), say: never leave the child running.
            _kill_group(child)
            raise
    stdout, stderr = mask(out, secrets), mask(err, secrets)
    if child.returncode != 0:
        log.debug("exit %d: %s: %s", child.returncode, shown, stderr.strip())
        if check:
            raise CommandFailed(argv, child.returncode, stderr)
    return Result(child.returncode, stdout, stderr)


def _communicate(
    child: subprocess.Popen[str],
    argv: Sequence[str],
    timeout: float | None,
    token: cancel.CancelToken | None,
    secrets: Sequence[str],
) -> tuple[str, str]:
    """Wait for ``child`` and take its output; kill it on timeout or cancellation."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        # With a token, wake up now and then to look at it; else only the deadline counts.
        step = (
            remaining
            if token is None or (remaining is not None and remaining < _POLL_SECONDS)
            else _POLL_SECONDS
        )
        try:
            return child.communicate(timeout=step)
        except subprocess.TimeoutExpired:
            pass
        if token is not None and token.take():
            _kill(child)
            log.info("stopped %s: %s", argv[0], token.reason)
            raise cancel.Cancelled(argv, token.reason) from None
        if deadline is not None and time.monotonic() >= deadline:
            _, stderr = _kill(child)
            raise CommandFailed(argv, None, mask(stderr, secrets), timed_out=True) from None


def run_many(
    argvs: Sequence[Sequence[str]],
    *,
    at_once: int,
    check: bool = True,
    on_poll: Callable[[list[int]], None] | None = None,
    pass_fds: Sequence[int] = (),
    network: bool = True,
) -> list[Result]:
    """Run every argv as :func:`run` does, up to ``at_once`` side by side, all from this
    thread; return their results in order. Every child inherits ``pass_fds``; without
    ``network`` none has a network.

    ``on_poll`` is called every few milliseconds with the running children's pids
    (progress, a stall watch) and may raise. Whatever ends the wait early (the thread's
    cancellation, a failure with ``check``, ``on_poll`` raising, a signal's
    ``Interrupted``) kills every child still running before it propagates: none outlives
    the call.
    """
    token = cancel.current()
    results: list[Result | None] = [None] * len(argvs)
    waiting = list(enumerate(argvs))
    running: dict[int, _Child] = {}
    try:
        while waiting or running:
            while waiting and len(running) < at_once:
                index, argv = waiting.pop(0)
                running[index] = _Child(argv, pass_fds, network)
            for index, child in list(running.items()):
                if child.process.poll() is None:
                    continue
                del running[index]
                result = results[index] = child.result()
                if result.returncode != 0:
                    log.debug("exit %d: %s: %s", result.returncode, child.shown, result.stderr)
                    if check:
                        raise CommandFailed(argvs[index], result.returncode, result.stderr)
            if running and token is not None and token.take():
                first = next(iter(running.values()))
                log.info("stopped %s: %s", first.argv[0], token.reason)
                raise cancel.Cancelled(first.argv, token.reason)
            if on_poll is not None and running:
                on_poll([child.process.pid for child in running.values()])
            if running:
                time.sleep(_MANY_POLL_SECONDS)
    except BaseException:
        for child in running.values():
            child.kill()
        raise
    return [r for r in results if r is not None]


SERVER_START_SECONDS = 30.0
"""How long a server (:func:`serving`) may take to accept connections."""


@contextlib.contextmanager
def serving(
    argv: Sequence[str], socket_path: Path, *, pass_fds: Sequence[int] = (), network: bool = True
) -> Iterator[None]:
    """Run the server ``argv`` for the block, from when ``socket_path`` accepts a connection
    (CommandFailed if it ends first or is not ready in :data:`SERVER_START_SECONDS`;
    Cancelled if the thread's token is cancelled meanwhile). It is killed with its group
    when the block ends, and by the kernel should this process die first (``setpriv
    --pdeathsig``, util-linux 2.33 and later: every supported host)."""
    token = cancel.current()
    child = _Child(argv, pass_fds, network, dies_with_parent=True)
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while not _accepts(socket_path):
            if token is not None and token.take():
                raise cancel.Cancelled(list(argv), token.reason)
            if child.process.poll() is not None:
                ended = child.result()
                raise CommandFailed(list(argv), ended.returncode, ended.stderr)
            if time.monotonic() > deadline:
                raise CommandFailed(
                    list(argv), None, f"not serving in {SERVER_START_SECONDS:g} s", timed_out=True
                )
            time.sleep(_MANY_POLL_SECONDS)
        yield
    finally:
        if child.process.returncode is None:  # not reaped: its pid is still its own
            child.kill()


def _accepts(socket_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fspath(socket_path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


class _Child:
    """One program of :func:`run_many` (or a server's), its output in temporary files (no
    pipe to drain)."""

    def __init__(
        self,
        argv: Sequence[str],
        pass_fds: Sequence[int] = (),
        network: bool = True,
        *,
        dies_with_parent: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.shown = mask(" ".join(argv), ())
        log.debug("run: %s", self.shown)
        # Closed by _close once the child has ended (or been killed).
        self._out: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                _confined(self.argv, network, dies_with_parent=dies_with_parent),
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=self._err,
                env=_ENV,
                pass_fds=tuple(pass_fds),
                start_new_session=True,
            )
        except FileNotFoundError:
            self._close()
            raise CommandFailed(argv, 127, f"{argv[0]}: command not found") from None

    def result(self) -> Result:
        """What the ended program printed, and how it exited."""
        outputs = []
        for stream in (self._out, self._err):
            stream.seek(0)
            outputs.append(mask(stream.read().decode(errors="replace"), ()))
        self._close()
        return Result(self.process.returncode, outputs[0], outputs[1])

    def kill(self) -> None:
        """SIGKILL it with its process group, and reap it."""
        _signal_group(self.process.pid)
        self.process.wait()
        self._close()

    def _close(self) -> None:
        self._out.close()
        self._err.close()


NO_NETWORK = ("unshare", "--net", "--")
"""The prefix that runs a program in a network namespace of its own (util-linux)."""


DIES_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL", "--")
"""The prefix that has the kernel kill a program when its parent dies (util-linux)."""


def _confined(argv: Sequence[str], network: bool, *, dies_with_parent: bool = False) -> list[str]:
    # Logs and errors name the program itself (argv), never the prefix.
    prefix = (() if network else NO_NETWORK) + (DIES_WITH_PARENT if dies_with_parent else ())
    return [*prefix, *argv]


def _kill(child: subprocess.Popen[str]) -> tuple[str, str]:
    # SIGKILL, then reap it: a program stuck on a dead NAS may ignore anything milder.
    _kill_group(child)
    return child.communicate()


def _kill_group(child: subprocess.Popen[str]) -> None:
    _signal_group(child.pid)
    with contextlib.suppress(ProcessLookupError):
        child.kill()  # not reaped yet, whatever its group did: the pid is still its own


def _signal_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads: the program and whatever it forked."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def processes_naming(text: str) -> list[int]:
    """Processes whose command line contains ``text``."""
    found = []
    needle = os.fsencode(text)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as cmdline:
            if needle in cmdline.read():
                found.append(int(entry))
    return found
