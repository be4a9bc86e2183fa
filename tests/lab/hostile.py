"""A hostile repository: files planted on the NAS by whoever controls it, and what the shim
does with them.

The NAS is shared by every host and tenant, and the shim runs as root. Each scenario plants
something in a local repository (mount type ``none``, ``-o bind``: the same mount path as
NFS) — links out of it at every level, hard links to host files, FIFOs, backing names that
are absolute, ``json:`` or network addresses, loops, lying headers, huge files, manifests
that name other files — and runs the shim on it as its callers do (the drop-in with an argv
list, the socket service with an envelope). Most need no VM at all. After each run:

* it finished within :data:`DEADLINE` (a FIFO must not hang it);
* it refused (exit 1 or ``result: false``, one line that names the file and the rule) or
  succeeded harmlessly, as the scenario expects;
* no host file changed (every file of the scenario's host directory: content and times);
* the host's marker string appears in no restored volume, no file of the repository and no
  file left beside a target volume; where it refused a restore, no ``qemu-img convert`` ran
  at all (so no staged copy ever held host data): the drop-ins run ``qemu-img`` through a
  wrapper that records every call;
* nothing connected to the listener on 127.0.0.1 that a planted ``nbd`` name points at;
* nothing leaked (mounts, ``csbackup`` directories, locks, processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from commands.envelope import dump, load_answers
from commands.model import BackupAnswer, RestoreBackupCommand
from shim import qemu_img
from shim.lock import VmLock
from shim.manifest import UNSEALED, DiskRecord, Manifest
from shim.nas import Repository
from tests.lab.chains import Run, run_dropin
from tests.lab.harness import captured_log, running
from tests.lab.lab import Lab, MiB
from tests.lab.leaks import leaks
from tests.lab.scenarios import Scenario

VM = "i-2-77-VM"
OTHER_VM = "i-2-78-VM"
DEADLINE = 60.0
"""Seconds any one command may take here: every one is refused or done in a second or two."""
SIZE = 8 * MiB
TB = 1024**4


# -- the world a scenario plants in --------------------------------------------------------------
@dataclass
class World:
    """A repository, host files outside it carrying a marker, a listener on 127.0.0.1, and
    the drop-in run through a ``qemu-img`` that records its calls."""

    lab: Lab
    scratch: Path
    repo: Repository
    host: Path
    marker: bytes
    listener: socket.socket
    spy_dir: Path
    volumes: Path
    runs: list[tuple[str, float]] = field(default_factory=list)
    host_before: dict[str, object] = field(default_factory=dict)

    @property
    def nas(self) -> Path:
        """The repository's exported directory (what the NAS holds)."""
        return Path(self.repo.address)

    @property
    def vm_dir(self) -> Path:
        """The VM's directory on the NAS."""
        return self.nas / VM

    @property
    def port(self) -> int:
        """The listener's port."""
        return int(self.listener.getsockname()[1])

    @property
    def log(self) -> Path:
        """The shim's log for this scenario."""
        return self.scratch / "agent.log"

    def nbd_name(self) -> str:
        """A ``json:`` backing name that makes QEMU connect to the listener."""
        server = {"type": "inet", "host": "127.0.0.1", "port": str(self.port)}
        return "json:" + json.dumps({"driver": "nbd", "server": server, "export": "x"})

    # -- images -------------------------------------------------------------------------------
    def qcow2(
        self,
        path: Path,
        *,
        backing: str | None = None,
        backing_fmt: str = "qcow2",
        pattern: int = 0x11,
        size: int = SIZE,
    ) -> Path:
        """A qcow2 of ``size`` holding 1 MiB of ``pattern``, its backing name set as given
        (never opened: a header-only rebase)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        qemu_img.create(path, size)
        _qemu_io(path, f"write -P {pattern:#x} 0 1M")
        if backing is not None:
            subprocess.run(
                ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", backing, "-F", backing_fmt,
                 str(path)],
                check=True, capture_output=True,
            )  # fmt: skip
        return path

    def backup(
        self,
        name: str,
        *,
        parent: str | None = None,
        vm: str = VM,
        pattern: int = 0x11,
        manifest: bool = True,
    ) -> Path:
        """A backup directory ``<vm>/<name>`` with ``root.v1.qcow2`` (backed by the same
        file of backup ``parent``) and a manifest whose checksum the first verify records."""
        directory = self.nas / vm / name
        backing = f"../{parent}/root.v1.qcow2" if parent else None
        file = self.qcow2(directory / "root.v1.qcow2", backing=backing, pattern=pattern)
        if manifest:
            self.write_manifest(directory, file=file.name, parent=parent, vm=vm)
        return directory

    def write_manifest(
        self,
        directory: Path,
        *,
        file: str,
        parent: str | None = None,
        vm: str = VM,
        lies: dict[str, object] | None = None,
    ) -> None:
        """The manifest the shim would have written for ``file`` (``lies``: fields of its
        disk record replaced)."""
        path = directory / file
        record = DiskRecord(
            role="root",
            volume_id="v1",
            file=file,
            source="/pool/v1",
            virtual_size=SIZE,
            stored_size=path.stat().st_size if path.exists() else 0,
            checksum=UNSEALED,
            backing=f"../{parent}/{file}" if parent else None,
        )
        record = dataclasses.replace(record, **(lies or {}))  # type: ignore[arg-type]
        manifest = Manifest(
            vm=vm, mode="incremental" if parent else "full", offline=False,
            bitmap=None, parent=parent, fallback=False, disks=[record],
        )  # fmt: skip
        text = json.dumps(dataclasses.asdict(manifest), indent=2)
        (directory / "manifest.json").write_text(text)

    # -- running the shim ---------------------------------------------------------------------
    def repo_argv(self) -> list[str]:
        """``-t -s -m`` of the repository."""
        return ["-t", self.repo.type, "-s", self.repo.address, "-m", self.repo.options]

    def dropin(self, *argv: str, lock_wait: float | None = None) -> Run:
        """The drop-in with ``argv`` (the repository's options added after ``-o OP``),
        within the deadline, its ``qemu-img`` the recording one."""
        full = [*argv[:2], *self.repo_argv(), *argv[2:]]
        self.planted()
        env = {"PATH": f"{self.spy_dir}:{os.environ['PATH']}"}
        if lock_wait is not None:
            env["NASBACKUP_SHIM_LOCK_WAIT"] = str(lock_wait)
        started = time.monotonic()
        with _environment(env):
            try:
                run = run_dropin(full, log_file=self.log, timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{argv[:2]} did not finish within {DEADLINE:g} s") from None
        self.runs.append((" ".join(argv[:2]), time.monotonic() - started))
        return run

    def restore(self, backup: str, *, files: str | None = None, vm: str | None = None) -> Run:
        """``-o restore`` of ``<VM>/<backup>`` into a new volume of this scenario."""
        argv = ["-o", "restore", "-p", f"{VM}/{backup}"]
        argv += ["--restore-volume-paths", str(self.volumes / "restored.qcow2")]
        argv += ["--backup-files", files] if files else []
        argv += ["-v", vm] if vm else []
        return self.dropin(*argv)

    def planted(self) -> None:
        """The host's picture, taken once the scenario has planted (links included) and
        before the shim first runs: what must not change."""
        if not self.host_before:
            self.host_before = _host_picture(self.host)

    def operate(self, operation: str, backup: str, *, files: str | None = None) -> Run:
        """``-o restore`` (into a new volume), ``verify`` or ``delete`` of ``<VM>/<backup>``."""
        if operation == "restore":
            return self.restore(backup, files=files)
        return self.dropin("-o", operation, "-p", f"{VM}/{backup}")

    def rebase(self, target: str, new_backing: str) -> Run:
        """``-o rebase`` of ``<VM>/<target>`` onto ``<VM>/<new_backing>``."""
        return self.dropin(
            "-o", "rebase", "--rebase-target", f"{VM}/{target}",
            "--rebase-new-backing", f"{VM}/{new_backing}",
        )  # fmt: skip

    def qemu_img_calls(self) -> list[str]:
        """Every ``qemu-img`` command line the drop-ins ran."""
        log = self.spy_dir / "calls"
        return log.read_text().splitlines() if log.exists() else []


def _qemu_io(path: Path, command: str) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(path)], check=True, capture_output=True
    )


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _make_world(lab: Lab, scratch: Path) -> World:
    marker = f"HOST-MARKER-{secrets.token_hex(8)}".encode()
    host = lab.new_dir("host")
    (host / "passwd").write_bytes(b"root:x:0:0:" + marker + b"\n")
    (host / "secret.raw").write_bytes((marker + b"\n") * (MiB // (len(marker) + 1)))
    other = host / "other-vm.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(host / "secret.raw"), str(other)],
        check=True, capture_output=True,
    )  # fmt: skip
    spy_dir = scratch / "spy"
    spy_dir.mkdir()
    spy = spy_dir / "qemu-img"
    real = subprocess.run(["which", "qemu-img"], capture_output=True, text=True, check=True)
    spy.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{spy_dir}/calls"\nexec {real.stdout.strip()} "$@"\n'
    )
    spy.chmod(0o755)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    volumes = lab.new_dir("volumes")
    repo = lab.repository()
    return World(lab, scratch, repo, host, marker, listener, spy_dir, volumes)


# -- what must hold after every scenario ---------------------------------------------------------
def _host_picture(host: Path) -> dict[str, object]:
    seen: dict[str, object] = {}
    for path in sorted(host.rglob("*")):
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            seen[str(path)] = (digest, st.st_mtime_ns, st.st_ctime_ns, stat.S_IMODE(st.st_mode))
        else:
            seen[str(path)] = stat.S_IFMT(st.st_mode)
    return seen


def _files_holding(root: Path, marker: bytes) -> list[str]:
    """Regular files under ``root`` (links not followed, special files skipped) that hold
    ``marker``: read in pieces, sparse giants included (their holes are skipped)."""
    found = []
    for directory, _dirs, names in os.walk(root):
        for name in names:
            path = Path(directory, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                continue  # a planted hard link to a host file is the host's file
            if _holds(path, marker):
                found.append(str(path))
    return found


def _holds(path: Path, marker: bytes) -> bool:
    with open(path, "rb") as fh:
        fd = fh.fileno()
        offset, end = 0, os.fstat(fd).st_size
        while offset < end:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                return False
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
            while offset < hole:
                chunk = os.pread(fd, min(4 * MiB, hole - offset) + len(marker), offset)
                if marker in chunk:
                    return True
                offset += 4 * MiB
            offset = hole
    return False


def _connections(listener: socket.socket) -> int:
    count = 0
    while True:
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            return count
        connection.close()
        count += 1


def _check_world(world: World) -> list[str]:
    problems = []
    if _host_picture(world.host) != world.host_before:
        problems.append("a host file changed")
    for root in (world.nas, world.volumes):
        holding = _files_holding(root, world.marker)
        problems += [f"{path} holds the host's marker" for path in holding]
    connections = _connections(world.listener)
    if connections:
        problems.append(f"{connections} connection(s) reached the listener on 127.0.0.1")
    problems += [f"leaked: {leak}" for leak in leaks(world.lab)]
    slow = [f"{what} took {seconds:.1f} s" for what, seconds in world.runs if seconds > DEADLINE]
    return problems + slow


def refused(run: Run, *words: str) -> list[str]:
    """Exit 1 with one line on stdout that says every one of ``words`` (the file, the rule)."""
    problems = []
    if run.returncode != 1:
        problems.append(f"exit {run.returncode}, not 1: {run.stdout.strip()[:300]!r}")
    line = run.stdout.strip()
    if "\n" in line:
        problems.append(f"more than one line on stdout: {run.stdout[:300]!r}")
    missing = [word for word in words if word not in line]
    problems += [f"stdout {line[:300]!r} does not say {word!r}" for word in missing]
    if "Traceback" in run.stdout + run.stderr:
        problems.append("a traceback")
    return problems


def succeeded(run: Run) -> list[str]:
    """Exit 0."""
    if run.returncode != 0:
        return [f"exit {run.returncode}, not 0: {run.stdout.strip()[:300]!r}"]
    return []


def no_copy(world: World) -> list[str]:
    """No ``qemu-img convert`` ran: nothing was staged, nothing written."""
    copies = [call for call in world.qemu_img_calls() if call.startswith("convert")]
    problems = [f"qemu-img ran: {call[:200]}" for call in copies]
    leftovers = [p.name for p in world.volumes.iterdir()]
    if leftovers:
        problems.append(f"files beside the target volume: {leftovers}")
    return problems


Plant = Callable[[World], list[str]]


def hostile(name: str, plant: Plant) -> Scenario:
    """A scenario: ``plant`` arranges the repository, runs the shim and returns what it
    found wrong with the outcome; the world's checks follow."""

    def run(lab: Lab, scratch: Path) -> None:
        world = _make_world(lab, scratch)
        try:
            problems = plant(world)
            problems += _check_world(world)
        finally:
            world.listener.close()
        if problems:
            raise AssertionError("; ".join(problems))

    return Scenario(name, run)


# -- the scenarios -------------------------------------------------------------------------------
def _full_and_two_incrementals(world: World) -> None:
    world.backup("b1")
    world.backup("b2", parent="b1", pattern=0x22)
    world.backup("b3", parent="b2", pattern=0x33)


def manifest_tmp_link(operation: str) -> Plant:
    """``.manifest.json.tmp`` planted as a link to a host file where a manifest is written."""

    def plant(world: World) -> list[str]:
        _full_and_two_incrementals(world)
        for backup in ("b1", "b3"):
            (world.vm_dir / backup / ".manifest.json.tmp").symlink_to(world.host / "passwd")
        run = world.rebase("b3", "b1") if operation == "rebase" else world.operate(operation, "b1")
        return succeeded(run)

    return plant


def manifest_link(operation: str) -> Plant:
    """``manifest.json`` itself a link to a host file."""

    def plant(world: World) -> list[str]:
        _full_and_two_incrementals(world)
        for backup in ("b1", "b3"):
            (world.vm_dir / backup / "manifest.json").unlink()
            (world.vm_dir / backup / "manifest.json").symlink_to(world.host / "passwd")
        run = world.rebase("b3", "b1") if operation == "rebase" else world.operate(operation, "b1")
        return refused(run, "manifest.json", "symbolic link") + no_copy(world)

    return plant


def disk_file_link_to_another_volume(world: World) -> list[str]:
    _full_and_two_incrementals(world)
    target = world.vm_dir / "b3" / "root.v1.qcow2"
    target.unlink()
    target.symlink_to(world.host / "other-vm.qcow2")
    run = world.rebase("b3", "b1")
    return refused(run, "b3/root.v1.qcow2", "symbolic link")


def backing(name: Callable[[World], str], *, fmt: str = "qcow2", operation: str = "restore",
            words: Sequence[str] = ()) -> Plant:  # fmt: skip
    """A backup file whose backing name is ``name`` (of format ``fmt``), restored or
    rebased."""

    def plant(world: World) -> list[str]:
        world.backup("b1")
        world.backup("b2", parent="b1")
        file = world.vm_dir / "b2" / "root.v1.qcow2"
        subprocess.run(
            ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", name(world), "-F", fmt, str(file)],
            check=True, capture_output=True,
        )  # fmt: skip
        if operation == "rebase":
            world.backup("b3", parent="b2")
            run = world.rebase("b3", "b1")
        else:
            run = world.operate(operation, "b2")
        return refused(run, "b2/root.v1.qcow2", *words) + no_copy(world)

    return plant


def manifest_names(file: str) -> Plant:
    """A manifest whose disk names a file elsewhere; restored without ``--backup-files``."""

    def plant(world: World) -> list[str]:
        directory = world.backup("b1")
        world.write_manifest(directory, file="root.v1.qcow2", lies={"file": file})
        run = world.restore("b1")
        return refused(run, "b1/manifest.json", "malformed") + no_copy(world)

    return plant


def link_out_of_nas(where: str, operation: str) -> Plant:
    """A link out of the NAS (to the host's directory) at one level of the repository."""

    def plant(world: World) -> list[str]:
        outside = world.host / "outside"
        (outside / "b1").mkdir(parents=True)
        world.qcow2(outside / "b1" / "root.v1.qcow2", pattern=0x44)
        # The marker in the file the link leads to: any read of it would carry it.
        world.qcow2(outside / "b1" / "root.v2.qcow2")
        subprocess.run(
            ["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2",
             str(world.host / "secret.raw"), str(outside / "b1" / "root.v2.qcow2")],
            check=True, capture_output=True,
        )  # fmt: skip
        if where == "vm":
            world.nas.joinpath(VM).symlink_to(outside, target_is_directory=True)
        elif where == "backup":
            world.vm_dir.mkdir()
            (world.vm_dir / "b1").symlink_to(outside / "b1", target_is_directory=True)
        else:
            world.backup("b1")
            (world.vm_dir / "b1" / "root.v1.qcow2").unlink()
            (world.vm_dir / "b1" / "root.v1.qcow2").symlink_to(outside / "b1" / "root.v2.qcow2")
        shown = {"vm": VM, "backup": f"{VM}/b1", "file": "b1/root.v1.qcow2"}[where]
        if operation == "rebase":
            run = world.rebase("b1", "b1")
        else:
            run = world.operate(operation, "b1", files="root.v1.qcow2")
        problems = refused(run, shown, "symbolic link") + no_copy(world)
        if not (outside / "b1" / "root.v1.qcow2").exists():
            problems.append("the file the link led to was removed")
        return problems

    return plant


def restore_through_socket_link(world: World) -> list[str]:
    """The socket's RestoreBackupCommand of a disk file that links out of the NAS."""
    world.backup("b1")
    (world.vm_dir / "b1" / "root.v1.qcow2").unlink()
    (world.vm_dir / "b1" / "root.v1.qcow2").symlink_to(world.host / "other-vm.qcow2")
    command = RestoreBackupCommand(
        vm_name=VM,
        backup_path=f"{VM}/b1",
        backup_repo_type=world.repo.type,
        backup_repo_address=world.repo.address,
        mount_options=world.repo.options,
        backup_volumes_uuids=["v1"],
        restore_volume_paths=[str(world.volumes / "restored.qcow2")],
        backup_files=["v1"],
        vm_exists=True,
    )

    async def post() -> BackupAnswer:
        async with running(world.scratch) as service:
            _status, answers = await service.post(dump([command]))
            (answer,) = load_answers(answers)
            assert isinstance(answer, BackupAnswer)
            return answer

    world.planted()
    with captured_log(world.log):
        answer = asyncio.run(post())
    problems = [] if answer.result is False else [f"result {answer.result}, not false"]
    if "b1/root.v1.qcow2" not in (answer.details or "") or "symbolic link" not in (
        answer.details or ""
    ):
        problems.append(f"details {answer.details!r} do not name the file and the rule")
    return problems + no_copy(world)


def hard_link(operation: str) -> Plant:
    """A backup file that is a hard link to a host file (another VM's volume)."""

    def plant(world: World) -> list[str]:
        world.backup("b1")
        (world.vm_dir / "b1" / "root.v1.qcow2").unlink()
        os.link(world.host / "other-vm.qcow2", world.vm_dir / "b1" / "root.v1.qcow2")
        run = world.operate(operation, "b1", files="root.v1.qcow2")
        return refused(run, "b1/root.v1.qcow2", "hard links") + no_copy(world)

    return plant


def fifo(name: str, operation: str, *, expect_ok: bool = False) -> Plant:
    """A FIFO planted as a backup file or a manifest: never opened for reading."""

    def plant(world: World) -> list[str]:
        _full_and_two_incrementals(world)
        where = world.vm_dir / ("b2" if operation == "delete" else "b1") / name
        where.unlink(missing_ok=True)
        os.mkfifo(where)
        # Deleted: b3, the leaf (b2 and b1 are parents), whose siblings' listing meets the
        # FIFO in b2. Else b1, whose own file or manifest is the FIFO.
        files = "root.v1.qcow2" if name.endswith("qcow2") else None
        run = world.operate(operation, "b3" if operation == "delete" else "b1", files=files)
        if expect_ok:
            return succeeded(run)
        return refused(run, name, "FIFO") + no_copy(world)

    return plant


def chain_loop(operation: str) -> Plant:
    def plant(world: World) -> list[str]:
        world.backup("b1")
        world.backup("b2", parent="b1")
        subprocess.run(
            ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "../b2/root.v1.qcow2", "-F",
             "qcow2", str(world.vm_dir / "b1" / "root.v1.qcow2")],
            check=True, capture_output=True,
        )  # fmt: skip
        run = world.operate(operation, "b2")
        return refused(run, "root.v1.qcow2", "loops back on itself") + no_copy(world)

    return plant


