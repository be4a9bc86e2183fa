"""``python -m shim.service``: the socket service in the foreground (``scripts/serve``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from commands.wrappers import DEFAULT_GENERATION, Generation
from shim import log as shim_log
from shim.service.config import (
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_MAX_BACKUPS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_SOCKET,
    ServiceConfig,
    StartupRefused,
    parse_tcp_address,
    read_token,
)
from shim.service.server import serve

log = logging.getLogger("shim.service")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line of ``scripts/serve``."""
    parser = argparse.ArgumentParser(
        prog="serve", description="CloudStack NAS backup commands over a local socket."
    )
    parser.add_argument(
        "--socket", type=Path, default=DEFAULT_SOCKET, help=f"default {DEFAULT_SOCKET}"
    )
    parser.add_argument("--tcp", metavar="127.0.0.1:PORT", help="also listen here (loopback)")
    parser.add_argument("--token-file", type=Path, help="the bearer token TCP requires")
    parser.add_argument(
        "--max-backups",
        type=int,
        default=DEFAULT_MAX_BACKUPS,
        help=f"backups running at once on this host (default {DEFAULT_MAX_BACKUPS})",
    )
    parser.add_argument(
        "--max-body",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body in bytes (default {DEFAULT_MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--command-timeout",
        type=int,
        default=DEFAULT_COMMAND_TIMEOUT,
        metavar="SECONDS",
        help="how long a command whose wait is 0 may run, like the agent's cmds.timeout "
        f"(default {DEFAULT_COMMAND_TIMEOUT})",
    )
    parser.add_argument(
        "--generation",
        choices=[g.value for g in Generation],
        default=DEFAULT_GENERATION.value,
        help="the CloudStack generation whose answers to give when a request neither says "
        f"(?generation=) nor shows it by its fields (default {DEFAULT_GENERATION.value})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug lines in the log")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> ServiceConfig:
    """The configuration ``args`` ask for; raise StartupRefused when it is not acceptable."""
    if args.token_file is not None and args.tcp is None:
        raise StartupRefused("--token-file is only for the TCP listener (--tcp)")
    return ServiceConfig(
        socket_path=args.socket,
        tcp=parse_tcp_address(args.tcp) if args.tcp else None,
        token=read_token(args.token_file) if args.token_file is not None else None,
        max_backups=args.max_backups,
        max_body_bytes=args.max_body,
        command_timeout=args.command_timeout,
        generation=Generation(args.generation),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the service until SIGTERM/SIGINT; 1 (and why, on stderr) if it cannot start."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    shim_log.setup(verbose=args.verbose)
    try:
        asyncio.run(serve(config_from(args)))
    except StartupRefused as exc:
        log.error("%s", exc)
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
