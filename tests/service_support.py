"""Helpers of the service tests: a real service on a temporary socket, a client for it, and
the lab's values for the envelope fixtures' placeholders."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim import settings
from shim.backupdir import directory_size
from shim.nas import Repository
from tests.envelopes import fill, mismatches, read
from tests.lab import Lab, LabVM
from tests.lab.harness import Call, EngineSpy, Running, running
from tests.lab.system import environment
from tests.support import disk_files

__all__ = [
    "Call",
    "EngineSpy",
    "FixtureRun",
    "Running",
    "backup_directories",
    "df_kib",
    "jobinfo",
    "running",
]


# -- the lab's values for the fixtures -----------------------------------------------------------
def jobinfo(vm: LabVM) -> str:
    """What ``virsh domjobinfo --completed`` prints for the VM's last job."""
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", "domjobinfo", vm.name, "--completed", "--keep-completed"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def df_kib(directory: Path) -> tuple[int, int]:
    """Size and use of the file system holding ``directory``, as ``df -P`` says (KiB)."""
    line = subprocess.run(
        ["df", "-P", "-k", str(directory)], capture_output=True, text=True, check=True
    ).stdout.splitlines()[1]
    total, used = line.split()[1:3]
    return int(total), int(used)


@dataclass
class FixtureRun:
    """One VM and repository, taking the fixtures' backups one after the other."""

    lab: Lab
    vm: LabVM
    repo: Repository
    backups: list[str] = field(default_factory=list)
    bitmaps: list[str] = field(default_factory=list)

    @property
    def repo_dir(self) -> Path:
        """The repository's directory (what the NAS exports)."""
        return Path(self.repo.address)

    def values(self) -> dict[str, Any]:
        """The placeholders' values that do not depend on a run's result."""
        count = len(self.backups) + 1
        values: dict[str, Any] = {
            "vm": self.vm.name,
            "backupPath": f"{self.vm.name}/2026.10.{count:02d}.00.00.00",
            "repoType": self.repo.type,
            "repoAddress": self.repo.address,
            "mountOptions": self.repo.options,
            "poolUuid": self.vm.disks[0].path.parent.name,
            "bitmapNew": f"backup-{1790000000 + count}",
            "volumePaths": [str(d.path) for d in self.vm.disks],
            "volumeIds": [d.volume_id for d in self.vm.disks],
            "volumeSizes": [d.size for d in self.vm.disks],
        }
        if self.backups:
            parent = self.backups[-1]
            values["backupFiles"] = [p.name for p in disk_files(self.repo_dir, parent, self.vm)]
            values["parentPath"] = parent
            values["parentPaths"] = [
                str(p.relative_to(self.repo_dir))
                for p in disk_files(self.repo_dir, parent, self.vm)
            ]
        if self.bitmaps:
            values["bitmapParent"] = self.bitmaps[-1]
        return values

    async def backup(self, service: Running, generation: str, case: str) -> dict[str, Any]:
        """Post a running-VM backup fixture; check its answer; return the values used.

        In push mode: the fixtures' ``${jobinfo}`` is what virsh prints for the same job,
        and only push mode's job is the backup (libvirt reports a pull job it was told to
        end as cancelled; the shim reports it completed, ``tests/test_pull.py``)."""
        command, expected = read(generation, case)
        values = self.values()
        with environment(settings.METHOD.name, "push"):
            status, answers = await service.post(fill(command, values), generation=generation)
        assert status == 200, answers
        path = values["backupPath"]
        values["jobinfo"] = jobinfo(self.vm)
        values["size"] = directory_size(self.repo_dir / path)
        assert mismatches(expected, answers, values) == []
        self.backups.append(path)
        if "bitmapNew" in str(command):
            self.bitmaps.append(values["bitmapNew"])
        return values


def backup_directories(repo_dir: Path, vm: LabVM) -> list[str]:
    """The backup directories of ``vm`` in a repository."""
    vm_dir = repo_dir / vm.name
    return sorted(os.listdir(vm_dir)) if vm_dir.exists() else []
