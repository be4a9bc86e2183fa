"""Helpers of the end-to-end tests: the generations' stdout parsers, and (from
:mod:`tests.lab.chains`) the drop-in as the agent runs it and chain verification."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shim.gate import VmDirectory
from tests.lab.chains import (
    BACKUP_GENERATIONS,
    DROPIN,
    FIXTURES,
    GENERATIONS,
    MODE_GENERATIONS,
    PARSERS,
    ROOT,
    Chain,
    Run,
    break_refcount,
    build_argv,
    disk_files,
    repo_values,
    run_dropin,
    verify_backup,
)

__all__ = [
    "BACKUP_GENERATIONS",
    "DROPIN",
    "FIXTURES",
    "GENERATIONS",
    "MODE_GENERATIONS",
    "PARSERS",
    "ROOT",
    "Chain",
    "Parsed",
    "Run",
    "assert_size_parses",
    "break_refcount",
    "build_argv",
    "disk_files",
    "downstream_stats_parse",
    "java_parse",
    "repo_values",
    "run_dropin",
    "verify_backup",
    "vm_directory",
]


@contextlib.contextmanager
def vm_directory(root: Path, vm: str) -> Iterator[VmDirectory]:
    """The gate over ``root/vm``, as a mount session makes it, for tests without a mount."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    vm_dir = VmDirectory(fd, root, vm)
    try:
        yield vm_dir
    finally:
        vm_dir.close()
        os.close(fd)


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


def downstream_stats_parse(stdout: str) -> tuple[int, int]:
    """Model of the downstream generation's stats wrapper: the one line holding exactly two
    integers is ``<total> <used>`` in KiB, returned in bytes; none, or a second such line,
    fails it (ValueError)."""
    found = []
    for line in _java_lines(stdout):
        tokens = line.split()
        if len(tokens) == 2 and all(t.isdigit() for t in tokens):
            found.append((int(tokens[0]) * 1024, int(tokens[1]) * 1024))
    if len(found) != 1:
        raise ValueError(f"{len(found)} line(s) of two integers in {stdout!r}")
    return found[0]


def assert_size_parses(parser: str, stdout: str, directory: Path, *, disks_given: bool) -> Parsed:
    """The generation's parser reads the directory's real byte count from stdout."""
    parsed = java_parse(parser, stdout, disks_given=disks_given)
    if disks_given and parser != "4.20.0":
        expected = sum(p.stat().st_size for p in directory.iterdir())
    else:
        # What the host's own script prints: its du (which entries count depends on the
        # host's coreutils).
        expected = int(
            subprocess.run(
                ["du", "-sb", str(directory)], capture_output=True, text=True, check=True
            ).stdout.split()[0]
        )
    assert parsed.size == expected
    return parsed


def stand_in_deb(into: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """A Debian package named ``package`` holding ``files`` (absolute path: content; the
    ``.sh`` ones executable), standing in for one of CloudStack's in the install tests."""
    root = into / f"{package}-{version}"
    for path, content in files.items():
        file = root / path.lstrip("/")
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(content)
        file.chmod(0o755 if path.endswith(".sh") else 0o644)
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: tests <tests@localhost>\nDescription: a stand-in for the tests\n"
    )
    deb = into / f"{package}_{version}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
        capture_output=True, check=True,
    )  # fmt: skip
    return deb
