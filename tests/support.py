"""Helpers of the end-to-end tests: the drop-in as the agent runs it, the generations'
argv and stdout parsers, and chain verification as the Java restore does it."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shim import qemu_img
from shim.chain import directory_size
from shim.lab import Lab, LabVM, compare, flatten
from shim.nas import Repository

ROOT = Path(__file__).resolve().parent.parent
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
    """The argv ``generation`` builds for ``operation`` from ``values`` (fixture order)."""
    spec = GENERATIONS[generation] if operation == "backup" else GENERATIONS["other-operations"]
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


# -- the Java side's parsing of stdout, per generation (contract §2) -------------------------
MARKER_PREFIXES = ("BITMAP_CREATED=", "BITMAP_RECREATED=", "INCREMENTAL_FALLBACK=")


@dataclass(frozen=True)
class Parsed:
    """What a generation's Java wrapper derives from the script's stdout."""

    size: int
    bitmap_created: str | None = None
    incremental_fallback: bool = False


def _java_lines(stdout: str) -> list[str]:
    # String.split("\n") drops trailing empty strings and keeps the others.
    lines = stdout.split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    return lines


def _java_long(text: str) -> int:
    text = text.strip()
    if not text or not text.lstrip("-").isdigit():
        raise ValueError(f"NumberFormatException: {text!r}")
    return int(text)


def java_parse(parser: str, stdout: str, *, disks_given: bool) -> Parsed:
    """Model of each generation's parsing; raises ValueError where Java would throw."""
    lines = _java_lines(stdout)
    bitmap, fallback = None, False
    if parser in ("seed", "merged"):
        if parser == "merged":
            fallback = "INCREMENTAL_FALLBACK=true" in stdout
        kept = []
        for line in lines:
            if line.startswith(MARKER_PREFIXES):
                if line.startswith("BITMAP_CREATED="):
                    bitmap = line.split("=", 1)[1]
                if parser == "seed" and line.startswith("INCREMENTAL_FALLBACK="):
                    fallback = True
                continue
            kept.append(line)
        lines = kept
    if disks_given and parser != "4.20.0":
        size = sum(_java_long(line.strip().split(" ")[0]) for line in lines)
    else:
        if not lines:
            raise ValueError("no output")
        size = _java_long(lines[-1])
    return Parsed(size=size, bitmap_created=bitmap, incremental_fallback=fallback)


# -- verification as the Java restore does it -------------------------------------------------
def disk_files(repo_dir: Path, backup: str, vm: LabVM) -> list[Path]:
    """The backup files of each of ``vm``'s disks, in disk order."""
    names = [
        f"{'root' if i == 0 else 'datadisk'}.{d.volume_id}.qcow2" for i, d in enumerate(vm.disks)
    ]
    return [repo_dir / backup / name for name in names]


def verify_backup(lab: Lab, repo_dir: Path, backup: str, vm: LabVM, refs: Sequence[Path]) -> None:
    """Every disk's chain: relative qcow2 backing links, clean checks, and its flattened
    content (qemu-img convert, as the Java restore) identical to the reference."""
    vm_dir = (repo_dir / backup).parent.resolve()
    for file, ref in zip(disk_files(repo_dir, backup, vm), refs, strict=True):
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


def assert_size_parses(parser: str, stdout: str, directory: Path, *, disks_given: bool) -> Parsed:
    """The generation's parser reads the directory's real byte count from stdout."""
    parsed = java_parse(parser, stdout, disks_given=disks_given)
    if disks_given and parser != "4.20.0":
        expected = sum(p.stat().st_size for p in directory.iterdir())
    else:
        expected = directory_size(directory)
    du = int(
        subprocess.run(
            ["du", "-sb", str(directory)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
    assert directory_size(directory) == du
    assert parsed.size == expected
    return parsed


@dataclass
class Chain:
    """A VM, its repository, and the backups taken so far."""

    lab: Lab
    vm: LabVM
    repo: Repository
    log: Path
    generation: str = "merged"
    backups: list[str] = field(default_factory=list)
    bitmaps: list[str] = field(default_factory=list)
    counter: int = 0

    @property
    def repo_dir(self) -> Path:
        return Path(self.repo.address)

    def parent_values(self, style: str) -> dict[str, str]:
        parent = self.backups[-1]
        files = [
            p.relative_to(self.repo_dir)
            for p in disk_files(self.repo_dir, parent, self.vm)
            if p.exists()
        ]
        if style == "paths":
            return {"parent_paths": ",".join(map(str, files))}
        if style == "dir":
            return {"parent_path": parent}
        return {"parent_path": str(files[0])}  # the seed's first form: the root disk's file

    def backup(
        self,
        mode: str = "",
        *,
        parent_style: str = "paths",
        disks: str = "",
        quiesce: str = "false",
        expect_exit: int = 0,
    ) -> tuple[Run, str]:
        self.counter += 1
        path = f"{self.vm.name}/2026.10.{self.counter:02d}.00.00.00"
        values = {
            "operation": "backup",
            "vm": self.vm.name,
            "path": path,
            "quiesce": quiesce,
            "disks": disks,
            "mode": mode,
            **repo_values(self.repo),
        }
        bitmap = f"backup-{1790000000 + self.counter}"
        if mode in ("full", "incremental"):
            values["bitmap_new"] = bitmap
        if mode == "incremental":
            values["bitmap_parent"] = self.bitmaps[-1]
            values.update(self.parent_values(parent_style))
        run = run_dropin(build_argv(self.generation, values), log_file=self.log)
        assert run.returncode == expect_exit, run.stdout + run.stderr
        if expect_exit == 0:
            self.backups.append(path)
            if mode in ("full", "incremental"):
                self.bitmaps.append(bitmap)
        return run, path
