"""The shim's log: only ever appended to the agent's log, never on stdout.

Lines carry the ``YYYY-MM-DD HH-MM-SS>`` prefix the upstream script uses, so they read
the same in ``agent.log``. When stderr is a terminal, the same messages (INFO and up) are
shown there too, as progress for a person; the agent never reads stderr.

A line cannot be forged: messages carry what callers sent (a field name of a JSON body, a
file name found on the NAS, a log id), so every control character in a message or a log id
is written escaped (``\n``, ``\x1b``); one record is one line (a traceback aside).
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from shim import settings
from shim.redact import RedactingFilter

DEFAULT_LOG_FILE = Path(settings.LOG.default)
LOG_FILE_ENV = settings.LOG.name


_context = threading.local()


@contextlib.contextmanager
def log_id(value: str | None) -> Iterator[None]:
    """Tag every line this thread logs meanwhile with the agent's log id (a command's
    ``contextMap["logid"]``), as ``(logid:<id>)``, the agent's own form: one grep then
    finds a command in the agent's lines and the shim's."""
    previous = getattr(_context, "logid", None)
    _context.logid = value
    try:
        yield
    finally:
        _context.logid = previous


def current_log_id() -> str | None:
    """The log id this thread's lines carry (to hand to a worker thread's :func:`log_id`)."""
    return getattr(_context, "logid", None)


_CONTROLS = {i: f"\\x{i:02x}" for i in (*range(32), 127)} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape: one line."""
    return text.translate(_CONTROLS)


class _EscapingFilter(logging.Filter):
    """Writes the control characters of each record's message escaped."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keep the record; escape its message."""
        message = record.getMessage()
        escaped = escape_controls(message)
        if escaped != message:
            record.msg, record.args = escaped, None
        return True


class _Formatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(
            fmt="%(asctime)s> nasbackup[%(process)d]: %(levelname)s %(message)s",
            datefmt="%Y-%m-%d %H-%M-%S",
        )

    def format(self, record: logging.LogRecord) -> str:
        """The line, with the log id of the command it belongs to, if any."""
        text = super().format(record)
        logid = getattr(record, "logid", None)
        return f"{text} (logid:{escape_controls(str(logid))})" if logid else text


class _LogIdFilter(logging.Filter):
    """Stamps each record with the log id of the thread that logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keep the record."""
        if not hasattr(record, "logid"):
            record.logid = current_log_id()
        return True


def log_file() -> Path:
    """Where the log goes: ``$NASBACKUP_SHIM_LOG``, else the agent's log."""
    return Path(settings.value(settings.LOG))


def setup(verbose: bool = False) -> None:
    """Send the ``shim`` loggers to the log file (append only), and to a terminal stderr.

    The host's settings file is read first (:func:`shim.settings.load`): it may name the log
    file, and every process that logs reads it so (the drop-in, the service)."""
    problems = settings.load()
    logger = logging.getLogger("shim")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    for previous in list(logger.handlers):
        logger.removeHandler(previous)
    path = log_file()
    to_file = True
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # mode "a": the log is only ever appended to (upstream's ">" truncated agent.log).
        # Watched: the agent's logrotate renames agent.log daily, and a long-running service
        # must go on writing to the current file, not to the renamed (compressed) one.
        handler: logging.Handler = logging.handlers.WatchedFileHandler(
            path, mode="a", encoding="utf-8"
        )
    except OSError:
        handler, to_file = logging.StreamHandler(sys.stderr), False
    handler.setFormatter(_Formatter())
    handler.addFilter(_LogIdFilter())
    handler.addFilter(RedactingFilter())
    handler.addFilter(_EscapingFilter())
    logger.addHandler(handler)
    if to_file and sys.stderr.isatty():
        terminal = logging.StreamHandler(sys.stderr)
        terminal.setLevel(logging.INFO)
        terminal.setFormatter(logging.Formatter("%(message)s"))
        terminal.addFilter(RedactingFilter())
        terminal.addFilter(_EscapingFilter())
        logger.addHandler(terminal)
    for problem in problems:
        logger.warning("%s", problem)
