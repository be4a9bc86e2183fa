"""Bad inputs: each one is refused with one clear line, writes nothing, and echoes no secret.

Every scenario sends one bad value to the shim as its callers do: the drop-in
``scripts/nasbackup.sh`` with an argv list (its stdout read as the agent reads it), the
socket service on a temporary socket (in this process, the real engine behind it), or
``scripts/serve`` itself. Around a real lab VM and repository (with a full backup already
taken where the bad value names a parent), each checks the same three things:

* a clear one-line error: exit 1 and one line on stdout (argv the parser cannot read is
  followed by the usage, as upstream), nothing on stderr; or an HTTP 4xx with a JSON body
  ``{"error", "problems"}`` whose lines say what is wrong, and no engine call at all;
* nothing written outside what existed: the lab's directory (volumes, repository, backups)
  and the scenario's scratch directory (logs aside), the temporary directory's
  ``csbackup.*`` and the names the bad values aim at, the VMs' checkpoints, lock files of
  refused VM names, and no leak (:func:`tests.lab.leaks.leaks`);
* no secret echoed: the mount options' ``password=`` value (every scenario carries one) or
  the bearer token appears in no stdout, stderr, HTTP body or log.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import aiohttp

from commands.envelope import dump
from commands.model import (
    Command,
    DeleteBackupCommand,
    RebaseBackupCommand,
    TakeBackupCommand,
)
from shim.cli import MAX_ARGV_BYTES, USAGE
from shim.log import LOG_FILE_ENV
from shim.nas import Repository
from shim.runtime import LOCK_DIR
from shim.service import TcpAddress
from tests.lab.chains import disk_files, run_dropin
from tests.lab.harness import SERVE, Reply, Running, captured_log, running
from tests.lab.lab import Lab, LabVM, MiB
from tests.lab.leaks import leaks
from tests.lab.scenarios import Scenario

ESCAPE = "nasbackup-escape"
"""Where the '..' values aim: ``$TMPDIR/nasbackup-escape*`` must never appear."""
FIRST_BACKUP = "2026.11.01.00.00.00"
NEW_BACKUP = "2026.11.02.00.00.00"


# -- the VM, the repository and the values of a valid request ------------------------------------
@dataclass
class Setup:
    """A scenario's world: a lab VM, a repository whose mount options carry a secret, and
    the valid requests a bad value is put into."""

    lab: Lab
    scratch: Path
    secret: str
    repo: Repository
    vm: LabVM | None = None
    parent: str | None = None
    """The full backup taken first (``<vm>/<FIRST_BACKUP>``), when the scenario needs one."""
    parent_files: list[str] = field(default_factory=list)
    """That backup's disk files, mount-relative, in disk order."""

    @property
    def log(self) -> Path:
        """The shim's log for this scenario."""
        return self.scratch / "agent.log"

    @property
    def repo_dir(self) -> Path:
        """The repository's exported directory."""
        return Path(self.repo.address)

    @property
    def vm_name(self) -> str:
        """The VM's name (a placeholder when the scenario has no VM)."""
        return self.vm.name if self.vm is not None else "i-2-3-VM"

    @property
    def new_path(self) -> str:
        """A backup path that does not exist yet."""
        return f"{self.vm_name}/{NEW_BACKUP}"

    # -- argv ---------------------------------------------------------------------------------
    def repo_pairs(self) -> list[tuple[str, str]]:
        """``-t -s -m`` of the repository."""
        return [("-t", self.repo.type), ("-s", self.repo.address), ("-m", self.repo.options)]

    def pairs(self, operation: str) -> list[tuple[str, str]]:
        """A valid argv for ``operation``, as (option, value) pairs in the agent's order.

        ``full`` and ``incremental`` are backups as the final generation sends them; the
        others name the parent backup (or its root disk's file).
        """
        parent = self.parent or f"{self.vm_name}/{FIRST_BACKUP}"
        if operation in ("full", "incremental"):
            pairs = [("-o", "backup"), ("-v", self.vm_name), *self.repo_pairs()]
            pairs += [("-p", self.new_path), ("-q", "false"), ("-d", "")]
            pairs += [("-M", operation), ("--bitmap-new", "backup-2")]
            if operation == "incremental":
                pairs += [("--bitmap-parent", "backup-1")]
                pairs += [("--parent-paths", ",".join(self.parent_files))]
            return pairs
        pairs = [("-o", operation), *self.repo_pairs()]
        if operation == "rebase":
            file = self.parent_files[0] if self.parent_files else f"{parent}/root.qcow2"
            return [*pairs, ("--rebase-target", file), ("--rebase-new-backing", file)]
        pairs += [("-p", parent)]
        if operation == "restore":
            pairs += [("--restore-volume-paths", str(self.scratch / "restored.qcow2"))]
        return pairs

    def argv(self, operation: str, changes: Mapping[str, str | None]) -> list[str]:
        """The valid argv of ``operation`` with ``changes`` (option -> value, None: drop)."""
        argv: list[str] = []
        for option, value in self.pairs(operation):
            new = changes.get(option, value)
            if new is not None:
                argv += [option, new]
        present = {option for option, _ in self.pairs(operation)}
        for option, change in changes.items():
            if option not in present and change is not None:
                argv += [option, change]
        return argv

    # -- envelopes ----------------------------------------------------------------------------
    def command(self, kind: str) -> Command:
        """A valid command: ``take`` (a full, or an incremental after the parent),
        ``delete`` or ``rebase`` of the parent backup."""
        parent = self.parent or f"{self.vm_name}/{FIRST_BACKUP}"
        if kind == "delete":
            return DeleteBackupCommand(
                backup_path=parent,
                backup_repo_type=self.repo.type,
                backup_repo_address=self.repo.address,
                mount_options=self.repo.options,
            )
        if kind == "rebase":
            file = self.parent_files[0] if self.parent_files else f"{parent}/root.qcow2"
            return RebaseBackupCommand(
                target_path=file,
                new_backing_path=file,
                backup_repo_type=self.repo.type,
                backup_repo_address=self.repo.address,
                mount_options=self.repo.options,
            )
        return TakeBackupCommand(
            vm_name=self.vm_name,
            backup_path=self.new_path,
            quiesce=False,
            mode="incremental" if self.parent else "full",
            bitmap_new="backup-2",
            bitmap_parent="backup-1" if self.parent else None,
            parent_paths=list(self.parent_files) if self.parent else None,
            backup_repo_type=self.repo.type,
            backup_repo_address=self.repo.address,
            mount_options=self.repo.options,
        )

    def envelope(self, kind: str = "take", **changes: Any) -> bytes:
        """The JSON body of a valid ``kind`` command with ``changes`` (wire names)."""
        ((class_name, body),) = dump([self.command(kind)])[0].items()
        return json.dumps([{class_name: {**body, **changes}}]).encode()


@dataclass
class _World:
    """A repository, and a VM with its parent backup where asked: what scenarios that only
    read them can share within one lab (each still checks that it changed nothing)."""

    address: str
    vm: LabVM | None
    parent: str | None
    parent_files: list[str]


_WORLDS: dict[tuple[str, bool, bool], _World] = {}


def _setup(
    lab: Lab, scratch: Path, *, vm: bool = True, parent: bool = False, shared: bool = True
) -> Setup:
    """A scenario's world: shared with earlier scenarios of the same lab that asked for the
    same (a VM, a parent backup) unless ``shared`` is False (a scenario that arranges the
    repository itself). The mount options' secret is the scenario's own either way."""
    secret = f"S3cr3t{secrets.token_hex(8)}"
    key = (str(lab.dir), vm or parent, parent)
    world = _WORLDS.get(key) if shared else None
    if world is None:
        repo = lab.repository()
        setup = Setup(
            lab, scratch, secret, Repository(repo.type, repo.address, f"bind,password={secret}")
        )
        if vm or parent:
            setup.vm = lab.create_vm(disks=(8 * MiB,))
            setup.vm.write(0, 0, 1 * MiB, pattern=0x42)
        if parent:
            _take_parent(setup)
        world = _World(repo.address, setup.vm, setup.parent, setup.parent_files)
        if shared:
            _WORLDS[key] = world
        return setup
    options = f"bind,password={secret}"
    return Setup(
        lab,
        scratch,
        secret,
        Repository("none", world.address, options),
        vm=world.vm,
        parent=world.parent,
        parent_files=list(world.parent_files),
    )


def _take_parent(setup: Setup) -> None:
    """A real full backup with checkpoint ``backup-1``: the parent the bad values name."""
    name = setup.vm_name
    argv = setup.argv("full", {"-p": f"{name}/{FIRST_BACKUP}", "--bitmap-new": "backup-1"})
    run = run_dropin(argv, log_file=setup.scratch / "setup.log")
    if run.returncode != 0:
        raise AssertionError(f"the parent backup failed: {run.stdout.strip()}")
    setup.parent = f"{name}/{FIRST_BACKUP}"
    assert setup.vm is not None
    setup.parent_files = [
        str(f.relative_to(setup.repo_dir))
        for f in disk_files(setup.repo_dir, setup.parent, setup.vm)
    ]


