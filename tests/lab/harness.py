"""How the tests and the lab's scenarios drive the socket service: on a temporary socket,
in this process, with a record of every engine call; and the shim's log captured to a file.
(The drop-in as the agent runs it is :func:`tests.lab.chains.run_dropin`.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from shim import operations
from shim.compat import strict_zip
from shim.service import Service, ServiceConfig
from tests.lab.chains import ROOT

SERVE = ROOT / "scripts" / "serve"


# -- the engine, observed ------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One call of the engine: the request and when it ran."""

    request: operations.Request
    started: float
    ended: float


def _vm_of(request: operations.Request) -> str | None:
    vm = getattr(request, "vm", None)
    return vm if isinstance(vm, str) else None


@dataclass
class EngineSpy:
    """The real engine (:func:`shim.operations.run`), with a record of every call and the
    most backups it ever ran at once."""

    calls: list[Call] = field(default_factory=list)
    peak_backups: int = 0
    """The most backups that were running at the same instant."""
    _backups: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: operations.Request, **kwargs: Any) -> operations.Result:
        backup = isinstance(request, operations.BackupRequest)
        with self._lock:
            if backup:
                self._backups += 1
                self.peak_backups = max(self.peak_backups, self._backups)
        started = time.monotonic()
        try:
            return operations.run(request, **kwargs)
        finally:
            with self._lock:
                self.calls.append(Call(request, started, time.monotonic()))
                if backup:
                    self._backups -= 1

    def overlapping(self) -> bool:
        """Whether any two calls ran at the same time."""
        return overlap([(c.started, c.ended) for c in self.calls])

    def overlapping_vms(self) -> list[str]:
        """The VMs two of whose calls ran at the same time."""
        by_vm: dict[str, list[tuple[float, float]]] = {}
        for call in self.calls:
            vm = _vm_of(call.request)
            if vm is not None:
                by_vm.setdefault(vm, []).append((call.started, call.ended))
        return sorted(vm for vm, spans in by_vm.items() if overlap(spans))


def overlap(spans: Sequence[tuple[float, float]]) -> bool:
    """Whether any two of these (start, end) spans overlap."""
    ordered = sorted(spans)
    return any(later[0] < earlier[1] for earlier, later in zip(ordered, ordered[1:]))


# -- the service ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """An HTTP reply as it came: status, content type and body text."""

    status: int
    content_type: str
    text: str


@dataclass
class Running:
    """A running service and a client session on its Unix socket."""

    service: Service
    session: aiohttp.ClientSession
    engine: EngineSpy
    socket_path: Path

    async def raw(self, method: str, path: str, **kw: Any) -> Reply:
        """A request over the socket, the reply taken as it is."""
        async with self.session.request(method, f"http://shim{path}", **kw) as reply:
            return Reply(reply.status, reply.content_type, await reply.text())

    async def request(
        self, method: str, path: str, *, json_body: Any = None, data: Any = None, **kw: Any
    ) -> tuple[int, Any]:
        """A request over the socket: the status and the JSON body (every body is JSON)."""
        reply = await self.raw(method, path, json=json_body, data=data, **kw)
        if reply.content_type != "application/json":
            raise AssertionError(f"{method} {path}: {reply.content_type} body: {reply.text}")
        return reply.status, json.loads(reply.text)

    async def post(
        self, envelope: Any, *, run_async: bool = False, generation: str | None = None
    ) -> tuple[int, Any]:
        """POST an envelope to /v1/commands (as ``generation``'s agent, when given)."""
        query = {"async": "1"} if run_async else {}
        if generation is not None:
            query["generation"] = generation
        path = "/v1/commands" + ("?" + urllib.parse.urlencode(query) if query else "")
        return await self.request("POST", path, json_body=envelope)

    async def job(self, job_id: str) -> dict[str, Any]:
        """GET a job."""
        status, body = await self.request("GET", f"/v1/jobs/{job_id}")
        if status != 200:
            raise AssertionError(f"GET /v1/jobs/{job_id}: {status} {body}")
        job: dict[str, Any] = body
        return job

    async def abort(self, job_id: str) -> tuple[int, float, dict[str, Any]]:
        """DELETE a job: the status, how long the DELETE took to answer, and the job once
        it has ended (polled when the answer came before its cleanup ended: 202)."""
        started = time.monotonic()
        status, body = await self.request("DELETE", f"/v1/jobs/{job_id}")
        took = time.monotonic() - started
        if status == 202:
            assert body["abortRequested"] is True, body
            body = await self.wait_job(job_id)
        return status, took, body

    async def wait_job(self, job_id: str, timeout: float = 240) -> dict[str, Any]:
        """Poll a job until it has finished."""
        deadline = time.monotonic() + timeout
        while True:
            body = await self.job(job_id)
            if body["state"] in ("succeeded", "failed", "aborted"):
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {body['state']}")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def running(directory: Path, **config: Any) -> AsyncIterator[Running]:
    """A service on ``directory/run/shim.sock`` (a 0700 directory), the real engine behind."""
    run_dir = directory / "run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    socket_path = run_dir / "shim.sock"
    engine = EngineSpy()
    service = Service(ServiceConfig(socket_path=socket_path, **config), runner=engine)
    async with (
        service,
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path))) as session,
    ):
        yield Running(service, session, engine, socket_path)


# -- the log -------------------------------------------------------------------------------------
@contextlib.contextmanager
def captured_log(path: Path) -> Iterator[Path]:
    """Everything the shim (and aiohttp) logs in this process meanwhile, appended to ``path``
    at debug level."""
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger("shim"), logging.getLogger("aiohttp")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield path
    finally:
        for logger, level in strict_zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
        handler.close()
