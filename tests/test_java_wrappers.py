"""The drop-in's stdout through each generation's Java wrapper, as the agent parses it; the
``rbd:`` sources the agent builds; which generation an envelope is. No hypervisor needed."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from commands import TakeBackupCommand, load_commands, wrappers
from commands.envelope import EnvelopeError
from commands.pools import CephAuth, ceph_auth, rbd_source
from commands.wrappers import Generation, JavaParseError, take_backup_answer
from shim import contract
from shim.contract import BackupOutcome
from shim.errors import UsageError

OUTCOME = BackupOutcome(
    size=9000,
    file_sizes=(4000, 3000, 512),
    bitmap_created="backup-2",
    incremental_fallback=True,
    job_stats={"type": 3, "operation": 9, "time_elapsed": 120, "disk_total": 1 << 20},
)


@pytest.mark.parametrize("generation", list(Generation))
@pytest.mark.parametrize("mode", [None, "full", "incremental"])
def test_stopped_vm_stdout_is_integers_that_every_generation_sums(
    generation: Generation, mode: str | None
) -> None:
    """Contract §2: with -d the wrappers sum every line, -M or not; one marker would throw."""
    stdout = contract.backup_stdout(OUTCOME, disk_paths_given=True)
    assert stdout == "4000\n3000\n512\n"
    answer = take_backup_answer(
        generation, 0, stdout, disk_paths_given=True, bitmap_new="backup-2" if mode else None
    )
    assert (answer.result, answer.size) == (True, 7512)


@pytest.mark.parametrize("generation", list(Generation))
def test_running_vm_stdout_gives_every_generation_the_directory_size(
    generation: Generation,
) -> None:
    stdout = contract.backup_stdout(OUTCOME, disk_paths_given=False)
    answer = take_backup_answer(
        generation, 0, stdout, disk_paths_given=False, bitmap_new="backup-2"
    )
    assert (answer.result, answer.size) == (True, 9000)
    if generation in (Generation.SEED, Generation.MERGED):
        assert answer.incremental_fallback is True
        assert answer.bitmap_created == "backup-2"
    else:
        assert answer.incremental_fallback is None and answer.bitmap_created is None


def test_markers_with_disk_paths_only_for_the_seed() -> None:
    """The seed-only setting prints markers with -d: the seed strips them, the merged throws."""
    stdout = contract.backup_stdout(OUTCOME, disk_paths_given=True, markers_with_disk_paths=True)
    seed = take_backup_answer(
        Generation.SEED, 0, stdout, disk_paths_given=True, bitmap_new="backup-2"
    )
    assert (seed.size, seed.bitmap_created, seed.incremental_fallback) == (7512, "backup-2", True)
    with pytest.raises(JavaParseError):
        take_backup_answer(
            Generation.MERGED, 0, stdout, disk_paths_given=True, bitmap_new="backup-2"
        )


def test_java_string_rules() -> None:
    assert wrappers.java_trim("\t\n x \n\x00") == "x"
    assert wrappers.java_split_lines("a\n\nb\n\n") == ["a", "", "b"]
    assert wrappers.parse_long("-12") == -12
    for bad in ("1.5", "", " 1", "1e3", str(2**63)):
        with pytest.raises(JavaParseError):
            wrappers.parse_long(bad)


POOL = {
    "uuid": "1b2c",
    "host": "10.0.0.1,10.0.0.2",
    "port": 3300,
    "path": "cloudstack",
    "poolType": "RBD",
}


def test_the_rbd_source_is_the_string_the_agent_builds() -> None:
    auth = CephAuth(user="admin", key="QUJD")
    assert rbd_source(POOL, "cloudstack/vol-1", auth) == (
        "rbd:cloudstack/vol-1:mon_host=10.0.0.1\\:3300\\;10.0.0.2\\:3300"
        ":auth_supported=cephx:id=admin:key=QUJD:rbd_default_format=2:client_mount_timeout=30"
    )
    v6 = {**POOL, "host": "fd00::1", "port": 0, "details": {"rbd_default_data_pool": "ec"}}
    assert rbd_source(v6, "p/i", None) == (
        "rbd:p/i:mon_host=[fd00\\:\\:1]:auth_supported=none:rbd_default_data_pool=ec"
        ":rbd_default_format=2:client_mount_timeout=30"
    )
    with pytest.raises(UsageError):
        rbd_source({**POOL, "host": ""}, "p/i", None)


class _Pool:
    def XMLDesc(self, _flags: int) -> str:
        return (
            "<pool type='rbd'><source><name>cloudstack</name>"
            "<auth type='ceph' username='admin'><secret uuid='1b2c'/></auth></source></pool>"
        )


class _Secret:
    def value(self) -> bytes:
        return b"secret-key"


class _Conn:
    def storagePoolLookupByUUIDString(self, uuid: str) -> _Pool:
        import libvirt

        if uuid != "1b2c":
            raise libvirt.libvirtError("no pool")
        return _Pool()

    def secretLookupByUUIDString(self, uuid: str) -> _Secret:
        return _Secret()


def test_ceph_auth_comes_from_the_agents_libvirt_pool() -> None:
    auth = ceph_auth(_Conn(), "1b2c")
    assert auth == CephAuth("admin", base64.b64encode(b"secret-key").decode())
    assert "secret" not in repr(auth)
    with pytest.raises(UsageError, match="not defined in libvirt"):
        ceph_auth(_Conn(), "other")


def test_take_backup_passes_rbd_sources_and_paths_as_the_agent_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from commands import model

    monkeypatch.setattr(model, "_ceph_auth", lambda uuid: CephAuth("admin", "QUJD"))
    command = TakeBackupCommand(
        vm_name="i-2-3-VM",
        backup_path="i-2-3-VM/b",
        backup_repo_type="nfs",
        backup_repo_address="a:/b",
        volume_pools=[POOL, {"uuid": "9f", "poolType": "NetworkFilesystem"}],
        volume_paths=["cloudstack/vol-1", "/mnt/9f/vol-2"],
    )
    sources = command.to_request().disk_paths
    assert sources[0].startswith("rbd:cloudstack/vol-1:mon_host=10.0.0.1\\:3300")
    assert sources[1] == "/mnt/9f/vol-2"


TAKE = "org.apache.cloudstack.backup.TakeBackupCommand"
REPO = {"backupRepoType": "nfs", "backupRepoAddress": "10.0.0.1:/backup"}


def _envelope(**fields: Any) -> list[dict[str, Any]]:
    return [{TAKE: {"vmName": "i-2-3-VM", "backupPath": "i-2-3-VM/b", **REPO, **fields}}]


def test_the_generation_is_stated_inferred_or_the_default() -> None:
    seed_fields = {
        "mode": "incremental",
        "bitmapNew": "b-2",
        "bitmapParent": "b-1",
        "parentPath": "i-2-3-VM/a",
    }
    (command,) = load_commands(_envelope(**seed_fields))
    assert command.generation is Generation.SEED
    (command,) = load_commands(_envelope(), default=Generation.V4_21)
    assert command.generation is Generation.V4_21
    (command,) = load_commands(_envelope(), generation=Generation.V4_20_0)
    assert command.generation is Generation.V4_20_0
    with pytest.raises(EnvelopeError, match="seed generation, not merged"):
        load_commands(_envelope(**seed_fields), generation=Generation.MERGED)


@pytest.mark.parametrize(
    ("fields", "pointer"),
    [
        ({"volumePassphrases": ["c2VjcmV0"]}, "volumePassphrases"),
        (
            {"volumePools": [{"uuid": "u", "poolType": "RBD", "passphrase": "x"}]},
            "volumePools/0/passphrase",
        ),
        ({"volumes": [{"encryptFormat": "LUKS"}]}, "volumes/0/encryptFormat"),
        ({"details": {"encryption": "true"}}, "details/encryption"),
    ],
)
def test_fields_that_change_what_happens_to_data_are_refused(
    fields: dict[str, Any], pointer: str
) -> None:
    with pytest.raises(EnvelopeError) as info:
        load_commands(_envelope(**fields))
    assert [p.field for p in info.value.problems] == [f"/0/{TAKE}/{pointer}"]
    assert "refused" in info.value.problems[0].message


def test_tuning_options_and_empty_passphrases_are_dropped_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="shim.commands")
    fields = {"details": {"compression": "true", "bandwidth_limit": "10"}, "passphrase": None}
    (command,) = load_commands(_envelope(**fields))
    assert command.vm == "i-2-3-VM"
    assert "bandwidth_limit" in caplog.text and "compression" in caplog.text


def test_loading_a_command_looks_up_no_ceph_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks on load need no key: its lookup is libvirt I/O, done when the command runs
    (in a worker thread), never on the service's event loop."""
    from commands import model

    def no_lookup(_uuid: str) -> CephAuth:
        raise AssertionError("the Ceph key was looked up while loading")

    monkeypatch.setattr(model, "_ceph_auth", no_lookup)
    (command,) = load_commands(
        _envelope(volumePools=[POOL], volumePaths=["cloudstack/vol-1"], mode="legacy-full")
    )
    assert isinstance(command, TakeBackupCommand)
    assert command.to_request(secrets=False).disk_paths[0].endswith("client_mount_timeout=30")


