"""qemu-img, the tool that moves and inspects image data outside a running QEMU.

Thin, typed wrappers over :func:`shim.proc.run`: every call names its formats explicitly
(format probing of a raw image is a security hole) and parses JSON output, never text. An
image read from the NAS is never named by a path here: it comes as a :class:`Spec` the gate
built (:mod:`shim.gate`), every layer's driver and backing given, the files by descriptor.

A Ceph source carries its key (``rbd:pool/image:...:key=AQB...``): every call here moves it
to a file of its own for the program's life (``keyfile=``, read by librados; 0600 in the
shim's root-only runtime directory), so that no key is on a command line ``ps`` shows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from shim import proc
from shim.compat import strict_zip
from shim.errors import CommandFailed
from shim.runtime import RUN_DIR

QEMU_IMG = "qemu-img"
QCOW2_V3 = "compat=1.1"

StrPath = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Spec:
    """An image named by a ``json:`` node graph that says every layer's driver and backing,
    and the descriptors it names (``/dev/fd/N``), which the program inherits."""

    text: str
    fds: tuple[int, ...]


Image = Union[StrPath, "Spec"]
"""An image as a program is told of it: a path (with its format given beside it), or a
:class:`Spec` (which carries its own)."""


def _name(image: Image) -> str:
    return image.text if isinstance(image, Spec) else os.fspath(image)


def _format(option: str, image: Image, fmt: str | None) -> list[str]:
    # A Spec names its drivers itself; a path gets its format, when known, beside it.
    return [option, fmt] if fmt and not isinstance(image, Spec) else []


def _fds(*images: Image) -> tuple[int, ...]:
    return tuple(fd for image in images if isinstance(image, Spec) for fd in image.fds)


KEY_DIR = RUN_DIR / "keys"
_RBD_KEY = re.compile(r"(?<=:)key=([^:]*)")


@contextlib.contextmanager
def keys_hidden(argv: Sequence[str]) -> Iterator[list[str]]:
    """``argv`` with the ``key=`` of every ``rbd:`` name moved to a 0600 file named by
    ``keyfile=`` instead, the files removed when the block ends."""
    made = []
    shown = []
    try:
        for arg in argv:
            match = _RBD_KEY.search(arg) if arg.startswith("rbd:") else None
            if match is not None:
                KEY_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
                path = KEY_DIR / f"key.{os.getpid()}.{secrets.token_hex(4)}"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                made.append(path)
                with os.fdopen(fd, "w") as fh:
                    fh.write(match.group(1) + "\n")
                shown.append(arg[: match.start()] + f"keyfile={path}" + arg[match.end() :])
            else:
                shown.append(arg)
        yield shown
    finally:
        for path in made:
            path.unlink(missing_ok=True)


def _run(argv: Sequence[str], **kwargs: Any) -> proc.Result:
    """:func:`shim.proc.run` with every Ceph key off the command line; a program given
    files of the NAS (descriptors) runs without a network."""
    if kwargs.get("pass_fds"):
        kwargs["network"] = False
    with keys_hidden(argv) as hidden:
        return proc.run(hidden, **kwargs)


@dataclass(frozen=True)
class ImageInfo:
    """The parts of ``qemu-img info`` the engine uses."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int
    backing_filename: str | None
    backing_format: str | None
    bitmaps: tuple[str, ...]
    raw: dict[str, Any]


def _info_of(doc: dict[str, Any]) -> ImageInfo:
    specific = doc.get("format-specific", {}).get("data", {})
    return ImageInfo(
        filename=doc["filename"],
        format=doc["format"],
        virtual_size=int(doc["virtual-size"]),
        actual_size=int(doc.get("actual-size", 0)),
        backing_filename=doc.get("backing-filename"),
        backing_format=doc.get("backing-filename-format"),
        bitmaps=tuple(b["name"] for b in specific.get("bitmaps", [])),
        raw=doc,
    )


