"""The demo: a throwaway lab VM, its data, and a backup proven identical.

Run by ``scripts/demo``. Each step prints one line; the VM and its volumes are removed at
the end, the backups stay in the repository for you to look at.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shim.errors import ShimError
from shim.lab import Lab, MiB, compare
from shim.nas import MountSession, Repository

DEFAULT_REPOSITORY = Path("/var/lib/cloudstack-nasbackup-shim/demo-repository")


def _step(started: float, text: str) -> None:
    print(f"[{time.monotonic() - started:6.2f}s] {text}", flush=True)


def run(repository_dir: Path) -> None:
    """The demo itself; raises on any failure."""
    started = time.monotonic()
    repository_dir.mkdir(parents=True, exist_ok=True)
    repository = Repository(type="none", address=str(repository_dir), options="bind")
    with Lab() as lab:
        vm = lab.create_vm(disks=(64 * MiB, 32 * MiB))
        _step(started, f"lab VM {vm.name} up: {len(vm.disks)} qcow2 disks, TCG, transient")
        vm.write(0, 0, 4 * MiB, pattern=0xA1)
        vm.write(1, 8 * MiB, 2 * MiB, pattern=0xB2)
        _step(started, "data written through QEMU's block layer (6 MiB on 2 disks)")
        with MountSession(repository) as session:
            _step(started, f"repository {repository_dir} mounted on {session.root}")
            dest = session.path(f"{vm.name}/reference", what="backup path")
            files = vm.reference_backup(dest)
            _step(started, f"reference backup written: {', '.join(f.name for f in files)}")
            vm.stop()
            for disk, file in zip(vm.disks, files, strict=True):
                if not compare(disk.path, file):
                    raise ShimError(f"backup of {disk.target} differs from the disk")
            _step(started, "reference backup verified identical to the disks (qemu-img compare)")
        kept = repository_dir / vm.name / "reference"
    _step(started, f"lab VM removed; the backup stays in {kept}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/demo``."""
    parser = argparse.ArgumentParser(prog="demo", description=__doc__)
    parser.add_argument(
        "--repository",
        type=Path,
        default=DEFAULT_REPOSITORY,
        help=f"directory used as the local repository (default {DEFAULT_REPOSITORY})",
    )
    args = parser.parse_args(argv)
    try:
        run(args.repository)
    except ShimError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print("demo: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