@pytest.mark.parametrize("generation", list(Generation))
def test_stats_answers_say_false_and_only_4_20_0_keeps_kib(generation: Generation) -> None:
    stdout = "/tmp/csbackup.x\n1024 512\n"
    answer = wrappers.stats_answer(generation, 0, stdout)
    unit = 1 if generation is Generation.V4_20_0 else 1024
    assert (answer.result, answer.details) == (False, stdout)
    assert (answer.total_size, answer.used_size) == (1024 * unit, 512 * unit)
    failed = wrappers.stats_answer(generation, 1, "Failed to mount nfs store\n")
    assert (failed.result, failed.total_size, failed.used_size) == (False, 0, 0)


@pytest.mark.parametrize("generation", list(Generation))
def test_needs_cleanup_only_where_the_answer_has_the_field(generation: Generation) -> None:
    answer = take_backup_answer(
        generation, 20, "Backup cleanup failed\n", disk_paths_given=False, bitmap_new=None
    )
    has_field = generation not in (Generation.V4_20_0, Generation.V4_20_X)
    assert (answer.result, answer.needs_cleanup) == (False, True if has_field else None)


def test_the_merged_wrapper_strips_and_reports_the_parent_bitmap_marker() -> None:
    stdout = "INCREMENTAL_FALLBACK=true\nPARENT_BITMAP_DELETED=true\nBITMAP_CREATED=b-2\n9000\n"
    answer = take_backup_answer(
        Generation.MERGED, 0, stdout, disk_paths_given=False, bitmap_new="b-2"
    )
    assert answer.details == "BITMAP_CREATED=b-2\n9000" and answer.size == 9000
    assert (answer.incremental_fallback, answer.parent_bitmap_deleted) == (True, True)
    plain = take_backup_answer(
        Generation.MERGED, 0, "9000\n", disk_paths_given=False, bitmap_new="b-2"
    )
    assert plain.parent_bitmap_deleted is False  # present on every success, as in Java
    for other in (g for g in Generation if g is not Generation.MERGED):
        answer = take_backup_answer(other, 0, "9000\n", disk_paths_given=False, bitmap_new=None)
        assert answer.parent_bitmap_deleted is None  # the field does not exist there
