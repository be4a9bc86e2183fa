"""The NAS mount session: every operation reaches the repository through one of these.

A session makes a fresh ``csbackup.XXXXX`` directory, mounts ``-t TYPE ADDR`` on it with
options ``OPTS`` (``nobrl`` appended for cifs), and on every way out unmounts with a timeout
and removes the directory. No secret of the options is ever on a command line, where ``ps``
shows it to every user of the host: ``mount`` is given a one-line fstab of its own
(``mount -T FILE DIR``, 0600 in a root-only directory, removed once it returns), and the
credentials a mount helper would get on its own command line go to the file that helper
reads instead (cifs: ``credentials=``; ceph: ``secretfile=``). A password may hold a comma
written ``,,``, as mount.cifs reads it. Everything in the repository is reached through
the gate (:meth:`MountSession.vm_directory`, :mod:`shim.gate`), from a descriptor of the
mount point held while it is mounted; those descriptors are closed before it is unmounted.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from shim import proc
from shim.compat import strict_zip
from shim.errors import Aborted, CleanupFailed, CommandFailed, InputError, MountError
from shim.gate import VmDirectory, split_vm
from shim.runtime import MOUNT_REGISTRY, pid_alive

log = logging.getLogger(__name__)

UNMOUNT_TIMEOUT_SECONDS = 60
MOUNT_TIMEOUT_SECONDS = 120
"""How long a mount may take when the caller does not say (``Repository.mount_timeout``)."""
MAX_MOUNT_TIMEOUT_SECONDS = 7 * 24 * 3600
"""Beyond this a timeout is surely a mistake (and overflows the poll() of the wait)."""

_FSTYPE = re.compile(r"^[a-z0-9][a-z0-9._+-]*$")
# Option keys whose values are credentials or name them: never logged.
_SECRET_KEYS = frozenset(
    {
        "password",
        "password2",
        "pass",
        "passwd",
        "username",
        "user",
        "credentials",
        "cred",
        "secret",
        "secretfile",
        "sec",
        "domain",
        "dom",
        "workgroup",
        "token",
        "key",
    }
)


_CONFINED = ("nodev", "nosuid", "noexec")
_ALLOWING = ("dev", "suid", "exec")
"""Options that would undo :data:`_CONFINED`: dropped."""


def _reject_control(value: str, what: str) -> None:
    if "\0" in value or "\n" in value or "\r" in value:
        raise InputError(f"{what} contains a control character")


def validate_relative(relative: str, what: str = "path") -> None:
    """Refuse, without touching anything, a caller's path that is empty, absolute, holds a
    ``..`` component or a control character (symlinks are checked once mounted)."""
    if not relative or not relative.strip("/."):
        raise InputError(f"{what} is empty")
    _reject_control(relative, what)
    if relative.startswith("/"):
        raise InputError(f"{what} must be relative to the repository: {relative}")
    if ".." in Path(relative).parts:
        raise InputError(f"{what} may not contain '..': {relative}")


@dataclass(frozen=True)
class Repository:
    """A backup repository as the agent names it: ``-t TYPE -s ADDRESS -m OPTIONS``, and
    the downstream generation's ``-w SECONDS`` (how long mounting it may take)."""

    type: str
    address: str
    options: str = ""
    mount_timeout: int | None = None
    """Seconds the mount may take: None for :data:`MOUNT_TIMEOUT_SECONDS`, 0 for no limit."""

    def validate(self) -> None:
        """Refuse values that mount would misread (an option in disguise, a bare newline),
        and a mount timeout that is not a whole number of seconds >= 0."""
        if not _FSTYPE.match(self.type or ""):
            raise InputError(f"invalid repository type: {self.type!r}")
        if not self.address or self.address.startswith("-"):
            raise InputError("invalid repository address")
        _reject_control(self.address, "repository address")
        if self.options.startswith("-"):
            raise InputError("invalid mount options: they may not start with '-'")
        _reject_control(self.options, "mount options")
        keys = {p.partition("=")[0].strip().lower() for p in split_options(self.options)}
        if self.type == "cifs" and "password2" in keys:
            # mount.cifs reads it from no file: it could only go on a command line.
            raise InputError("cifs password2 is not supported: it would show in ps")
        timeout = self.mount_timeout
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int)
            or not 0 <= timeout <= MAX_MOUNT_TIMEOUT_SECONDS
        ):
            raise InputError(
                f"invalid mount timeout: {timeout!r} (seconds from 0, no timeout, "
                f"to {MAX_MOUNT_TIMEOUT_SECONDS})"
            )

    @property
    def mount_timeout_seconds(self) -> int | None:
        """The timeout to run mount under: None for none (``mount_timeout`` 0)."""
        if self.mount_timeout is None:
            return MOUNT_TIMEOUT_SECONDS
        return self.mount_timeout or None

    @property
    def mount_options(self) -> str:
        """The options passed to mount: ``nodev,nosuid,noexec`` always (a device node or a
        set-uid program on the NAS is someone else's), and cifs gets ``nobrl`` (byte-range
        locks break QEMU)."""
        parts = [p for p in split_options(self.options) if p not in _ALLOWING]
        wanted = [*_CONFINED, *(["nobrl"] if self.type == "cifs" else [])]
        return join_options(parts + [option for option in wanted if option not in parts])

    @property
    def redacted_options(self) -> str:
        """The mount options with every credential value replaced by ``***``."""
        return redact_options(self.mount_options)


