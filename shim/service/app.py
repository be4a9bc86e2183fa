"""The HTTP API: thin handlers over :mod:`shim.operations`, through the job scheduler.

Every request body is read within a size limit, parsed as strict JSON and loaded through
the command schemas before anything runs: a bad request is answered 400 with every
problem named by field, and the engine is never called. Error responses are JSON too.
Requests that did not come through the Unix socket need the bearer token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from commands.envelope import EnvelopeError, Problem, dump, load_commands
from commands.wrappers import DEFAULT_GENERATION, Generation
from shim.errors import VirtError
from shim.service.jobs import Job, JobState, Scheduler
from shim.service.schemas import (
    ErrorSchema,
    HealthSchema,
    JobAcceptedSchema,
    JobStatusSchema,
    openapi_document,
)
from shim.virt import host
from shim.virt.connection import open_connection

log = logging.getLogger(__name__)


def _app_key(name: str, kind: type) -> Any:
    """A typed application key (aiohttp 3.9); on Debian 12's aiohttp 3.8, which the .deb
    depends on, the plain string that version keys its applications by."""
    app_key = getattr(web, "AppKey", None)
    return name if app_key is None else app_key(name, kind)


SCHEDULER: web.AppKey[Scheduler] = _app_key("scheduler", Scheduler)
TOKEN: web.AppKey[str | None] = _app_key("token", str)  # None: no TCP listener, no token
MAX_BODY: web.AppKey[int] = _app_key("max_body", int)
OPENAPI: web.AppKey[dict[str, Any]] = _app_key("openapi", dict)
DEFAULT_GENERATION_KEY: web.AppKey[Generation] = _app_key("generation", Generation)

_TRUE, _FALSE = ("1", "true"), ("0", "false", "")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """A request refused before anything runs: a summary and the problems by field."""

    def __init__(self, error: str, problems: list[Problem]) -> None:
        super().__init__(error)
        self.error = error
        self.problems = problems


def error_response(
    status: int,
    error: str,
    problems: list[Problem] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A JSON error body: ``{"error": ..., "problems": [{"field", "message"}]}``."""
    body = ErrorSchema().dump(
        {"error": error, "problems": [vars(p) for p in problems] if problems else []}
    )
    return web.json_response(body, status=status, headers=headers)


def _over_unix_socket(request: web.Request) -> bool:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The Unix socket is guarded by its mode; anything else needs the bearer token."""
    if not _over_unix_socket(request):
        token = request.app[TOKEN]
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if (
            token is None
            or scheme.lower() != "bearer"
            or not hmac.compare_digest(given.strip().encode(), token.encode())
        ):
            return error_response(
                401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )
    return await handler(request)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal as JSON (aiohttp's own 404/405 included), every request logged."""
    started = time.monotonic()
    try:
        response = await handler(request)
    except BadRequest as bad:
        response = error_response(400, bad.error, bad.problems)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, exc.reason)
    # Path and status only: bodies carry mount options, headers the token.
    log.info(
        "%s %s -> %d (%.0f ms)",
        request.method,
        request.path,
        response.status,
        (time.monotonic() - started) * 1000,
    )
    return response


