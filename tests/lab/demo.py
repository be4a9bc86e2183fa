"""The demo: a throwaway VM backed up, changed, backed up incrementally, restored, verified.

Run by ``scripts/demo``. The backups are taken by the drop-in ``scripts/nasbackup.sh``
exactly as a CloudStack agent runs it (an argv list, stdout read), into a local repository
reached through ``mount -t none ADDR DIR -o bind``, the path an NFS one takes. The restore
flattens each disk's chain with ``qemu-img convert`` as the Java agent does, and
``qemu-img compare`` proves it identical to a reference taken at the same point. The VM is
removed at the end; the backups stay in the repository.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from shim.compat import strict_zip
from shim.errors import ShimError
from shim.nas import Repository
from tests.lab import Lab, LabVM, MiB, compare, flatten

ROOT = Path(__file__).resolve().parents[2]
DROPIN = ROOT / "scripts" / "nasbackup.sh"
DEFAULT_REPOSITORY = Path("/var/lib/cloudstack-nasbackup-shim/demo-repository")
DEFAULT_LOG = Path("/var/log/cloudstack-nasbackup-shim-demo.log")


class Demo:
    """The demo's steps, each printing one line."""

    def __init__(self, repository_dir: Path, log: Path) -> None:
        self.repository = Repository("none", str(repository_dir), "bind")
        self.repository_dir = repository_dir
        self.log = log
        self.started = time.monotonic()
        self.stamp = time.strftime("%Y.%m.%d.%H.%M.%S")

    def step(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.2f}s] {text}", flush=True)

    def nasbackup(self, *args: str) -> str:
        """Run the drop-in as the agent does (an argv list, stdout read); fail on exit != 0."""
        repo = self.repository
        argv = [str(DROPIN), *args[:2], "-t", repo.type, "-s", repo.address, "-m", repo.options]
        env = {**os.environ, "NASBACKUP_SHIM_LOG": str(self.log)}
        done = subprocess.run([*argv, *args[2:]], capture_output=True, text=True, env=env,
                              check=False)  # fmt: skip
        if done.returncode != 0:
            raise ShimError(f"nasbackup.sh {args[1]} exited {done.returncode}: {done.stdout}")
        return done.stdout

    def backup(self, vm: LabVM, path: str, mode: str, *extra: str) -> str:
        """A running-VM backup with the final generation's argv."""
        return self.nasbackup(
            "-o", "backup", "-v", vm.name, "-p", path, "-q", "false", "-d", "", "-M", mode, *extra
        )

    def run(self) -> None:
        """The demo itself; raises on any failure."""
        self.repository_dir.mkdir(parents=True, exist_ok=True)
        with Lab() as lab:
            vm = lab.create_vm(disks=(64 * MiB, 32 * MiB))
            self.step(f"lab VM {vm.name} up: 2 qcow2 disks, TCG, transient like CloudStack's")
            vm.write(0, 0, 8 * MiB, pattern=0xA1)
            vm.write(1, 4 * MiB, 4 * MiB, pattern=0xB2)
            self.step("data written through QEMU's block layer: 12 MiB on 2 disks")

            full = f"{vm.name}/{self.stamp}.full"
            bitmap_full = f"backup-{int(time.time())}"
            out = self.backup(vm, full, "full", "--bitmap-new", bitmap_full)
            self.step(f"full backup: {full}, {self._summary(out)}")

            vm.write(0, 16 * MiB, 2 * MiB, pattern=0xC3)
            vm.write_zeroes(0, 0, 1 * MiB)
            vm.discard(1, 4 * MiB, 1 * MiB)
            self.step("changed: 2 MiB written, 1 MiB zeroed, 1 MiB discarded")

            incremental = f"{vm.name}/{self.stamp}.incr"
            parents = ",".join(
                f"{full}/{'root' if i == 0 else 'datadisk'}.{d.volume_id}.qcow2"
                for i, d in enumerate(vm.disks)
            )
            out = self.backup(
                vm, incremental, "incremental",
                "--bitmap-new", f"backup-{int(time.time()) + 1}",
                "--bitmap-parent", bitmap_full, "--parent-paths", parents,
            )  # fmt: skip
            self.step(f"incremental backup: {incremental}, {self._summary(out)}")

            truth = vm.reference_backup()
            self.step("reference taken of the live disks (a plain full backup, no checkpoint)")
            out = self.nasbackup("-o", "verify", "-p", incremental)
            self.step(f"verify: {len(out.splitlines())} files of the chain check clean, "
                      "links relative, sizes as in the manifests; checksums recorded (the "
                      "backups read nothing back: their first verify computes them)")  # fmt: skip
            self.nasbackup("-o", "verify", "-p", incremental)
            self.step("verify again: every checksum matches the one recorded")
            for i, (disk, ref) in enumerate(strict_zip(vm.disks, truth)):
                role = "root" if i == 0 else "datadisk"
                top = self.repository_dir / incremental / f"{role}.{disk.volume_id}.qcow2"
                restored = flatten(top, lab.dir / f"java-restore-{disk.target}.qcow2")
                if not compare(restored, ref):
                    raise ShimError(f"{disk.target} restored as Java does differs")
            self.step("restored each chain as the Java agent does (qemu-img convert): identical")
            volumes = [lab.new_volume(f"r{i}", d.size).path for i, d in enumerate(vm.disks)]
            out = self.nasbackup(
                "-o", "restore", "-p", incremental, "-v", vm.name,
                "--restore-volume-paths", ",".join(map(str, volumes)),
            )  # fmt: skip
            for volume, ref in strict_zip(volumes, truth):
                if not compare(volume, ref):
                    raise ShimError(f"restored volume {volume.name} differs from the reference")
            self.step(f"restore into {len(volumes)} fresh volumes (-o restore): identical to "
                      "the reference (qemu-img compare)")  # fmt: skip
        self.step(f"lab VM removed; backups kept in {self.repository_dir / vm.name}")
        self.step(f"shim log: {self.log}")

    @staticmethod
    def _summary(stdout: str) -> str:
        lines = stdout.splitlines()
        markers = [line for line in lines if "=" in line]
        return f"{int(lines[-1]) / MiB:.1f} MiB stored ({', '.join(markers) or 'no markers'})"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/demo``."""
    parser = argparse.ArgumentParser(prog="demo", description=__doc__)
    parser.add_argument(
        "--repository",
        type=Path,
        default=DEFAULT_REPOSITORY,
        help=f"directory used as the local repository (default {DEFAULT_REPOSITORY})",
    )
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG, help="the shim's log file")
    args = parser.parse_args(argv)
    try:
        Demo(args.repository, args.log).run()
    except ShimError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print("demo: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
