"""The socket service, running for real on a temporary socket, against the lab hypervisor."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import libvirt
import pytest

from commands.envelope import dump, load_commands
from commands.model import BackupAnswer, GetBackupStorageStatsCommand
from commands.wrappers import Generation
from shim.backupdir import directory_size
from shim.errors import CleanupFailed
from shim.lock import LOCK_WAIT_ENV, VmLock
from shim.service import Service, ServiceConfig, StartupRefused, TcpAddress
from shim.service.config import parse_tcp_address, read_token
from shim.service.jobs import ABORTED_MESSAGE, Job, JobState, Scheduler
from shim.virt import host
from tests.envelopes import GENERATIONS, SAMPLE_VALUES, all_cases, fill, mismatches, read
from tests.lab import Lab, MiB
from tests.lab.leaks import leaks
from tests.service_support import (
    FixtureRun,
    Running,
    backup_directories,
    df_kib,
    jobinfo,
    running,
)
from tests.support import ROOT, verify_backup

TAKE = "org.apache.cloudstack.backup.TakeBackupCommand"
ANSWER = "org.apache.cloudstack.backup.BackupAnswer"
RUNNING_CASES = [(g, c) for g, c in all_cases() if c in ("legacy", "full", "incremental")]


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Running]:
    async with running(tmp_path) as the_service:
        yield the_service


def _answer(answers: list[dict[str, Any]], index: int = 0) -> dict[str, Any]:
    ((_, body),) = answers[index].items()
    return body


def _take(run: FixtureRun, mode: str = "legacy", generation: str = "merged") -> list[Any]:
    return fill(read(generation, mode)[0], run.values())


# -- the fixtures, end to end ------------------------------------------------------------------
@pytest.mark.live_backup
@pytest.mark.lab
@pytest.mark.parametrize(("generation", "case"), RUNNING_CASES)
async def test_running_vm_fixture_gets_its_answer_and_a_backup_that_restores(
    lab: Lab, service: Running, generation: str, case: str
) -> None:
    run = FixtureRun(lab, lab.create_vm(disks=(32 * MiB, 16 * MiB)), lab.repository())
    run.vm.write(0, 0, 2 * MiB, pattern=0x21)
    run.vm.write(1, 1 * MiB, 1 * MiB, pattern=0x22)
    if case == "incremental":
        await run.backup(service, generation, "full")
        run.vm.write(0, 4 * MiB, 1 * MiB, pattern=0x23)
        run.vm.write_zeroes(0, 0, 1 * MiB)
    await run.backup(service, generation, case)
    verify_backup(lab, run.repo_dir, run.backups[-1], run.vm, run.vm.reference_backup())
    assert run.vm.checkpoints() == run.bitmaps[-1:]
    assert leaks(lab) == []
    if case == "incremental":  # only the changed clusters
        size = sum(f.stat().st_size for f in (run.repo_dir / run.backups[-1]).glob("*.qcow2"))
        assert size < 4 * MiB


@pytest.mark.lab
@pytest.mark.parametrize("generation", GENERATIONS)
async def test_stats_fixture_answers_bytes(lab: Lab, service: Running, generation: str) -> None:
    repo = lab.repository(size=16 * MiB)
    (Path(repo.address) / "filler").write_bytes(b"\1" * (3 * MiB))
    run = FixtureRun(lab, lab.create_vm(disks=(16 * MiB,), start=False), repo)
    command, expected = read(generation, "stats")
    status, answers = await service.post(fill(command, run.values()), generation=generation)
    total, used = df_kib(Path(repo.address))
    values = {
        "totalKiB": total,
        "usedKiB": used,
        "totalBytes": total * 1024,
        "usedBytes": used * 1024,
    }
    found: dict[str, Any] = {}
    assert status == 200
    assert mismatches(expected, answers, values, found=found) == []
    assert found["mountPoint"].startswith("/") and "csbackup." in found["mountPoint"]
    assert total == 16 * 1024 and used >= 3 * 1024
    assert leaks(lab) == []


@pytest.mark.lab
async def test_a_failed_backup_is_a_failed_answer(lab: Lab, service: Running) -> None:
    run = FixtureRun(lab, lab.create_vm(disks=(16 * MiB,), start=False), lab.repository())
    status, answers = await service.post(_take(run, "full"))
    assert status == 200
    body = _answer(answers)
    # details: the drop-in's one failure line, whatever the engine's wording.
    assert body.pop("details").startswith(f"VM {run.vm.name} is not running on this host")
    assert body == {
        "contextMap": {},
        "wait": 0,
        "bypassHostMaintenance": False,
        "result": False,
    }
    assert leaks(lab) == []


@pytest.mark.lab
async def test_the_dropins_lock_makes_it_a_failure_saying_so(
    lab: Lab, service: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = FixtureRun(lab, lab.create_vm(disks=(16 * MiB,)), lab.repository())
    monkeypatch.setenv(LOCK_WAIT_ENV, "1")  # waited for a bounded time (60 s by default)
    with VmLock(run.vm.name):  # what a drop-in run holds while it works on the VM
        started = time.monotonic()
        status, answers = await service.post(_take(run))
        assert 1 <= time.monotonic() - started < 10
    assert status == 200
    body = _answer(answers)
    assert body["result"] is False
    assert body["details"] == (
        f"another operation on VM {run.vm.name} is in progress (pid {os.getpid()})"
    )
    assert backup_directories(run.repo_dir, run.vm) == []
    assert leaks(lab) == []


@pytest.mark.live_backup
@pytest.mark.lab
async def test_two_requests_for_one_vm_run_one_after_the_other(lab: Lab, service: Running) -> None:
    run = FixtureRun(lab, lab.create_vm(disks=(128 * MiB,)), lab.repository())
    run.vm.write(0, 0, 64 * MiB, pattern=0x31)
    first = _take(run)
    run.backups.append("placeholder")  # the second gets the next backup path
    second = _take(run)
    (status1, answers1), (status2, answers2) = await asyncio.gather(
        service.post(first), service.post(second)
    )
    assert (status1, status2) == (200, 200)
    assert _answer(answers1)["result"] and _answer(answers2)["result"], (answers1, answers2)
    assert len(service.engine.calls) == 2 and not service.engine.overlapping()
    assert len(backup_directories(run.repo_dir, run.vm)) == 2
    assert leaks(lab) == []


@pytest.mark.live_backup
@pytest.mark.lab
async def test_one_envelope_runs_its_commands_in_order(lab: Lab, service: Running) -> None:
    run = FixtureRun(lab, lab.create_vm(disks=(16 * MiB,)), lab.repository())
    stats = fill(read("merged", "stats")[0], run.values())
    envelope = [*_take(run, "full"), *stats, *_take(run, "full")]  # the third: path taken
    status, answers = await service.post(envelope)
    assert status == 200
    assert [next(iter(a)) for a in answers] == [
        ANSWER,
        "org.apache.cloudstack.backup.BackupStorageStatsAnswer",
        ANSWER,
    ]
    # The stats answer says false on success too, as the agent's: its size says it ran.
    assert [_answer(answers, i)["result"] for i in range(3)] == [True, False, False]
    assert _answer(answers, 1)["totalSize"] > 0
    assert _answer(answers, 2)["details"].endswith("already exists")
    assert [type(c.request).__name__ for c in service.engine.calls] == [
        "BackupRequest",
        "StatsRequest",
        "BackupRequest",
    ]


# -- async jobs: progress, the backup limit, abort ------------------------------------------------
async def _until(predicate: Any, what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.live_backup
@pytest.mark.lab
async def test_async_progress_limit_and_abort(lab: Lab, tmp_path: Path, push_mode: None) -> None:
    """In push mode, whose abort answers libvirt's "Operation canceled" (pull mode's full of
    768 MiB may end before the abort on a fast host; ``tests/test_pull.py`` aborts one)."""
    big = FixtureRun(lab, lab.create_vm(disks=(1024 * MiB,)), lab.repository())
    big.vm.write(0, 0, 768 * MiB, pattern=0x5A)
    small = FixtureRun(lab, lab.create_vm(disks=(16 * MiB,)), lab.repository())
    queued = FixtureRun(lab, lab.create_vm(disks=(16 * MiB,)), lab.repository())
    async with running(tmp_path, max_backups=1) as service:
        status, accepted = await service.post(_take(big, "full"), run_async=True)
        assert status == 202 and set(accepted) == {"jobId"}
        big_job = accepted["jobId"]

        async def copying() -> dict[str, Any] | None:
            body = await service.job(big_job)
            progress = body["progress"]
            return body if body["state"] == "running" and progress["total"] > 0 else None

        first = await _until(copying, "the backup to copy")
        assert "answers" not in first
        later = await service.job(big_job)
        assert 0 <= first["progress"]["processed"] <= later["progress"]["processed"]
        assert later["progress"]["processed"] <= later["progress"]["total"]
        assert later["progress"]["total"] >= 768 * MiB

        # One backup at a time: the others wait, queued.
        _, small_accepted = await service.post(_take(small, "full"), run_async=True)
        _, queued_accepted = await service.post(_take(queued, "full"), run_async=True)
        assert (await service.job(small_accepted["jobId"]))["state"] == "queued"
        status, health = await service.request("GET", "/v1/health")
        assert status == 200 and health["jobs"]["inFlight"] == 3
        assert health["jobs"]["running"] == 1 and health["jobs"]["queued"] == 2

        # Aborting a queued job: it never runs.
        status, aborted = await service.request("DELETE", f"/v1/jobs/{queued_accepted['jobId']}")
        assert status == 200 and aborted["state"] == "aborted"
        assert _answer(aborted["answers"])["details"] == ABORTED_MESSAGE

        # Aborting the running backup: cleaned up as after any failure.
        status, took, aborted = await service.abort(big_job)
        assert status in (200, 202) and took < 1.5, (status, took)
        assert aborted["state"] == "aborted", aborted
        body = _answer(aborted["answers"])
        assert body["details"] == "backup job failed: Operation canceled"
        assert body["result"] is False and "needsCleanup" not in body and "size" not in body
        status, again = await service.request("DELETE", f"/v1/jobs/{big_job}")
        assert status == 409 and again["error"] == "the job has already aborted"

        done = await service.wait_job(small_accepted["jobId"])
        assert done["state"] == "succeeded"
        assert _answer(done["answers"])["bitmapCreated"] == small.values()["bitmapNew"]
        progress = done["progress"]
        assert progress["processed"] == progress["total"] > 0
        assert not service.engine.overlapping()
        assert [getattr(c.request, "vm", None) for c in service.engine.calls] == [
            big.vm.name,
            small.vm.name,
        ]

    assert leaks(lab) == []
    assert big.vm.checkpoints() == [] and backup_directories(big.repo_dir, big.vm) == []
    assert not list(big.repo_dir.glob("*/*.partial"))
    assert backup_directories(queued.repo_dir, queued.vm) == []
    refs = small.vm.reference_backup()
    verify_backup(lab, small.repo_dir, small.values()["backupPath"], small.vm, refs)


@pytest.mark.live_backup
@pytest.mark.lab
async def test_async_job_answers_as_the_synchronous_call(
    lab: Lab, service: Running, push_mode: None
) -> None:
    run = FixtureRun(lab, lab.create_vm(disks=(16 * MiB,)), lab.repository())
    run.vm.write(0, 0, 1 * MiB)
    command, expected = read("seed", "full")
    values = run.values()
    status, accepted = await service.post(fill(command, values), run_async=True, generation="seed")
    assert status == 202
    done = await service.wait_job(accepted["jobId"])
    assert done["state"] == "succeeded"
    values["jobinfo"] = jobinfo(run.vm)
    values["size"] = directory_size(run.repo_dir / values["backupPath"])
    assert mismatches(expected, done["answers"], values) == []
    status, unknown = await service.request("GET", "/v1/jobs/0123")
    assert status == 404 and unknown["error"] == "no such job"


# -- bad requests ----------------------------------------------------------------------------------
_VALID = [
    {
        TAKE: {
            "vmName": "i-2-3-VM",
            "backupPath": "i-2-3-VM/b",
            "backupRepoType": "nfs",
            "backupRepoAddress": "10.0.0.1:/b",
        }
    }
]


def _with(**fields: Any) -> bytes:
    return json.dumps([{TAKE: {**_VALID[0][TAKE], **fields}}]).encode()


BAD_REQUESTS = {
    "malformed JSON": (b'[{"x": ', "malformed JSON", "", "Expecting value"),
    "not UTF-8": (b'["\xff"]', "malformed JSON", "", "not UTF-8"),
    "NaN": (b"[NaN]", "malformed JSON", "", "NaN is not JSON"),
    "not an array": (b"{}", "invalid envelope", "", "an envelope is a JSON array"),
    "empty": (b"[]", "invalid envelope", "", "the envelope holds no command"),
    "two keys": (b'[{"a": {}, "b": {}}]', "invalid envelope", "/0", "exactly one key"),
    "unknown class": (
        b'[{"com.cloud.agent.api.StopCommand": {}}]',
        "invalid envelope",
        "/0/com.cloud.agent.api.StopCommand",
        "unknown command class",
    ),
    "missing field": (
        json.dumps(
            [{TAKE: {"vmName": "v", "backupPath": "v/b", "backupRepoType": "nfs"}}]
        ).encode(),
        "invalid envelope",
        f"/0/{TAKE}/backupRepoAddress",
        "Missing data for required field.",
    ),
    "wrong type": (_with(wait="0"), "invalid envelope", f"/0/{TAKE}/wait", "Not a valid integer."),
    "string boolean": (
        _with(quiesce="true"),
        "invalid envelope",
        f"/0/{TAKE}/quiesce",
        "Not a valid boolean.",
    ),
    "null primitive": (
        _with(bypassHostMaintenance=None),
        "invalid envelope",
        f"/0/{TAKE}/bypassHostMaintenance",
        "Field may not be null.",
    ),
    "list as a string": (
        _with(volumePaths="/a,/b"),
        "invalid envelope",
        f"/0/{TAKE}/volumePaths",
        "Not a valid list.",
    ),
    "java validation": (
        _with(mode="full"),
        "invalid envelope",
        f"/0/{TAKE}",
        "full mode requires bitmapNew (the bitmap to create for the next incremental)",
    ),
    "unknown mode": (
        _with(mode="differential"),
        "invalid envelope",
        f"/0/{TAKE}",
        "Unknown backup mode: differential",
    ),
    "too large": (
        _with(contextMap={"pad": "x" * 5000}),
        "request body too large",
        "",
        "at most 4096 bytes",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_requests_are_400_naming_field_and_problem(tmp_path: Path, case: str) -> None:
    body, error, field, message = BAD_REQUESTS[case]
    async with running(tmp_path, max_body_bytes=4096) as service:
        status, reply = await service.request(
            "POST", "/v1/commands", data=body, headers={"Content-Type": "application/json"}
        )
        assert status == 400
        assert reply["error"] == error
        assert any(p["field"] == field and message in p["message"] for p in reply["problems"]), (
            reply
        )
        assert service.engine.calls == []
        assert service.service.scheduler is not None and not service.service.scheduler.in_flight()


async def test_a_chunked_body_over_the_limit_is_refused(tmp_path: Path) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'[{"' + TAKE.encode() + b'": {"contextMap": {"pad": "'
        for _ in range(10):
            yield b"x" * 1024
        yield b'"}}}]'

    async with running(tmp_path, max_body_bytes=4096) as service:
        status, reply = await service.request("POST", "/v1/commands", data=chunks())
        assert status == 400 and reply["error"] == "request body too large"
        assert service.engine.calls == []


async def test_a_bad_async_flag_and_unknown_routes_are_json(tmp_path: Path) -> None:
    async with running(tmp_path) as service:
        status, reply = await service.request("POST", "/v1/commands?async=maybe", json_body=_VALID)
        assert status == 400 and reply["problems"] == [
            {"field": "async", "message": "takes 1 or 0, not 'maybe'"}
        ]
        status, reply = await service.request("GET", "/v1/nothing")
        assert status == 404 and reply["error"] == "Not Found"
        status, reply = await service.request("PUT", "/v1/commands", json_body=_VALID)
        assert status == 405
        assert service.engine.calls == []


# -- listeners and their permissions ---------------------------------------------------------------
async def test_the_socket_is_0600_and_ours(service: Running) -> None:
    st = os.lstat(service.socket_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid() == 0


async def test_tcp_needs_the_bearer_token(tmp_path: Path) -> None:
    token = "s3cret-token-4f9a"  # noqa: S105 - a test's token
    async with running(tmp_path, tcp=TcpAddress("127.0.0.1", 0), token=token) as service:
        assert service.service.tcp_address is not None
        host_, port = service.service.tcp_address
        assert host_ == "127.0.0.1"
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as tcp:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
                async with tcp.post(f"{url}/v1/commands", json=_VALID, headers=headers) as reply:
                    assert reply.status == 401
                    assert reply.headers["WWW-Authenticate"] == "Bearer"
                    assert (await reply.json())["error"] == "a valid bearer token is required"
            async with tcp.get(
                f"{url}/v1/openapi.json", headers={"Authorization": f"Bearer {token}"}
            ) as reply:
                assert reply.status == 200
        assert service.engine.calls == []
        status, _ = await service.request("GET", "/v1/openapi.json")  # the socket: no token
        assert status == 200


NOT_LOOPBACK = [
    "0.0.0.0:8251",
    "10.1.2.3:1",
    "[::]:1",
    "example.com:1",
    "127.0.0.1",
    "127.0.0.1:99999",
]


@pytest.mark.parametrize("address", NOT_LOOPBACK)
def test_only_loopback_tcp_addresses(address: str) -> None:
    with pytest.raises(StartupRefused):
        parse_tcp_address(address)


def test_loopback_addresses_and_the_token_rule() -> None:
    assert parse_tcp_address("127.0.0.1:0") == TcpAddress("127.0.0.1", 0)
    assert parse_tcp_address("[::1]:8251") == TcpAddress("::1", 8251)
    assert parse_tcp_address("localhost:8251") == TcpAddress("127.0.0.1", 8251)
    with pytest.raises(StartupRefused, match="needs a bearer token"):
        ServiceConfig(tcp=TcpAddress("127.0.0.1", 0))
    assert "s3cret" not in repr(ServiceConfig(tcp=TcpAddress("127.0.0.1", 0), token="s3cret"))  # noqa: S106


def test_the_token_file_must_be_private(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("abc123\n")
    token_file.chmod(0o644)
    with pytest.raises(StartupRefused, match="loose permissions"):
        read_token(token_file)
    token_file.chmod(0o600)
    assert read_token(token_file) == "abc123"


async def _refused(socket_path: Path, match: str) -> None:
    with pytest.raises(StartupRefused, match=match):
        await Service(ServiceConfig(socket_path=socket_path)).start()


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
async def test_a_loose_socket_directory_is_refused(tmp_path: Path, mode: int) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(mode)
    await _refused(run_dir / "shim.sock", "socket directory .* has loose permissions")
    assert not (run_dir / "shim.sock").exists()


def _stale_socket(tmp_path: Path, mode: int) -> Path:
    """A socket file nobody listens on (a service that died), with ``mode``."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(run_dir / "shim.sock"))
    (run_dir / "shim.sock").chmod(mode)
    return run_dir / "shim.sock"


