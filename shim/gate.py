"""The one gate for everything read from the NAS: nothing found there is trusted before it.

The repository is shared by every host and tenant of a zone and the shim runs as root, so
whoever controls the NAS's contents (its admin, a tenant who could write there, a corrupt
file) must gain nothing on a host. Every file an operation opens there (backup files, the
whole backing chain of each, manifests) passes here first, and only here:

* **Where it is.** Walked from a descriptor of the VM's directory, itself opened from the
  mount point, one component at a time with ``O_NOFOLLOW``: no symbolic link at any level,
  no ``..``, no control character in a name, nothing outside that VM's directory of this
  repository. A backup path, a parent path, a backing name all resolve the same way.
* **What it is.** Opened ``O_NONBLOCK`` and checked with ``fstat`` on the descriptor: a
  regular file with one link. A FIFO would hang the command, a device or socket read
  something else, a hard link may be another file's data.
* **What it says.** A backup file's qcow2 header is parsed here, byte by byte, before any
  program reads it: version, cluster size, virtual size (plausible for the file's size, and
  what its directory's manifest recorded), no encryption, no external data file, no
  unknown incompatible feature; a backing name only as a relative path that stays inside
  the VM's directory, with backing format qcow2 — never absolute, never ``json:`` or a
  protocol (``nbd:``, ``http:``), never looping. Each layer of the chain is gated the same
  way. A manifest is a regular file of at most :data:`MAX_MANIFEST_BYTES`.
* **How programs see it.** ``qemu-img`` then opens the descriptors the gate holds
  (``/dev/fd/N``), given as a ``json:`` node graph that names the driver of every layer and
  its backing explicitly (:meth:`Chain.spec`): QEMU resolves no name it read from the NAS
  and probes no format. Only a rebase, which must store a relative name, lets qemu-img
  resolve names, from the VM directory's descriptor (:meth:`VmDirectory.anchored`) and
  only names this gate has already walked.

A refusal (:class:`Refused`) names the file and the rule; nothing has been changed by then.
The descriptors belong to the mount session (:class:`shim.nas.MountSession`), which closes
them before it unmounts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shim import manifest as manifests
from shim import proc
from shim.errors import InputError
from shim.manifest import MANIFEST, Manifest
from shim.qemu_img import Spec

QCOW2_MAGIC = b"QFI\xfb"
MAX_MANIFEST_BYTES = 1024 * 1024
"""A manifest of a backup of 64 disks is about 30 KiB; anything near this is not one."""
MAX_CHAIN_DEPTH = 256
"""Layers of one backing chain (CloudStack forces a full every ``nas.backup.full.every``,
10 by default); each is an open descriptor while the operation runs."""
MAX_BACKING_NAME = 1023
"""QEMU's own limit on a backing file name."""
MAX_NAME_BYTES = 255
STORED_SIZE_SLACK = 256 * 1024 * 1024
"""Room for metadata above the data of a qcow2 (tables, bitmaps, leaked clusters): a file
larger than 5/4 of its virtual size plus this holds something its header does not say."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

# qcow2 header fields and extensions (docs/interop/qcow2.txt in QEMU's sources).
_V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # up to snapshots_offset: 72 bytes
_V3_FIELDS = struct.Struct(">QQQII")  # incompatible, compatible, autoclear, order, length
_EXT_END, _EXT_BACKING_FORMAT, _EXT_DATA_FILE, _EXT_CRYPTO = 0, 0xE2792ACA, 0x44415441, 0x0537BE77
_INCOMPAT_DATA_FILE = 1 << 2
_INCOMPAT_COMPRESSION_TYPE = 1 << 3
_COMPRESSION_TYPE_AT = 104  # one byte, in a v3 header of at least 105 bytes
ZLIB, ZSTD = 0, 1
_INCOMPAT_KNOWN = 0b11111  # dirty, corrupt, external data file, compression type, extended L2
_MAX_CLUSTER_BITS = 21


class Refused(InputError):
    """A file of the repository the gate will not let any program open."""

    def __init__(self, shown: str, rule: str) -> None:
        super().__init__(f"{shown} refused: {rule}")
        self.shown = shown
        self.rule = rule


class Damaged(Refused):
    """A file that is not a readable qcow2 image at all: damage, more likely than intent (a
    backup falls back to a full over a damaged parent, as over a missing one)."""


def escaped(name: str) -> str:
    """``name`` as it may be shown on one log or stdout line: controls escaped."""
    if name.isprintable():
        return name
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in name)


def _check_component(name: str, shown: str) -> None:
    if name in ("", ".", ".."):
        raise Refused(shown, f"a path component {name!r}: only plain names are followed")
    if "/" in name or "\0" in name or not name.isprintable():
        raise Refused(shown, "a name with control characters")
    if len(name.encode(errors="surrogateescape")) > MAX_NAME_BYTES:
        raise Refused(shown, "a name longer than a file name can be")


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISLNK, "symbolic link: nothing in the repository may be one"),
        (stat.S_ISFIFO, "FIFO, not a regular file"),
        (stat.S_ISSOCK, "socket, not a regular file"),
        (stat.S_ISCHR, "character device, not a regular file"),
        (stat.S_ISBLK, "block device, not a regular file"),
        (stat.S_ISDIR, "directory, not a regular file"),
    ):
        if test(mode):
            return f"a {kind}"
    return "not a regular file"


def _open_at(dir_fd: int, name: str, shown: str, *, directory: bool) -> int:
    """Open ``name`` in ``dir_fd`` as a directory or a regular file, or refuse it.

    The entry is looked at first (for a message that says what it is), then opened without
    following a link, and the descriptor checked to be that same entry: an entry swapped in
    between is refused, never opened. Raises FileNotFoundError when there is none.
    """
    _check_component(name, shown)
    try:
        seen = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such file or directory", shown) from None
    except NotADirectoryError:
        raise Refused(shown, "a component is not a directory") from None
    expected = stat.S_ISDIR if directory else stat.S_ISREG
    if not expected(seen.st_mode):
        rule = "not a directory" if directory and not stat.S_ISLNK(seen.st_mode) else None
        raise Refused(shown, rule or _kind(seen.st_mode))
    try:
        fd = os.open(name, _DIR_FLAGS if directory else _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such file or directory", shown) from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
            raise Refused(shown, "changed into something else while it was opened") from None
        raise
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino) or not expected(st.st_mode):
            raise Refused(shown, "changed into something else while it was opened")
        if not directory and st.st_nlink != 1:
            raise Refused(shown, f"a file with {st.st_nlink} hard links: it may be another's data")
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class Qcow2Header:
    """What a qcow2 header says, as far as the gate needs it."""

    version: int
    cluster_size: int
    virtual_size: int
    backing_name: str | None
    backing_format: str | None
    compression_type: int = ZLIB
    """How compressed clusters are stored (:data:`ZLIB` or :data:`ZSTD`); a header names
    zstd whether or not a cluster was written compressed."""


def parse_qcow2_header(data: bytes, shown: str) -> Qcow2Header:
    """The header at the start of ``data`` (the image's first cluster, or as much of it as
    the file holds), or :class:`Refused` naming the first rule it breaks."""
    if len(data) < _V2_HEADER.size or data[:4] != QCOW2_MAGIC:
        raise Damaged(shown, "not a qcow2 image")
    (_magic, version, backing_offset, backing_size, cluster_bits, size, crypt_method,
     *_rest) = _V2_HEADER.unpack_from(data)  # fmt: skip
    if version not in (2, 3):
        raise Damaged(shown, f"qcow2 version {version}")
    if not 9 <= cluster_bits <= _MAX_CLUSTER_BITS:
        raise Damaged(shown, f"a cluster size of 2^{cluster_bits} bytes")
    cluster_size = 1 << cluster_bits
    if crypt_method != 0:
        raise Refused(shown, "an encrypted image")
    if size > 1 << 62:
        raise Refused(shown, f"a virtual size of {size} bytes")
    extensions_at = _V2_HEADER.size
    compression_type = ZLIB
    if version == 3:
        extensions_at = _v3_header_length(data, shown, cluster_size)
        compression_type = _compression_type(data, extensions_at)
    backing_name = None
    if backing_offset:
        end = backing_offset + backing_size
        if not 0 < backing_size <= MAX_BACKING_NAME or end > min(cluster_size, len(data)):
            raise Damaged(shown, "a backing file name out of its header's bounds")
        try:
            backing_name = data[backing_offset:end].decode("utf-8")
        except UnicodeDecodeError:
            raise Damaged(shown, "a backing file name that is not UTF-8") from None
    extensions_end = backing_offset if backing_offset else min(cluster_size, len(data))
    backing_format = _read_extensions(data, extensions_at, extensions_end, shown)
    return Qcow2Header(version, cluster_size, size, backing_name, backing_format, compression_type)


def _compression_type(data: bytes, header_length: int) -> int:
    """A v3 header's compression type: :data:`ZSTD` when its incompatible bit is set and its
    field says so, else :data:`ZLIB` (anything else is QEMU's to refuse when it opens it)."""
    (incompatible,) = struct.unpack_from(">Q", data, _V2_HEADER.size)
    if incompatible & _INCOMPAT_COMPRESSION_TYPE and header_length > _COMPRESSION_TYPE_AT:
        return ZSTD if data[_COMPRESSION_TYPE_AT] == ZSTD else ZLIB
    return ZLIB


def _v3_header_length(data: bytes, shown: str, cluster_size: int) -> int:
    """Where a version 3 header ends (its extensions begin); refuse its features."""
    if len(data) < _V2_HEADER.size + _V3_FIELDS.size:
        raise Damaged(shown, "a truncated header")
    incompatible, _compat, _autoclear, _order, header_length = _V3_FIELDS.unpack_from(
        data, _V2_HEADER.size
    )
    if incompatible & _INCOMPAT_DATA_FILE:
        raise Refused(shown, "an external data file")
    if incompatible & ~_INCOMPAT_KNOWN:
        raise Refused(shown, f"unknown incompatible features {incompatible:#x}")
    if not _V2_HEADER.size + _V3_FIELDS.size <= header_length <= cluster_size:
        raise Damaged(shown, f"a header length of {header_length}")
    return int(header_length)


def _read_extensions(data: bytes, at: int, end: int, shown: str) -> str | None:
    """The backing format extension's value; refuse an external data file or encryption."""
    backing_format = None
    while at + 8 <= end:
        kind, length = struct.unpack_from(">II", data, at)
        if kind == _EXT_END:
            return backing_format
        value = data[at + 8 : at + 8 + length]
        if len(value) != length or at + 8 + length > end:
            raise Damaged(shown, "a header extension out of its header's bounds")
        if kind == _EXT_DATA_FILE:
            raise Refused(shown, "an external data file")
        if kind == _EXT_CRYPTO:
            raise Refused(shown, "an encrypted image")
        if kind == _EXT_BACKING_FORMAT:
            backing_format = value.decode("ascii", errors="replace")
        at += 8 + (length + 7) // 8 * 8
    return backing_format


def _read_header(fd: int, shown: str) -> Qcow2Header:
    """Parse the header of the open image ``fd``: its first 4 KiB, or its whole first
    cluster when the header says it is larger (the header and its extensions live there)."""
    head = os.pread(fd, 4096, 0)
    if len(head) >= 24 and head[:4] == QCOW2_MAGIC:
        cluster_bits = struct.unpack_from(">I", head, 20)[0]
        if 9 <= cluster_bits <= _MAX_CLUSTER_BITS and (1 << cluster_bits) > len(head):
            head = os.pread(fd, 1 << cluster_bits, 0)
    return parse_qcow2_header(head, shown)


def plausible_stored_size(header: Qcow2Header) -> int:
    """The largest a qcow2 of this virtual size can honestly be on disk."""
    return header.virtual_size + header.virtual_size // 4 + STORED_SIZE_SLACK


def backing_rule(name: str) -> str | None:
    """Why a backing name read from a header may not be followed (None: it may, as a path
    relative to the image's directory, once walked by the gate)."""
    if not name.isprintable():
        return "a backing file name with control characters"
    if name.startswith("/"):
        return f"an absolute backing path {escaped(name)}"
    if name.startswith("json:") or ":" in name.split("/", 1)[0]:
        # QEMU reads 'json:{...}' as options and 'proto:...' (nbd, http, ssh, ...) as a
        # network protocol: either reaches what the name says, not a file beside it.
        return f"a backing name that is not a file path: {escaped(name[:80])}"
    parts = name.split("/")
    if not (len(parts) == 1 or (len(parts) == 3 and parts[0] == "..")) or any(
        part in ("", ".", "..") for part in parts[-2 if len(parts) == 3 else -1 :]
    ):
        # Only the shapes backups have: the kernel follows a link before it applies a
        # '..', so a name the gate tidied as text could lead elsewhere than it walked.
        return f"{_NOT_OF_THE_FORM}: {escaped(name[:80])}"
    return None


_NOT_OF_THE_FORM = "a backing name not of the form ../<backup>/<file>"


@dataclass(eq=False)  # one per open file: compared and hashed by identity
class Layer:
    """One gated image of a chain: open, checked, its header read."""

    shown: str
    """The file's path relative to the mount root, for messages."""
    relative: str
    """The file's path relative to its VM's directory."""
    fd: int
    size: int
    identity: tuple[int, int]
    header: Qcow2Header

    @property
    def name(self) -> str:
        """The file's name."""
        return posixpath.basename(self.relative)

    @property
    def directory(self) -> str:
        """Its backup directory, relative to the VM's directory."""
        return posixpath.dirname(self.relative)

    @property
    def fd_path(self) -> str:
        """How a child process that inherited :attr:`fd` names the file."""
        return f"/dev/fd/{self.fd}"


def _node(layer: Layer, backing: dict[str, object] | None) -> dict[str, object]:
    return {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": layer.fd_path},
        "backing": backing,
    }


@dataclass
class Chain:
    """A backup file and its whole backing chain, top first, every layer gated."""

    layers: list[Layer]

    @property
    def top(self) -> Layer:
        """The file the chain was asked for."""
        return self.layers[0]

    @property
    def virtual_size(self) -> int:
        """The disk size the chain restores to."""
        return self.top.header.virtual_size

    @property
    def zstd(self) -> bool:
        """Whether a layer's header names zstd: the shim's compressed backups do where
        QEMU writes zstd (a zlib one cannot be told from a plain one by its header)."""
        return any(layer.header.compression_type == ZSTD for layer in self.layers)

    def node_graph(self, vm_path: Path) -> dict[str, object]:
        """The chain as a QEMU node graph naming each layer by its path under ``vm_path``
        (the VM's directory in the mount) and its driver: for a program that cannot inherit
        the descriptors (a storage daemon opening an incremental's parent as its backing)."""
        node: dict[str, object] | None = None
        for layer in reversed(self.layers):
            filename = str(vm_path / layer.relative)
            node = {"driver": "qcow2", "file": {"driver": "file", "filename": filename},
                    "backing": node}  # fmt: skip
        assert node is not None  # noqa: S101 - a chain has a top
        return node

    def spec(self) -> Spec:
        """The whole chain for QEMU: every layer by its descriptor, driver named."""
        node: dict[str, object] | None = None
        for layer in reversed(self.layers):
            node = _node(layer, node)
        return Spec("json:" + json.dumps(node), tuple(layer.fd for layer in self.layers))


def alone(layer: Layer) -> Spec:
    """One layer for QEMU without its backing (``qemu-img check`` of that file only)."""
    return Spec("json:" + json.dumps(_node(layer, None)), (layer.fd,))


class VmDirectory:
    """One VM's directory of a mounted repository, and the gate to everything in it.

    ``relative`` paths below are relative to this directory (``<backup>/<file>``).
    """

    def __init__(self, root_fd: int, root: Path, vm: str) -> None:
        self._root_fd = root_fd
        self.root = root
        self.vm = vm
        self.path = root / vm
        """The directory's path, for programs that write there (a backup's targets)."""
        self._fd: int | None = None
        self._owned: list[int] = []
        self._manifests: dict[str, Manifest | None] = {}

    # -- descriptors ------------------------------------------------------------------------
    def shown(self, relative: str = "") -> str:
        """``relative`` as messages show it: from the mount root, controls escaped."""
        return escaped(posixpath.join(self.vm, relative) if relative else self.vm)

    @property
    def fd(self) -> int:
        """The VM directory's descriptor (FileNotFoundError when there is none yet)."""
        if self._fd is None:
            self._fd = _open_at(self._root_fd, self.vm, self.shown(), directory=True)
        return self._fd

    def exists(self) -> bool:
        """Whether the VM's directory exists (refused if it is anything but a directory)."""
        try:
            _ = self.fd
        except FileNotFoundError:
            return False
        return True

    def create(self) -> bool:
        """Make the VM's directory if there is none; whether this call made it."""
        if self.exists():
            return False
        with contextlib.suppress(FileExistsError):  # made meanwhile: gated below all the same
            os.mkdir(self.vm, mode=0o755, dir_fd=self._root_fd)
        _ = self.fd
        return True

    def remove_tree(self, name: str) -> None:
        """Remove the entry ``name`` of the VM's directory and all below it (a link is
        removed, never followed; nothing on another filesystem is touched). By ``rm``,
        which walks any depth, given the name from the held directory's descriptor."""
        _check_component(name, self.shown(name))
        proc.run(["rm", "-rf", "--one-file-system", "--", self.anchored(name)], pass_fds=(self.fd,))

    def anchored(self, relative: str) -> str:
        """``relative`` for a child process that inherited :attr:`fd`: resolved from the
        directory this gate holds, whatever the mount's path leads to meanwhile."""
        return f"/proc/self/fd/{self.fd}/{relative}"

    def close(self) -> None:
        """Close every descriptor opened here (before the repository is unmounted)."""
        for fd in self._owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._owned.clear()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self._manifests.clear()

    @contextlib.contextmanager
    def _walk(self, relative: str) -> Iterator[tuple[int, str]]:
        """The descriptor of ``relative``'s directory (each component gated) and its last
        component; the directory descriptor is closed afterwards."""
        parts = relative.split("/")
        if not relative or relative.startswith("/"):
            raise Refused(self.shown(relative), "not a path inside the VM's directory")
        fd, opened = self.fd, []
        try:
            for index, part in enumerate(parts[:-1]):
                fd = _open_at(fd, part, self.shown("/".join(parts[: index + 1])), directory=True)
                opened.append(fd)
            yield fd, parts[-1]
        finally:
            for each in opened:
                os.close(each)

    def open_directory(self, relative: str) -> int:
        """A descriptor of the directory ``relative``, gated; the caller closes it."""
        with self._walk(relative) as (parent, name):
            return _open_at(parent, name, self.shown(relative), directory=True)

    def kind(self, relative: str) -> str | None:
        """``"directory"``, ``"file"`` (a regular file) or None (nothing there, the VM's
        directory included); anything else (a link, a FIFO), or a path through one, is
        refused."""
        try:
            with self._walk(relative) as (parent, name):
                _check_component(name, self.shown(relative))
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode):
            return "directory"
        if stat.S_ISREG(st.st_mode):
            return "file"
        raise Refused(self.shown(relative), _kind(st.st_mode))

    def names(self, relative: str = "") -> list[str]:
        """The entries of directory ``relative`` (the VM's own with ""), sorted; names a
        program could not show on one line are left out."""
        fd = self.open_directory(relative) if relative else os.dup(self.fd)
        try:
            return sorted(name for name in os.listdir(fd) if name.isprintable())
        finally:
            os.close(fd)

    def _open_file(self, relative: str) -> int:
        with self._walk(relative) as (parent, name):
            return _open_at(parent, name, self.shown(relative), directory=False)

    # -- contents ---------------------------------------------------------------------------
    def read(self, relative: str, limit: int) -> bytes:
        """The whole regular file ``relative``, at most ``limit`` bytes (else refused)."""
        fd = self._open_file(relative)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise Refused(self.shown(relative), f"{size} bytes, more than {limit} expected")
            data = os.pread(fd, limit + 1, 0)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise Refused(self.shown(relative), f"more than {limit} bytes")
        return data

    def manifest(self, backup: str) -> Manifest | None:
        """The manifest of backup directory ``backup``; None when it has none (an
        incomplete backup, or one upstream's script wrote). Refused when it is not a small
        regular file; :class:`Damaged` when it does not hold a well-formed manifest."""
        if backup not in self._manifests:
            relative = f"{backup}/{MANIFEST}"
            try:
                data = self.read(relative, MAX_MANIFEST_BYTES)
            except FileNotFoundError:
                self._manifests[backup] = None
            else:
                try:
                    self._manifests[backup] = manifests.parse(data)
                except ValueError as exc:
                    raise Damaged(self.shown(relative), f"malformed: {exc}") from None
        return self._manifests[backup]

    def image(self, relative: str) -> Layer:
        """Backup file ``relative`` through the gate: open, regular, its header checked
        (alone: see :meth:`chain` for its backing). The descriptor lives as long as this
        directory's."""
        fd = self._open_file(relative)
        self._owned.append(fd)
        shown = self.shown(relative)
        st = os.fstat(fd)
        header = _read_header(fd, shown)
        if st.st_size > plausible_stored_size(header):
            raise Refused(
                shown,
                f"{st.st_size} bytes on disk for a disk of {header.virtual_size} bytes: its "
                "header does not describe it",
            )
        layer = Layer(shown, relative, fd, st.st_size, (st.st_dev, st.st_ino), header)
        self._check_against_manifest(layer)
        return layer

    def _check_against_manifest(self, layer: Layer) -> None:
        if not layer.directory:
            return
        recorded = self.manifest(layer.directory)
        if recorded is None:
            return
        record = {d.file: d for d in recorded.disks}.get(layer.name)
        if record is not None and record.virtual_size != layer.header.virtual_size:
            raise Refused(
                layer.shown,
                f"its header says a disk of {layer.header.virtual_size} bytes, its manifest "
                f"{record.virtual_size}",
            )

    def backing_path(self, layer: Layer) -> str | None:
        """Where ``layer``'s backing file is, relative to the VM's directory (None: it has
        none), or :class:`Refused` when the name may not be followed."""
        header = layer.header
        if header.backing_name is None:
            return None
        rule = backing_rule(header.backing_name)
        joined = posixpath.normpath(posixpath.join(layer.directory, header.backing_name))
        outside = joined in (".", "..") or joined.startswith(("../", "/"))
        if outside and (rule is None or rule.startswith(_NOT_OF_THE_FORM)):
            rule = f"a backing file outside the VM's directory: {escaped(header.backing_name)}"
        if rule is None and header.backing_format != "qcow2":
            rule = f"a backing file of format {header.backing_format or '(unnamed)'}, not qcow2"
        if rule is None:
            return joined
        raise Refused(layer.shown, rule)

    def chain(self, relative: str) -> Chain:
        """Backup file ``relative`` and every file under it, each through the gate."""
        return Chain(list(self.walk(relative)))

    def walk(self, relative: str) -> Iterator[Layer]:
        """The layers of ``relative``'s chain, top first, each gated as it is reached: a
        caller that checks layer by layer learns of a refusal below only once it has seen
        the layers above (``-o verify`` reports them all)."""
        layer = self.image(relative)
        seen = {layer.identity}
        depth = 1
        while True:
            yield layer
            below = self.backing_path(layer)
            if below is None:
                return
            if depth >= MAX_CHAIN_DEPTH:
                raise Refused(layer.shown, f"a backing chain deeper than {MAX_CHAIN_DEPTH}")
            try:
                lower = self.image(below)
            except FileNotFoundError:
                raise Damaged(
                    layer.shown, f"its backing file {self.shown(below)} is missing"
                ) from None
            if lower.identity in seen:
                raise Refused(layer.shown, "its backing chain loops back on itself")
            seen.add(lower.identity)
            layer, depth = lower, depth + 1

    def header_of(self, relative: str) -> Qcow2Header | None:
        """The qcow2 header of ``relative`` if it is a gated regular qcow2 file, else None
        (for listings that only look: nothing is refused, nothing kept open)."""
        try:
            fd = self._open_file(relative)
        except (Refused, FileNotFoundError):
            return None
        try:
            return _read_header(fd, self.shown(relative))
        except Refused:
            return None
        finally:
            os.close(fd)


def split_vm(relative: str) -> tuple[str, str]:
    """``(vm, rest)`` of a mount-relative path ``<vm>/<rest>`` (rest may be empty)."""
    vm, _, rest = relative.partition("/")
    return vm, rest.strip("/")