# -- what must not change ------------------------------------------------------------------------
def _tree(root: Path, skip: Callable[[Path], bool] = lambda _p: False) -> dict[str, object]:
    """Every entry under ``root`` (not following symlinks): files by size and mtime."""
    found: dict[str, object] = {}
    if not root.exists():
        return found
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(directory, name)
            if skip(path):
                continue
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                found[str(path)] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                found[str(path)] = ("file", st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
            else:
                found[str(path)] = ("other", stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))
    return found


@dataclass
class Witness:
    """A picture of everything a refused request must leave as it was."""

    setup: Setup
    watch: Sequence[Path] = ()
    """Paths outside the lab and scratch directories that the bad values name."""
    before: dict[str, object] = field(default_factory=dict)

    def picture(self) -> dict[str, object]:
        """The lab's and scratch's trees (logs aside), the temporary directory's
        ``csbackup.*`` and escape targets, the watched paths and every VM's checkpoints."""
        tmp = Path(tempfile.gettempdir())
        seen = {
            **_tree(self.setup.lab.dir),
            **_tree(self.setup.scratch, skip=lambda p: p.suffix == ".log"),
        }
        for entry in tmp.iterdir():
            if entry.name.startswith(("csbackup.", ESCAPE)):
                seen[str(entry)] = "present"
        for path in self.watch:
            seen[f"watched {path}"] = _tree(path) if path.is_dir() else path.exists()
        for vm in self.setup.lab.vms:
            seen[f"checkpoints of {vm.name}"] = vm.checkpoints()
        return seen

    def __enter__(self) -> Witness:
        self.before = self.picture()
        return self

    def __exit__(self, *_exc: object) -> None:
        pass

    def changes(self) -> list[str]:
        """What differs from the picture taken on entry, and what leaked."""
        after = self.picture()
        changed = [
            f"{key} {_how(key, self.before, after)}"
            for key in sorted(set(self.before) | set(after))
            if self.before.get(key) != after.get(key)
        ]
        return changed + [f"leaked: {leak}" for leak in leaks(self.setup.lab)]


def _how(key: str, before: Mapping[str, object], after: Mapping[str, object]) -> str:
    if key not in before:
        return "appeared"
    return "disappeared" if key not in after else "changed"


# -- the three properties ------------------------------------------------------------------------
def _one_line(text: str) -> bool:
    return bool(text.strip()) and "\n" not in text.strip()


def refused_by_dropin(stdout: str, stderr: str, returncode: int, expect: str) -> list[str]:
    """Exit 1, one line on stdout saying ``expect`` (then only the usage), no stderr."""
    problems = []
    if returncode != 1:
        problems.append(f"exit {returncode}, not 1")
    first, _, rest = stdout.partition("\n")
    if not first.strip() or expect not in first:
        problems.append(f"stdout's first line {first!r} does not say {expect!r}")
    if rest and rest != USAGE:
        problems.append(f"more than one line on stdout: {stdout!r}")
    if stderr:
        problems.append(f"stderr: {stderr!r}")
    return problems


def refused_by_service(reply: Reply, expect: str, status: int = 400) -> list[str]:
    """HTTP ``status`` (a 4xx), a JSON ``{"error", "problems"}`` body of one-line messages,
    ``expect`` in the error or one of the problems."""
    problems = []
    if reply.status != status:
        problems.append(f"HTTP {reply.status}, not {status}")
    if reply.content_type != "application/json":
        problems.append(f"a {reply.content_type} body: {reply.text[:200]!r}")
        return problems
    try:
        body = json.loads(reply.text)
    except ValueError:
        return [*problems, f"the body is not JSON: {reply.text[:200]!r}"]
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return [*problems, f"no error in the body: {reply.text[:200]!r}"]
    messages = [body["error"], *(p.get("message", "") for p in body.get("problems", []))]
    if not all(_one_line(m) for m in messages):
        problems.append(f"an error of several lines: {messages!r}")
    if not any(expect in m for m in messages):
        problems.append(f"the body {reply.text[:300]!r} does not say {expect!r}")
    return problems


def echoes(secrets_: Iterable[str], **texts: str) -> list[str]:
    """Which of ``texts`` (by name) show a secret, or a traceback."""
    found = []
    for name, text in texts.items():
        found += [f"{name} shows a secret" for secret in secrets_ if secret and secret in text]
        if "Traceback" in text:
            found.append(f"{name} shows a traceback")
    return found


def verdict(problems: Sequence[str]) -> None:
    """Raise an AssertionError naming every problem, on one line."""
    if problems:
        raise AssertionError("; ".join(problems))


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# -- the drop-in ---------------------------------------------------------------------------------
Changes = Callable[[Setup], Mapping[str, Optional[str]]]
Prepare = Callable[[Setup], Sequence[Path]]


