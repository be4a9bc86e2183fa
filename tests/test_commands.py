"""The command schemas and the GSON envelope: fixtures, types, GSON's rules, the mapping to
the engine's requests and the answers made from its results. No hypervisor needed."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import pytest

from commands import (
    BackupAnswer,
    BackupStorageStatsAnswer,
    DeleteBackupCommand,
    EnvelopeError,
    GetBackupStorageStatsCommand,
    RebaseBackupCommand,
    RestoreBackupCommand,
    TakeBackupCommand,
    dump,
    load_answers,
    load_commands,
)
from commands.wrappers import Generation
from shim import operations
from shim.contract import StorageStats
from shim.nas import Repository
from shim.operations import Result
from tests.envelopes import SAMPLE_VALUES, all_cases, cases, fill, mismatches, read, rule

TAKE = "org.apache.cloudstack.backup.TakeBackupCommand"
ANSWER = "org.apache.cloudstack.backup.BackupAnswer"
REPO = {"backupRepoType": "nfs", "backupRepoAddress": "10.0.0.1:/backup"}


def _take(**fields: Any) -> list[dict[str, Any]]:
    return [{TAKE: {"vmName": "i-2-3-VM", "backupPath": "i-2-3-VM/b", **REPO, **fields}}]


def _problems(data: Any) -> list[tuple[str, str]]:
    with pytest.raises(EnvelopeError) as info:
        load_commands(data)
    return [(p.field, p.message) for p in info.value.problems]


# -- the fixtures -------------------------------------------------------------------------------
@pytest.mark.parametrize(("generation", "case"), all_cases())
def test_every_fixture_round_trips_unchanged(generation: str, case: str) -> None:
    command_template, answer_template = read(generation, case)
    envelope = fill(command_template, SAMPLE_VALUES)
    commands = load_commands(envelope)
    assert dump(commands) == envelope  # nothing null, nothing unknown: the very same JSON
    assert load_commands(dump(commands)) == commands
    answers = fill(answer_template, SAMPLE_VALUES)  # a wildcard stays: details is any text
    loaded = load_answers(answers)
    assert dump(loaded) == answers
    assert len(loaded) == len(commands)
    # Each command maps to one request of the engine, which accepts it.
    for command in commands:
        operations.validate(command.to_request())
    # Each expected answer says which rule of the contract's §7 it follows.
    assert rule(generation, case).startswith("§7 ")


def test_fields_each_generation_sends() -> None:
    def take_fields(generation: str) -> set[str]:
        names: set[str] = set()
        for case in cases(generation):
            for item in read(generation, case)[0]:
                if TAKE in item:
                    names |= set(item[TAKE])
        return names

    mode_fields = {"mode", "bitmapNew", "bitmapParent", "parentPath", "parentPaths"}
    assert not take_fields("4.20.0") & (mode_fields | {"quiesce", "volumePaths"})
    assert "volumePaths" in take_fields("4.20.x")
    assert not take_fields("4.20.x") & (mode_fields | {"quiesce"})
    assert "quiesce" in take_fields("4.21")
    assert not take_fields("4.21") & mode_fields
    assert {"parentPath", "mode"} <= take_fields("seed")
    assert "parentPaths" not in take_fields("seed")
    assert {"parentPaths", "mode"} <= take_fields("merged")
    assert "parentPath" not in take_fields("merged")
    assert "rebase" in cases("seed")
    assert all("rebase" not in cases(g) for g in ("4.20.0", "4.20.x", "4.21", "merged"))


def test_the_placeholder_matcher() -> None:
    values = {"size": 42, "vm": "i-2-3-VM"}
    found: dict[str, Any] = {}
    assert (
        mismatches(
            {"a": "${?mp}\n${size} x", "b": "${size}"},
            {"a": "/m\n42 x", "b": 42},
            values,
            found=found,
        )
        == []
    )
    assert found == {"mp": "/m"}
    assert mismatches({"b": "${size}"}, {"b": 43}, values) == ["/b: 43 != 42"]
    assert mismatches({"a": 1}, {"a": 1, "c": 2}, values) == ["/c: unexpected"]
    assert mismatches(["${vm}"], ["i-2-3-VMx"], values)


# -- GSON's rules -------------------------------------------------------------------------------
def test_unknown_fields_are_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shim.commands")
    (command,) = load_commands(_take(volumeTO={"x": 1}, futureField=3))
    assert isinstance(command, TakeBackupCommand)
    assert "futureField" not in str(dump([command]))
    assert "ignoring unknown fields futureField, volumeTO" in caplog.text


def test_nulls_mean_absent_and_are_omitted_on_output() -> None:
    (command,) = load_commands(_take(mode=None, mountOptions=None, volumePaths=None))
    body = dump([command])[0][TAKE]
    assert "mode" not in body and "mountOptions" not in body and "volumePaths" not in body
    assert body["contextMap"] == {} and body["wait"] == 0 and body["bypassHostMaintenance"] is False
    answer = dump([BackupAnswer(result=True, size=5)])[0][
        "org.apache.cloudstack.backup.BackupAnswer"
    ]
    assert "details" not in answer and "bitmapCreated" not in answer


def test_volume_pools_are_opaque_objects() -> None:
    pools = [{"uuid": "u", "poolType": "NetworkFilesystem", "nested": {"any": [1, None, "x"]}}]
    (command,) = load_commands(_take(volumePools=pools, volumePaths=["/mnt/u/v"]))
    assert dump([command])[0][TAKE]["volumePools"] == pools


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"wait": "0"}, "wait", "Not a valid integer."),
        ({"wait": 1.5}, "wait", "Not a valid integer."),
        ({"wait": True}, "wait", "Not a valid integer."),
        (
            {"wait": 2**31},
            "wait",
            "Must be greater than or equal to -2147483648 and less than or equal to 2147483647.",
        ),
        ({"wait": None}, "wait", "Field may not be null."),
        ({"quiesce": "false"}, "quiesce", "Not a valid boolean."),
        ({"quiesce": 1}, "quiesce", "Not a valid boolean."),
        ({"bypassHostMaintenance": None}, "bypassHostMaintenance", "Field may not be null."),
        ({"vmName": 7}, "vmName", "Not a valid string."),
        ({"vmName": None}, "vmName", "Field may not be null."),
        ({"volumePaths": "/a,/b"}, "volumePaths", "Not a valid list."),
        ({"parentPaths": ["ok", 1]}, "parentPaths/1", "Not a valid string."),
        ({"contextMap": {"logid": 5}}, "contextMap/logid/value", "Not a valid string."),
        ({"volumePools": ["x"]}, "volumePools/0", "Not a valid mapping type."),
    ],
)
def test_wrong_types_name_the_field(fields: dict[str, Any], field: str, message: str) -> None:
    assert _problems(_take(**fields)) == [(f"/0/{TAKE}/{field}", message)]


def test_missing_fields_are_each_named() -> None:
    problems = _problems([{TAKE: {"vmName": "i-2-3-VM"}}])
    assert sorted(problems) == [
        (f"/0/{TAKE}/{name}", "Missing data for required field.")
        for name in ("backupPath", "backupRepoAddress", "backupRepoType")
    ]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "differential"}, "Unknown backup mode: differential"),
        (
            {"mode": "incremental", "bitmapParent": "b-1", "parentPaths": ["p"]},
            "incremental mode requires bitmapNew",
        ),
        (
            {"mode": "incremental", "bitmapNew": "b-2", "parentPaths": ["p"]},
            "incremental mode requires bitmapParent",
        ),
        (
            {"mode": "incremental", "bitmapNew": "b-2", "bitmapParent": "b-1"},
            "incremental mode requires parentPaths",
        ),
        (
            {"mode": "full"},
            "full mode requires bitmapNew (the bitmap to create for the next incremental)",
        ),
        ({"mode": "full", "bitmapNew": "bad/name"}, "invalid bitmap name: 'bad/name'"),
        ({"vmName": "-rf"}, "invalid VM name: '-rf'"),
        ({"mountOptions": "-o remount"}, "invalid mount options: they may not start with '-'"),
    ],
)
def test_the_java_wrappers_messages(fields: dict[str, Any], message: str) -> None:
    assert _problems(_take(**fields)) == [(f"/0/{TAKE}", message)]


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({}, "", "an envelope is a JSON array of {class name: command} objects"),
        ([], "", "the envelope holds no command"),
        ([5], "/0", "must be an object with exactly one key: a command class"),
        ([{"a": {}, "b": {}}], "/0", "must be an object with exactly one key: a command class"),
        (
            [{"com.cloud.agent.api.StopCommand": {}}],
            "/0/com.cloud.agent.api.StopCommand",
            "unknown command class",
        ),
        ([{TAKE: []}], f"/0/{TAKE}", "Invalid input type."),
    ],
)
def test_malformed_envelopes(data: Any, field: str, message: str) -> None:
    assert _problems(data) == [(field, message)]


def test_every_problem_of_every_command_is_reported() -> None:
    stats = "org.apache.cloudstack.backup.GetBackupStorageStatsCommand"
    problems = _problems([*_take(wait="x"), {stats: {"backupRepoType": "nfs"}}])
    assert problems == [
        (f"/0/{TAKE}/wait", "Not a valid integer."),
        (f"/1/{stats}/backupRepoAddress", "Missing data for required field."),
    ]


# -- commands to requests -----------------------------------------------------------------------
def test_take_backup_maps_to_the_request_the_dropin_builds() -> None:
    (seed,) = load_commands(
        _take(mode="incremental", bitmapNew="b-2", bitmapParent="b-1", parentPath="i-2-3-VM/a")
    )
    assert seed.to_request() == operations.BackupRequest(
        vm="i-2-3-VM",
        repository=Repository("nfs", "10.0.0.1:/backup", ""),
        path="i-2-3-VM/b",
        mode="incremental",
        bitmap_new="b-2",
        bitmap_parent="b-1",
        parent_path="i-2-3-VM/a",
    )
    (merged,) = load_commands(
        _take(
            mode="full",
            bitmapNew="b-2",
            parentPaths=[],
            volumePaths=["/mnt/p/v1", "/mnt/p/v2"],
            quiesce=True,
            mountOptions="vers=4.1",
        )
    )
    request = merged.to_request()
    assert isinstance(request, operations.BackupRequest)
    assert request.disk_paths == ("/mnt/p/v1", "/mnt/p/v2") and request.quiesce is True
    assert request.parent_paths == () and request.repository.options == "vers=4.1"
    assert merged.vm == "i-2-3-VM" and merged.is_backup


def test_the_other_commands_map_to_their_requests() -> None:
    repo = Repository("nfs", "10.0.0.1:/backup", "")
    fields = {"backup_repo_type": "nfs", "backup_repo_address": "10.0.0.1:/backup"}
    assert DeleteBackupCommand(backup_path="v/b", **fields).to_request() == (
        operations.DeleteRequest(repo, "v/b")
    )
    assert RebaseBackupCommand(target_path="t", new_backing_path="n", **fields).to_request() == (
        operations.RebaseRequest(repo, target="t", new_backing="n")
    )
    assert GetBackupStorageStatsCommand(**fields).to_request() == operations.StatsRequest(repo)
    assert GetBackupStorageStatsCommand(**fields).vm is None
    # Serialized with the VM whose backups they touch.
    assert DeleteBackupCommand(backup_path="v/b", **fields).vm == "v"
    assert (
        RebaseBackupCommand(target_path="v/b/root.x.qcow2", new_backing_path="n", **fields).vm
        == "v"
    )
    assert DeleteBackupCommand(backup_path="b", **fields).vm is None
    # A restore that names no VM is the backup's VM's (the engine locks it so too).
    assert RestoreBackupCommand(backup_path="v/b", **fields).vm == "v"
    assert RestoreBackupCommand(backup_path="v/b", vm_name="w", **fields).vm == "w"
    existing = RestoreBackupCommand(
        backup_path="v/b",
        vm_name="v",
        backup_volumes_uuids=["u1", "u2"],
        restore_volume_paths=["/mnt/p/n1", "/mnt/p/n2"],
        volume_paths=["/old/u1", "/old/u2"],
        vm_exists=True,
        **fields,
    )
    # Files named <diskType>.<uuid>.qcow2, errors naming the VM's volume uuids.
    assert existing.to_request() == operations.RestoreRequest(
        repo,
        backup_path="v/b",
        targets=("/mnt/p/n1", "/mnt/p/n2"),
        backup_files=("root.u1.qcow2", "datadisk.u2.qcow2"),
        vm="v",
        volume_uuids=("u1", "u2"),
    )
    # backupFiles is the middle of the name (the volume's path as CloudStack stores it).
    destroyed = RestoreBackupCommand(
        backup_path="v/b",
        vm_name="v",
        backup_volumes_uuids=["u1", "u2"],
        backup_files=["p1", "p2"],
        restore_volume_paths=["/mnt/p/n1", "/dev/drbd/by-res/cs-n2/0"],
        vm_exists=False,
        mount_timeout=7,
        **fields,
    )
    request = destroyed.to_request()
    assert request.backup_files == ("root.p1.qcow2", "datadisk.p2.qcow2")
    assert request.volume_uuids == ("n1", "n2")  # from the target paths (LINSTOR: cs-<uuid>)
    assert request.repository.mount_timeout == 7
    assert request.attach_to is None and request.create_size is None
    # vmExists absent: one volume, index 0 of every list, the command's own diskType.
    single = RestoreBackupCommand(
        backup_path="v/b",
        vm_name="v",
        backup_volumes_uuids=["u2", "ignored"],
        backup_files=["p2", "ignored"],
        restore_volume_paths=["/mnt/p/new", "/ignored"],
        restore_volume_sizes=[1048576, 1],
        disk_type="DATADISK",
        vm_state="Running",
        **fields,
    )
    request = single.to_request()
    assert (request.targets, request.backup_files) == (("/mnt/p/new",), ("datadisk.p2.qcow2",))
    assert (request.create_size, request.attach_to) == (1048576, "v")
    assert single.answer(Result("")).details == "new"
    assert existing.answer(Result("")).details is None
    # 4.20.0: volumePaths only; the middle is the target's last element.
    legacy = RestoreBackupCommand(
        backup_path="v/b", volume_paths=["/mnt/p/u1"], vm_exists=True, **fields
    )
    assert legacy.to_request().backup_files == ("root.u1.qcow2",)


def test_a_restore_without_volumes_is_refused_with_its_reason() -> None:
    restore = "org.apache.cloudstack.backup.RestoreBackupCommand"
    problems = _problems([{restore: {"backupPath": "v/b", **REPO}}])
    assert problems == [(f"/0/{restore}", "restore needs restoreVolumePaths or volumePaths")]


# -- results to answers -------------------------------------------------------------------------
def _command(**fields: Any) -> TakeBackupCommand:
    (command,) = load_commands(_take(**fields))
    assert isinstance(command, TakeBackupCommand)
    return command


RUNNING_STDOUT = "INCREMENTAL_FALLBACK=true\nBITMAP_CREATED=b-2\nJob type: Completed\n\n9000\n"


def test_the_merged_wrapper_sets_bitmap_created_from_the_command() -> None:
    answer = _command(mode="full", bitmapNew="b-2").answer(Result(RUNNING_STDOUT))
    assert answer == BackupAnswer(
        result=True,
        details="BITMAP_CREATED=b-2\nJob type: Completed\n\n9000",
        size=9000,
        bitmap_created="b-2",
        incremental_fallback=True,
        parent_bitmap_deleted=False,
    )
    # A stopped VM's stdout has no marker: the bitmap is still the command's.
    command = _command(mode="full", bitmapNew="b-2", volumePaths=["/mnt/p/v1", "/mnt/p/v2"])
    answer = command.answer(Result("4000\n3000\n"))
    assert (answer.size, answer.details, answer.bitmap_created) == (7000, "4000\n3000", "b-2")
    assert answer.incremental_fallback is False
    assert _command(mode="legacy-full").answer(Result("9000\n")).bitmap_created is None


def test_the_seed_wrapper_reads_the_markers() -> None:
    command = replace(_command(mode="full", bitmapNew="b-2"), generation=Generation.SEED)
    answer = command.answer(Result(RUNNING_STDOUT))
    assert answer == BackupAnswer(
        result=True,
        details=RUNNING_STDOUT.strip(),
        size=9000,
        bitmap_created="b-2",
        incremental_fallback=True,
    )
    stopped = replace(
        _command(mode="full", bitmapNew="b-2", volumePaths=["/p/v"]), generation=Generation.SEED
    )
    assert stopped.answer(Result("4000\n")).bitmap_created is None


@pytest.mark.parametrize("generation", [Generation.V4_20_0, Generation.V4_20_X, Generation.V4_21])
def test_older_wrappers_set_details_and_size_only(generation: Generation) -> None:
    command = replace(_command(), generation=generation)
    answer = command.answer(Result("Job type: Completed\n\n9000\n"))
    assert answer == BackupAnswer(result=True, details="Job type: Completed\n\n9000", size=9000)
    unclean = command.failure("cannot unmount", 20)
    # 4.20.0's and 4.20.x's BackupAnswer have no needsCleanup field.
    assert unclean.needs_cleanup is (True if generation is Generation.V4_21 else None)


def test_failures_cleanup_failures_and_timeouts() -> None:
    failed = _command().failure("backup job failed:\nENOSPC", 1)
    assert failed == BackupAnswer(result=False, details="backup job failed: ENOSPC")
    body = dump([failed])[0]["org.apache.cloudstack.backup.BackupAnswer"]
    assert not {"size", "incrementalFallback", "needsCleanup"} & body.keys()
    unclean = _command().failure("cannot unmount /tmp/csbackup.x", 20)
    assert unclean.needs_cleanup is True and unclean.details == "Backup cleanup failed"
    assert _command().timed_out() == BackupAnswer(result=False, details="timeout")


def test_stdout_java_cannot_parse_is_a_failed_answer() -> None:
    # A marker line where the merged wrapper sums integers would throw in Java.
    command = _command(mode="full", bitmapNew="b-2", volumePaths=["/p/v"])
    answer = command.answer(Result("BITMAP_CREATED=b-2\n4000\n"))
    assert answer.result is False and "NumberFormatException" in str(answer.details)


def test_delete_stats_rebase_and_restore_answers() -> None:
    fields = {"backup_repo_type": "nfs", "backup_repo_address": "a"}
    delete = DeleteBackupCommand(backup_path="v/b", **fields)
    assert delete.answer(Result("")) == BackupAnswer(result=True)
    assert "details" not in dump([delete.answer(Result(""))])[0][ANSWER]
    # A failed delete's details are stdout as it is (not trimmed).
    assert delete.failure("in use", 1) == BackupAnswer(result=False, details="in use\n")
    rebase = RebaseBackupCommand(target_path="t", new_backing_path="n", **fields)
    assert rebase.answer(Result("")) == BackupAnswer(result=True)
    stats = GetBackupStorageStatsCommand(**fields)
    answer = stats.answer(Result("/tmp/m\n100 40\n", StorageStats("/tmp/m", 100, 40)))
    # result false on success too, as the wrapper builds it (the provider reads the sizes).
    assert answer == BackupStorageStatsAnswer(
        result=False, details="/tmp/m\n100 40\n", total_size=102400, used_size=40960
    )
    old = replace(stats, generation=Generation.V4_20_0)  # its wrapper keeps df's KiB
    kib = old.answer(Result("/tmp/m\n100 40\n", StorageStats("/tmp/m", 100, 40)))
    assert (kib.result, kib.total_size, kib.used_size) == (False, 100, 40)
    assert stats.failure("Failed to mount nfs store", 1) == BackupStorageStatsAnswer(
        result=False, details="Failed to mount nfs store\n", total_size=0, used_size=0
    )
    assert stats.timed_out() == BackupStorageStatsAnswer(
        result=False, details="timeout", total_size=0, used_size=0
    )
    restore = RestoreBackupCommand(backup_path="v/b", volume_paths=["/t"], vm_exists=True, **fields)
    assert restore.answer(Result("/t 1024\n")) == BackupAnswer(result=True)
    missing = "Backup file for the volume [t] does not exist."
    assert restore.failure(missing, 1) == BackupAnswer(result=False, details=missing)
    assert restore.timed_out() == BackupAnswer(result=False, details="timeout")


def test_describe_never_shows_credentials() -> None:
    text = _command(mountOptions="username=u,password=hunter2").describe()
    assert "hunter2" not in text and "password=***" in text and "TakeBackupCommand" in text