def lying_header(world: World) -> list[str]:
    """A header that says 1 TiB where the manifest recorded 8 MiB."""
    directory = world.backup("b1")
    file = directory / "root.v1.qcow2"
    file.unlink()
    world.qcow2(file, size=TB)
    run = world.restore("b1")
    return refused(run, "b1/root.v1.qcow2", "its manifest") + no_copy(world)


def sparse_giant(operation: str) -> Plant:
    """A backup file of 1 TB (sparse) whose header says a disk of 8 MiB."""

    def plant(world: World) -> list[str]:
        directory = world.backup("b1")
        os.truncate(directory / "root.v1.qcow2", TB)
        run = world.operate(operation, "b1")
        return refused(run, "b1/root.v1.qcow2", "its header does not describe it") + no_copy(world)

    return plant


def huge_manifest(operation: str) -> Plant:
    def plant(world: World) -> list[str]:
        directory = world.backup("b1")
        with open(directory / "manifest.json", "r+b") as fh:
            fh.truncate(100 * MiB)
        run = world.operate(operation, "b1")
        return refused(run, "b1/manifest.json", "more than") + no_copy(world)

    return plant


def newline_names(world: World) -> list[str]:
    """A backup file whose name holds a newline and a forged log line: never listed, and
    the log gets no line of its making."""
    directory = world.backup("b1")
    forged = "root.v1\n2026-12-07 00-00-00> nasbackup[1]: INFO forged line.qcow2"
    os.rename(directory / "root.v1.qcow2", directory / forged)
    run = world.operate("verify", "b1")
    problems = refused(run, "holds no backup file")
    if any(line.startswith("2026-12-07 00-00-00> nasbackup[1]") for line in _log_lines(world)):
        problems.append("a forged line in the log")
    return problems + no_copy(world)