def dropin(
    name: str,
    operation: str,
    changes: Changes,
    expect: str,
    *,
    parent: bool = False,
    prepare: Prepare | None = None,
) -> Scenario:
    """The valid argv of ``operation`` with ``changes``, run through ``scripts/nasbackup.sh``.

    ``prepare`` arranges the repository (symlinks) and returns paths outside the lab to
    watch. A parent backup is taken first for incrementals and with ``parent``.
    """

    def run(lab: Lab, scratch: Path) -> None:
        setup = _setup(
            lab, scratch, parent=parent or operation == "incremental", shared=prepare is None
        )
        watch = list(prepare(setup)) if prepare else []
        given = changes(setup)
        argv = setup.argv(operation, given)
        vm_name = given.get("-v")
        vm_names = [vm_name] if vm_name else []
        watch += [LOCK_DIR / f"{vm}.lock" for vm in vm_names if "/" not in vm]
        with Witness(setup, watch) as witness:
            done = run_dropin(argv, log_file=setup.log)
        verdict(
            refused_by_dropin(done.stdout, done.stderr, done.returncode, expect)
            + witness.changes()
            + echoes([setup.secret], stdout=done.stdout, stderr=done.stderr, log=_read(setup.log))
        )

    return Scenario(name, run, live_backup=operation in ("full", "incremental"))


def _outside(setup: Setup, link: Path) -> list[Path]:
    """A directory outside the repository holding a file, and ``link`` pointing to it."""
    outside = setup.scratch / "outside"
    (outside / NEW_BACKUP).mkdir(parents=True)
    (outside / NEW_BACKUP / "keep").write_text("not the repository's\n")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    return [outside]


def _escape_link(setup: Setup) -> list[Path]:
    return _outside(setup, setup.repo_dir / "escape")


def _vm_dir_link(setup: Setup) -> list[Path]:
    return _outside(setup, setup.repo_dir / setup.vm_name)


def _link_in_vm_dir(setup: Setup) -> list[Path]:
    return _outside(setup, setup.repo_dir / setup.vm_name / "linked")


def _backup_link(setup: Setup) -> list[Path]:
    return _outside(setup, setup.repo_dir / setup.new_path)


OTHER_VM = "i-2-999999-VM"
"""A VM whose directory the repository holds: a backup, and what a sweep would remove."""


def _other_vm_dir(setup: Setup) -> list[Path]:
    """Another VM's directory: one backup, and an interrupted delete's leftover (which a
    sweep of leftovers removes; a ``.partial`` would count as a leak of this lab)."""
    for name in (FIRST_BACKUP, f".{FIRST_BACKUP}.deleting"):
        (setup.repo_dir / OTHER_VM / name).mkdir(parents=True)
        (setup.repo_dir / OTHER_VM / name / "root.x.qcow2").write_text("x\n")
    return []


def _escaping(setup: Setup) -> str:
    """A '..' path from the mount root into the temporary directory."""
    return f"{setup.vm_name}/../../{ESCAPE}-{setup.secret[-4:]}"


def _absolute(setup: Setup, relative: str) -> str:
    """The absolute path of a repository path (what an attacker would name)."""
    return str(setup.repo_dir / relative)


def _parent_root(setup: Setup) -> str:
    return setup.parent_files[0]


