"""The one way the shim runs external programs: an argv list, never a shell.

Every call is logged (with secrets masked), has stdin closed, runs in the C locale so that
messages can be matched, and raises :class:`~shim.errors.CommandFailed` on a non-zero exit
or a timeout. The child's output is captured: nothing it prints reaches the shim's stdout,
which belongs to the agent contract.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shim import cancel
from shim.errors import CommandFailed
from shim.redact import redact

log = logging.getLogger(__name__)

_ENV = {**os.environ, "LC_ALL": "C", "LANG": "C"}
_POLL_SECONDS = 0.1
"""How often a running program's cancellation token is looked at."""


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
) -> Result:
    """Run ``argv`` to completion and return its output.

    ``secrets`` are masked in the log and in any error raised. With ``check`` (the default)
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
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env={**_ENV, **env} if env else _ENV,
        )
    except FileNotFoundError:
        raise CommandFailed(argv, 127, f"{argv[0]}: command not found") from None
    with child:
        try:
            out, err = _communicate(child, argv, timeout, token, secrets)
        except BaseException:
            # A signal's Interrupted (the drop-in), say: never leave the child running.
            child.kill()
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


def _kill(child: subprocess.Popen[str]) -> tuple[str, str]:
    # SIGKILL, then reap it: a program stuck on a dead NAS may ignore anything milder.
    child.kill()
    return child.communicate()


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