def info(path: StrPath, *, fmt: str | None = None, force_share: bool = False) -> ImageInfo:
    """``qemu-img info`` of one image (``force_share`` reads an image QEMU has open)."""
    argv = [QEMU_IMG, "info", "--output=json"]
    argv += ["-f", fmt] if fmt else []
    argv += ["-U"] if force_share else []
    return _info_of(json.loads(_run([*argv, str(path)]).stdout))


def chain(path: StrPath, *, fmt: str = "qcow2", force_share: bool = False) -> list[ImageInfo]:
    """``qemu-img info --backing-chain``: the image first, its base last."""
    argv = [QEMU_IMG, "info", "--output=json", "--backing-chain", "-f", fmt]
    argv += ["-U"] if force_share else []
    docs = json.loads(_run([*argv, str(path)]).stdout)
    return [_info_of(d) for d in docs]


def create(
    path: StrPath,
    size: int | None = None,
    *,
    fmt: str = "qcow2",
    backing: str | None = None,
    backing_fmt: str = "qcow2",
    options: Sequence[str] = (),
) -> None:
    """Create an image; qcow2 images are v3 (bitmaps need it), with ``options`` more
    (``-o``: e.g. :meth:`shim.targets.Targets.create_options`).

    ``backing`` is stored as given: pass a path relative to the new image's directory to
    get a relocatable chain. With ``size`` given it is not opened (``-u``): a parent on the
    NAS is the gate's to check, never qemu-img's to open by name. Without ``size`` the
    backing image is opened for its size (local images only).
    """
    argv = [QEMU_IMG, "create", "-q", "-f", fmt]
    if fmt == "qcow2":
        argv += ["-o", ",".join((QCOW2_V3, *options))]
    elif options:
        argv += ["-o", ",".join(options)]
    if backing is not None:
        argv += ["-u"] if size is not None else []
        argv += ["-b", backing, "-F", backing_fmt]
    argv.append(str(path))
    if size is not None:
        argv.append(str(size))
    _run(argv)


def convert(
    source: Image,
    target: StrPath,
    *,
    source_fmt: str | None = "qcow2",
    target_fmt: str = "qcow2",
    force_share: bool = False,
    bitmaps: bool = False,
    existing: bool = False,
    coroutines: int | None = None,
    create_options: Sequence[str] = (),
    write_options: Sequence[str] = (),
) -> None:
    """Copy ``source`` (its whole backing chain flattened) into a new sparse ``target``,
    or with ``existing`` into a target that exists (a device, an ``rbd:`` image).

    ``coroutines`` (``-m``, at most 16) reads that many pieces at once; the target is still
    written in order (unless ``write_options`` have ``-W``). ``create_options`` are the new
    target's ``-o`` options,
    ``write_options`` how it is written (:meth:`shim.targets.Targets.convert_options`:
    compressed, out of order, capped).
    """
    argv = [QEMU_IMG, "convert", "-O", target_fmt, *_format("-f", source, source_fmt)]
    argv += ["-m", str(coroutines)] if coroutines else []
    argv += list(write_options)
    if existing:
        argv.append("-n")
    elif target_fmt == "qcow2":
        argv += ["-o", ",".join((QCOW2_V3, *create_options))]
    argv += ["-U"] if force_share else []
    argv += ["--bitmaps"] if bitmaps else []
    _run([*argv, _name(source), os.fspath(target)], pass_fds=_fds(source))


def compare(
    first: Image,
    second: Image,
    *,
    first_fmt: str | None = "qcow2",
    second_fmt: str | None = "qcow2",
    force_share: bool = False,
) -> bool:
    """Whether the two images (each read through its backing chain) hold the same data.

    Different virtual sizes count as different only where the larger image holds non-zero
    data beyond the smaller one, as qemu-img defines it.
    """
    argv = compare_argv(
        first, second, first_fmt=first_fmt, second_fmt=second_fmt, force_share=force_share
    )
    return compare_result(argv, _run(argv, check=False, pass_fds=_fds(first, second)))


