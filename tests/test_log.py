"""The shim's log: appended to, follows the agent's log rotation, never holds a Ceph key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from shim import log as shim_log
from shim.contract import error_stdout
from shim.redact import redact

SOURCE = "rbd:pool/img:mon_host=10.0.0.1\\:6789:auth_supported=cephx:id=admin:key=AQBsecret=="


@pytest.fixture
def agent_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "agent.log"
    path.write_text("a line of the agent's\n")
    monkeypatch.setenv(shim_log.LOG_FILE_ENV, str(path))
    shim_log.setup()
    return path


def test_the_log_is_appended_to_and_follows_rotation(agent_log: Path) -> None:
    logger = logging.getLogger("shim.test")
    logger.info("before rotation")
    assert agent_log.read_text().startswith("a line of the agent's\n")
    rotated = agent_log.with_name("agent.log.1")
    agent_log.rename(rotated)  # what logrotate does each day
    logger.info("after rotation")
    assert "after rotation" in agent_log.read_text()
    assert "after rotation" not in rotated.read_text()


def test_no_ceph_key_reaches_the_log_or_an_error_line(agent_log: Path) -> None:
    logger = logging.getLogger("shim.test")
    logger.error("disk %s: cannot open", SOURCE)
    try:
        raise OSError(f"cannot open {SOURCE}")
    except OSError:
        logger.exception("failed")
    text = agent_log.read_text()
    assert "AQBsecret" not in text and "key=***" in text
    assert "AQBsecret" not in error_stdout(f"disk {SOURCE} failed")
    assert redact("keyring=/etc/ceph/x.keyring,monkey=1") == "keyring=***,monkey=1"


def test_a_manifest_records_an_rbd_source_without_its_options() -> None:
    from shim.redact import public_source

    assert public_source(SOURCE) == "rbd:pool/img"
    assert public_source("/mnt/p/v") == "/mnt/p/v"


def test_lines_carry_the_commands_log_id(agent_log: Path) -> None:
    logger = logging.getLogger("shim.test")
    with shim_log.log_id("7f2ac3d1"):
        logger.info("inside the command")
    logger.info("outside")
    lines = agent_log.read_text().splitlines()
    assert lines[-2].endswith("inside the command (logid:7f2ac3d1)")
    assert lines[-1].endswith("outside")


async def test_the_engines_lines_carry_the_commands_log_id(agent_log: Path) -> None:
    from commands.model import GetBackupStorageStatsCommand
    from shim.operations import Result
    from shim.service.jobs import Scheduler

    def engine(_request: object, **_kw: object) -> Result:
        logging.getLogger("shim.engine").info("mounting the repository")
        return Result("/m\n1 1\n")

    scheduler = Scheduler(max_backups=1, runner=engine)
    stats = GetBackupStorageStatsCommand(
        backup_repo_type="nfs", backup_repo_address="a", context_map={"logid": "7f2ac3d1"}
    )
    await scheduler.submit([stats]).wait()
    await scheduler.shutdown()
    line = next(x for x in agent_log.read_text().splitlines() if "mounting" in x)
    assert line.endswith("(logid:7f2ac3d1)")


FORGED = "\n2026-12-07 00-00-00> nasbackup[1]: INFO forged"


def test_control_characters_cannot_forge_a_line(agent_log: Path) -> None:
    # What callers send (a field name, a file name found on the NAS, a log id) is escaped.
    logger = logging.getLogger("shim.test")
    with shim_log.log_id(f"id{FORGED}"):
        logger.info("ignoring unknown fields %s", f"x{FORGED}\r\x1b[2J")
    logger.error("a line\nof two")
    lines = agent_log.read_text().splitlines()
    assert not any(line.startswith("2026-12-07 00-00-00> nasbackup[1]") for line in lines)
    assert lines[-2].endswith(
        "ignoring unknown fields x\\n2026-12-07 00-00-00> nasbackup[1]: INFO forged\\r\\x1b[2J"
        " (logid:id\\n2026-12-07 00-00-00> nasbackup[1]: INFO forged)"
    )
    assert lines[-1].endswith("a line\\nof two")


async def test_a_newline_in_a_json_field_name_forges_no_line(
    agent_log: Path, tmp_path: Path
) -> None:
    import json

    from commands.envelope import dump
    from commands.model import GetBackupStorageStatsCommand
    from tests.lab.harness import running

    ((name, body),) = dump(
        [GetBackupStorageStatsCommand(backup_repo_type="x", backup_repo_address="a")]
    )[0].items()
    envelope = [{name: {**body, f"unknown{FORGED}": 1, "backupRepoType": "-bad"}}]
    async with running(tmp_path) as service:
        reply = await service.raw("POST", "/v1/commands", data=json.dumps(envelope).encode())
    assert reply.status == 400
    text = agent_log.read_text()
    assert "ignoring unknown fields unknown\\n2026-12-07" in text
    assert not any(
        line.startswith("2026-12-07 00-00-00> nasbackup[1]") for line in text.splitlines()
    )
