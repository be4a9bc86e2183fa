"""The lab's real guest, built once from Debian packages into the lab's cache.

A booted Linux with qemu-guest-agent, so that pauses, freezes and guest I/O are real:

* the distribution kernel (the image package of Debian's ``linux-image-amd64`` or Ubuntu's
  ``linux-image-virtual``, with Ubuntu's separate modules package);
* an initramfs holding ``busybox-static``, the kernel modules for virtio disks, the
  virtio console and ext4 (with their dependencies, read from each module's ``depends=``),
  ``qemu-guest-agent`` and ``ioping`` with the libraries ``ldd`` lists, and an ``/init``
  that mounts the ext4 filesystem of the first virtio disk at ``/mnt/data`` and runs the
  agent on the ``org.qemu.guest_agent.0`` port (an fsfreeze hook logs each freeze and thaw
  to ``/run/fsfreeze.log``, and makes freezes slow on request);
* a template ROOT volume: a qcow2 holding an empty ext4 filesystem.

The packages are downloaded (``apt-get download``) and unpacked into a scratch directory;
nothing is installed on the host, so its kernel, initrd and services stay untouched, and
nothing but packages is ever downloaded. The cache is keyed by this file's contents: a
change here rebuilds it, a rerun finds it and returns at once without touching apt.

Run by ``scripts/setup-host`` as ``python -m tests.lab.guest_image``.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("SHIM_GUEST_CACHE", "/var/cache/cloudstack-nasbackup-shim/guest"))
DATA_MOUNT = "/mnt/data"
FREEZE_LOG = "/run/fsfreeze.log"
SLOW_FREEZE_FLAG = "/run/slow-freeze"
"""While it exists in the guest, each freeze takes three seconds longer."""
ROOT_SIZE = 64 * 1024 * 1024
_PACKAGES = ("busybox-static", "qemu-guest-agent", "ioping", "coreutils")
"""coreutils for its ``dd`` (:data:`DD`)."""
DD = "/usr/local/bin/dd"
"""The guest's ``dd`` for writes with ``oflag=direct``, which busybox's lacks before 1.33
(Ubuntu 22.04 ships 1.30): coreutils', called by its path, since busybox's shell runs its
own applet for a bare ``dd`` whatever PATH says."""
_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic", "ext4")
"""Loaded in dependency order; ext4 wants a crc32c (a soft dependency modinfo does not list
as ``depends``): the generic one, as the accelerated one needs SSE4.2, absent under TCG."""

INIT = f"""#!/bin/busybox sh
# The lab guest's init (tests/lab/guest_image.py): modules, the ext4 ROOT volume, the agent.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 run /run
for m in $(cat /etc/modules.load); do insmod "/lib/modules/$m" 2>/dev/null; done
mkdir -p {DATA_MOUNT}
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.05; n=$((n + 1)); done
if mount -t ext4 -o noatime /dev/vda {DATA_MOUNT}; then echo "guest: ext4 mounted"
else echo "guest: no ext4 filesystem on /dev/vda"; fi
port=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${{p##*/}}
done
if [ -n "$port" ] && ! grep -qw shim.noagent /proc/cmdline; then
    qemu-ga -m virtio-serial -p "$port" -t /run -f /run/qemu-ga.pid -F/etc/fsfreeze-hook -d
    echo "guest: agent on $port"
fi
echo "guest: ready"
while :; do sleep 3600; done
"""

FREEZE_HOOK = f"""#!/bin/sh
# qemu-ga runs this with "freeze" before freezing and "thaw" after thawing.
echo "$1 $(cut -d' ' -f1 /proc/uptime)" >> {FREEZE_LOG}
# A test's window between "the agent is freezing" and "the job begins".
if [ "$1" = freeze ] && [ -e {SLOW_FREEZE_FLAG} ]; then sleep 3; fi
"""


@dataclass(frozen=True)
class GuestImage:
    """The cached guest: kernel, initramfs, template ROOT volume, and what built them."""

    kernel: Path
    initrd: Path
    root_template: Path
    info: str

    @classmethod
    def cached(cls, cache: Path = CACHE) -> GuestImage:
        """The image in the cache; raises FileNotFoundError when it was never built (or was
        built by another version of this file)."""
        directory = cache / _stamp()
        if not (directory / "BUILD-INFO").exists():
            raise FileNotFoundError(
                f"the lab guest is not in {cache} (scripts/setup-host builds it)"
            )
        image = cls(
            kernel=directory / "vmlinuz",
            initrd=directory / "initrd.gz",
            root_template=directory / "root.qcow2",
            info=(directory / "BUILD-INFO").read_text(encoding="utf-8"),
        )
        return image


def _stamp() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _run(*argv: str, cwd: Path | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True)
    return done.stdout


def _unpacked(unpacked: Path, relative: str) -> Path:
    """``relative`` in the unpacked packages, before or after the merged ``/usr`` (Debian 13
    ships kernel modules and busybox under ``usr/``)."""
    for candidate in (unpacked / relative, unpacked / "usr" / relative):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{relative} is in none of the unpacked packages")


def _module_index(modules_dir: Path) -> dict[str, Path | None]:
    """Module name to its file, or to None when it is built into the kernel (Debian 13
    builds ``virtio_pci`` in)."""
    index: dict[str, Path | None] = {}
    builtin = modules_dir / "modules.builtin"
    if builtin.exists():
        for line in builtin.read_text().split():
            index[Path(line).name.split(".ko")[0].replace("-", "_")] = None
    for path in modules_dir.rglob("*.ko*"):
        name = path.name.split(".ko")[0].replace("-", "_")
        index[name] = path
    return index


def _depends(module: Path) -> list[str]:
    if module.name.endswith(".xz"):
        data = lzma.decompress(module.read_bytes())
    else:
        data = module.read_bytes()
    found = re.search(rb"\x00depends=([^\x00]*)\x00", data)
    if not found or not found.group(1):
        return []
    return [d.replace("-", "_") for d in found.group(1).decode().split(",")]


def _load_order(index: dict[str, Path | None], wanted: tuple[str, ...]) -> list[str]:
    """The modules to load, dependencies first; built-in ones are left out."""
    order: list[str] = []

    def visit(name: str) -> None:
        module = index[name]
        if name in order or module is None:
            return
        for dep in _depends(module):
            visit(dep)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def _libraries(binary: Path) -> list[Path]:
    """The shared objects ``ldd`` resolves for ``binary`` (host paths, loader included)."""
    libs = []
    for line in _run("ldd", str(binary)).splitlines():
        if "not found" in line:
            raise RuntimeError(f"{binary.name} needs a library the host lacks: {line.strip()}")
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            libs.append(Path(match.group(1)))
    return libs


def _write_cpio_newc(root: Path, out: Path) -> None:
    """``root`` as a gzipped newc archive (the initramfs format), in sorted order."""
    entries = sorted(root.rglob("*"))
    with gzip.open(out, "wb", compresslevel=6) as archive:
        for ino, path in enumerate(entries, start=1):
            st = path.lstat()
            name = str(path.relative_to(root)).encode() + b"\0"
            if path.is_symlink():
                data = os.readlink(path).encode()
            elif path.is_file():
                data = path.read_bytes()
            else:
                data = b""
            header = "070701" + "".join(
                f"{v:08x}"
                for v in (
                    ino,
                    st.st_mode,
                    0,
                    0,
                    1,
                    0,
                    len(data),
                    0,
                    0,
                    os.major(st.st_rdev),
                    os.minor(st.st_rdev),
                    len(name),
                    0,
                )
            )
            archive.write(header.encode() + name)
            archive.write(b"\0" * (-(110 + len(name)) % 4))
            archive.write(data + b"\0" * (-len(data) % 4))
        trailer = b"TRAILER!!!\0"
        archive.write(("070701" + "0" * 8 * 11 + f"{len(trailer):08x}" + "0" * 8).encode())
        archive.write(trailer + b"\0" * (-(110 + len(trailer)) % 4))


_KERNELS = ("linux-image-amd64", "linux-image-virtual")
"""The distribution's kernel metapackage: Debian's, Ubuntu's."""


def _apt_depends(package: str, prefix: str) -> list[str]:
    # An unknown package (the other distribution's metapackage) is an answer, not an error.
    listed = subprocess.run(["apt-cache", "depends", package],
                            check=False, capture_output=True, text=True).stdout  # fmt: skip
    return [line.split()[-1] for line in listed.splitlines()
            if re.match(rf"\s+Depends: {prefix}\d", line)]  # fmt: skip


def _kernel_packages() -> list[str]:
    """The kernel's image package and, where they are split out of it (Ubuntu), its
    modules."""
    image = next((dep for meta in _KERNELS for dep in _apt_depends(meta, "linux-image-")), None)
    if image is None:
        raise RuntimeError(f"no kernel package: apt knows none of {', '.join(_KERNELS)}")
    return [image, *_apt_depends(image, "linux-modules-")]


def _download(debs: Path) -> list[str]:
    """The packages' .deb files into ``debs``; returns ``package=version`` of each."""
    kernel = _kernel_packages()
    # apt's sandbox user cannot write into root's scratch directory.
    os.chmod(debs, 0o777)  # noqa: S103 - a private scratch directory, removed after
    try:
        _run("apt-get", "download", "-q", *kernel, *_PACKAGES, cwd=debs)
    except subprocess.CalledProcessError:
        # Package lists never fetched, or stale (a superseded version is gone).
        _run("apt-get", "update", "-qq")
        _run("apt-get", "download", "-q", *kernel, *_PACKAGES, cwd=debs)
    fields = [_run("dpkg-deb", "-f", str(d), "Package", "Version").splitlines()
              for d in sorted(debs.glob("*.deb"))]  # fmt: skip
    return ["=".join(line.split(": ", 1)[1] for line in pair) for pair in fields]


def _built(index: dict[str, Path | None], name: str) -> Path:
    module = index[name]
    assert module is not None, f"{name} is built into the kernel"
    return module


def _copy_module(module: Path, directory: Path) -> str:
    target = directory / module.name
    if module.name.endswith(".xz"):
        target = target.with_suffix("")
        target.write_bytes(lzma.decompress(module.read_bytes()))
    else:
        shutil.copy2(module, target)
    return target.name


def _stage_initramfs(unpacked: Path, initramfs: Path, kver: str) -> list[str]:
    """The initramfs tree; returns the modules it loads, in order."""
    index = _module_index(_unpacked(unpacked, "lib/modules") / kver)
    order = _load_order(index, _MODULES)
    for sub in ("bin", "usr/bin", "usr/sbin", "usr/local/bin", "proc", "sys", "dev", "run",
                "mnt", "etc", "lib/modules", "tmp"):  # fmt: skip
        (initramfs / sub).mkdir(parents=True, exist_ok=True)
    loaded = [_copy_module(_built(index, name), initramfs / "lib/modules") for name in order]
    (initramfs / "etc/modules.load").write_text("\n".join(loaded) + "\n")
    # The kernel opens the console before running /init (devtmpfs comes later).
    os.mknod(initramfs / "dev/console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    shutil.copy2(_unpacked(unpacked, "bin/busybox"), initramfs / "bin/busybox")
    for binary, where in (
        (unpacked / "usr/sbin/qemu-ga", "usr/sbin"),
        (unpacked / "usr/bin/ioping", "usr/bin"),
        (_unpacked(unpacked, "bin/dd"), "usr/local/bin"),
    ):
        shutil.copy2(binary, initramfs / where)
        for lib in _libraries(binary):
            target = initramfs / str(lib).lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib.resolve(), target)
    (initramfs / "init").write_text(INIT)
    (initramfs / "etc/fsfreeze-hook").write_text(FREEZE_HOOK)
    for executable in ("init", "etc/fsfreeze-hook"):
        (initramfs / executable).chmod(0o755)
    return order


def _root_template(scratch: Path, out: Path) -> None:
    raw = scratch / "root.raw"
    with raw.open("wb") as f:
        f.truncate(ROOT_SIZE)
    # Inode tables and journal initialised now: no lazy-init thread writing in the guest
    # behind the tests' backs.
    _run("mkfs.ext4", "-q", "-F", "-L", "labroot", "-E",
         "lazy_itable_init=0,lazy_journal_init=0", str(raw))  # fmt: skip
    _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out))