PATHS = [
    dropin("-p with '..'", "full", lambda s: {"-p": _escaping(s)}, "may not contain '..'"),
    dropin(
        "-p absolute",
        "full",
        lambda s: {"-p": str(s.scratch / "absolute" / NEW_BACKUP)},
        "must be relative",
    ),
    dropin(
        "--parent-paths with '..'",
        "incremental",
        lambda s: {"--parent-paths": f"{_escaping(s)}/root.qcow2"},
        "may not contain '..'",
    ),
    dropin(
        "--parent-paths absolute",
        "incremental",
        lambda s: {"--parent-paths": _absolute(s, _parent_root(s))},
        "must be relative",
    ),
    dropin(
        "--parent-path with '..'",
        "incremental",
        lambda s: {"--parent-paths": None, "--parent-path": _escaping(s)},
        "may not contain '..'",
    ),
    dropin(
        "--parent-path absolute",
        "incremental",
        lambda s: {"--parent-paths": None, "--parent-path": _absolute(s, s.parent or "")},
        "must be relative",
    ),
    dropin(
        "--rebase-target with '..'",
        "rebase",
        lambda s: {"--rebase-target": f"{_escaping(s)}/root.qcow2"},
        "may not contain '..'",
        parent=True,
    ),
    dropin(
        "--rebase-target absolute",
        "rebase",
        lambda s: {"--rebase-target": _absolute(s, _parent_root(s))},
        "must be relative",
        parent=True,
    ),
    dropin(
        "--rebase-new-backing with '..'",
        "rebase",
        lambda s: {"--rebase-new-backing": f"{s.vm_name}/../../../etc/passwd"},
        "may not contain '..'",
        parent=True,
    ),
    dropin(
        "--rebase-new-backing absolute",
        "rebase",
        lambda s: {"--rebase-new-backing": "/etc/passwd"},
        "must be relative",
        parent=True,
    ),
    dropin(
        "delete -p with '..'",
        "delete",
        lambda s: {"-p": f"{s.parent}/../../{s.parent}"},
        "may not contain '..'",
        parent=True,
    ),
    dropin(
        "delete -p absolute",
        "delete",
        lambda s: {"-p": _absolute(s, s.parent or "")},
        "must be relative",
        parent=True,
    ),
    dropin(
        "restore -p with '..'",
        "restore",
        lambda s: {"-p": f"{s.vm_name}/../../{s.parent}"},
        "may not contain '..'",
        parent=True,
    ),
    dropin(
        "restore --backup-files with '..'",
        "restore",
        lambda s: {"--backup-files": "../../../etc/shadow"},
        "may not contain '..'",
        parent=True,
    ),
    dropin(
        "verify -p absolute",
        "verify",
        lambda s: {"-p": _absolute(s, s.parent or "")},
        "must be relative",
        parent=True,
    ),
]

LINK_REFUSED = "a symbolic link"
"""What a path through a link is refused with: the gate follows none, wherever it leads."""

SYMLINKS = [
    dropin(
        "-p through a symlink out of the repository",
        "full",
        lambda _s: {},
        LINK_REFUSED,
        prepare=_backup_link,
    ),
    dropin(
        "the VM's directory a symlink out of the repository",
        "full",
        lambda _s: {},
        LINK_REFUSED,
        prepare=_vm_dir_link,
    ),
    dropin(
        "--parent-paths through a symlink out of the repository",
        "incremental",
        lambda s: {"--parent-paths": f"{s.vm_name}/linked/{NEW_BACKUP}/keep"},
        LINK_REFUSED,
        prepare=_link_in_vm_dir,
    ),
    dropin(
        "delete through a symlink out of the repository",
        "delete",
        lambda _s: {"-p": f"escape/{NEW_BACKUP}"},
        LINK_REFUSED,
        prepare=_escape_link,
    ),
    dropin(
        "rebase through a symlink out of the repository",
        "rebase",
        lambda _s: {
            "--rebase-target": f"escape/{NEW_BACKUP}/keep",
            "--rebase-new-backing": f"escape/{NEW_BACKUP}/keep",
        },
        LINK_REFUSED,
        parent=True,
        prepare=_escape_link,
    ),
    dropin(
        "verify through a symlink out of the repository",
        "verify",
        lambda s: {"-p": f"{s.vm_name}/linked"},
        LINK_REFUSED,
        parent=True,
        prepare=_link_in_vm_dir,
    ),
]

NOT_THE_VMS = "is not a backup of VM"
"""What a backup path that is not ``<vm>/<name>`` (``-v``'s VM) is refused with."""

OWNERSHIP = [
    dropin(
        "-p in another VM's directory",
        "full",
        lambda _s: {"-p": f"{OTHER_VM}/{NEW_BACKUP}"},
        NOT_THE_VMS,
        prepare=_other_vm_dir,
    ),
    dropin(
        "-p in a directory named like no VM",
        "full",
        lambda _s: {"-p": f"backups/{NEW_BACKUP}"},
        NOT_THE_VMS,
    ),
    dropin("-p the VM's directory itself", "full", lambda s: {"-p": s.vm_name}, NOT_THE_VMS),
    dropin(
        "-p below a backup of the VM",
        "full",
        lambda s: {"-p": f"{s.new_path}/nested"},
        NOT_THE_VMS,
    ),
    dropin(
        "-p of another VM for an incremental",
        "incremental",
        lambda _s: {"-p": f"{OTHER_VM}/{NEW_BACKUP}"},
        NOT_THE_VMS,
        prepare=_other_vm_dir,
    ),
]

OPTION_LIKE = [
    dropin(
        "-m '-o remount'",
        "full",
        lambda s: {"-m": f"-o remount,password={s.secret}"},
        "invalid mount options: they may not start with '-'",
    ),
    dropin("VM name '-rf'", "full", lambda _s: {"-v": "-rf"}, "invalid VM name: '-rf'"),
    dropin("VM name '--help'", "full", lambda _s: {"-v": "--help"}, "invalid VM name: '--help'"),
    dropin("-s '-oremount'", "full", lambda _s: {"-s": "-oremount"}, "invalid repository address"),
    dropin("-t '--bind'", "full", lambda _s: {"-t": "--bind"}, "invalid repository type"),
]

