"""The Debian package of the shim (``scripts/package``), built offline from a clean tree.

The sources are this checkout's tracked files (nothing untracked or ignored gets in). The
wheel is built by setuptools itself, called as its PEP 517 backend by the distribution's
own ``python3`` (no pip, no index), and laid out as Debian lays out an application in
Python: the modules in a directory of the package's own, ``/usr/lib/cloudstack-nasbackup-shim``
(``shim`` and ``commands`` are too generic to claim in the system's module path), compiled
by ``py3compile`` on install; the ``[project.scripts]`` commands in ``/usr/bin``, which put
that directory first on their module path. Its Python dependencies are
the distribution's packages, at pyproject's own floors (README.md, "The package").
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 and older: the package is built on Debian 12 on
    sys.exit("package: building needs Python 3.11 or later (tomllib)")

REPO = Path(__file__).resolve().parents[2]
NAME = "cloudstack-nasbackup-shim"
PYTHON_LIBS = f"usr/lib/{NAME}"
SHARE = f"usr/share/{NAME}"
# pip's name of each dependency, and the distribution's package of it.
DEBIAN_PACKAGE_OF = {
    "libvirt-python": "python3-libvirt",
    "lxml": "python3-lxml",
    "aiohttp": "python3-aiohttp",
    "marshmallow": "python3-marshmallow",
    "apispec": "python3-apispec",
}
# What the engine runs besides Python: qemu-img (qemu-utils); qemu-storage-daemon, which
# backs up stopped VMs and runs pull mode (qemu-system-common, which every KVM host has);
# mount and umount.
TOOLS = ("qemu-utils", "qemu-system-common", "mount")
RECOMMENDS = ("nfs-common", "cifs-utils")
_REQUIREMENT = re.compile(r"^([A-Za-z0-9_.-]+)\s*((?:[<>=!~]=?\s*[^,\s]+\s*,?\s*)*)$")


def depends(requirements: list[str]) -> list[str]:
    """The Depends of the package: pyproject's dependencies as the distribution's packages,
    with the same bounds (``aiohttp>=3.8.4,<4``: ``python3-aiohttp (>= 3.8.4),
    python3-aiohttp (<< 4)``), then the tools."""
    out = ["python3 (>= 3.9)"]
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement.strip())
        if match is None or match.group(1) not in DEBIAN_PACKAGE_OF:
            raise SystemExit(f"package: no Debian package known for {requirement!r}")
        debian = DEBIAN_PACKAGE_OF[match.group(1)]
        bounds = [b.strip() for b in match.group(2).split(",") if b.strip()]
        if not bounds:
            out.append(debian)
        for bound in bounds:
            op, version = re.match(r"([<>=!~]=?)\s*(.+)", bound).groups()  # type: ignore[union-attr]
            op = {">=": ">=", "<": "<<", "<=": "<=", ">": ">>", "==": "="}.get(op)
            if op is None:
                raise SystemExit(f"package: cannot say {bound!r} in Debian's terms")
            out.append(f"{debian} ({op} {version})")
    return out + list(TOOLS)


def clean_tree(into: Path) -> None:
    """The checkout's tracked files, as they are in the work tree."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], check=True, capture_output=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if not source.exists():  # deleted, not yet committed
            continue
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)


