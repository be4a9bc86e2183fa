"""No secret anywhere: a Ceph key in an rbd: source, the credentials and details of primary
store objects never reach stdout, stderr, the log, an HTTP body or a file on the NAS —
through the drop-in and through the socket, on the lab (these backups fail: there is no
Ceph here, which is when an error line would carry a source)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from commands import model
from commands.pools import CephAuth
from shim import qemu_img
from tests.lab import Lab
from tests.lab.harness import captured_log
from tests.lab.leaks import leaks
from tests.service_support import running
from tests.support import run_dropin

pytestmark = pytest.mark.lab

KEY = "AQBkZXZlbG9wZXJzU2VjcmV0S2V5MDAwMDAwMDA9PQ=="
SECRETS = (KEY, "URLSECRET", "CHAPSECRET")
VM = "i-2-99991-VM"


def _files_text(directory: Path) -> str:
    return "".join(
        p.read_bytes().decode(errors="replace") for p in directory.rglob("*") if p.is_file()
    )


def test_a_stopped_vm_rbd_backup_through_the_dropin_shows_no_key(lab: Lab, tmp_path: Path) -> None:
    repo = lab.repository()
    source = (
        "rbd:cloudstack/vol-1:mon_host=127.0.0.1\\:1:auth_supported=cephx:id=admin"
        f":key={KEY}:rbd_default_format=2:client_mount_timeout=5"
    )
    log = tmp_path / "agent.log"
    argv = ["-o", "backup", "-v", VM, "-t", repo.type, "-s", repo.address, "-m", repo.options]
    # qemu-img through a wrapper that records its command line, as ps would show it.
    spy = tmp_path / "spy"
    spy.mkdir()
    real = shutil.which("qemu-img")
    (spy / "qemu-img").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$*" >> {spy}/calls\nexec {real} "$@"\n'
    )
    (spy / "qemu-img").chmod(0o700)
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{spy}:{path}"
    try:
        run = run_dropin([*argv, "-p", f"{VM}/2026.10.01.00.00.00", "-d", source], log_file=log)
    finally:
        os.environ["PATH"] = path
    assert run.returncode == 1 and run.stdout.count("\n") == 1, run
    seen = run.stdout + run.stderr + log.read_text() + _files_text(Path(repo.address))
    assert KEY not in seen
    assert "key=***" in log.read_text()  # the source was logged, masked
    # No key on any command line: librados reads it from a file, removed afterwards.
    calls = (spy / "calls").read_text()
    assert "rbd:cloudstack/vol-1" in calls and "keyfile=" in calls and KEY not in calls
    assert list(qemu_img.KEY_DIR.iterdir()) == []
    assert leaks(lab) == []


async def test_rbd_pools_with_secrets_through_the_socket_show_none(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The key the agent's libvirt secret would hold (there is no Ceph pool to define here).
    monkeypatch.setattr(model, "_ceph_auth", lambda _uuid: CephAuth("admin", KEY))
    repo = lab.repository()
    pool = {
        "uuid": "9d4f",
        "poolType": "RBD",
        "host": "127.0.0.1",
        "port": 1,
        "path": "cloudstack",
        "url": "rbd://admin:URLSECRET@127.0.0.1/cloudstack",
        "details": {"chapInitiatorSecret": "CHAPSECRET"},
    }
    command = {
        "vmName": VM,
        "backupPath": f"{VM}/2026.10.01.00.00.00",
        "backupRepoType": repo.type,
        "backupRepoAddress": repo.address,
        "mountOptions": repo.options,
        "volumePools": [pool],
        "volumePaths": ["cloudstack/vol-1"],
    }
    with captured_log(tmp_path / "service.log") as log:
        async with running(tmp_path) as service:
            status, answers = await service.post(
                [{"org.apache.cloudstack.backup.TakeBackupCommand": command}]
            )
    assert status == 200
    ((_, answer),) = answers[0].items()
    assert answer["result"] is False
    seen = str(answers) + log.read_text() + _files_text(Path(repo.address))
    for secret in SECRETS:
        assert secret not in seen, secret
    assert leaks(lab) == []