def _log_lines(world: World) -> list[str]:
    return world.log.read_text(errors="replace").splitlines() if world.log.exists() else []


def unreadable_image(kind: str) -> Plant:
    """A qcow2 that reads another file (an external data file) or needs a key (LUKS)."""

    def plant(world: World) -> list[str]:
        directory = world.backup("b1")
        file = directory / "root.v1.qcow2"
        file.unlink()
        if kind == "data file":
            options = f"data_file={world.host / 'secret.raw'},data_file_raw=on"
            argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(file), "1M"]
            words = ["an external data file"]
        else:
            # A LUKS image's header (crypt_method 2): made by hand, as qemu-img's creation of
            # one benchmarks the CPU and fails now and then on a busy host.
            argv = ["qemu-img", "create", "-q", "-f", "qcow2", str(file), "1M"]
            words = ["encrypted"]
        subprocess.run(argv, check=True, capture_output=True)
        if kind != "data file":
            with open(file, "r+b") as fh:
                fh.seek(32)  # crypt_method
                fh.write((2).to_bytes(4, "big"))
        world.write_manifest(directory, file=file.name, lies={"virtual_size": MiB})
        run = world.restore("b1")
        return refused(run, "b1/root.v1.qcow2", *words) + no_copy(world)

    return plant


