"""The Debian package (``scripts/package``) in clean chroots of the releases it is for.

Built from this checkout, installed with apt into a throwaway copy (an overlay) of a
debootstrap of Debian 12 and of Debian 13 that nothing else touches: it must take the agent's
``nasbackup.sh`` over, run the shim with the distribution's own Python libraries, survive
an upgrade of itself and of ``cloudstack-common`` (a stand-in package, built here, that
ships the agent's script), and leave the host exactly as it was when purged; and through
the agent's script it must back up, verify and restore a stopped VM's disk.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import stand_in_deb

# Run from the host, into chroots of their own: not again inside a release chroot.
# Each builds or boots a chroot and downloads packages: more than the suite's usual limit.
pytestmark = [pytest.mark.host, pytest.mark.release_chroots, pytest.mark.timeout(900)]
# Debian 11's python3-aiohttp (3.7) is older than the shim's floor: a clone install there.
RELEASES = ("bookworm", "trixie")

REPO = Path(__file__).resolve().parents[1]
CHROOTS = Path(os.environ.get("SHIM_CHROOTS", "/var/tmp/nasbackup-shim-chroots")) / "package"
AGENT_SCRIPT = "/usr/share/cloudstack-common/scripts/vm/hypervisor/kvm/nasbackup.sh"
DROP_IN = "/usr/bin/cloudstack-nasbackup"
PACKAGE = "cloudstack-nasbackup-shim"
DEBS = "/root/debs"  # inside the chroot

# Every file of the chroot: type, mode, owner, and content's hash or link's target. What
# package managers keep for themselves (their database, caches, logs) is left out.
SNAPSHOT = r"""
import hashlib, json, os, stat, sys
skip = {"/proc", "/sys", "/dev", "/run", "/tmp", "/var/lib/dpkg", "/var/lib/apt",
        "/var/cache", "/var/log/apt", "/var/log/dpkg.log", "/var/log/alternatives.log",
        "/root/debs", sys.argv[1]}
seen = {}
for top, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in skip]
    for name in dirs + files:
        path = os.path.join(top, name)
        if path in skip:
            continue
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            what = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                what = hashlib.sha256(f.read()).hexdigest()
        else:
            what = ""
        seen[path] = [stat.filemode(st.st_mode), st.st_uid, st.st_gid, what]
print(json.dumps(seen))
"""


@dataclass
class Chroot:
    """A throwaway copy of the clean chroot; each ``run`` sees what the last one left."""

    overlay: Path
    release: str

    def run(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = _release_chroot(
            "run", "--overlay", str(self.overlay), self.release,
            "/usr/bin/env", "DEBIAN_FRONTEND=noninteractive",
            "/bin/bash", "-euo", "pipefail", "-c", script,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"{script}\nexit {done.returncode}\n{done.stdout}{done.stderr}")
        return done

    def install(self, *packages: str) -> None:
        """apt installs the packages (a path: a .deb), without recommends."""
        self.run(
            "apt-get update -qq && apt-get install -y -qq --no-install-recommends "
            f"{' '.join(packages)} >/dev/null"
        )

    def put(self, source: Path) -> str:
        """Copies a file into the chroot's /root/debs; its path there."""
        target = self.overlay / "upper" / DEBS.lstrip("/") / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        return f"{DEBS}/{source.name}"

    def snapshot(self) -> dict[str, list[object]]:
        out = self.run(f"python3 -c {shlex.quote(SNAPSHOT)} {REPO}").stdout
        snap: dict[str, list[object]] = json.loads(out)
        return snap