def split_options(options: str) -> list[str]:
    """The options of a mount option string, in order; ``,,`` is a comma inside a value
    (mount.cifs's escape for a password that holds one)."""
    parts, current, i = [], "", 0
    while i < len(options):
        if options[i] == ",":
            if options[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += options[i]
        i += 1
    parts.append(current)
    return [p for p in parts if p]


def join_options(parts: list[str]) -> str:
    """The option string of ``parts``, a comma inside a value written ``,,``."""
    return ",".join(p.replace(",", ",,") for p in parts)


def redact_options(options: str) -> str:
    """``options`` with the values of credential-like keys replaced by ``***``."""
    out = []
    for part in split_options(options):
        key, sep, _value = part.partition("=")
        out.append(f"{key}=***" if sep and key.strip().lower() in _SECRET_KEYS else part)
    return ",".join(out)


def _secret_values(options: str) -> list[str]:
    values = []
    for part in split_options(options):
        key, sep, value = part.partition("=")
        if sep and key.strip().lower() in _SECRET_KEYS and value:
            values.append(value)
    # Also as written (",," escaped), should a program echo the option string.
    return values + [v.replace(",", ",,") for v in values if "," in v]


# cifs credentials a mount.cifs credentials file holds, by the name it reads there. Not
# password2: mount.cifs reads any key of that file starting "pass" as the password.
_CIFS_CREDENTIALS = {
    "username": "username", "user": "username",
    "password": "password", "pass": "password",
    "domain": "domain", "dom": "domain", "workgroup": "domain",
}  # fmt: skip


def _fstab_field(value: str) -> str:
    # fstab's escapes (libmount unescapes them): space, tab, backslash.
    return value.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")


class _MountFiles:
    """The files a mount reads instead of its command line: an fstab line, and the
    credentials a helper reads (cifs, ceph); 0600, in the root-only registry directory,
    removed as soon as the mount has returned."""

    def __init__(self, name: str) -> None:
        MOUNT_REGISTRY.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._prefix = f".{name}.{secrets.token_hex(4)}"
        self._made: list[Path] = []

    def _write(self, suffix: str, text: str) -> Path:
        path = MOUNT_REGISTRY / f"{self._prefix}.{suffix}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        self._made.append(path)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        return path

    def fstab(self, repository: Repository, directory: Path) -> Path:
        """The fstab ``mount -T`` reads: this mount's one line."""
        options = self._options(repository)
        fields = [repository.address, str(directory), repository.type, options or "defaults"]
        return self._write("fstab", " ".join(_fstab_field(f) for f in fields) + " 0 0\n")

    def _options(self, repository: Repository) -> str:
        parts = split_options(repository.mount_options)
        if repository.type == "cifs":
            found = [(p.partition("=")[0].strip().lower(), p.partition("=")[2]) for p in parts]
            credentials: dict[str, str] = {}
            for key, value in found:
                if key in _CIFS_CREDENTIALS:  # the first of each, as mount.cifs takes them
                    credentials.setdefault(_CIFS_CREDENTIALS[key], value)
            if credentials:
                text = "".join(f"{key}={value}\n" for key, value in credentials.items())
                parts = [p for p, (k, _v) in strict_zip(parts, found)
                         if k not in _CIFS_CREDENTIALS]  # fmt: skip
                parts.append(f"credentials={self._write('credentials', text)}")
        elif repository.type == "ceph":
            for index, part in enumerate(parts):
                key, sep, value = part.partition("=")
                if sep and key.strip().lower() == "secret":
                    parts[index] = f"secretfile={self._write('secret', value)}"
        return join_options(parts)

    def remove(self) -> None:
        """Remove every file made here."""
        for path in self._made:
            path.unlink(missing_ok=True)
        self._made.clear()


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> list[Path]:
    """Every mount point of this mount namespace, in mount order."""
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        return [Path(_unescape(line.split()[4])) for line in fh if line.strip()]


def recover_stale_mounts() -> list[Path]:
    """Unmount and remove what runs that died (SIGKILL) left mounted; return those paths."""
    recovered = []
    for entry in sorted(MOUNT_REGISTRY.glob("csbackup.*")) if MOUNT_REGISTRY.is_dir() else []:
        try:
            pid_text, path_text = entry.read_text().split(maxsplit=1)
            pid, path = int(pid_text), Path(path_text.strip())
        except (OSError, ValueError):
            continue
        if pid_alive(pid):
            continue
        log.warning("recovering %s, left mounted by a run that died (pid %d)", path, pid)
        # Not os.path.ismount: a bind mount of the same filesystem looks like a directory.
        if path in mount_points():
            try:
                proc.run(["umount", "-l", str(path)], timeout=UNMOUNT_TIMEOUT_SECONDS)
            except CommandFailed as exc:
                log.warning("cannot unmount %s: %s", path, exc)
                continue
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc.strerror)
            continue
        for leftover in MOUNT_REGISTRY.glob(f".{path.name}.*"):  # its fstab, credentials
            leftover.unlink(missing_ok=True)
        entry.unlink(missing_ok=True)
        recovered.append(path)
    return recovered