async def test_an_existing_socket_with_loose_permissions_is_refused(tmp_path: Path) -> None:
    socket_path = _stale_socket(tmp_path, 0o666)
    await _refused(socket_path, "existing socket .* has loose permissions")
    (socket_path.parent / "plain").write_text("")
    await _refused(socket_path.parent / "plain", "exists and is not a socket")


async def test_a_stale_socket_is_replaced_and_a_live_one_is_not(tmp_path: Path) -> None:
    socket_path = _stale_socket(tmp_path, 0o600)
    async with running(tmp_path) as service:
        status, _ = await service.request("GET", "/v1/openapi.json")
        assert status == 200
        await _refused(service.socket_path, "another service listens")
    assert not socket_path.exists()  # removed on stop


# -- health, OpenAPI, the client and scripts/serve ------------------------------------------------
@pytest.mark.lab
async def test_health(service: Running, hypervisor: libvirt.virConnect) -> None:
    status, health = await service.request("GET", "/v1/health")
    assert status == 200
    assert health == {
        "status": "ok",
        "libvirt": {"reachable": True, "versions": host.versions(hypervisor)},
        "jobs": {"inFlight": 0, "queued": 0, "running": 0, "maxBackups": 2},
    }


async def test_openapi_is_generated_from_the_schemas(service: Running) -> None:
    status, document = await service.request("GET", "/v1/openapi.json")
    assert status == 200 and document["openapi"] == "3.0.3"
    assert set(document["paths"]) == {
        "/v1/commands",
        "/v1/jobs/{jobId}",
        "/v1/health",
        "/v1/openapi.json",
    }
    schemas = document["components"]["schemas"]
    take = schemas["TakeBackupCommand"]
    assert {"vmName", "backupPath", "backupRepoType", "backupRepoAddress"} <= set(take["required"])
    assert take["properties"]["parentPaths"]["type"] == "array"
    assert take["properties"]["parentPath"]["type"] == "string"
    assert take["properties"]["wait"]["maximum"] == 2**31 - 1
    assert schemas["BackupAnswer"]["properties"]["bitmapRecreated"]["type"] == "string"
    assert schemas["BackupStorageStatsAnswer"]["properties"]["totalSize"]["type"] == "integer"
    wrappers = schemas["CommandEnvelope"]["items"]["oneOf"]
    assert len(wrappers) == 5 and {"DeleteBackupCommand", "RebaseBackupCommand"} <= {
        w["properties"][next(iter(w["properties"]))]["$ref"].rsplit("/", 1)[-1] for w in wrappers
    }