CONTROL = [
    dropin(
        "newline in -p",
        "full",
        lambda s: {"-p": f"{s.new_path}\nx"},
        "invalid value for -p: control characters",
    ),
    dropin(
        "newline in -m with a password",
        "full",
        lambda s: {"-m": f"bind,password={s.secret}\nuser=x"},
        "invalid value for -m: control characters",
    ),
    dropin(
        "carriage return in -v",
        "full",
        lambda s: {"-v": f"{s.vm_name}\r"},
        "invalid value for -v: control characters",
    ),
    dropin(
        "newline in --parent-paths",
        "incremental",
        lambda s: {"--parent-paths": f"{_parent_root(s)}\n"},
        "invalid value for --parent-paths: control characters",
    ),
]


def _bitmap_new(value: str) -> Changes:
    """The change giving ``--bitmap-new`` the value ``value``."""
    return lambda _s: {"--bitmap-new": value}


MODES = [
    dropin("-M differential", "full", lambda _s: {"-M": "differential"}, "Unknown backup mode"),
    dropin("-o explode", "full", lambda _s: {"-o": "explode"}, "Invalid operation: explode"),
    dropin("-q yes", "full", lambda _s: {"-q": "yes"}, "-q takes true or false, not 'yes'"),
]

BITMAPS = [
    dropin(
        f"--bitmap-new {label}",
        "full",
        _bitmap_new(value),
        "invalid bitmap name",
    )
    for label, value in (
        ("with '/'", "backup/2"),
        ("with '<'", "backup<2>"),
        ("with a double quote", 'backup"2'),
        ("with a single quote", "backup'2"),
        ("with a leading '-'", "-backup-2"),
        ("over 1023 bytes", "b" * 1024),
    )
] + [
    dropin(
        "--bitmap-parent with '/'",
        "incremental",
        lambda _s: {"--bitmap-parent": "../backup-1"},
        "invalid bitmap name",
    )
]


def _huge(setup: Setup) -> Mapping[str, str]:
    # Each value under the kernel's 128 KiB per argument; together beyond the drop-in's limit.
    third = MAX_ARGV_BYTES // 3 + 1024
    return {"-p": setup.new_path + "x" * third, "-d": "y" * third, "--bitmap-new": "z" * third}


HUGE = [dropin("argv beyond the limit", "full", _huge, "argument list too long")]


# -- the service ---------------------------------------------------------------------------------
Body = Callable[[Setup], Any]


def service(
    name: str,
    body: Body,
    expect: str,
    *,
    vm: bool = True,
    parent: bool = False,
    headers: Mapping[str, str] | None = None,
) -> Scenario:
    """POST ``body`` (bytes, or an async iterator of chunks) to ``/v1/commands`` over the
    Unix socket of a service running in this process."""

    def run(lab: Lab, scratch: Path) -> None:
        setup = _setup(lab, scratch, vm=vm, parent=parent)

        async def send(svc: Running) -> Reply:
            return await svc.raw(
                "POST",
                "/v1/commands",
                data=body(setup),
                headers={"Content-Type": "application/json", **(headers or {})},
            )

        verdict(_through_service(setup, send, expect))

    return Scenario(name, run)


def _through_service(
    setup: Setup,
    send: Callable[[Running], Any],
    expect: str,
    *,
    status: int = 400,
    config: Mapping[str, Any] | None = None,
    secrets_: Sequence[str] = (),
) -> list[str]:
    """Start the service, send, check the reply, the engine, the files, the log."""
    service_log = setup.scratch / "service.log"

    async def exchange() -> list[str]:
        async with running(setup.scratch, **(config or {})) as svc:
            with Witness(setup) as witness:
                reply = await send(svc)
            scheduler = svc.service.scheduler
            busy = scheduler is not None and bool(scheduler.in_flight())
            ran = [f"the engine ran {len(svc.engine.calls)} time(s)"] if svc.engine.calls else []
            return (
                refused_by_service(reply, expect, status)
                + ran
                + (["a job is in flight"] if busy else [])
                + witness.changes()
                + echoes([setup.secret, *secrets_], body=reply.text)
            )

    with captured_log(service_log):
        problems = asyncio.run(exchange())
    return problems + echoes([setup.secret, *secrets_], log=_read(service_log))


