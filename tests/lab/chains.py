"""The drop-in as a CloudStack agent runs it, and backup chains checked as the Java restore
reads them: shared by the tests, the fault suite and ``scripts/fault-report``."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shim import manifest, qemu_img
from shim.compat import strict_zip
from shim.nas import Repository
from tests.lab.lab import Lab, LabVM, compare, flatten

ROOT = Path(__file__).resolve().parents[2]
DROPIN = ROOT / "scripts" / "nasbackup.sh"
FIXTURES = ROOT / "fixtures"
GENERATIONS = json.loads((FIXTURES / "argv" / "generations.json").read_text())
BACKUP_GENERATIONS = [g for g in GENERATIONS if not g.startswith(("_", "other"))]
MODE_GENERATIONS = [g for g in BACKUP_GENERATIONS if GENERATIONS[g]["modes"]]
PARSERS = sorted({GENERATIONS[g]["parser"] for g in BACKUP_GENERATIONS})


@dataclass(frozen=True)
class Run:
    """One run of the drop-in: exit code and stdout (all the agent reads) and stderr."""

    returncode: int
    stdout: str
    stderr: str


def run_dropin(argv: Sequence[str], *, log_file: Path, timeout: float = 300) -> Run:
    """Run ``scripts/nasbackup.sh`` with an argv list, reading stdout as the agent does."""
    env = {**os.environ, "NASBACKUP_SHIM_LOG": str(log_file)}
    done = subprocess.run(
        [str(DROPIN), *argv], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    return Run(done.returncode, done.stdout, done.stderr)


def build_argv(generation: str, values: Mapping[str, str], operation: str = "backup") -> list[str]:
    """The argv ``generation`` builds for ``operation`` from ``values`` (fixture order): a
    generation's own ``operations`` when it has them, else the shared ones."""
    own = GENERATIONS.get(generation, {}).get("operations", {})
    if operation == "backup":
        spec = GENERATIONS[generation]
    else:
        spec = own if operation in own else GENERATIONS["other-operations"]
    argv: list[str] = []
    for item in spec[operation]:
        option, name = item[0], item[1]
        value = values.get(name, "")
        if len(item) > 2 and item[2] == "nonempty" and not value:
            continue
        argv += [option, value]
    return argv


def repo_values(repo: Repository) -> dict[str, str]:
    """The -t/-s/-m values of a repository."""
    return {"type": repo.type, "address": repo.address, "options": repo.options}


def read_manifest(directory: Path) -> manifest.Manifest | None:
    """The manifest of a backup directory the lab made (trusted: a test's own repository),
    None when it has none."""
    try:
        return manifest.parse((directory / manifest.MANIFEST).read_bytes())
    except FileNotFoundError:
        return None


# -- verification as the Java restore does it -------------------------------------------------
def disk_files(
    repo_dir: Path, backup: str, vm: LabVM, volume_ids: Sequence[str] = ()
) -> list[Path]:
    """The backup files of each of ``vm``'s disks, in disk order (named after
    ``volume_ids`` when the backup was taken with ``-u``)."""
    ids = list(volume_ids) or [d.volume_id for d in vm.disks]
    names = [f"{'root' if i == 0 else 'datadisk'}.{v}.qcow2" for i, v in enumerate(ids)]
    return [repo_dir / backup / name for name in names]


def break_refcount(image: Path) -> None:
    """Set cluster 0's refcount to 0: the image still opens and reads, only
    ``qemu-img check`` finds it."""
    with open(image, "r+b") as fh:
        fh.seek(48)  # the header's refcount_table_offset
        table = int.from_bytes(fh.read(8), "big")
        fh.seek(table)
        block = int.from_bytes(fh.read(8), "big")
        fh.seek(block)
        fh.write(b"\0\0")  # 16-bit refcounts: the first is cluster 0's
    assert qemu_img.info(image).format == "qcow2"
    assert not qemu_img.check(image).clean


def verify_backup(
    lab: Lab,
    repo_dir: Path,
    backup: str,
    vm: LabVM,
    refs: Sequence[Path],
    *,
    volume_ids: Sequence[str] = (),
) -> None:
    """Every disk's chain: relative qcow2 backing links, clean checks, and its flattened
    content (qemu-img convert, as the Java restore) identical to the reference."""
    vm_dir = (repo_dir / backup).parent.resolve()
    for file, ref in strict_zip(disk_files(repo_dir, backup, vm, volume_ids), refs):
        assert file.is_file(), f"missing {file}"
        links = qemu_img.chain(file)
        for link in links:
            assert qemu_img.check(link.filename).clean, f"qemu-img check: {link.filename}"
            assert Path(link.filename).resolve().parent.parent == vm_dir
            if link.backing_filename is not None:
                assert not link.backing_filename.startswith("/"), link.backing_filename
                assert link.backing_format == "qcow2"
        flat = lab.dir / f"flat-{file.name}"
        flatten(file, flat)
        assert compare(flat, ref), f"{file} does not restore to the reference"
        flat.unlink()


