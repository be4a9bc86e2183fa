"""Helpers of the service tests: a real service on a temporary socket, a client for it, and
the lab's values for the envelope fixtures' placeholders."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from shim import operations
from shim.chain import directory_size
from shim.lab import Lab, LabVM
from shim.nas import Repository
from shim.service import Service, ServiceConfig
from tests.envelopes import fill, mismatches, read
from tests.support import disk_files


@dataclass(frozen=True)
class Call:
    """One call of the engine: the request and when it ran."""

    request: operations.Request
    started: float
    ended: float


@dataclass
class EngineSpy:
    """The real engine (:func:`shim.operations.run`), with a record of every call."""

    calls: list[Call] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: operations.Request, **kwargs: Any) -> operations.Result:
        started = time.monotonic()
        try:
            return operations.run(request, **kwargs)
        finally:
            with self._lock:
                self.calls.append(Call(request, started, time.monotonic()))

    def overlapping(self) -> bool:
        """Whether any two calls ran at the same time."""
        spans = sorted((c.started, c.ended) for c in self.calls)
        return any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))


@dataclass
class Running:
    """A running service and a client session on its Unix socket."""

    service: Service
    session: aiohttp.ClientSession
    engine: EngineSpy
    socket_path: Path

    async def request(
        self, method: str, path: str, *, json_body: Any = None, data: Any = None, **kw: Any
    ) -> tuple[int, Any]:
        """A request over the socket: the status and the JSON body (every body is JSON)."""
        async with self.session.request(
            method, f"http://shim{path}", json=json_body, data=data, **kw
        ) as reply:
            assert reply.content_type == "application/json", await reply.text()
            return reply.status, await reply.json()

    async def post(self, envelope: Any, *, run_async: bool = False) -> tuple[int, Any]:
        """POST an envelope to /v1/commands."""
        path = "/v1/commands?async=1" if run_async else "/v1/commands"
        return await self.request("POST", path, json_body=envelope)

    async def job(self, job_id: str) -> dict[str, Any]:
        """GET a job."""
        status, body = await self.request("GET", f"/v1/jobs/{job_id}")
        assert status == 200, body
        return body

    async def wait_job(self, job_id: str, timeout: float = 240) -> dict[str, Any]:
        """Poll a job until it has finished."""
        deadline = time.monotonic() + timeout
        while True:
            body = await self.job(job_id)
            if body["state"] in ("succeeded", "failed", "aborted"):
                return body
            assert time.monotonic() < deadline, f"job {job_id} still {body['state']}"
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **config: Any) -> AsyncIterator[Running]:
    """A service on ``tmp_path/run/shim.sock`` (a 0700 directory), the real engine behind."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    socket_path = run_dir / "shim.sock"
    engine = EngineSpy()
    service = Service(ServiceConfig(socket_path=socket_path, **config), runner=engine)
    async with (
        service,
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path))) as session,
    ):
        yield Running(service, session, engine, socket_path)


# -- the lab's values for the fixtures -----------------------------------------------------------
def jobinfo(vm: LabVM) -> str:
    """What ``virsh domjobinfo --completed`` prints for the VM's last job."""
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", "domjobinfo", vm.name, "--completed", "--keep-completed"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def df_kib(directory: Path) -> tuple[int, int]:
    """Size and use of the file system holding ``directory``, as ``df -P`` says (KiB)."""
    line = subprocess.run(
        ["df", "-P", "-k", str(directory)], capture_output=True, text=True, check=True
    ).stdout.splitlines()[1]
    total, used = line.split()[1:3]
    return int(total), int(used)


@dataclass
class FixtureRun:
    """One VM and repository, taking the fixtures' backups one after the other."""

    lab: Lab
    vm: LabVM
    repo: Repository
    backups: list[str] = field(default_factory=list)
    bitmaps: list[str] = field(default_factory=list)

    @property
    def repo_dir(self) -> Path:
        """The repository's directory (what the NAS exports)."""
        return Path(self.repo.address)

    def values(self) -> dict[str, Any]:
        """The placeholders' values that do not depend on a run's result."""
        count = len(self.backups) + 1
        values: dict[str, Any] = {
            "vm": self.vm.name,
            "backupPath": f"{self.vm.name}/2026.10.{count:02d}.00.00.00",
            "repoType": self.repo.type,
            "repoAddress": self.repo.address,
            "mountOptions": self.repo.options,
            "poolUuid": self.vm.disks[0].path.parent.name,
            "bitmapNew": f"backup-{1790000000 + count}",
            "volumePaths": [str(d.path) for d in self.vm.disks],
            "volumeIds": [d.volume_id for d in self.vm.disks],
            "volumeSizes": [d.size for d in self.vm.disks],
        }
        if self.backups:
            parent = self.backups[-1]
            values["backupFiles"] = [p.name for p in disk_files(self.repo_dir, parent, self.vm)]
            values["parentPath"] = parent
            values["parentPaths"] = [
                str(p.relative_to(self.repo_dir))
                for p in disk_files(self.repo_dir, parent, self.vm)
            ]
        if self.bitmaps:
            values["bitmapParent"] = self.bitmaps[-1]
        return values

    async def backup(self, service: Running, generation: str, case: str) -> dict[str, Any]:
        """Post a running-VM backup fixture; check its answer; return the values used."""
        command, expected = read(generation, case)
        values = self.values()
        status, answers = await service.post(fill(command, values))
        assert status == 200, answers
        path = values["backupPath"]
        values["jobinfo"] = jobinfo(self.vm)
        values["size"] = directory_size(self.repo_dir / path)
        assert mismatches(expected, answers, values) == []
        self.backups.append(path)
        if "bitmapNew" in str(command):
            self.bitmaps.append(values["bitmapNew"])
        return values


def backup_directories(repo_dir: Path, vm: LabVM) -> list[str]:
    """The backup directories of ``vm`` in a repository."""
    vm_dir = repo_dir / vm.name
    return sorted(os.listdir(vm_dir)) if vm_dir.exists() else []
