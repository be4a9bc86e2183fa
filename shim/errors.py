"""The one error hierarchy of the shim, and its mapping to the agent's exit codes.

Two roots, so that a stop can never be mistaken for a failure. Every handled failure is a
:class:`ShimError`. An operation *stopped* from outside (the agent's SIGTERM, the socket
service's abort or deadline) raises an :class:`Aborted`, which is a ``BaseException`` and
not an ``Exception``: no ``except ShimError`` or ``except CommandFailed`` (which turn a
failed program into a fallback, a warning or another message) can catch it; only cleanup
paths see it (``except BaseException: ...; raise``). The command-line boundary catches
both, once, prints the one-line message where the contract wants it, and exits with
:func:`exit_code_for`: 1 for any handled error or stop, 20 when cleanup itself failed (the
Java agent then marks the backup Error and sets ``needsCleanup``). No other code is used.

Every error class of the project (those defined elsewhere name their module)::

    BaseException
     +-- Aborted                          exit 1
     |    +-- Interrupted
     |    +-- Cancelled                   (shim.cancel)
     +-- Exception
          +-- ShimError                   exit 1
               +-- UsageError
               +-- InputError
               |    +-- Refused           (shim.gate)
               |         +-- Damaged      (shim.gate)
               +-- MountError
               +-- LockBusy
               +-- CommandFailed
               +-- VirtError
               +-- BackupFailed
               +-- StorageFailed
               +-- CleanupFailed          exit 20
               +-- QmpError               (shim.storage_daemon)
               |    +-- DaemonHung        (shim.storage_daemon)
               +-- StartupRefused         (shim.service.config)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CLEANUP_FAILED = 20


class _OneLine(BaseException):
    """A message of one line meant for the operator, and the exit code it ends with."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ShimError(_OneLine, Exception):
    """A handled failure: its message is one line meant for the operator."""


class UsageError(ShimError):
    """The caller's arguments are malformed: nothing was touched."""


class InputError(ShimError):
    """A value is well-formed but unacceptable (a path leaving the repository, say)."""


class MountError(ShimError):
    """The NAS could not be mounted."""


class LockBusy(ShimError):
    """Another operation holds the VM's lock."""


class CommandFailed(ShimError):
    """An external program exited non-zero or timed out."""

    def __init__(
        self, argv: Sequence[str], returncode: int | None, stderr: str, *, timed_out: bool = False
    ) -> None:
        # Only the program's name is kept: arguments can carry secrets (mount options).
        self.program = argv[0]
        self.returncode = returncode
        self.stderr = stderr
        self.timed_out = timed_out
        detail = _last_line(stderr)
        what = "timed out" if timed_out else f"failed with exit code {returncode}"
        super().__init__(f"{argv[0]} {what}" + (f": {detail}" if detail else ""))


class VirtError(ShimError):
    """libvirt refused or failed an operation."""


class BackupFailed(ShimError):
    """The backup job failed, was aborted, or its result is unusable."""


class StorageFailed(ShimError):
    """The repository or a volume failed under an operation (EIO, ENOSPC, gone)."""


class Aborted(_OneLine):
    """The operation was stopped from outside; what it was doing did not fail.

    Not an ``Exception``: handlers of failures never see it (see the module's docstring).
    """


class Interrupted(Aborted):
    """A termination signal arrived (the agent's timeout sends SIGTERM)."""


class CleanupFailed(ShimError):
    """Cleanup after the operation failed: something may be left behind."""

    exit_code = EXIT_CLEANUP_FAILED


Outcome = Union[ShimError, Aborted]
"""What ends an operation other than success: a failure, or a stop."""


def exit_code_for(error: BaseException) -> int:
    """The process exit code for ``error``: the only place codes are chosen."""
    if isinstance(error, (ShimError, Aborted)):
        return error.exit_code
    return EXIT_ERROR


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
