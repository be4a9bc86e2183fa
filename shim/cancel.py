"""Stopping a running operation at a safe point: a cancellation token.

The socket service stops an operation when its deadline passes or when it is aborted. The
engine is blocking code in a worker thread, so it cannot be interrupted anywhere: it is
stopped where that is safe, i.e. while it waits for an external program. :func:`bound`
makes a token the current thread's for the duration of an operation (a thread-local, as
``run_in_executor`` does not carry context variables); :func:`shim.proc.run` polls it while
a child runs and, once it is cancelled, kills the child and raises :class:`Cancelled`, an
:class:`~shim.errors.Aborted`: no handler of a failed program can take it for one. The
operation's cleanup paths then run as after any failure.

Like the drop-in's signal handler, the token interrupts once: the cleanup that follows
runs programs too (``umount``, ``qemu-img``), and those must not be stopped in turn.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence

from shim.errors import Aborted

__all__ = ["CancelToken", "Cancelled", "bound", "current"]


class Cancelled(Aborted):
    """The operation was cancelled (deadline passed, aborted) where it waited: ``argv`` is
    the program killed for it, or what was waited for."""

    def __init__(self, argv: Sequence[str], reason: str) -> None:
        super().__init__(f"{argv[0]} stopped: {reason}")
        self.program = argv[0]
        self.reason = reason


class CancelToken:
    """Set once, from any thread, to stop an operation at its next safe point."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._delivered = False
        self._callbacks: list[Callable[[], None]] = []
        self.reason = ""

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled.is_set()

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the operation to stop; the first reason given is kept. Idempotent."""
        with self._lock:
            if self._cancelled.is_set():
                return
            self.reason = reason
            self._cancelled.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the cancelling thread) when cancelled; at once if it is."""
        with self._lock:
            if not self._cancelled.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until cancelled or ``timeout`` passed; whether it is cancelled."""
        return self._cancelled.wait(timeout)

    def take(self) -> bool:
        """True exactly once after :meth:`cancel`: the caller must stop now (and raise).

        Later calls say False, so that the cleanup after the stop runs undisturbed.
        """
        with self._lock:
            if not self._cancelled.is_set() or self._delivered:
                return False
            self._delivered = True
            return True


_local = threading.local()


def current() -> CancelToken | None:
    """The token bound to this thread's operation, if any."""
    return getattr(_local, "token", None)


@contextlib.contextmanager
def bound(token: CancelToken | None) -> Iterator[None]:
    """Make ``token`` this thread's for the block (None: keep whatever is bound)."""
    if token is None:
        yield
        return
    previous = current()
    _local.token = token
    try:
        yield
    finally:
        _local.token = previous
