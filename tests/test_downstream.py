"""The downstream generation's options: ``-w`` (mount timeout) on every operation and ``-u``
(the volume ids that name a backup's files): parsing, refusals, and where they end up."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from shim import cli
from shim.errors import InputError, UsageError
from shim.live import named_disks
from shim.nas import MOUNT_TIMEOUT_SECONDS, Repository
from shim.offline import source_disks
from shim.operations import (
    BackupRequest,
    DeleteRequest,
    RebaseRequest,
    RestoreRequest,
    StatsRequest,
    VerifyRequest,
)
from shim.virt.disks import parse_disks
from tests.lab import Lab, MiB
from tests.lab.leaks import leaks
from tests.support import (
    GENERATIONS,
    build_argv,
    downstream_stats_parse,
    repo_values,
    run_dropin,
)

VALUES = {
    "vm": "i-2-3-VM",
    "type": "nfs",
    "address": "10.0.0.1:/b",
    "options": "vers=4.1",
    "path": "i-2-3-VM/2026.10.03.00.00.00",
    "quiesce": "false",
    "disks": "",
    "mount_timeout": "0",
}


def _request(argv: Sequence[str]) -> object:
    return cli.request_for(cli.parse(argv))


# -- argv -> request ---------------------------------------------------------------------------
def test_downstream_backup_argv_builds_the_right_request() -> None:
    argv = build_argv(
        "downstream",
        {
            **VALUES,
            "operation": "backup",
            "mount_timeout": "45",
            "disks": "/mnt/p/a1,/mnt/p/b2",
            "volume_ids": "uuid-1,uuid-2",
            "mode": "incremental",
            "bitmap_new": "backup-2",
            "bitmap_parent": "backup-1",
            "parent_paths": "i-2-3-VM/t1/root.uuid-1.qcow2,i-2-3-VM/t1/datadisk.uuid-2.qcow2",
        },
    )
    assert argv[-4:] == ["-w", "45", "-u", "uuid-1,uuid-2"]
    request = _request(argv)
    assert request == BackupRequest(
        vm="i-2-3-VM",
        repository=Repository("nfs", "10.0.0.1:/b", "vers=4.1", mount_timeout=45),
        path="i-2-3-VM/2026.10.03.00.00.00",
        disk_paths=("/mnt/p/a1", "/mnt/p/b2"),
        mode="incremental",
        bitmap_new="backup-2",
        bitmap_parent="backup-1",
        parent_paths=("i-2-3-VM/t1/root.uuid-1.qcow2", "i-2-3-VM/t1/datadisk.uuid-2.qcow2"),
        volume_ids=("uuid-1", "uuid-2"),
    )
    hash(request.repository)  # still a frozen, hashable value


@pytest.mark.parametrize(
    ("operation", "extra", "kind"),
    [
        ("stats", {}, StatsRequest),
        ("delete", {}, DeleteRequest),
        ("verify", {}, VerifyRequest),
        ("rebase", {"rebase_target": "i-2-3-VM/t2", "rebase_new_backing": "i-2-3-VM/t0"},
         RebaseRequest),
        ("restore", {"restore_paths": "/mnt/p/a1"}, RestoreRequest),
    ],
)  # fmt: skip
def test_every_downstream_operation_takes_w(
    operation: str, extra: dict[str, str], kind: type
) -> None:
    for timeout, expected in (("0", 0), ("30", 30)):
        values = {**VALUES, **extra, "operation": operation, "mount_timeout": timeout}
        argv = build_argv("downstream", values, operation)
        assert argv[-2:] == ["-w", timeout]
        request = _request(argv)
        assert isinstance(request, kind)
        assert request.repository.mount_timeout == expected  # type: ignore[attr-defined]


def test_stats_argv_of_the_contract_example() -> None:
    # ``-o stats -t T -s A -m O -w 0``, with a type mount knows.
    request = _request(["-o", "stats", "-t", "nfs", "-s", "A", "-m", "O", "-w", "0"])
    assert request == StatsRequest(Repository("nfs", "A", "O", mount_timeout=0))


# -- -w ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], None),
        (["-w", ""], None),  # an empty value, as for every option: the default
        (["-w", "0"], 0),
        (["-w", "7"], 7),
        (["--mount-timeout", "120"], 120),
        (["-w", "007"], 7),
    ],
)
def test_mount_timeout_parsing(argv: list[str], expected: int | None) -> None:
    request = _request(["-o", "stats", "-t", "nfs", "-s", "h:/e", "-m", "", *argv])
    assert isinstance(request, StatsRequest)
    assert request.repository.mount_timeout == expected


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("abc", UsageError, "-w takes a whole number of seconds (0 for no timeout), not 'abc'"),
        ("-1", UsageError, "-w takes a whole number of seconds (0 for no timeout), not '-1'"),
        ("1.5", UsageError, "not '1.5'"),
        ("+5", UsageError, "not '+5'"),
        (" 5", UsageError, "not ' 5'"),
        ("0x10", UsageError, "not '0x10'"),
        ("\u0663", UsageError, "not"),  # an Arabic-Indic digit: isdigit() but not ASCII
        ("9" * 5000, UsageError, "-w is too large"),
        ("99999999", InputError, "invalid mount timeout: 99999999"),
    ],
)
def test_bad_mount_timeouts_are_refused(value: str, error: type, message: str) -> None:
    with pytest.raises(error) as caught:
        _request(["-o", "stats", "-t", "nfs", "-s", "h:/e", "-m", "", "-w", value])
    assert message in caught.value.message and "\n" not in caught.value.message


def test_bad_mount_timeout_is_one_line_exit_1_before_anything(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_mount(*_a: object, **_k: object) -> None:
        raise AssertionError("nothing may run")

    monkeypatch.setattr("shim.nas.proc.run", no_mount)
    code = cli.main(["-o", "backup", "-v", "i-2-3-VM", "-t", "nfs", "-s", "h:/e", "-m", "",
                     "-p", "i-2-3-VM/t", "-w", "soon"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert out == "-w takes a whole number of seconds (0 for no timeout), not 'soon'\n"


@pytest.mark.parametrize("timeout", [-1, True, 1.5, "5", 7 * 24 * 3600 + 1])
def test_repository_refuses_a_bad_mount_timeout(timeout: object) -> None:
    # The socket service sets the field from JSON: any type may arrive.
    with pytest.raises(InputError, match="invalid mount timeout"):
        Repository("nfs", "h:/e", mount_timeout=timeout).validate()  # type: ignore[arg-type]


def test_repository_mount_timeout_seconds() -> None:
    assert Repository("nfs", "h:/e").mount_timeout_seconds == MOUNT_TIMEOUT_SECONDS == 120
    assert Repository("nfs", "h:/e", mount_timeout=0).mount_timeout_seconds is None
    assert Repository("nfs", "h:/e", mount_timeout=9).mount_timeout_seconds == 9
    a, b = Repository("nfs", "h:/e", mount_timeout=9), Repository("nfs", "h:/e", mount_timeout=9)
    assert a == b and hash(a) == hash(b) and a != Repository("nfs", "h:/e")


# -- -u ----------------------------------------------------------------------------------------
def _backup(volume_ids: Sequence[str], disk_paths: Sequence[str] = ()) -> BackupRequest:
    return BackupRequest(
        vm="i-2-3-VM",
        repository=Repository("nfs", "h:/e"),
        path="i-2-3-VM/t",
        disk_paths=tuple(disk_paths),
        volume_ids=tuple(volume_ids),
    )


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([""], "invalid volume id: empty"),
        (["a", ""], "invalid volume id: empty"),
        (["a/b"], "invalid volume id: 'a/b'"),
        (["..", "b"], "invalid volume id"),
        (["a..b"], "invalid volume id"),
        (["-rf"], "invalid volume id: '-rf'"),
        ([".hidden"], "invalid volume id"),
        (["a\tb"], "invalid volume id"),
        (["a\x7fb"], "invalid volume id"),
        (["a\nb"], "invalid volume id"),
        (["a\udcffb"], "invalid volume id"),  # an undecodable argv byte
        (["x" * 201], "invalid volume id"),
        (["u1", "u1"], "duplicate volume id"),
    ],
)
def test_bad_volume_ids_are_refused(ids: list[str], message: str) -> None:
    with pytest.raises(InputError, match=message):
        _backup(ids).validate()


def test_good_volume_ids_are_accepted() -> None:
    _backup(["0c9a1c3e-8d1a-4a4b-9a5e-1f2e3d4c5b6a", "vol_2.data", "x" * 200]).validate()
    _backup(["u1", "u2"], ["/mnt/p/a", "/mnt/p/b"]).validate()


def test_volume_ids_must_match_the_disk_paths() -> None:
    with pytest.raises(InputError, match=r"names 1 volume\(s\) but there are 2 disk paths"):
        _backup(["u1"], ["/mnt/p/a", "/mnt/p/b"]).validate()
    with pytest.raises(InputError, match=r"names 3 volume\(s\) but there are 2 disk paths"):
        _backup(["u1", "u2", "u3"], ["/mnt/p/a", "/mnt/p/b"]).validate()


def test_u_keeps_empty_items_so_they_are_refused() -> None:
    argv = ["-o", "backup", "-v", "i-2-3-VM", "-t", "nfs", "-s", "h:/e", "-m", "",
            "-p", "i-2-3-VM/t", "-u", "u1,,u3"]  # fmt: skip
    with pytest.raises(InputError, match="invalid volume id: empty"):
        _request(argv)


_DOMAIN = """<domain><devices>
  <disk type='file' device='disk'><driver type='qcow2'/>
    <source file='/mnt/pool/aaaa'/><target dev='vda'/></disk>
  <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='hdc'/></disk>
  <disk type='file' device='disk'><driver type='qcow2'/>
    <source file='/mnt/pool/bbbb'/><target dev='vdb'/></disk>
