"""What the service listens on, and the checks it makes before it listens at all.

The Unix socket is the only listener by default: mode 0600, owned by the service's user
(root on a KVM host), in a directory nobody else can write to. A TCP listener exists only
when asked for, only on a loopback address, and only with a bearer token read from a file
nobody else can read. Anything looser and the service refuses to start, saying why.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

from commands.wrappers import DEFAULT_GENERATION, Generation
from shim.errors import ShimError

DEFAULT_SOCKET = Path("/run/cloudstack-nasbackup-shim/shim.sock")
DEFAULT_MAX_BACKUPS = 2
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_KEEP_FINISHED_JOBS = 256
DEFAULT_COMMAND_TIMEOUT = 7200
"""The agent's default ``cmds.timeout``: how long a command whose ``wait`` is 0 may run."""
SOCKET_MODE = 0o600


class StartupRefused(ShimError):
    """The service will not start as configured (a loose permission, a public address)."""


@dataclass(frozen=True)
class TcpAddress:
    """A loopback TCP address to listen on (port 0: any free port)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServiceConfig:
    """How the service runs: its listeners, its token and its limits."""

    socket_path: Path = DEFAULT_SOCKET
    tcp: TcpAddress | None = None
    token: str | None = field(default=None, repr=False)
    """The bearer token the TCP listener requires (never logged, never in repr)."""
    max_backups: int = DEFAULT_MAX_BACKUPS
    """Backup jobs that may run at once on this host; more wait their turn."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    keep_finished_jobs: int = DEFAULT_KEEP_FINISHED_JOBS
    command_timeout: int = DEFAULT_COMMAND_TIMEOUT
    """Seconds a command whose ``wait`` is 0 may run before it is stopped (``timeout``)."""
    generation: Generation = DEFAULT_GENERATION
    """Whose agent the callers are, for requests that neither say nor show it: answers are
    built as that generation's Java wrappers build them."""

    def __post_init__(self) -> None:
        if self.tcp is not None and not self.token:
            raise StartupRefused("a TCP listener needs a bearer token (--token-file)")
        if self.max_backups < 1:
            raise StartupRefused("the limit of concurrent backups must be at least 1")
        if self.max_body_bytes < 1:
            raise StartupRefused("the body size limit must be positive")
        if self.command_timeout < 1:
            raise StartupRefused("the command timeout must be at least 1 second")


def parse_tcp_address(text: str) -> TcpAddress:
    """``127.0.0.1:PORT``, ``[::1]:PORT`` or ``localhost:PORT``; refuse any other host."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise StartupRefused(f"invalid TCP address {text!r}: expected HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise StartupRefused(f"invalid TCP address {text!r}: the host must be an IP") from None
    if not address.is_loopback:
        raise StartupRefused(f"refusing to listen on {host}: only a loopback address may be used")
    return TcpAddress(str(address), int(port_text))


def _refuse_loose(st: os.stat_result, forbidden: int, what: str) -> None:
    """Refuse ``what`` unless it is ours and has none of the ``forbidden`` mode bits."""
    if st.st_uid != os.geteuid():
        problem = f"owned by uid {st.st_uid}, not {os.geteuid()}"
    elif stat.S_IMODE(st.st_mode) & forbidden:
        problem = f"mode {stat.S_IMODE(st.st_mode):04o}"
    else:
        return
    raise StartupRefused(f"refusing to start: {what} has loose permissions ({problem})")


def read_token(path: Path) -> str:
    """The bearer token in ``path``: a regular file of ours that nobody else can read."""
    try:
        st = os.stat(path)
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StartupRefused(f"cannot read the token file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StartupRefused(f"the token file {path} is not a regular file")
    _refuse_loose(st, 0o077, f"the token file {path}")
    token = text.strip()
    if not token or any(c.isspace() for c in token):
        raise StartupRefused(f"the token file {path} must hold one token, no white space")
    return token


def _check_directory(directory: Path) -> None:
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise StartupRefused(f"{directory} is not a directory")
    # Someone who can write to the directory can replace the socket with their own.
    _refuse_loose(st, 0o022, f"the socket directory {directory}")


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _check_existing_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupRefused(f"refusing to start: {path} exists and is not a socket")
    _refuse_loose(st, 0o077, f"the existing socket {path}")
    if _listening(path):
        raise StartupRefused(f"refusing to start: another service listens on {path}")
    path.unlink()  # a stale socket of a service that died


@dataclass(frozen=True)
class UnixListener:
    """A listening Unix socket and the file it is bound to."""

    sock: socket.socket
    path: Path
    inode: int

    def remove(self) -> None:
        """Remove the socket file, if it still is ours (not a newer service's)."""
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self.inode:
                self.path.unlink()


def bind_unix_socket(path: Path) -> UnixListener:
    """Check the socket's place, then bind a listening socket there with mode 0600.

    The socket is created with that mode (umask), not chmod-ed afterwards: it is never
    reachable by anyone else, not even for an instant.
    """
    _check_directory(path.parent)
    _check_existing_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise StartupRefused(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, SOCKET_MODE)
    sock.listen(128)
    sock.setblocking(False)
    return UnixListener(sock, path, os.lstat(path).st_ino)


def bind_tcp_socket(address: TcpAddress) -> socket.socket:
    """A listening socket on a loopback address (checked again: never another one)."""
    if not ipaddress.ip_address(address.host).is_loopback:
        raise StartupRefused(f"refusing to listen on {address.host}: not a loopback address")
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        sock = socket.create_server((address.host, address.port), family=family, backlog=128)
    except OSError as exc:
        raise StartupRefused(f"cannot listen on {address}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock
