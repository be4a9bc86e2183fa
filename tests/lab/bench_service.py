"""P7: the socket service's latency for a stats command, at 1, 10 and 50 clients at once.

The service runs as ``scripts/serve`` does, in its own process, on a temporary socket, and
each client posts the same GetBackupStorageStatsCommand envelope over the Unix socket
(bounded: a fixed number of requests per level).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.lab.bench import ROOT, Metric

REQUESTS_PER_LEVEL = 200
LEVELS = (1, 10, 50)


def _envelope(repository: str) -> bytes:
    command = {
        "backupRepoType": "none",
        "backupRepoAddress": repository,
        "mountOptions": "bind",
        "contextMap": {},
        "wait": 0,
    }
    return json.dumps(
        [{"org.apache.cloudstack.backup.GetBackupStorageStatsCommand": command}]
    ).encode()


async def _level(socket_path: Path, body: bytes, clients: int) -> list[float]:
    latencies: list[float] = []
    per_client = max(1, REQUESTS_PER_LEVEL // clients)
    connector = aiohttp.UnixConnector(path=str(socket_path), limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            for _ in range(per_client):
                start = time.perf_counter()
                async with session.post("http://shim/v1/commands", data=body) as response:
                    answers = await response.json()
                latencies.append((time.perf_counter() - start) * 1000)
                answer = next(iter(answers[0].values()))
                # A stats answer says result false on success too (as the agent's): its size
                # tells.
                if response.status != 200 or not answer.get("totalSize"):
                    raise RuntimeError(f"stats failed: {answers}")

        await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98] if len(samples) > 1 else samples[0]


def stats_latency() -> Metric:
    """P7 at 50 clients, with 1 and 10 clients in its details."""
    work = Path(tempfile.mkdtemp(prefix="nasbackup-shim-bench-svc."))
    repository = work / "nas"
    repository.mkdir()
    socket_path = work / "shim.sock"
    env = {**os.environ, "NASBACKUP_SHIM_LOG": str(work / "service.log")}
    server = subprocess.Popen(
        [str(ROOT / "scripts" / "serve"), "--socket", str(socket_path)], env=env
    )
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists():  # a benchmark harness waiting for its server
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the service did not start")
            time.sleep(0.01)
        body = _envelope(str(repository))
        p99s = {n: _p99(asyncio.run(_level(socket_path, body, n))) for n in LEVELS}
    finally:
        server.terminate()
        server.wait(timeout=60)
        for path in (work / "service.log", repository, work):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
    return Metric(
        "P7", p99s[50], 50,
        "ms p99 of stats at 50 clients; " + ", ".join(f"{n}: {p99s[n]:.0f} ms" for n in LEVELS),
    )  # fmt: skip