def _body_of_size(setup: Setup, size: int) -> bytes:
    head = setup.envelope(mountOptions=setup.repo.options)[:-3] + b', "contextMap": {"pad": "'
    tail = b'"}}}]'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def _chunks(data: bytes, size: int = 1024 * 1024) -> Any:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def _deep_field(setup: Setup, levels: int) -> bytes:
    """A valid envelope with one more field, nested ``levels`` deep."""
    return setup.envelope(deep=0).replace(b'"deep": 0', b'"deep": ' + _deep(levels))


PATHS += [
    service(
        "backupPath with '..' over the socket",
        lambda s: s.envelope(backupPath=_escaping(s)),
        "may not contain '..'",
    ),
    service(
        "parentPaths absolute over the socket",
        lambda s: s.envelope(parentPaths=[_absolute(s, _parent_root(s))]),
        "must be relative",
        parent=True,
    ),
    service(
        "parentPath with '..' over the socket",
        lambda s: s.envelope(parentPaths=None, parentPath=_escaping(s)),
        "may not contain '..'",
        parent=True,
    ),
    service(
        "delete backupPath absolute over the socket",
        lambda s: s.envelope("delete", backupPath=_absolute(s, s.parent or "")),
        "must be relative",
        parent=True,
    ),
    service(
        "rebase targetPath with '..' over the socket",
        lambda s: s.envelope("rebase", targetPath=f"{_escaping(s)}/root.qcow2"),
        "may not contain '..'",
        parent=True,
    ),
]

OWNERSHIP += [
    service(
        "backupPath of another VM over the socket",
        lambda s: s.envelope(backupPath=f"{OTHER_VM}/{NEW_BACKUP}"),
        NOT_THE_VMS,
    ),
    service(
        "backupPath below a backup of the VM over the socket",
        lambda s: s.envelope(backupPath=f"{s.new_path}/nested"),
        NOT_THE_VMS,
    ),
]

OPTION_LIKE += [
    service("vmName '-rf' over the socket", lambda s: s.envelope(vmName="-rf"), "invalid VM name"),
    service(
        "mountOptions '-o remount' over the socket",
        lambda s: s.envelope(mountOptions=f"-o remount,password={s.secret}"),
        "invalid mount options",
    ),
]

CONTROL += [
    service(
        "NUL in vmName",
        lambda s: s.envelope(vmName=f"{s.vm_name}\0"),
        "invalid VM name: control characters",
    ),
    service(
        "NUL in backupPath",
        lambda s: s.envelope(backupPath=f"{s.new_path}\0x"),
        "backup path contains a control character",
    ),
    service(
        "NUL in mountOptions with a password",
        lambda s: s.envelope(mountOptions=f"bind,password={s.secret}\0"),
        "mount options contains a control character",
    ),
    service(
        "newline in parentPaths",
        lambda s: s.envelope(parentPaths=[f"{_parent_root(s)}\n"]),
        "parent path contains a control character",
        parent=True,
    ),
    service(
        "newline in bitmapNew",
        lambda s: s.envelope(bitmapNew="backup-2\nx"),
        "invalid bitmap name",
    ),
]

MODES += [
    service(
        "mode 'differential' over the socket",
        lambda s: s.envelope(mode="differential"),
        "Unknown backup mode: differential",
    )
]

BITMAPS += [
    service(
        "bitmapNew with '&' over the socket",
        lambda s: s.envelope(bitmapNew="backup&2"),
        "invalid bitmap name",
    )
]