def build_wheel(source: Path, into: Path) -> Path:
    """setuptools' wheel of ``source``, built by its PEP 517 backend in this Python."""
    code = (
        "import sys\nfrom setuptools import build_meta\n"
        "print(build_meta.build_wheel(sys.argv[1]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(into)],
        cwd=source, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit("package: the wheel did not build (python3-setuptools >= 64 and "
                         "python3-wheel are needed)")  # fmt: skip
    return into / done.stdout.strip().splitlines()[-1]


def console_scripts(dist_info: Path) -> dict[str, str]:
    """``[console_scripts]`` of the wheel's entry_points.txt: command -> ``module:function``."""
    scripts: dict[str, str] = {}
    section = ""
    for raw in (dist_info / "entry_points.txt").read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and section == "console_scripts":
            name, _, target = line.partition("=")
            scripts[name.strip()] = target.strip()
    return scripts


def command(target: str) -> str:
    """A console command. ``-I``: root's tool, run by the agent with the agent's environment,
    takes no module path or user site from it; the package's own directory comes first."""
    module, _, function = target.partition(":")
    return (
        "#!/usr/bin/python3 -I\n"
        "import sys\n\n"
        f'sys.path.insert(0, "/{PYTHON_LIBS}")\n\n'
        f"from {module} import {function}\n\n"
        'if __name__ == "__main__":\n'
        f"    sys.exit({function}())\n"
    )


def settings_file(source: Path) -> str:
    """/etc/default/cloudstack-nasbackup: every setting, commented out at its default."""
    # The table itself, from the tree being packaged (it imports only the standard library).
    spec = importlib.util.spec_from_file_location("settings", source / "shim/settings.py")
    if spec is None or spec.loader is None:
        raise SystemExit("package: shim/settings.py cannot be loaded")
    settings = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = settings  # dataclasses look their module up there
    spec.loader.exec_module(settings)
    lines = [
        "# Settings of the CloudStack NAS backup shim: NAME=value lines, read by the drop-in",
        "# nasbackup.sh the agent runs and by the socket service (its EnvironmentFile=). The",
        "# environment wins over this file. It must be root's and writable by nobody else.",
    ]
    for setting in settings.TABLE:
        lines += ["", f"# {setting.meaning}", f"#{setting.name}={setting.default}"]
    return "\n".join(lines) + "\n"


def copyright_file(project: dict[str, object]) -> str:
    """Debian's machine-readable copyright file, from pyproject's license."""
    license_ = project["license"]["text"]  # type: ignore[index]
    return (
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        f"Upstream-Name: {NAME}\n\n"
        f"Files: *\nCopyright: the {NAME} developers\nLicense: {license_}\n"
        f" On Debian systems the license is in /usr/share/common-licenses/{license_}.\n"
    )


def install(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    path.chmod(mode)


def control(project: dict[str, object], version: str, root: Path) -> str:
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) // 1024 + 1
    fields = {
        "Package": NAME,
        "Version": version,
        "Architecture": "all",
        "Maintainer": "cloudstack-nasbackup-shim developers <root@localhost>",
        "Installed-Size": str(size),
        "Depends": ", ".join(depends(list(project["dependencies"]))),  # type: ignore[call-overload]
        "Recommends": ", ".join(RECOMMENDS),
        "Enhances": "cloudstack-agent",
        "Section": "admin",
        "Priority": "optional",
        "Description": f"{project['description']}\n"
        " Takes the CloudStack KVM agent's nasbackup.sh over by a dpkg diversion (given back,\n"
        " byte for byte, on removal) and serves the agent's backup commands on a local socket.",
    }
    return "".join(f"{k}: {v}\n" for k, v in fields.items())


def build(out: Path, version: str | None) -> Path:
    """Builds the package into ``out``; returns its path."""
    with tempfile.TemporaryDirectory(prefix="shim-package.") as work_dir:
        work = Path(work_dir)
        source, root = work / "source", work / "root"
        clean_tree(source)
        project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
        version = version or project["version"]
        wheel = build_wheel(source, work / "wheel")
        libs = root / PYTHON_LIBS
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(libs)
        (dist_info,) = libs.glob("*.dist-info")
        (dist_info / "RECORD").unlink()  # dpkg's files: pip must not think them its own
        install(dist_info / "INSTALLER", "dpkg\n")
        for name, target in console_scripts(dist_info).items():
            install(root / "usr/bin" / name, command(target), 0o755)

        debian = source / "scripts/debian"
        install(
            root / f"usr/lib/systemd/system/{NAME}.service",
            (debian / f"{NAME}.service").read_bytes(),
        )
        install(root / "etc/default/cloudstack-nasbackup", settings_file(source))
        install(root / f"etc/logrotate.d/{NAME}", (debian / "logrotate").read_bytes())
        (root / "etc/cloudstack-nasbackup").mkdir(mode=0o700, parents=True)
        (root / "etc/cloudstack-nasbackup").chmod(0o700)  # the TCP listener's token goes here
        (root / "var/log/cloudstack-nasbackup").mkdir(parents=True)
        (root / "var/log/cloudstack-nasbackup").chmod(0o750)
        install(root / SHARE / "install-agent", (source / "scripts/install-agent").read_bytes(),
                0o755)  # fmt: skip
        install(root / SHARE / "lib/agent.sh", (source / "scripts/lib/agent.sh").read_bytes())
        install(root / f"usr/share/doc/{NAME}/README.md", (source / "README.md").read_bytes())
        install(root / f"usr/share/doc/{NAME}/copyright", copyright_file(project))

        meta = root / "DEBIAN"
        for script in ("postinst", "prerm", "postrm"):
            install(meta / script, (debian / script).read_bytes(), 0o755)
        install(meta / "triggers", (debian / "triggers").read_bytes())
        conffiles = sorted("/" + str(p.relative_to(root)) for p in (root / "etc").rglob("*")
                           if p.is_file())  # fmt: skip
        install(meta / "conffiles", "".join(f"{c}\n" for c in conffiles))
        sums = []
        for path in sorted(p for p in root.rglob("*") if p.is_file() and meta not in p.parents):
            if f"/{path.relative_to(root)}" in conffiles:  # dpkg keeps theirs itself
                continue
            digest = hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324 - dpkg's format
            sums.append(f"{digest}  {path.relative_to(root)}\n")
        install(meta / "md5sums", "".join(sums))
        install(meta / "control", control(project, version, root))

        out.mkdir(parents=True, exist_ok=True)
        deb = out / f"{NAME}_{version}_all.deb"
        subprocess.run(
            ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(deb)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        return deb


def main() -> None:
    parser = argparse.ArgumentParser(prog="package")
    parser.add_argument("--out", type=Path, default=REPO / "dist")
    parser.add_argument("--version", help="the package's version (default pyproject's)")
    args = parser.parse_args()
    # Reproducible: file times from the last commit, for setuptools' zip and dpkg-deb alike.
    if "SOURCE_DATE_EPOCH" not in os.environ:
        os.environ["SOURCE_DATE_EPOCH"] = subprocess.run(
            ["git", "-C", str(REPO), "log", "-1", "--format=%ct"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    print(build(args.out.resolve(), args.version))


if __name__ == "__main__":
    main()
