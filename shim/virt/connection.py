"""Connections to libvirt, with an event loop so that jobs are awaited, never polled.

libvirt delivers events (job completed, domain stopped) only to connections opened after an
event implementation is registered; :func:`open_connection` registers libvirt's default
implementation once per process and runs it in a daemon thread.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import libvirt

from shim.errors import VirtError

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"

_loop_lock = threading.Lock()
_loop_started = False


def _quiet_libvirt(_ctx: object, err: tuple[Any, ...]) -> None:
    # libvirt prints every error to stderr by default; errors reach us as exceptions anyway.
    log.debug("libvirt: %s", err[2] if len(err) > 2 else err)


def _run_event_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once)."""
    global _loop_started  # noqa: PLW0603 - process-wide, like libvirt's own registration
    with _loop_lock:
        if _loop_started:
            return
        libvirt.registerErrorHandler(_quiet_libvirt, None)
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _loop_started = True


def open_connection(uri: str = DEFAULT_URI) -> libvirt.virConnect:
    """Open a read-write connection to ``uri`` that receives events.

    Keep-alive is enabled so that a libvirtd that dies mid-job closes the connection (and
    wakes whoever waits on it) instead of leaving it hanging.
    """
    ensure_event_loop()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise VirtError(f"cannot connect to libvirt at {uri}: {exc.get_error_message()}") from None
    try:
        conn.setKeepAlive(5, 3)
    except libvirt.libvirtError:
        log.debug("keep-alive not supported on %s", uri)
    return conn


def is_alive(conn: libvirt.virConnect) -> bool:
    """Whether the connection still reaches libvirtd (False once libvirtd went away)."""
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def reconnect(within_seconds: float, uri: str = DEFAULT_URI) -> libvirt.virConnect:
    """Open a connection, retrying with backoff while libvirtd restarts (bounded)."""
    deadline = time.monotonic() + within_seconds
    delay = 0.1
    while True:
        try:
            return open_connection(uri)
        except VirtError:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)  # a daemon coming back: nothing to wait on but the retry
            delay = min(delay * 2, 2.0)