JSON_BODIES = [
    service("malformed JSON", lambda _s: b'[{"x": ', "malformed JSON", vm=False),
    service(
        "truncated JSON",
        lambda s: s.envelope()[: len(s.envelope()) // 2],
        "malformed JSON",
    ),
    service("JSON nested 100 000 levels", lambda _s: _deep(100_000), "nested too deeply", vm=False),
    # Within what json's decoder takes, beyond what the schemas' recursion would.
    service(
        "JSON nested 990 levels in a field", lambda s: _deep_field(s, 990), "nested too deeply"
    ),
    service("JSON nested 40 levels in a field", lambda s: _deep_field(s, 40), "nested too deeply"),
    service(
        "100 MB of JSON",
        lambda s: _body_of_size(s, 100 * 1024 * 1024),
        "request body too large",
    ),
    service(
        "100 MB of JSON, chunked",
        lambda s: _chunks(_body_of_size(s, 100 * 1024 * 1024)),
        "request body too large",
    ),
    service("wait as a string", lambda s: s.envelope(wait="0"), "Not a valid integer."),
    service("vmName as a number", lambda s: s.envelope(vmName=3), "Not a valid string."),
    service(
        "parentPaths as a string",
        lambda s: s.envelope(parentPaths=",".join(s.parent_files)),
        "Not a valid list.",
        parent=True,
    ),
    service("quiesce as a string", lambda s: s.envelope(quiesce="true"), "Not a valid boolean."),
    service(
        "unknown class",
        lambda s: s.envelope().replace(b"TakeBackupCommand", b"StopCommand"),
        "unknown command class",
    ),
]


# -- the TCP listener's token --------------------------------------------------------------------
def tcp(name: str, authorization: Callable[[str], str | None]) -> Scenario:
    """A valid envelope over the TCP listener with ``authorization(token)`` as the
    Authorization header (None: no header): 401, JSON, and no token echoed."""

    def run(lab: Lab, scratch: Path) -> None:
        setup = _setup(lab, scratch)
        token = secrets.token_urlsafe(24)
        header = authorization(token)

        async def send(svc: Running) -> Reply:
            assert svc.service.tcp_address is not None
            host, port = svc.service.tcp_address
            headers = {"Content-Type": "application/json"}
            if header is not None:
                headers["Authorization"] = header
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"http://{host}:{port}/v1/commands", data=setup.envelope(), headers=headers
                ) as reply,
            ):
                return Reply(reply.status, reply.content_type, await reply.text())

        given = (header or "").removeprefix("Bearer ")
        verdict(
            _through_service(
                setup,
                send,
                "a valid bearer token is required",
                status=401,
                config={"tcp": TcpAddress("127.0.0.1", 0), "token": token},
                secrets_=[token, given],
            )
        )

    return Scenario(name, run)


TOKENS = [
    tcp("TCP request without a token", lambda _token: None),
    tcp("TCP request with a wrong token", lambda _token: f"Bearer {secrets.token_urlsafe(24)}"),
    tcp("TCP request with the token but not as Bearer", lambda token: token),
]


# -- scripts/serve refusing to start -------------------------------------------------------------
def refused_start(name: str, arrange: Callable[[Setup], list[str]], expect: str) -> Scenario:
    """``scripts/serve`` with what ``arrange`` made (it returns serve's arguments) refuses
    to start: exit 1, one line on stderr, nothing on stdout, nothing changed."""

    def run(lab: Lab, scratch: Path) -> None:
        setup = _setup(lab, scratch, vm=False)
        args = arrange(setup)
        env = {**os.environ, LOG_FILE_ENV: str(setup.log)}
        with Witness(setup) as witness:
            try:
                done = subprocess.run(
                    [str(SERVE), *args],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=60,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                verdict(["scripts/serve started (it ran for 60 s)"])
                return
        problems = [] if done.returncode == 1 else [f"exit {done.returncode}, not 1"]
        if done.stdout:
            problems.append(f"stdout: {done.stdout!r}")
        if not _one_line(done.stderr) or expect not in done.stderr:
            problems.append(f"stderr {done.stderr!r} does not say {expect!r} on one line")
        verdict(
            problems
            + witness.changes()
            + echoes([setup.secret], stderr=done.stderr, log=_read(setup.log))
        )

    return Scenario(name, run)


def _run_dir(setup: Setup, mode: int = 0o700) -> Path:
    run_dir = setup.scratch / "run"
    run_dir.mkdir()
    run_dir.chmod(mode)
    return run_dir


def _stale_socket(setup: Setup, mode: int) -> list[str]:
    path = _run_dir(setup) / "shim.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    path.chmod(mode)
    return ["--socket", str(path)]


def _loose_token(setup: Setup) -> list[str]:
    token = setup.scratch / "token"
    token.write_text(setup.secret + "\n")
    token.chmod(0o644)
    path = _run_dir(setup) / "shim.sock"
    return ["--socket", str(path), "--tcp", "127.0.0.1:0", "--token-file", str(token)]


PERMISSIONS = [
    refused_start(
        "socket file with mode 0666",
        lambda s: _stale_socket(s, 0o666),
        "has loose permissions (mode 0666)",
    ),
    refused_start(
        "socket file with mode 0660",
        lambda s: _stale_socket(s, 0o660),
        "has loose permissions (mode 0660)",
    ),
    refused_start(
        "socket directory with mode 0777",
        lambda s: ["--socket", str(_run_dir(s, 0o777) / "shim.sock")],
        "has loose permissions (mode 0777)",
    ),
    refused_start("token file with mode 0644", _loose_token, "has loose permissions (mode 0644)"),
]

BAD_INPUTS: list[Scenario] = [
    *PATHS,
    *SYMLINKS,
    *OWNERSHIP,
    *OPTION_LIKE,
    *CONTROL,
    *MODES,
    *BITMAPS,
    *HUGE,
    *JSON_BODIES,
    *TOKENS,
    *PERMISSIONS,
]
"""Every bad input, each refused as the module's docstring says."""