@pytest.mark.lab
def test_the_client_through_scripts_serve(lab: Lab, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    socket_path, log = run_dir / "shim.sock", tmp_path / "agent.log"
    env = {**os.environ, "NASBACKUP_SHIM_LOG": str(log)}
    serve = subprocess.Popen(
        [str(ROOT / "scripts" / "serve"), "--socket", str(socket_path)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            assert serve.poll() is None and time.monotonic() < deadline, serve.stderr
            time.sleep(0.05)
        repo = lab.repository()
        stats = GetBackupStorageStatsCommand(
            backup_repo_type=repo.type,
            backup_repo_address=repo.address,
            mount_options="bind,password=hunter2",
        )
        envelope = tmp_path / "stats.json"
        envelope.write_text(json.dumps(dump([stats])))

        def client(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "shim.service.client", "--socket", str(socket_path), *args],
                capture_output=True,
                text=True,
                input=stdin,
                timeout=60,
                check=False,
            )

        sent = client("send", str(envelope))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        answer = _answer(json.loads(sent.stdout))
        # As the agent's stats answer: result false on success too; the client knows it.
        assert answer["result"] is False and answer["totalSize"] > 0
        refused = client("send", "-", stdin="[{")
        assert refused.returncode == 2 and json.loads(refused.stdout)["error"] == "malformed JSON"
        health = client("health")
        assert health.returncode == 0 and json.loads(health.stdout)["libvirt"]["reachable"]
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
    assert not socket_path.exists()
    text = log.read_text()
    assert "hunter2" not in text and "password=***" in text
    assert "POST /v1/commands -> 200" in text


def test_scripts_serve_refuses_a_loose_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o777)
    done = subprocess.run(
        [str(ROOT / "scripts" / "serve"), "--socket", str(run_dir / "shim.sock")],
        env={**os.environ, "NASBACKUP_SHIM_LOG": str(tmp_path / "agent.log")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "loose permissions" in done.stderr and done.stdout == ""


# -- error branches of the scheduler (the only fakes of the engine) ------------------------------
async def test_an_engine_bug_is_a_failed_answer_not_a_dead_job() -> None:
    def broken(_request: object, **_kw: object) -> None:
        raise KeyError("oops")

    scheduler = Scheduler(max_backups=1, runner=broken)
    stats = GetBackupStorageStatsCommand(backup_repo_type="nfs", backup_repo_address="a")
    answers = await scheduler.submit([stats]).wait()
    assert answers[0].result is False
    assert answers[0].details == "internal error: KeyError: 'oops'\n"
    await scheduler.shutdown()


async def test_a_cleanup_failure_sets_needs_cleanup() -> None:
    def unclean(_request: object, **_kw: object) -> None:
        raise CleanupFailed("cannot unmount /tmp/csbackup.x")

    scheduler = Scheduler(max_backups=1, runner=unclean)
    command = _load_one(_VALID)
    job = scheduler.submit([command])
    answers = await job.wait()
    assert job.state.value == "failed"
    assert dump(answers)[0][ANSWER] == {
        "contextMap": {},
        "wait": 0,
        "bypassHostMaintenance": False,
        "result": False,
        "details": "Backup cleanup failed",
        "needsCleanup": True,
    }
    await scheduler.shutdown()


@pytest.mark.parametrize("generation", [g for g, c in all_cases() if c == "cleanup-failed"])
async def test_a_cleanup_failure_answers_as_each_generation(generation: str) -> None:
    # Exit 20: needsCleanup where the generation's BackupAnswer has the field, none where
    # it has not (4.20.0, 4.20.x).
    def unclean(_request: object, **_kw: object) -> None:
        raise CleanupFailed("cannot unmount /tmp/csbackup.x")

    command, expected = read(generation, "cleanup-failed")
    scheduler = Scheduler(max_backups=1, runner=unclean)
    commands = load_commands(fill(command, SAMPLE_VALUES), generation=Generation(generation))
    answers = await scheduler.submit(commands).wait()
    await scheduler.shutdown()
    assert mismatches(expected, dump(answers), SAMPLE_VALUES) == []


def _load_one(envelope: list[Any]) -> Any:
    (command,) = load_commands(envelope)
    return command


@pytest.mark.lab
async def test_concurrent_stats_of_one_repository_share_one_run(lab: Lab, service: Running) -> None:
    repository = lab.repository()
    command = GetBackupStorageStatsCommand(
        backup_repo_type=repository.type,
        backup_repo_address=repository.address,
        mount_options=repository.options,
    )
    results = await asyncio.gather(*(service.post(dump([command])) for _ in range(20)))
    assert all(status == 200 for status, _ in results)
    answers = [next(iter(body[0].values())) for _, body in results]
    assert all(a["totalSize"] > 0 for a in answers)
    # Twenty requests at once need far fewer mounts than twenty (one per wave).
    assert len(service.engine.calls) < 20
    assert leaks(lab) == []


@pytest.mark.live_backup
@pytest.mark.lab
async def test_the_generation_is_asked_shown_or_configured(lab: Lab, tmp_path: Path) -> None:
    """A request says its generation, or a field shows it, or the service's setting holds."""
    async with running(tmp_path, generation=Generation.V4_21) as service:
        run = FixtureRun(lab, lab.create_vm(disks=(16 * MiB,)), lab.repository())
        status, answers = await service.post(_take(run, "legacy", "4.21"))
        assert status == 200
        body = _answer(answers)
        # The 4.21 wrapper sets details and size only: no incrementalFallback, no bitmap.
        assert body["result"] is True and "incrementalFallback" not in body
        status, refused = await service.request(
            "POST", "/v1/commands?generation=4.22", json_body=_VALID
        )
        assert status == 400 and refused["problems"][0]["field"] == "generation"
        seed_only = [{TAKE: {**_VALID[0][TAKE], "parentPath": "i-2-3-VM/a"}}]
        status, refused = await service.post(seed_only, generation="merged")
        assert status == 400 and "seed generation" in refused["problems"][0]["message"]
    assert leaks(lab) == []


def test_scripts_serve_takes_a_generation() -> None:
    from shim.service.__main__ import config_from, parse_args

    assert config_from(parse_args([])).generation is Generation.MERGED
    assert config_from(parse_args(["--generation", "seed"])).generation is Generation.SEED


async def test_an_abort_that_came_after_the_work_leaves_the_job_succeeded() -> None:
    """Asked to abort as its backup was published: the state says what the answers say
    (a later DELETE is then refused as for any finished job). On the event loop, where the
    service makes its jobs (Python 3.9's asyncio.Event needs one)."""
    job = Job([])
    job.abort_requested = True
    job._finish([BackupAnswer(result=True, details="done")])
    assert job.state is JobState.SUCCEEDED
    failed = Job([])
    failed.abort_requested = True
    failed._finish([BackupAnswer(result=False, details="stopped")])
    assert failed.state is JobState.ABORTED