@dataclass
class Chain:
    """A VM, its repository, and the backups taken so far."""

    lab: Lab
    vm: LabVM
    repo: Repository
    log: Path
    generation: str = "merged"
    volume_ids: tuple[str, ...] = ()
    """Sent as ``-u`` by generations that have it (the files are then named after them)."""
    mount_timeout: str = "0"
    """Sent as ``-w`` by generations that have it."""
    backups: list[str] = field(default_factory=list)
    bitmaps: list[str] = field(default_factory=list)
    counter: int = 0

    @property
    def repo_dir(self) -> Path:
        return Path(self.repo.address)

    def parent_values(self, style: str) -> dict[str, str]:
        parent = self.backups[-1]
        # The server names the files the parent holds: not a disk attached since. (A parent
        # directory that vanished on the NAS is still named in full.)
        gone = not (self.repo_dir / parent).exists()
        files = [
            p.relative_to(self.repo_dir)
            for p in disk_files(self.repo_dir, parent, self.vm, self.volume_ids)
            if gone or p.exists()
        ]
        if style == "paths":
            return {"parent_paths": ",".join(map(str, files))}
        if style == "dir":
            return {"parent_path": parent}
        return {"parent_path": str(files[0])}  # the seed's first form: the root disk's file

    def argv(
        self,
        mode: str = "",
        *,
        parent_style: str = "paths",
        disks: str = "",
        quiesce: str = "false",
    ) -> tuple[list[str], str, str]:
        """The next backup's argv (this chain's generation), its path and its bitmap."""
        self.counter += 1
        path = f"{self.vm.name}/2026.10.{self.counter:02d}.00.00.00"
        values = {
            "operation": "backup",
            "vm": self.vm.name,
            "path": path,
            "quiesce": quiesce,
            "disks": disks,
            "mode": mode,
            "mount_timeout": self.mount_timeout,
            "volume_ids": ",".join(self.volume_ids),
            **repo_values(self.repo),
        }
        bitmap = f"backup-{1790000000 + self.counter}"
        if mode in ("full", "incremental"):
            values["bitmap_new"] = bitmap
        if mode == "incremental":
            values["bitmap_parent"] = self.bitmaps[-1]
            values.update(self.parent_values(parent_style))
        return build_argv(self.generation, values), path, bitmap

    def record(self, mode: str, path: str, bitmap: str) -> None:
        """Remember a backup that succeeded (the next incremental's parent)."""
        self.backups.append(path)
        if mode in ("full", "incremental"):
            self.bitmaps.append(bitmap)

    def backup(
        self,
        mode: str = "",
        *,
        parent_style: str = "paths",
        disks: str = "",
        quiesce: str = "false",
        expect_exit: int = 0,
    ) -> tuple[Run, str]:
        """Run the next backup with the drop-in; assert its exit code."""
        argv, path, bitmap = self.argv(mode, parent_style=parent_style, disks=disks,
                                       quiesce=quiesce)  # fmt: skip
        run = run_dropin(argv, log_file=self.log)
        assert run.returncode == expect_exit, run.stdout + run.stderr
        if expect_exit == 0:
            self.record(mode, path, bitmap)
        return run, path

    def start(self, mode: str, log: Path, **kwargs: str) -> InFlight:
        """Start the next backup in the background; :meth:`InFlight.wait_for` its log."""
        argv, path, bitmap = self.argv(mode, **kwargs)
        env = {**os.environ, "NASBACKUP_SHIM_LOG": str(log)}
        proc = subprocess.Popen([str(DROPIN), *argv], stdout=subprocess.PIPE, text=True, env=env)
        return InFlight(self, proc, log, mode, path, bitmap)


@dataclass
class InFlight:
    """A backup running in the background."""

    chain: Chain
    proc: subprocess.Popen[str]
    log: Path
    mode: str
    path: str
    bitmap: str

    def wait_for(self, text: str, timeout: float = 60) -> None:
        """Block until the run's log says ``text`` (it must not end first)."""
        deadline = time.monotonic() + timeout
        while text not in (self.log.read_text() if self.log.exists() else ""):
            assert self.proc.poll() is None, f"the run ended before it logged {text!r}"
            assert time.monotonic() < deadline, f"no {text!r} in {timeout} s"
            time.sleep(0.01)  # a test watching a log: there is no event to wait on

    def finish(self, timeout: float = 180) -> Run:
        """Wait for the run; remember the backup if it succeeded."""
        out, _ = self.proc.communicate(timeout=timeout)
        if self.proc.returncode == 0:
            self.chain.record(self.mode, self.path, self.bitmap)
        return Run(self.proc.returncode, out, "")