</devices></domain>"""


def test_running_vm_disks_take_the_ids_in_disk_order() -> None:
    disks = named_disks(parse_disks(_DOMAIN), ("U1", "U2"))
    assert [d.backup_name for d in disks] == ["root.U1.qcow2", "datadisk.U2.qcow2"]
    assert [d.source for d in disks] == ["/mnt/pool/aaaa", "/mnt/pool/bbbb"]
    plain = named_disks(parse_disks(_DOMAIN), ())
    assert [d.backup_name for d in plain] == ["root.aaaa.qcow2", "datadisk.bbbb.qcow2"]


def test_running_vm_disk_count_is_checked() -> None:
    for ids in (("U1",), ("U1", "U2", "U3")):
        with pytest.raises(InputError, match="but there are 2 disks in the domain"):
            named_disks(parse_disks(_DOMAIN), ids)


def test_stopped_vm_sources_take_the_ids(tmp_path: Path) -> None:
    first, second = tmp_path / "aaaa", tmp_path / "bbbb"
    for path in (first, second):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    disks = source_disks([str(first), str(second)], ["U1", "U2"])
    assert [d.backup_name for d in disks] == ["root.U1.qcow2", "datadisk.U2.qcow2"]
    assert [d.backup_name for d in source_disks([str(first)])] == ["root.aaaa.qcow2"]
    with pytest.raises(InputError, match="but there are 2 disk paths"):
        source_disks([str(first), str(second)], ["U1"])


def test_downstream_generation_is_in_the_fixtures() -> None:
    spec = GENERATIONS["downstream"]
    merged = GENERATIONS["merged"]["backup"]
    assert spec["backup"] == [*merged, ["-w", "mount_timeout"], ["-u", "volume_ids", "nonempty"]]
    assert spec["parser"] == "merged" and spec["stats_parser"] == "two-integers"
    for operation, items in spec["operations"].items():
        assert items == [*GENERATIONS["other-operations"][operation], ["-w", "mount_timeout"]]


def test_downstream_stats_parser_model() -> None:
    assert downstream_stats_parse("/tmp/csbackup.x1\n10 4\n") == (10240, 4096)
    for bad in ("/tmp/csbackup.x1\n", "1 2\n3 4\n", "/tmp/csbackup.x1\n10 4 5\n"):
        with pytest.raises(ValueError):
            downstream_stats_parse(bad)


# -- on the lab --------------------------------------------------------------------------------
@pytest.mark.lab
@pytest.mark.parametrize("timeout", ["0", "30"])
def test_downstream_stats_has_one_line_of_two_integers(
    lab: Lab, tmp_path: Path, timeout: str
) -> None:
    repo = lab.repository(size=64 * MiB)
    (Path(repo.address) / "data").write_bytes(b"x" * 3 * MiB)
    values = {"operation": "stats", "mount_timeout": timeout, **repo_values(repo)}
    argv = build_argv("downstream", values, "stats")
    assert argv[-2:] == ["-w", timeout]
    run = run_dropin(argv, log_file=tmp_path / "agent.log")
    assert run.returncode == 0, run.stdout
    pairs = [
        line
        for line in run.stdout.splitlines()
        if len(line.split()) == 2 and all(t.isdigit() for t in line.split())
    ]
    assert len(pairs) == 1, run.stdout
    total, used = downstream_stats_parse(run.stdout)
    df = (
        subprocess.run(["df", "-P", repo.address], capture_output=True, text=True, check=True)
        .stdout.splitlines()[1]
        .split()
    )
    assert (total, used) == (int(df[1]) * 1024, int(df[2]) * 1024)
    assert leaks(lab) == []