def lock_held(operation: str) -> Plant:
    """Another process holds the VM's lock: a restore without ``-v`` and a verify wait
    for it, then fail saying so, having touched nothing."""

    def plant(world: World) -> list[str]:
        world.backup("b1")
        with VmLock(VM, wait=0):
            if operation == "restore":
                target = str(world.volumes / "restored.qcow2")
                argv = ["-o", "restore", "-p", f"{VM}/b1", "--restore-volume-paths", target]
            else:
                argv = ["-o", "verify", "-p", f"{VM}/b1"]
            run = world.dropin(*argv, lock_wait=1)
        return refused(run, f"another operation on VM {VM} is in progress") + no_copy(world)

    return plant


def harmless_stats(world: World) -> list[str]:
    """Stats reads nothing of the repository's contents: a planted mess changes nothing."""
    world.vm_dir.mkdir()
    (world.vm_dir / "b1").symlink_to(world.host, target_is_directory=True)
    os.mkfifo(world.vm_dir / "manifest.json")
    return succeeded(world.dropin("-o", "stats"))


def offline_parent_link(world: World) -> list[str]:
    """A stopped VM's incremental whose parent file links to another VM's volume: the
    parent lookup refuses, nothing is written."""
    world.backup("b1")
    (world.vm_dir / "b1" / "root.v1.qcow2").unlink()
    (world.vm_dir / "b1" / "root.v1.qcow2").symlink_to(world.host / "other-vm.qcow2")
    source = world.lab.new_dir("pool") / "v1"
    world.qcow2(source)
    run = world.dropin(
        "-o", "backup", "-v", VM, "-p", f"{VM}/b2", "-q", "false", "-d", str(source),
        "-M", "incremental", "--bitmap-new", "backup-2", "--bitmap-parent", "backup-1",
        "--parent-paths", f"{VM}/b1/root.v1.qcow2",
    )  # fmt: skip
    problems = refused(run, "b1/root.v1.qcow2", "symbolic link")
    if (world.vm_dir / "b2").exists() or (world.vm_dir / "b2.partial").exists():
        problems.append("a backup directory was made")
    return problems


