"""``python -m shim.service.client``: send commands to the service by hand.

    python -m shim.service.client send FILE|-      # an envelope; prints the answers
    python -m shim.service.client send --async F   # prints {"jobId": ...}
    python -m shim.service.client job ID           # state, progress, answers
    python -m shim.service.client abort ID
    python -m shim.service.client health

It talks to the Unix socket (``--socket``, default the service's). What the service
answers is printed on stdout as JSON. Exit status: 0 when the request succeeded (and, for
``send``, every answer's ``result`` is true; a stats answer, which says ``result`` false
as the agent's does, when it carries a size), 1 when an answer says it failed, 2 when the
service refused the request (the error body is printed) or cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from shim.service.config import DEFAULT_SOCKET

EXIT_OK, EXIT_FAILED_ANSWER, EXIT_REFUSED = 0, 1, 2


async def request(
    socket_path: Path, method: str, path: str, body: bytes | None = None
) -> tuple[int, Any]:
    """One request over the Unix socket: the HTTP status and the JSON body."""
    connector = aiohttp.UnixConnector(path=str(socket_path))
    headers = {"Content-Type": "application/json"} if body is not None else {}
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, f"http://localhost{path}", data=body, headers=headers) as reply,
    ):
        return reply.status, await reply.json(content_type=None)


STATS_ANSWER = "org.apache.cloudstack.backup.BackupStorageStatsAnswer"


def _succeeded(class_name: str, body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    if class_name == STATS_ANSWER:
        # The agent's stats answer says result false on success too (its wrapper builds it
        # so): it succeeded when it carries the repository's size.
        return isinstance(body.get("totalSize"), int) and body["totalSize"] > 0
    return bool(body.get("result"))


def _all_succeeded(answers: Any) -> bool:
    return isinstance(answers, list) and all(
        isinstance(item, dict) and all(_succeeded(name, body) for name, body in item.items())
        for item in answers
    )


def _read(source: str) -> bytes:
    return sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The client's command line."""
    parser = argparse.ArgumentParser(prog="python -m shim.service.client")
    parser.add_argument("--socket", type=Path, default=DEFAULT_SOCKET)
    verbs = parser.add_subparsers(dest="verb", required=True)
    send = verbs.add_parser("send", help="post an envelope (a file, or - for stdin)")
    send.add_argument("source")
    send.add_argument("--async", dest="run_async", action="store_true", help="answer a job")
    for verb in ("job", "abort"):
        verbs.add_parser(verb, help=f"{verb} a job").add_argument("job_id")
    verbs.add_parser("health", help="libvirt, versions, jobs in flight")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Send what the command line says; print the answer; return the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    call: tuple[str, str, bytes | None]
    if args.verb == "send":
        call = ("POST", "/v1/commands" + ("?async=1" if args.run_async else ""), _read(args.source))
    elif args.verb == "job":
        call = ("GET", f"/v1/jobs/{args.job_id}", None)
    elif args.verb == "abort":
        call = ("DELETE", f"/v1/jobs/{args.job_id}", None)
    else:
        call = ("GET", "/v1/health", None)
    try:
        status, body = asyncio.run(request(args.socket, *call))
    except (aiohttp.ClientError, OSError) as exc:
        print(f"cannot reach the service at {args.socket}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    print(json.dumps(body, indent=2))
    if status >= 400:
        return EXIT_REFUSED
    if args.verb == "send" and not args.run_async and not _all_succeeded(body):
        return EXIT_FAILED_ANSWER
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