def compare_argv(
    first: Image,
    second: Image,
    *,
    first_fmt: str | None = "qcow2",
    second_fmt: str | None = "qcow2",
    force_share: bool = False,
) -> list[str]:
    """The argv :func:`compare` runs, for a caller that runs it beside other programs
    (:func:`shim.proc.run_many`, with :func:`fds_of` the images); :func:`compare_result`
    reads its result."""
    argv = [QEMU_IMG, "compare", "-q"]
    argv += _format("-f", first, first_fmt) + _format("-F", second, second_fmt)
    argv += ["-U"] if force_share else []
    return [*argv, _name(first), _name(second)]


QEMU_NBD = "qemu-nbd"
COMPARE_SLICES = 4
"""``qemu-img compare`` reads one piece at a time: a compressed chain's clusters were
decompressed one after another (768 MiB of compressed text: 1.7 s). Compared in 4 slices
side by side, read from one ``qemu-nbd`` that decompresses for all of them: 1.1 s. Not
worth it for a chain stored plain (1.0 s either way), and a hole costs more through NBD
(a disk of 1 TiB holding 256 MiB: 0.14 s compared whole, 0.9 s in 4 slices)."""
COMPARE_SLICE_MIN = 64 * 1024 * 1024
"""An image smaller than two of these is compared whole, without a server."""
_SLICE_ALIGN = 1024 * 1024
COMPARE_DIR_PREFIX = "compare."
"""The private directories of the servers' sockets, in the runtime directory."""
_RUN_DIR_MAX = 107 - len("/compare.XXXXXXXX/nbd.sock")