async def _read_body(request: web.Request) -> bytes:
    limit = request.app[MAX_BODY]
    too_large = BadRequest(
        "request body too large", [Problem("", f"the body may hold at most {limit} bytes")]
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


MAX_JSON_DEPTH = 32
"""Levels of nesting a body may have: an envelope of commands with primary store objects
needs about eight; everything past this is refused before a schema (whose code recurses)
sees it."""


def _parse_json(body: bytes) -> Any:
    too_deep = BadRequest(
        "malformed JSON", [Problem("", f"nested too deeply (at most {MAX_JSON_DEPTH} levels)")]
    )
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError as exc:
        raise BadRequest("malformed JSON", [Problem("", f"not UTF-8: {exc.reason}")]) from None
    except RecursionError:  # json's recursive decoder: about a thousand levels of nesting
        raise too_deep from None
    except ValueError as exc:  # JSONDecodeError is one
        raise BadRequest("malformed JSON", [Problem("", str(exc))]) from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise too_deep
    return data


def _depth(data: Any) -> int:
    """How deeply ``data`` nests (a scalar: 0), without recursion."""
    deepest = 0
    pending = [(data, 1)]
    while pending:
        value, level = pending.pop()
        children = value.values() if isinstance(value, dict) else value
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            pending.extend((child, level + 1) for child in children)
    return deepest


def _async_flag(request: web.Request) -> bool:
    value = request.query.get("async", "").lower()
    if value not in (*_TRUE, *_FALSE):
        raise BadRequest("bad query", [Problem("async", f"takes 1 or 0, not {value!r}")])
    return value in _TRUE


def _generation(request: web.Request) -> Generation | None:
    value = request.query.get("generation")
    if value is None:
        return None
    try:
        return Generation(value)
    except ValueError:
        known = ", ".join(g.value for g in Generation)
        raise BadRequest(
            "bad query", [Problem("generation", f"is one of {known}, not {value!r}")]
        ) from None


async def post_commands(request: web.Request) -> web.Response:
    """Run an envelope of commands; answer their envelope (or 202 and a job with async=1)."""
    run_async = _async_flag(request)
    generation = _generation(request)
    data = _parse_json(await _read_body(request))
    try:
        commands = load_commands(
            data, generation=generation, default=request.app[DEFAULT_GENERATION_KEY]
        )
    except EnvelopeError as exc:
        raise BadRequest("invalid envelope", exc.problems) from None
    scheduler = request.app[SCHEDULER]
    if scheduler.closed:
        return error_response(503, "the service is shutting down")
    job = scheduler.submit(commands)
    if run_async:
        return web.json_response(
            JobAcceptedSchema().dump({"job_id": job.id}),
            status=202,
            headers={"Location": f"/v1/jobs/{job.id}"},
        )
    # The job runs on if the client goes away: a backup is never left half-way.
    answers = await job.wait()
    return web.json_response(dump(answers))


def _job(request: web.Request) -> Job:
    job = request.app[SCHEDULER].get(request.match_info["job_id"])
    if job is None:
        raise web.HTTPNotFound(reason="no such job")
    return job


async def _status(request: web.Request, job: Job) -> dict[str, Any]:
    progress = await request.app[SCHEDULER].progress(job)
    status: dict[str, Any] = {
        "job_id": job.id,
        "state": job.state.value,
        "progress": progress,
        "abort_requested": job.abort_requested,
    }
    if job.answers is not None:
        status["answers"] = dump(job.answers)
    dumped: dict[str, Any] = JobStatusSchema().dump(status)
    return dumped


async def get_job(request: web.Request) -> web.Response:
    """A job's state, progress and, once finished, answers."""
    job = _job(request)
    return web.json_response(await _status(request, job))


ABORT_ANSWER_SECONDS = 1.0
"""How long DELETE waits for the aborted job's cleanup before it answers 202."""


async def delete_job(request: web.Request) -> web.Response:
    """Abort a job: the stop begins at once; answer 200 with the final state once it has
    ended and cleaned up, or 202 (still cleaning up: poll GET) after a second at most."""
    job = _job(request)
    if job.state.finished:
        return error_response(409, f"the job has already {job.state.value}")
    scheduler = request.app[SCHEDULER]
    if job.abort_task is None:
        job.abort_task = asyncio.ensure_future(scheduler.abort(job))
    try:
        await asyncio.wait_for(asyncio.shield(job.abort_task), ABORT_ANSWER_SECONDS)
    except asyncio.TimeoutError:
        return web.json_response(
            await _status(request, job), status=202, headers={"Location": f"/v1/jobs/{job.id}"}
        )
    return web.json_response(await _status(request, job))


def _libvirt_health() -> dict[str, Any]:
    try:
        conn = open_connection()
    except VirtError as exc:
        return {"reachable": False, "error": exc.message}
    try:
        return {"reachable": True, "versions": host.versions(conn)}
    finally:
        conn.close()


async def get_health(request: web.Request) -> web.Response:
    """libvirt reachable (and its and QEMU's versions), jobs in flight."""
    scheduler = request.app[SCHEDULER]
    libvirt_health = await asyncio.to_thread(_libvirt_health)
    in_flight = scheduler.in_flight()
    body = HealthSchema().dump(
        {
            "status": "ok" if libvirt_health["reachable"] else "unavailable",
            "libvirt": libvirt_health,
            "jobs": {
                "in_flight": len(in_flight),
                "queued": sum(job.state == JobState.QUEUED for job in in_flight),
                "running": sum(job.state == JobState.RUNNING for job in in_flight),
                "max_backups": scheduler.max_backups,
            },
        }
    )
    return web.json_response(body, status=200 if libvirt_health["reachable"] else 503)


async def get_openapi(request: web.Request) -> web.Response:
    """The OpenAPI document, generated from the schemas."""
    return web.json_response(request.app[OPENAPI])


def make_app(
    scheduler: Scheduler,
    *,
    token: str | None,
    max_body_bytes: int,
    generation: Generation = DEFAULT_GENERATION,
) -> web.Application:
    """The application: routes, JSON errors, authentication off the Unix socket.

    ``generation`` is whose agent the callers are, for envelopes that neither say
    (``?generation=``) nor show it by their fields: answers are built as its wrappers do.
    """
    # aiohttp's own limit stays above ours, so that ours (a JSON 400) is the one that speaks.
    app = web.Application(
        middlewares=[json_errors, authenticate], client_max_size=max_body_bytes + 1024
    )
    app[SCHEDULER] = scheduler
    app[TOKEN] = token
    app[MAX_BODY] = max_body_bytes
    app[OPENAPI] = openapi_document()
    app[DEFAULT_GENERATION_KEY] = generation
    app.router.add_post("/v1/commands", post_commands)
    app.router.add_get("/v1/jobs/{job_id}", get_job)
    app.router.add_delete("/v1/jobs/{job_id}", delete_job)
    app.router.add_get("/v1/health", get_health)
    app.router.add_get("/v1/openapi.json", get_openapi)
    return app
