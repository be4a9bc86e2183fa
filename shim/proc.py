"""The one way the shim runs external programs: an argv list, never a shell.

Every call is logged (with secrets masked), has stdin closed, runs in the C locale so that
messages can be matched, and raises :class:`~shim.errors.CommandFailed` on a non-zero exit
or a timeout. The child's output is captured: nothing it prints reaches the shim's stdout,
which belongs to the agent contract.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shim.errors import CommandFailed

log = logging.getLogger(__name__)

_ENV = {**os.environ, "LC_ALL": "C", "LANG": "C"}


@dataclass(frozen=True)
class Result:
    """What a finished program printed, and how it exited."""

    returncode: int
    stdout: str
    stderr: str


def mask(text: str, secrets: Sequence[str]) -> str:
    """Return ``text`` with every non-empty secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


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
    a non-zero exit raises :class:`CommandFailed`; a timeout always does.
    """
    shown = mask(" ".join(argv), secrets)
    log.debug("run: %s", shown)
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env={**_ENV, **env} if env else _ENV,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise CommandFailed(argv, None, mask(stderr, secrets), timed_out=True) from None
    except FileNotFoundError:
        raise CommandFailed(argv, 127, f"{argv[0]}: command not found") from None
    stdout, stderr = mask(done.stdout, secrets), mask(done.stderr, secrets)
    if done.returncode != 0:
        log.debug("exit %d: %s: %s", done.returncode, shown, stderr.strip())
        if check:
            raise CommandFailed(argv, done.returncode, stderr)
    return Result(done.returncode, stdout, stderr)
