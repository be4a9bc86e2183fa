"""The drop-in ``nasbackup.sh``: the agent's argv in, the contract's stdout and exit codes out.

Parsing follows the upstream script: every option takes exactly one value (which may be
empty), short and long forms, no ``--opt=value``. Bad input prints one line (and, for an
unknown option, the usage) on stdout and exits 1 before anything is mounted. Every
:class:`~shim.errors.ShimError` is caught here, once, and mapped to its exit code.

Imports are lazy: ``-h`` and argument errors must not pay for libvirt and lxml.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING

from shim.contract import error_stdout, failure_stdout
from shim.errors import (
    EXIT_ERROR,
    Aborted,
    Interrupted,
    ShimError,
    UsageError,
    exit_code_for,
)

if TYPE_CHECKING:
    from shim.nas import Repository
    from shim.operations import Request

log = logging.getLogger("shim.cli")

USAGE = """\
Usage: nasbackup.sh -o <operation> -v|--vm <domain name> -t <storage type> \
-s <storage address> -m <mount options> -p <backup path> -d <disks path> \
-q|--quiesce <true|false> [-M|--mode <full|incremental|legacy-full>] \
[--bitmap-new <name>] [--bitmap-parent <name>] [--parent-paths <p1,p2,...>] \
[--parent-path <path>] [--rebase-target <path>] [--rebase-new-backing <path>] \
[--backup-files <f1,f2,...>] [--restore-volume-paths <v1,v2,...>] \
[-w|--mount-timeout <seconds, 0 for none>] [-u|--volumeuuids <u1,u2,...>] \
[-S|--scratch-dir <local directory: pull mode>] [-c|--compress] \
[-b|--bandwidth <MiB/s, 0 for no cap>]
Operations: backup, delete, stats, rebase, restore, verify.
"""

# option -> field; every option takes exactly one value.
OPTIONS = {
    "-o": "operation", "--operation": "operation",
    "-v": "vm", "--vm": "vm",
    "-t": "type", "--type": "type",
    "-s": "storage", "--storage": "storage",
    "-m": "mount", "--mount": "mount",
    "-p": "path", "--path": "path",
    "-q": "quiesce", "--quiesce": "quiesce",
    "-d": "diskpaths", "--diskpaths": "diskpaths",
    "-M": "mode", "--mode": "mode",
    "--bitmap-new": "bitmap_new",
    "--bitmap-parent": "bitmap_parent",
    "--parent-path": "parent_path",
    "--parent-paths": "parent_paths",
    "--rebase-target": "rebase_target",
    "--rebase-new-backing": "rebase_new_backing",
    "--backup-files": "backup_files",
    "--restore-volume-paths": "restore_paths",
    # A downstream distribution's agent: -w on every operation, -u on backups.
    "-w": "mount_timeout", "--mount-timeout": "mount_timeout",
    "-u": "volume_ids", "--volumeuuids": "volume_ids",
    # apache/cloudstack PR 14194's pull-mode path: its local scratch directory.
    "-S": "scratch_dir", "--scratch-dir": "scratch_dir",
    # The open compression and bandwidth proposal (apache/cloudstack PR 12898).
    "-b": "bandwidth", "--bandwidth": "bandwidth",
}  # fmt: skip
FLAGS = {"-c": "compress", "--compress": "compress"}
"""Options that take no value (the proposal's ``-c``); ``true`` or ``false`` right after
one is read as its value, so ``-c true`` means what it says."""

MAX_ARGV_BYTES = 256 * 1024


@dataclass
class Arguments:
    """The parsed argv: each field is the option's value, or None when absent."""

    values: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        """The value given for ``name`` (possibly empty), None when absent."""
        return self.values.get(name)

    def text(self, name: str) -> str:
        """The value given for ``name``, empty when absent."""
        return self.values.get(name) or ""


class _Usage(Exception):
    """Print this (and the usage text) and exit 1."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


def parse(argv: Sequence[str]) -> Arguments:
    """Parse the agent's argv; raise :class:`_Usage` for help, unknown or valueless options."""
    if sum(len(a) + 1 for a in argv) > MAX_ARGV_BYTES:
        raise UsageError("argument list too long")
    args = Arguments()
    i = 0
    while i < len(argv):
        option = argv[i]
        if option in ("-h", "--help"):
            raise _Usage()
        flag = FLAGS.get(option)
        if flag is not None:
            explicit = i + 1 < len(argv) and argv[i + 1] in ("true", "false")
            args.values[flag] = argv[i + 1] if explicit else "true"
            i += 2 if explicit else 1
            continue
        name = OPTIONS.get(option)
        if name is None:
            raise _Usage(f"Invalid option: {option}")
        if i + 1 >= len(argv):
            raise _Usage(f"Missing value for option: {option}")
        value = argv[i + 1]
        if "\0" in value or "\n" in value or "\r" in value:
            raise UsageError(f"invalid value for {option}: control characters")
        args.values[name] = value
        i += 2
    return args


def _split(value: str | None) -> list[str]:
    return [part for part in (value or "").split(",") if part]


def _repository(args: Arguments) -> Repository:
    from shim.nas import Repository

    for option, name in (("-t", "type"), ("-s", "storage")):
        if not args.text(name):
            raise UsageError(f"missing {option} ({name})")
    return Repository(
        type=args.text("type"),
        address=args.text("storage"),
        options=args.text("mount"),
        mount_timeout=_mount_timeout(args),
    )


def _mount_timeout(args: Arguments) -> int | None:
    # Empty like any other option's value: the default, as when -w is absent.
    value = args.get("mount_timeout")
    if not value:
        return None
    if not (value.isascii() and value.isdigit()):
        raise UsageError(f"-w takes a whole number of seconds (0 for no timeout), not {value!r}")
    if len(value) > 18:  # int() would refuse 4300 digits; the range is checked later
        raise UsageError(f"-w is too large: {value[:20]}...")
    return int(value)


def _volume_ids(args: Arguments) -> tuple[str, ...]:
    # Split keeping empty items: "a,,b" is refused as an empty id, not read as "a,b".
    value = args.get("volume_ids")
    return tuple(value.split(",")) if value else ()


def _quiesce(args: Arguments) -> bool:
    value = args.get("quiesce")
    if value in (None, "", "false"):
        return False
    if value == "true":
        return True
    raise UsageError(f"-q takes true or false, not {value!r}")


def _backup(args: Arguments) -> Request:
    from shim.backup import BackupRequest

    return BackupRequest(
        vm=args.text("vm"),
        repository=_repository(args),
        path=args.text("path"),
        disk_paths=tuple(_split(args.get("diskpaths"))),
        quiesce=_quiesce(args),
        mode=args.get("mode") or None,
        bitmap_new=args.get("bitmap_new") or None,
        bitmap_parent=args.get("bitmap_parent") or None,
        parent_paths=tuple(_split(args.get("parent_paths"))),
        parent_path=args.get("parent_path") or None,
        volume_ids=_volume_ids(args),
        scratch_dir=args.get("scratch_dir") or None,
        compress=_compress(args),
        bandwidth_mib=_bandwidth(args),
    )


def _compress(args: Arguments) -> bool | None:
    value = args.get("compress")
    return None if value is None else value == "true"


def _bandwidth(args: Arguments) -> int | None:
    # Empty like any other option's value: the host setting, as when -b is absent.
    from shim.targets import parse_bandwidth

    value = args.get("bandwidth")
    return (parse_bandwidth(value, "-b") or 0) if value else None


def _required(args: Arguments, name: str, option: str) -> str:
    value = args.text(name)
    if not value:
        raise UsageError(f"missing {option}")
    return value


def request_for(args: Arguments) -> Request:
    """The typed request ``args`` describe, validated (nothing is touched)."""
    from shim import operations as ops

    operation = args.text("operation")
    request: Request
    if operation == "backup":
        request = _backup(args)
    elif operation == "delete":
        request = ops.DeleteRequest(_repository(args), _required(args, "path", "-p"))
    elif operation == "stats":
        request = ops.StatsRequest(_repository(args))
    elif operation == "rebase":
        request = ops.RebaseRequest(
            _repository(args),
            target=_required(args, "rebase_target", "--rebase-target"),
            new_backing=_required(args, "rebase_new_backing", "--rebase-new-backing"),
        )
    elif operation == "restore":
        request = ops.RestoreRequest(
            _repository(args),
            backup_path=_required(args, "path", "-p"),
            targets=tuple(_split(_required(args, "restore_paths", "--restore-volume-paths"))),
            backup_files=tuple(_split(args.get("backup_files"))),
            vm=args.get("vm") or None,
        )
    elif operation == "verify":
        request = ops.VerifyRequest(_repository(args), _required(args, "path", "-p"))
    else:
        raise _Usage(f"Invalid operation: {operation}" if operation else "Missing operation (-o)")
    ops.validate(request)
    return request


_signalled = False


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    # The agent's timeout sends SIGTERM: unwind through every cleanup, once. A second
    # signal must not interrupt that cleanup.
    global _signalled  # noqa: PLW0603 - process-wide by nature
    if _signalled:
        log.warning("signal %d ignored: cleanup in progress", signum)
        return
    _signalled = True
    raise Interrupted(f"interrupted by signal {signal.Signals(signum).name}")


def _emit(text: str) -> None:
    """Print ``text`` for the agent. A reader that went away (a closed pipe) is logged, not
    a traceback on stderr; the exit code still tells what happened."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's last flush is quiet
        log.warning("stdout was closed by its reader")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, print the contract's stdout, return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
        request = request_for(args)
    except _Usage as usage:
        _emit((usage.message + "\n" if usage.message else "") + USAGE)
        return EXIT_ERROR
    except ShimError as exc:
        _emit(error_stdout(exc.message))
        return EXIT_ERROR

    from shim import log as shim_log
    from shim import operations

    shim_log.setup()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    operation = args.text("operation")
    log.info("nasbackup %s", _describe(args))
    try:
        text = operations.run(request).stdout
    except (ShimError, Aborted) as exc:
        code = exit_code_for(exc)
        if exc.__cause__ is not None:
            log.error("caused by: %s", exc.__cause__)
        how = "stopped" if isinstance(exc, Aborted) else "failed"
        log.error("%s %s (exit %d): %s", operation, how, code, exc)
        _emit(failure_stdout(exc.message, code))
        return code
    except Exception as exc:  # a bug: still one line and exit 1, never a traceback on stdout
        log.exception("unexpected error")
        _emit(error_stdout(f"internal error: {type(exc).__name__}: {exc}"))
        return EXIT_ERROR
    _emit(text)
    log.info("%s succeeded", operation)
    return 0


def _describe(args: Arguments) -> str:
    from shim.nas import redact_options

    shown = dict(args.values)
    if "mount" in shown:
        shown["mount"] = redact_options(shown["mount"])
    return " ".join(f"{k}={v!r}" for k, v in shown.items())


if __name__ == "__main__":
    sys.exit(main())