class MountSession:
    """The repository mounted on a fresh ``csbackup.XXXXX`` directory for one operation."""

    def __init__(self, repository: Repository, *, tmp_dir: str | None = None) -> None:
        repository.validate()
        self.repository = repository
        self._tmp_dir = tmp_dir
        self._root: Path | None = None
        self._root_fd: int | None = None
        self._vm_dirs: dict[str, VmDirectory] = {}
        self._mounted = False

    @property
    def root(self) -> Path:
        """The mount point (valid inside the ``with`` block)."""
        if self._root is None:
            raise RuntimeError("the repository is not mounted")
        return self._root

    def __enter__(self) -> MountSession:
        if self._root is not None:
            # Entered already (``__enter__()`` then ``with session``): a second mount would
            # be left behind, as only the last one is unmounted.
            return self
        repo = self.repository
        recover_stale_mounts()
        self._root = Path(tempfile.mkdtemp(prefix="csbackup.", dir=self._tmp_dir))
        self._register()
        files = _MountFiles(self._root.name)
        log.info(
            "mounting %s %s on %s (options: %s)",
            repo.type,
            repo.address,
            self._root,
            repo.redacted_options or "none",
        )
        timeout = repo.mount_timeout_seconds
        try:
            argv = ["mount", "-T", str(files.fstab(repo, self._root)), str(self._root)]
            proc.run(argv, timeout=timeout, secrets=_secret_values(repo.options))
        except CommandFailed as exc:
            if exc.timed_out:
                log.error("mount timed out after %s s: %s", timeout, exc)
            else:
                log.error("mount failed: %s", exc)
            self._abandon()
            raise MountError(f"Failed to mount {repo.type} store") from None
        except BaseException as exc:
            # Interrupted while mounting (the agent's SIGTERM, a cancelled operation).
            log.error("mount interrupted: %s", exc)
            self._abandon()
            raise
        finally:
            files.remove()  # read by mount and its helper: no longer needed
        self._mounted = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def vm_directory(self, vm: str) -> VmDirectory:
        """VM ``vm``'s directory of the repository: the gate to everything in it (one per
        VM and session; it need not exist yet)."""
        validate_vm_dir(vm)
        if vm not in self._vm_dirs:
            if self._root_fd is None:
                self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._vm_dirs[vm] = VmDirectory(self._root_fd, self.root, vm)
        return self._vm_dirs[vm]

    def _close_descriptors(self) -> None:
        for vm_dir in self._vm_dirs.values():
            vm_dir.close()
        self._vm_dirs.clear()
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    def close(self) -> None:
        """Unmount (lazily if a plain unmount fails or hangs) and remove the directory."""
        if self._root is None:
            return
        self._close_descriptors()  # an open descriptor would keep the mount busy
        root = self._root
        if self._mounted and root not in mount_points():
            # Someone unmounted the NAS under us: nothing to unmount, the directory remains.
            log.warning("%s is no longer mounted", root)
            self._mounted = False
        if self._mounted:
            try:
                proc.run(["umount", str(root)], timeout=UNMOUNT_TIMEOUT_SECONDS)
            except (CommandFailed, Aborted) as exc:
                # A stop that lands here came after the operation's outcome was decided (a
                # backup published, a volume restored; or the failure being cleaned up): it
                # stops nothing more and changes no outcome. The mount is detached all the
                # same (the stop is taken: this umount runs undisturbed).
                log.warning("umount %s: %s; detaching lazily", root, exc)
                try:
                    proc.run(["umount", "-l", str(root)], timeout=UNMOUNT_TIMEOUT_SECONDS)
                except CommandFailed as lazy_exc:
                    raise CleanupFailed(f"cannot unmount {root}: {lazy_exc}") from None
            self._mounted = False
            log.info("unmounted %s", root)
        self._remove_dir()
        self._unregister(root)

    def _abandon(self) -> None:
        """Undo a mount that did not succeed: detach it if the kernel finished it after all
        (the helper killed by a timeout or a signal), remove the directory, unregister."""
        root = self._root
        if root is None:
            return
        if root in mount_points():
            try:
                proc.run(["umount", "-l", str(root)], timeout=UNMOUNT_TIMEOUT_SECONDS)
                log.info("detached %s, mounted after all by the failed mount", root)
            except CommandFailed as exc:
                log.error("cannot detach %s: %s", root, exc)
        self._remove_dir()  # forgets the root: unregister it by name
        self._unregister(root)

    def _entry(self, root: Path) -> Path:
        return MOUNT_REGISTRY / root.name

    def _register(self) -> None:
        # A SIGKILLed run cannot unmount: its entry lets the next run recover the mount.
        MOUNT_REGISTRY.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._entry(self.root).write_text(f"{os.getpid()} {self.root}\n")

    def _unregister(self, root: Path | None = None) -> None:
        target = root or self._root
        if target is not None:
            self._entry(target).unlink(missing_ok=True)

    def _remove_dir(self) -> None:
        if self._root is None:
            return
        try:
            self._root.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CleanupFailed(f"cannot remove {self._root}: {exc.strerror}") from None
        self._root = None

    def path(self, relative: str, *, what: str = "path") -> Path:
        """The path in the mount of a caller's mount-relative path ``<vm>/...``, once the
        gate has walked what of it exists (no link at any level, nothing outside it).

        Refused: an empty path, an absolute one, any ``..`` component, control characters,
        the mount root itself, and a path through a link or a special file.
        """
        validate_relative(relative, what)
        vm, rest = split_vm(relative)
        vm_dir = self.vm_directory(vm)
        if rest:
            vm_dir.kind(rest)  # the VM's directory is walked too
        else:
            vm_dir.exists()  # refused when a link or a file stands in its place
        return self.root / vm / rest if rest else self.root / vm


def validate_vm_dir(name: str) -> None:
    """Refuse a VM directory name that is not one plain name."""
    if not name or name in (".", "..") or "/" in name or not name.isprintable():
        raise InputError(f"invalid VM directory name: {name!r}")