def dotdot_through_a_link(world: World) -> list[str]:
    """A backing name ``x/../<host dir>/other-vm.qcow2`` where ``x`` links to the host's
    directory: the kernel follows the link before the ``..`` (to the host's file), while the
    name tidied as text leads to a harmless copy planted in the backup."""
    _full_and_two_incrementals(world)
    b3 = world.vm_dir / "b3"
    (b3 / "root.v1.qcow2").unlink()  # all unallocated: a rebase copies what lies below
    qemu_img.create(b3 / "root.v1.qcow2", SIZE)
    world.write_manifest(b3, file="root.v1.qcow2", parent="b2")
    (b3 / "x").symlink_to(world.host, target_is_directory=True)
    world.qcow2(b3 / world.host.name / "other-vm.qcow2", pattern=0x55)  # the decoy
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2",
         "-b", f"x/../{world.host.name}/other-vm.qcow2", str(b3 / "root.v1.qcow2")],
        check=True, capture_output=True,
    )  # fmt: skip
    run = world.rebase("b3", "b1")
    return refused(run, "b3/root.v1.qcow2", "not of the form ../<backup>/<file>")


def deep_leftover(world: World) -> list[str]:
    """A dead run's leftover nested 1100 directories deep: swept like any other (Python's
    recursive removal would fail), and the delete succeeds."""
    world.backup("b1")
    deep = world.vm_dir / "b0.partial"
    subprocess.run(["mkdir", "-p", str(deep) + "/d" * 1100], check=True)  # os.makedirs recurses
    problems = succeeded(world.operate("delete", "b1"))
    if deep.exists() or (world.vm_dir / "b1").exists():
        problems.append("the leftover or the backup is still there")
    return problems