def _release_chroot(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """scripts/release-chroot with the package's own chroots, which nothing else touches."""
    return subprocess.run(
        [str(REPO / "scripts/release-chroot"), *args],
        env={**os.environ, "SHIM_CHROOTS": str(CHROOTS)},
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def _agent_script(version: str) -> bytes:
    return f'#!/bin/bash\necho "upstream nasbackup.sh {version}"\nexit 0\n'.encode()


def _cloudstack_common(into: Path, version: str) -> Path:
    """A stand-in for CloudStack's cloudstack-common: the agent's script and a neighbour."""
    kvm = Path(AGENT_SCRIPT).parent
    files = {AGENT_SCRIPT: _agent_script(version), f"{kvm}/kvmheartbeat.sh": b"#!/bin/bash\n"}
    return stand_in_deb(into, "cloudstack-common", version, files)


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("debs")
    built = {}
    for version in ("0.1.0~test1", "0.1.0~test2"):
        done = subprocess.run(
            [str(REPO / "scripts/package"), "--out", str(out), "--version", version],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        built[version] = Path(done.stdout.strip())
    for version in ("4.20.0", "4.20.1"):
        built[version] = _cloudstack_common(out, version)
    return built


@pytest.fixture(params=RELEASES)
def chroot(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Chroot]:
    release: str = request.param
    built = _release_chroot("build", release)
    assert built.returncode == 0, built.stderr
    overlay = tmp_path / "overlay"
    yield Chroot(overlay, release)
    # Its packages (QEMU, libvirt) are hundreds of MiB; pytest keeps its last runs' files.
    shutil.rmtree(overlay, ignore_errors=True)


def _installed_for_the_agent(chroot: Chroot) -> None:
    """The agent's script is the drop-in, diverted in the package's name, and runs the shim."""
    state = chroot.run(
        f"readlink {AGENT_SCRIPT}; dpkg-divert --listpackage {AGENT_SCRIPT}; "
        f"{AGENT_SCRIPT} -h || echo exit=$?"
    ).stdout.splitlines()
    assert state[0] == DROP_IN, state
    assert state[1] == PACKAGE, state
    assert state[2].startswith("Usage: nasbackup.sh -o <operation>"), state
    assert state[-1] == "exit=1", state  # upstream's usage exit


def _diverted(chroot: Chroot) -> bytes:
    return chroot.run(f"cat {AGENT_SCRIPT}.cloudstack-orig").stdout.encode()


def test_install_upgrades_and_purge_leave_the_agent_as_it_was(
    chroot: Chroot, debs: dict[str, Path]
) -> None:
    first, second = chroot.put(debs["0.1.0~test1"]), chroot.put(debs["0.1.0~test2"])
    common_old, common_new = chroot.put(debs["4.20.0"]), chroot.put(debs["4.20.1"])
    # The agent, and what the package needs from the distribution (resolved by apt from
    # the package's own Depends and Recommends), are there before the snapshot; and systemd,
    # to check the unit with.
    chroot.run(
        f"dpkg -i {common_old} >/dev/null && apt-get update -qq && "
        "apt-get satisfy -y -qq --no-install-recommends "
        f'"$(dpkg-deb -f {first} Depends), $(dpkg-deb -f {first} Recommends), systemd, logrotate" '
        ">/dev/null"
    )
    before = chroot.snapshot()

    # The install is one apt command.
    chroot.run(f"apt-get install -y -qq {first} >/dev/null")
    _installed_for_the_agent(chroot)
    assert _diverted(chroot) == _agent_script("4.20.0")
    enabled = chroot.run(
        f"readlink /etc/systemd/system/multi-user.target.wants/{PACKAGE}.service"
    ).stdout.strip()
    assert enabled.endswith(f"/systemd/system/{PACKAGE}.service")
    # systemd knows every line of the unit (an unknown one is only warned about).
    assert chroot.run(f"systemd-analyze verify {PACKAGE}.service 2>&1").stdout == ""
    # logrotate takes the snippet (a forced rotation under --debug changes nothing).
    rotate = chroot.run(f"logrotate --debug --force /etc/logrotate.d/{PACKAGE} 2>&1").stdout
    assert "/var/log/cloudstack-nasbackup/*.log" in rotate
    assert "error" not in rotate.lower(), rotate
    # The service, with the distribution's aiohttp and marshmallow, answers its client (run
    # as its unit runs it: no systemd here).
    health = chroot.run(
        "mkdir -m 0700 /run/t; NASBACKUP_SHIM_LOG=/var/log/cloudstack-nasbackup/serve.log "
        "cloudstack-nasbackup-serve --socket /run/t/s.sock & "
        "for _ in $(seq 100); do [ -S /run/t/s.sock ] && break; sleep 0.1; done; "
        "cloudstack-nasbackup-client --socket /run/t/s.sock health || true; kill $!"
    ).stdout
    assert '"libvirt"' in health, health

    # Again over itself, then a newer version: still one diversion, still the shim, and the
    # operator's settings kept.
    setting = "NASBACKUP_SHIM_LOCK_WAIT=30"
    chroot.run(f"echo {setting} >> /etc/default/cloudstack-nasbackup")
    chroot.run(f"dpkg -i {first} >/dev/null && dpkg -i {second} >/dev/null")
    _installed_for_the_agent(chroot)
    kept = chroot.run("tail -n1 /etc/default/cloudstack-nasbackup").stdout.strip()
    assert kept == setting
    assert chroot.run("dpkg-divert --list | grep -c nasbackup").stdout.strip() == "1"

    # cloudstack-common upgraded under the shim: its new script goes beside the drop-in.
    chroot.run(f"dpkg -i {common_new} >/dev/null")
    _installed_for_the_agent(chroot)
    assert _diverted(chroot) == _agent_script("4.20.1")

    chroot.run(f"apt-get purge -y -qq {PACKAGE} >/dev/null")
    after = chroot.snapshot()
    assert chroot.run(f"cat {AGENT_SCRIPT}").stdout.encode() == _agent_script("4.20.1")
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    assert changed == {AGENT_SCRIPT}, sorted(changed)
    assert after[AGENT_SCRIPT][:3] == before[AGENT_SCRIPT][:3]  # mode and owner too


def test_the_agent_installed_after_the_package_gets_the_drop_in(
    chroot: Chroot, debs: dict[str, Path]
) -> None:
    shim, common = chroot.put(debs["0.1.0~test1"]), chroot.put(debs["4.20.0"])
    chroot.install(shim)
    assert chroot.run(f"dpkg-divert --list {AGENT_SCRIPT}").stdout == ""
    # The package's trigger on the agent's script takes it over as it arrives.
    chroot.run(f"dpkg -i {common} >/dev/null")
    _installed_for_the_agent(chroot)
    assert _diverted(chroot) == _agent_script("4.20.0")
    # A removal given up after prerm (dpkg then runs postinst abort-remove) takes it back.
    info = f"/var/lib/dpkg/info/{PACKAGE}"
    chroot.run(f"{info}.prerm remove")
    assert chroot.run(f"cat {AGENT_SCRIPT}").stdout.encode() == _agent_script("4.20.0")
    chroot.run(f"{info}.postinst abort-remove")
    _installed_for_the_agent(chroot)
    # With prerm unable to give the script back (its helper gone), postrm does, by a rename.
    chroot.run(f"rm /usr/share/{PACKAGE}/install-agent && dpkg --purge {PACKAGE} >/dev/null")
    assert chroot.run(f"cat {AGENT_SCRIPT}").stdout.encode() == _agent_script("4.20.0")
    assert chroot.run(f"dpkg-divert --list {AGENT_SCRIPT}").stdout == ""
    assert chroot.run(f"ls {Path(AGENT_SCRIPT).parent}").stdout.split() == [
        "kvmheartbeat.sh",
        "nasbackup.sh",
    ]


# The tests of everything that uses aiohttp, marshmallow and apispec, but the lab's.
LIBRARY_TESTS = (
    "tests/test_commands.py", "tests/test_java_wrappers.py", "tests/test_jobs.py",
    "tests/test_secrets.py", "tests/test_service.py", "tests/test_service_timeouts.py",
    "tests/test_service_operations.py", "tests/test_errors.py", "tests/test_settings.py",
)  # fmt: skip


def test_the_service_tests_pass_with_the_distributions_libraries(
    chroot: Chroot, debs: dict[str, Path]
) -> None:
    """pyproject's floors are the distribution's versions: they must really do."""
    chroot.install(
        chroot.put(debs["0.1.0~test1"]), "python3-pytest", "python3-pytest-aiohttp",
        "python3-pytest-asyncio", "python3-pytest-timeout", "python3-fusepy",
    )  # fmt: skip
    done = chroot.run(
        f"cd {REPO} && PYTHONDONTWRITEBYTECODE=1 python3 -m pytest -p no:cacheprovider -q "
        f"-m 'not lab and not host' {' '.join(LIBRARY_TESTS)} "
        # It runs scripts/serve, which a clone install has and this chroot does not.
        "--deselect tests/test_service.py::test_scripts_serve_refuses_a_loose_directory "
        "&& python3 -c 'import aiohttp, marshmallow, apispec; "
        "print(aiohttp.__version__, marshmallow.__version__, apispec.__version__)'",
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and " failed" not in done.stdout
    print(done.stdout.splitlines()[-1])  # the versions, in the suite's output


# libvirtd, only to say a VM is not running: the lab's minimum (the account it resolves
# first, its directories, QEMU as root), without the distribution's systemd units.
LIBVIRT = ("libvirt-daemon", "libvirt-daemon-driver-qemu")
START_LIBVIRTD = r"""
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu libvirt-qemu
mkdir -p /etc/libvirt /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/cache/libvirt/qemu
printf 'user = "root"\ngroup = "root"\n' > /etc/libvirt/qemu.conf
libvirtd -d
for _ in $(seq 100); do [ -S /run/libvirt/libvirt-sock ] && break; sleep 0.1; done
"""

# A stopped VM's disk backed up through the agent's script, full then incremental, verified
# and restored, as the agent and an operator would: the package's own Python, libraries,
# qemu-img and qemu-storage-daemon do the work.
BACKUP_AND_RESTORE = (
    START_LIBVIRTD
    + r"""
mkdir /srv/nas
qemu-img create -q -f qcow2 /srv/vol-1 64M && qemu-io -c 'write -P 7 0 4M' /srv/vol-1 >/dev/null
nas=(-t none -s /srv/nas -m bind)
full=i-2-3-VM/2026.12.07.00.00.00 incremental=i-2-3-VM/2026.12.07.01.00.00
echo "full: $(AGENT -o backup -v i-2-3-VM "${nas[@]}" -p $full -q false -d /srv/vol-1 \
    -M full --bitmap-new backup-1 | paste -sd+)"
qemu-io -c 'write -P 9 8M 2M' /srv/vol-1 >/dev/null
echo "incremental: $(AGENT -o backup -v i-2-3-VM "${nas[@]}" -p $incremental -q false \
    -d /srv/vol-1 -M incremental --bitmap-new backup-2 --bitmap-parent backup-1 \
    --parent-paths $full/root.vol-1.qcow2 | paste -sd+)"
echo "backing: $(qemu-img info /srv/nas/$incremental/root.vol-1.qcow2 | grep '^backing file:')"
AGENT -o verify "${nas[@]}" -p $incremental >/dev/null
qemu-img create -q -f qcow2 /srv/restored 64M
AGENT -o restore "${nas[@]}" -v i-2-3-VM -p $incremental --restore-volume-paths /srv/restored \
    >/dev/null
qemu-img compare /srv/vol-1 /srv/restored
echo "mounts left: $(grep -c csbackup /proc/mounts || true)"
"""
)


def test_the_agents_script_backs_up_and_restores_a_stopped_vm(
    chroot: Chroot, debs: dict[str, Path]
) -> None:
    chroot.run(f"dpkg -i {chroot.put(debs['4.20.0'])} >/dev/null")
    chroot.install(chroot.put(debs["0.1.0~test2"]), *LIBVIRT)
    done = chroot.run(BACKUP_AND_RESTORE.replace("AGENT", AGENT_SCRIPT), check=False)
    out = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    full = sum(int(n) for n in out[0].removeprefix("full: ").split("+"))
    incremental = sum(int(n) for n in out[1].removeprefix("incremental: ").split("+"))
    assert full > 4 * 2**20 > incremental > 2 * 2**20  # the incremental holds the change only
    assert out[2].startswith("backing: backing file: ../2026.12.07.00.00.00/root.vol-1.qcow2 ")
    assert out[3:] == ["Images are identical.", "mounts left: 0"], out


# Under the package's own unit, started by systemd itself (the chroot booted in
# systemd-nspawn): a stopped VM's full, incremental and restore sent to the service, the
# restored disk compared; and the unit's hardening seen on the service's process.
PROBE_UNIT = """[Unit]
After=cloudstack-nasbackup-shim.service
Wants=cloudstack-nasbackup-shim.service
[Service]
Type=oneshot
ExecStart=/bin/bash /root/probe.sh
ExecStopPost=/bin/systemctl --no-block poweroff
[Install]
WantedBy=multi-user.target
"""
PROBE = (
    "exec >/root/probe.out 2>&1\nset -x\n"
    + START_LIBVIRTD
    + r"""
mkdir -p /srv/nas
qemu-img create -q -f qcow2 /srv/vol-1 64M && qemu-io -c 'write -P 7 0 4M' /srv/vol-1
socket=/run/cloudstack-nasbackup-shim/shim.sock
for _ in $(seq 100); do [ -S $socket ] && break; sleep 0.1; done
pid=$(systemctl show -P MainPID cloudstack-nasbackup-shim)
echo "status: $(systemctl is-active cloudstack-nasbackup-shim)"
echo "process: $(grep -E '^(NoNewPrivs|Seccomp):' /proc/$pid/status | tr -s '\t\n' '  ')"
repo='"backupRepoType": "none", "backupRepoAddress": "/srv/nas", "mountOptions": "bind"'
base='"vmName": "i-2-3-VM", "contextMap": {}, "wait": 0, "bypassHostMaintenance": false'
send() { cloudstack-nasbackup-client send - > "/root/$1.json"; echo "$1: $?"; }
send full <<JSON
[{"org.apache.cloudstack.backup.TakeBackupCommand": {$base, $repo, "quiesce": false,
  "backupPath": "i-2-3-VM/2026.12.07.00.00.00", "volumePaths": ["/srv/vol-1"],
  "mode": "full", "bitmapNew": "backup-1"}}]
JSON
qemu-io -c 'write -P 9 8M 2M' /srv/vol-1
send incremental <<JSON
[{"org.apache.cloudstack.backup.TakeBackupCommand": {$base, $repo, "quiesce": false,
  "backupPath": "i-2-3-VM/2026.12.07.01.00.00", "volumePaths": ["/srv/vol-1"],
  "mode": "incremental", "bitmapNew": "backup-2", "bitmapParent": "backup-1",
  "parentPaths": ["i-2-3-VM/2026.12.07.00.00.00/root.vol-1.qcow2"]}}]
JSON
qemu-img create -q -f qcow2 /srv/restored 64M
send restore <<JSON
[{"org.apache.cloudstack.backup.RestoreBackupCommand": {$base, $repo,
  "backupPath": "i-2-3-VM/2026.12.07.01.00.00", "backupVolumesUUIDs": ["vol-1"],
  "backupFiles": ["vol-1"], "restoreVolumePaths": ["/srv/restored"],
  "volumePaths": ["/srv/restored"], "restoreVolumeSizes": [67108864],
  "restoreVolumePools": [{"uuid": "p", "path": "/srv", "poolType": "Filesystem", "id": 1}],
  "diskType": "root", "vmExists": true, "vmState": "Stopped", "mountTimeout": 0}}]
JSON
echo "compare: $(qemu-img compare /srv/vol-1 /srv/restored)"
echo "done"
"""
)


def test_the_service_backs_up_under_its_unit_and_systemd(
    chroot: Chroot, debs: dict[str, Path]
) -> None:
    chroot.install(chroot.put(debs["0.1.0~test1"]), "systemd", "systemd-sysv", *LIBVIRT)
    etc = chroot.overlay / "upper/etc/systemd/system"
    (etc / "probe.service").write_text(PROBE_UNIT)
    (etc / "multi-user.target.wants/probe.service").symlink_to("/etc/systemd/system/probe.service")
    (chroot.overlay / "upper/root/probe.sh").write_text(PROBE)
    booted = _release_chroot("boot", "--overlay", str(chroot.overlay), chroot.release, timeout=400)
    upper = chroot.overlay / "upper/root"
    probe = (upper / "probe.out").read_text() if (upper / "probe.out").exists() else ""
    lines = {k: v.strip() for k, _, v in (x.partition(":") for x in probe.splitlines())}
    context = f"{probe}\n{booted.stdout[-3000:]}{booted.stderr[-2000:]}"
    assert lines.get("done") == "", context
    assert lines["status"] == "active", context
    # NoNewPrivileges, and the seccomp filter of the unit's Restrict*= lines, are in force.
    assert lines["process"] == "NoNewPrivs: 1 Seccomp: 2", context
    assert (lines["full"], lines["incremental"], lines["restore"]) == ("0", "0", "0"), context
    answers = {
        name: json.loads((upper / f"{name}.json").read_text())[0][
            "org.apache.cloudstack.backup.BackupAnswer"
        ]
        for name in ("full", "incremental", "restore")
    }
    assert answers["full"]["bitmapCreated"] == "backup-1"
    # A real incremental (its parent checked by qemu-img in a network namespace of its own),
    # not a full in its place.
    assert answers["incremental"]["incrementalFallback"] is False
    assert answers["incremental"]["size"] < answers["full"]["size"]
    assert answers["restore"]["result"] is True
    assert lines["compare"] == "Images are identical.", context