def build(cache: Path = CACHE) -> tuple[GuestImage, bool]:
    """Build the image unless the cache holds it; returns it and whether it was built."""
    with_stamp = cache / _stamp()
    try:
        return GuestImage.cached(cache), False
    except FileNotFoundError:
        pass
    started = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="guest-build-", dir=cache) as scratch_name:
        scratch = Path(scratch_name)
        debs, unpacked, initramfs, staged = (
            scratch / name for name in ("debs", "unpacked", "initramfs", "image")
        )
        for d in (debs, unpacked, initramfs, staged):
            d.mkdir()
        versions = _download(debs)
        for deb in sorted(debs.glob("*.deb")):
            _run("dpkg-deb", "-x", str(deb), str(unpacked))
        kver = next(_unpacked(unpacked, "lib/modules").iterdir()).name
        order = _stage_initramfs(unpacked, initramfs, kver)
        shutil.copy2(unpacked / "boot" / f"vmlinuz-{kver}", staged / "vmlinuz")
        _write_cpio_newc(initramfs, staged / "initrd.gz")
        _root_template(scratch, staged / "root.qcow2")
        seconds = time.monotonic() - started
        (staged / "BUILD-INFO").write_text(
            f"kernel {kver}\nmodules {' '.join(order)}\npackages {'; '.join(versions)}\n"
            f"initrd {(staged / 'initrd.gz').stat().st_size} bytes\nbuilt in {seconds:.1f} s\n",
            encoding="utf-8",
        )
        shutil.rmtree(with_stamp, ignore_errors=True)
        staged.rename(with_stamp)
    # Earlier builds (another version of this file) are of no further use.
    for old in cache.iterdir():
        if old.name != with_stamp.name and not old.name.startswith("guest-build-"):
            shutil.rmtree(old, ignore_errors=True)
    return GuestImage.cached(cache), True


def main() -> int:
    """Build (or find) the guest image and say which, and how long it took."""
    started = time.monotonic()
    image, built = build()
    what = "built" if built else "found in the cache"
    print(f"lab guest {what} in {time.monotonic() - started:.1f} s: {image.kernel.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