def _outside_raw(world: World) -> str:
    return os.path.relpath(world.host / "secret.raw", world.vm_dir / "b2")


HOSTILE = [
    hostile("verify with .manifest.json.tmp linked to a host file", manifest_tmp_link("verify")),
    hostile("rebase with .manifest.json.tmp linked to a host file", manifest_tmp_link("rebase")),
    hostile("verify with manifest.json linked to a host file", manifest_link("verify")),
    hostile("restore with manifest.json linked to a host file", manifest_link("restore")),
    hostile("rebase with manifest.json linked to a host file", manifest_link("rebase")),
    hostile(
        "rebase of a disk file linked to another VM's volume", disk_file_link_to_another_volume
    ),
    hostile(
        "restore of a qcow2 backed by another VM's volume (absolute)",
        backing(lambda w: str(w.host / "other-vm.qcow2"), words=["absolute backing path"]),
    ),
    hostile(
        "verify of a qcow2 backed by another VM's volume (absolute)",
        backing(
            lambda w: str(w.host / "other-vm.qcow2"),
            operation="verify",
            words=["absolute backing path"],
        ),
    ),
    hostile("restore of a manifest naming an absolute file", manifest_names("/etc/passwd")),
    hostile("restore of a manifest naming ../../..", manifest_names("../../../etc/passwd")),
    hostile("restore of a disk file linked out of the NAS", link_out_of_nas("file", "restore")),
    hostile("socket restore of a disk file linked out of the NAS", restore_through_socket_link),
    hostile(
        "rebase onto a raw backing file outside the NAS",
        backing(_outside_raw, fmt="raw", operation="rebase", words=["outside the VM's directory"]),
    ),
    hostile(
        "rebase of a chain through a qcow2 outside the NAS",
        backing(
            lambda w: str(w.host / "other-vm.qcow2"),
            operation="rebase",
            words=["absolute backing path"],
        ),
    ),
    hostile(
        "restore of a json: nbd backing name",
        backing(lambda w: w.nbd_name(), words=["not a file path"]),
    ),
    hostile(
        "rebase of a chain with a json: nbd backing name",
        backing(lambda w: w.nbd_name(), operation="rebase", words=["not a file path"]),
    ),
    hostile(
        "restore of an nbd:// backing name",
        backing(lambda w: f"nbd://127.0.0.1:{w.port}/x", words=["not a file path"]),
    ),
    hostile(
        "restore of a raw backing file outside the NAS",
        backing(_outside_raw, fmt="raw", words=["outside the VM's directory"]),
    ),
    hostile(
        "restore of a backing name leaving the VM's directory",
        backing(
            lambda _w: f"../../{OTHER_VM}/b1/root.v1.qcow2", words=["outside the VM's directory"]
        ),
    ),
    hostile(
        "delete beside a FIFO named like a backup file",
        fifo("root.v1.qcow2", "delete", expect_ok=True),
    ),
    hostile("verify of a FIFO named like a backup file", fifo("root.v1.qcow2", "verify")),
    hostile("verify of a FIFO named manifest.json", fifo("manifest.json", "verify")),
    hostile("restore of a FIFO named like a backup file", fifo("root.v1.qcow2", "restore")),
    hostile("restore of a FIFO named manifest.json", fifo("manifest.json", "restore")),
    hostile("restore while another process holds the VM's lock", lock_held("restore")),
    hostile("verify while another process holds the VM's lock", lock_held("verify")),
    hostile(
        "restore through a VM directory linked out of the NAS", link_out_of_nas("vm", "restore")
    ),
    hostile("verify through a VM directory linked out of the NAS", link_out_of_nas("vm", "verify")),
    hostile("delete through a VM directory linked out of the NAS", link_out_of_nas("vm", "delete")),
    hostile("rebase through a VM directory linked out of the NAS", link_out_of_nas("vm", "rebase")),
    hostile(
        "restore of a backup directory linked out of the NAS", link_out_of_nas("backup", "restore")
    ),
    hostile(
        "verify of a backup directory linked out of the NAS", link_out_of_nas("backup", "verify")
    ),
    hostile(
        "delete of a backup directory linked out of the NAS", link_out_of_nas("backup", "delete")
    ),
    hostile("restore of a hard link to another VM's volume", hard_link("restore")),
    hostile("verify of a hard link to another VM's volume", hard_link("verify")),
    hostile("restore of a backing chain that loops", chain_loop("restore")),
    hostile("verify of a backing chain that loops", chain_loop("verify")),
    hostile("restore of a header that lies about its disk's size", lying_header),
    hostile("restore of a 1 TB sparse backup file", sparse_giant("restore")),
    hostile("verify of a 1 TB sparse backup file", sparse_giant("verify")),
    hostile("restore with a manifest of 100 MB", huge_manifest("restore")),
    hostile("verify with a manifest of 100 MB", huge_manifest("verify")),
    hostile("verify of a file named with a newline and a forged log line", newline_names),
    hostile("restore of a qcow2 with an external data file", unreadable_image("data file")),
    hostile("restore of an encrypted qcow2", unreadable_image("encrypted")),
    hostile("stats of a repository full of traps", harmless_stats),
    hostile("rebase of a backing name through a link and '..'", dotdot_through_a_link),
    hostile("delete beside a leftover nested 1100 levels deep", deep_leftover),
    hostile("a stopped VM's incremental whose parent links to another volume", offline_parent_link),
]
