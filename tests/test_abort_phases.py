"""An abort is never swallowed: stopped at each program of a backup and of a restore, the
operation raises the stop (never a failure it turns into a fallback, a warning or an
answer of its own), cleans up, and changes nothing an earlier backup or the VM relies on.

The stop comes as the socket service's abort does, through the operation's cancellation
token, cancelled just as the k-th program of the operation is about to run, for every k of
the programs a normal run of the same operation runs (the parent's ``qemu-img check`` of
an incremental among them: a stop there once became "parent cannot be checked" and a full
ran on). After every stop: the VM runs, has exactly the checkpoint it had, no partial
directory, mount, lock or staged file is left, and the next incremental (not a fallback)
from the same parent succeeds and restores identical to a reference. The last program, the
final ``umount``, runs once the outcome is decided (a backup published, a volume restored):
a stop there stops nothing more and changes no outcome; the mount is detached all the same.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shim import cancel, operations, proc
from shim.cli import parse, request_for
from shim.errors import Aborted
from shim.request import RestoreRequest
from tests.lab import Lab, MiB
from tests.lab.leaks import leaks
from tests.support import Chain, disk_files, verify_backup

pytestmark = pytest.mark.lab


@dataclass
class _Programs:
    """Every program an operation runs (``shim.proc``), and a stop at the ``stop_at``-th."""

    token: cancel.CancelToken = field(default_factory=cancel.CancelToken)
    stop_at: int | None = None
    ran: list[str] = field(default_factory=list)
    armed: bool = False
    """Only the operation's programs count (not the lab's, around it)."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def seen(self, argvs: Sequence[Sequence[str]]) -> None:
        if not self.armed:
            return
        with self._lock:
            for argv in argvs:
                if len(self.ran) == self.stop_at:
                    self.token.cancel(
                        f"aborted before {argv[0]} {argv[1] if len(argv) > 1 else ''}"
                    )
                self.ran.append(" ".join(argv[:2]))


@pytest.fixture
def programs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int | None], _Programs]]:
    """Install the observer: ``programs(k)`` gives a fresh one that stops at program k."""
    current: list[_Programs] = [_Programs()]
    real_run, real_many = proc.run, proc.run_many

    def run(argv: Sequence[str], **kwargs: Any) -> proc.Result:
        current[-1].seen([argv])
        return real_run(argv, **kwargs)

    def run_many(argvs: Sequence[Sequence[str]], **kwargs: Any) -> list[proc.Result]:
        current[-1].seen(argvs)
        return real_many(argvs, **kwargs)

    monkeypatch.setattr(proc, "run", run)
    monkeypatch.setattr(proc, "run_many", run_many)

    def make(stop_at: int | None) -> _Programs:
        current.append(_Programs(stop_at=stop_at))
        return current[-1]

    yield make


def _observed(request: operations.Request, observer: _Programs) -> operations.Result:
    observer.armed = True
    try:
        return operations.run(request, cancel=observer.token)
    finally:
        observer.armed = False


def _run(argv: list[str], observer: _Programs) -> operations.Result:
    return _observed(request_for(parse(argv)), observer)


@pytest.mark.live_backup
def test_a_backup_stopped_at_each_program_raises_the_stop_and_loses_nothing(
    lab: Lab, tmp_path: Path, programs: Callable[[int | None], _Programs]
) -> None:
    vm = lab.create_vm(disks=(16 * MiB, 8 * MiB))
    chain = Chain(lab=lab, vm=vm, repo=lab.repository(), log=tmp_path / "agent.log")
    vm.write(0, 0, 1 * MiB, pattern=0x11)
    chain.backup("full")
    vm.write(1, 2 * MiB, 1 * MiB, pattern=0x22)
    # A normal incremental, to learn its programs; it stays in the chain.
    argv, path, bitmap = chain.argv("incremental")
    normal = programs(None)
    _run(argv, normal)
    chain.record("incremental", path, bitmap)
    assert any(p.startswith("qemu-img check") for p in normal.ran), normal.ran
    assert normal.ran[-1].startswith("umount")
    for k in range(len(normal.ran) - 1):
        vm.write(0, (4 + k % 8) * MiB, 64 * 1024, pattern=0x30 + k)
        argv, path, _bitmap = chain.argv("incremental")
        stopped = programs(k)
        with pytest.raises(Aborted, match="aborted before"):
            _run(argv, stopped)
        where = f"stopped before program {k} ({normal.ran[k]})"
        assert vm.checkpoints() == [chain.bitmaps[-1]], where
        assert vm.is_running() and not vm.is_paused(), where
        assert not (chain.repo_dir / path).exists(), where
        assert leaks(lab) == [], where
    # Stopped as it unmounts: the backup stands, nothing stays mounted.
    argv, path, bitmap = chain.argv("incremental")
    _run(argv, programs(len(normal.ran) - 1))
    chain.record("incremental", path, bitmap)
    assert vm.checkpoints() == [bitmap] and leaks(lab) == []
    # Nothing of the parent was lost: the next incremental is one, and restores identical.
    run, path = chain.backup("incremental")
    refs = vm.reference_backup()  # the VM is idle: the same point as the backup
    assert "INCREMENTAL_FALLBACK" not in run.stdout
    verify_backup(lab, chain.repo_dir, path, vm, refs)


@pytest.mark.live_backup
def test_a_restore_stopped_at_each_program_raises_the_stop_and_writes_nothing(
    lab: Lab, tmp_path: Path, programs: Callable[[int | None], _Programs]
) -> None:
    vm = lab.create_vm(disks=(16 * MiB,))
    chain = Chain(lab=lab, vm=vm, repo=lab.repository(), log=tmp_path / "agent.log")
    vm.write(0, 0, 1 * MiB, pattern=0x11)
    chain.backup("full")
    vm.write(0, 2 * MiB, 1 * MiB, pattern=0x22)
    chain.backup("incremental")
    (file,) = disk_files(chain.repo_dir, chain.backups[-1], vm)
    volumes = lab.new_dir("volumes")
    volume = volumes / "restored"
    volume.write_bytes(b"\0" * MiB)  # an existing volume: replaced only by a finished restore
    before = hashlib.sha256(volume.read_bytes()).hexdigest()

    def restore(observer: _Programs) -> None:
        request = RestoreRequest(
            chain.repo, chain.backups[-1], targets=(str(volume),), backup_files=(file.name,)
        )
        _observed(request, observer)

    normal = programs(None)
    restore(normal)
    restored = hashlib.sha256(volume.read_bytes()).hexdigest()
    assert restored != before
    volume.write_bytes(b"\0" * MiB)
    assert normal.ran[-1].startswith("umount")
    for k in range(len(normal.ran) - 1):
        stopped = programs(k)
        with pytest.raises(Aborted, match="aborted before"):
            restore(stopped)
        where = f"stopped before program {k} ({normal.ran[k]})"
        assert hashlib.sha256(volume.read_bytes()).hexdigest() == before, where
        assert sorted(p.name for p in volumes.iterdir()) == ["restored"], where
        assert leaks(lab) == [], where
    restore(programs(len(normal.ran) - 1))  # stopped as it unmounts: the restore stands
    assert hashlib.sha256(volume.read_bytes()).hexdigest() == restored
    assert leaks(lab) == []