@contextlib.contextmanager
def compare_slices(
    chain: Spec, copy: StrPath, *, size: int, copy_fmt: str | None, slices: int
) -> Iterator[list[list[str]]]:
    """:func:`compare_argv` of the first ``size`` bytes of ``chain`` (every layer named)
    and ``copy`` (one layer: a file of ``copy_fmt``, or a ``json:`` name with its drivers),
    in up to ``slices`` slices for the block to run side by side (without a network); they
    hold the same data when every slice's :func:`compare_result` says so.

    A slice is a raw window (``offset``, ``size``). Not over the chain's own nodes: a
    window's allocation stops at it, so data a backing file holds under an unallocated top
    reads as a hole. Over a ``qemu-nbd`` serving the chain instead, whose allocation is the
    whole chain's (NBD's ``base:allocation``), on a socket in a private directory; the
    server ends with the block.
    """
    slices = max(1, min(slices, size // COMPARE_SLICE_MIN))
    # A window's size must be whole sectors, a socket's path at most 107 bytes.
    if slices == 1 or size % 512 or len(os.fsencode(RUN_DIR)) > _RUN_DIR_MAX:
        yield [compare_argv(chain, copy, second_fmt=copy_fmt)]
        return
    RUN_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(prefix=COMPARE_DIR_PREFIX, dir=RUN_DIR) as private:
        sock = os.path.join(private, "nbd.sock")
        server = [QEMU_NBD, "--read-only", "--persistent", f"--shared={slices}",
                  f"--socket={sock}", chain.text]  # fmt: skip
        served = {"driver": "nbd", "server": {"type": "unix", "path": sock}}
        step = -(-size // slices // _SLICE_ALIGN) * _SLICE_ALIGN
        argvs = [
            compare_argv(
                _window(served, offset, min(step, size - offset)),
                _window(_copy_node(copy, copy_fmt), offset, min(step, size - offset)),
                first_fmt=None,
                second_fmt=None,
            )
            for offset in range(0, size, step)
        ]
        with proc.serving(server, Path(sock), pass_fds=chain.fds, network=False):
            yield argvs


def _copy_node(copy: StrPath, fmt: str | None) -> dict[str, Any]:
    name = os.fspath(copy)
    if name.startswith("json:"):
        node: dict[str, Any] = json.loads(name[len("json:") :])
        return node
    if fmt is None:
        raise ValueError(f"the format of {name} is needed to compare it in slices")
    node = {"driver": fmt, "file": {"driver": "file", "filename": name}}
    return {**node, "backing": None} if fmt == "qcow2" else node


def _window(node: dict[str, Any], offset: int, length: int) -> str:
    return "json:" + json.dumps({"driver": "raw", "offset": offset, "size": length, "file": node})


def fds_of(*images: Image) -> tuple[int, ...]:
    """The descriptors a program must inherit to open ``images``."""
    return _fds(*images)


def compare_result(argv: list[str], result: proc.Result) -> bool:
    """What a finished ``qemu-img compare`` said: same, or different; a failure raises."""
    if result.returncode == 0:
        return True
    if result.returncode == 1:
        return False
    raise CommandFailed(argv, result.returncode, result.stderr)


@dataclass(frozen=True)
class CheckResult:
    """``qemu-img check``: clean when no corruption and no leaked clusters."""

    corruptions: int
    leaks: int
    check_errors: int
    raw: dict[str, Any]

    @property
    def clean(self) -> bool:
        """No corruption, no leak, no error while checking."""
        return self.corruptions == 0 and self.leaks == 0 and self.check_errors == 0


def check(image: Image, *, fmt: str = "qcow2", chain: bool = True) -> CheckResult:
    """``qemu-img check`` of one image (its backing files are not checked).

    With ``chain`` a path is opened with its backing chain, as QEMU opens it, so a backing
    file that is missing or does not open fails the check. Without, only the image is
    opened (qcow2 only): what a caller that walks the chain itself wants, since opening the
    30th incremental opens 31 files, and checking each file of that chain 496. A
    :class:`Spec` is opened as it says (the gate's ``alone`` for one layer).
    """
    argv = _check_argv(image, fmt, chain=chain)
    return _check_result(argv, _run(argv, check=False, pass_fds=_fds(image)))


def check_many(images: Sequence[Spec], *, at_once: int) -> list[CheckResult | CommandFailed]:
    """``qemu-img check`` of each image as its spec says (one layer each, from the gate),
    ``at_once`` side by side: per image its result, or why it could not be checked. A
    cancellation or signal stops them all."""
    argvs = [_check_argv(image, "qcow2", chain=False) for image in images]
    runs = proc.run_many(argvs, at_once=at_once, check=False, pass_fds=_fds(*images), network=False)
    found: list[CheckResult | CommandFailed] = []
    for argv, result in strict_zip(argvs, runs):
        try:
            found.append(_check_result(argv, result))
        except CommandFailed as exc:
            found.append(exc)
    return found


def repair_leaks(image: Spec) -> None:
    """``qemu-img check -r leaks``: frees clusters nothing refers to, and nothing else."""
    _run([QEMU_IMG, "check", "-q", "-r", "leaks", image.text], pass_fds=image.fds)


def rebase(image: str, backing: str, *, pass_fds: Sequence[int]) -> None:
    """Safe (content-preserving) ``qemu-img rebase`` of the qcow2 ``image`` onto the qcow2
    ``backing`` (stored as given, resolved from the image's directory), without a network:
    the names it resolves are the NAS's."""
    argv = [QEMU_IMG, "rebase", "-f", "qcow2", "-F", "qcow2", "-b", backing, image]
    proc.run(argv, pass_fds=pass_fds, network=False)


def _check_argv(image: Image, fmt: str, *, chain: bool) -> list[str]:
    if isinstance(image, Spec):
        return [QEMU_IMG, "check", "--output=json", image.text]
    if chain:
        return [QEMU_IMG, "check", "--output=json", "-f", fmt, os.fspath(image)]
    alone = {"driver": fmt, "file": {"driver": "file", "filename": os.fspath(image)},
             "backing": None}  # fmt: skip
    return [QEMU_IMG, "check", "--output=json", "json:" + json.dumps(alone)]


def _check_result(argv: list[str], result: proc.Result) -> CheckResult:
    # Exit 2 is corruption, 3 leaks: both still print the JSON report.
    if result.returncode not in (0, 2, 3) or not result.stdout.strip():
        raise CommandFailed(argv, result.returncode, result.stderr)
    doc = json.loads(result.stdout)
    return CheckResult(
        corruptions=int(doc.get("corruptions", 0)),
        leaks=int(doc.get("leaks", 0)),
        check_errors=int(doc.get("check-errors", 0)),
        raw=doc,
    )
