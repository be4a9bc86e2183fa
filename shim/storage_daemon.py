"""qemu-storage-daemon with a minimal QMP client: block jobs on images no VM has open.

Used for stopped VMs: the daemon opens each source qcow2 read-write with image locking,
so a VM that starts meanwhile fails to get its write lock instead of writing under the
backup; one QMP transaction adds the new bitmap and starts the copy at the same instant;
the daemon holds the images until it quits, which also stores the bitmaps. QEMU moves
the data; Python only speaks QMP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from shim.errors import CommandFailed, ShimError

log = logging.getLogger(__name__)

QSD = "qemu-storage-daemon"
_START_TIMEOUT_SECONDS = 30
_QUIT_TIMEOUT_SECONDS = 120


class QmpError(ShimError):
    """QEMU answered a QMP command with an error."""


class StorageDaemon:
    """One ``qemu-storage-daemon`` process and its QMP monitor, as a context manager.

    ``blockdevs`` are ``--blockdev`` option strings. Leaving the block quits the daemon
    (bitmaps are written to the images then); on an exception it is killed.
    """

    def __init__(self, blockdevs: Sequence[str]) -> None:
        self._blockdevs = list(blockdevs)
        self._dir = Path(tempfile.mkdtemp(prefix="shim-qsd."))
        self._socket_path = self._dir / "qmp.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> StorageDaemon:
        argv = [QSD]
        for blockdev in self._blockdevs:
            argv += ["--blockdev", blockdev]
        # The daemon connects to us: accepting is an event to wait for, not a file to poll.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self._socket_path))
        listener.listen(1)
        argv += [
            "--chardev", f"socket,path={self._socket_path},server=off,id=qmp0",
            "--monitor", "chardev=qmp0",
        ]  # fmt: skip
        log.debug("run: %s", " ".join(argv))
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except FileNotFoundError:
            listener.close()
            self._remove_dir()
            raise CommandFailed([QSD], 127, f"{QSD}: command not found") from None
        try:
            self._accept(listener)
            self.command("qmp_capabilities")
        except BaseException:
            self._kill()
            raise
        finally:
            listener.close()
        return self

    def _accept(self, listener: socket.socket) -> None:
        proc = self._process
        # Either the daemon connects, or it exits (its stderr reaches end of file).
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(proc.stderr, selectors.EVENT_READ)  # type: ignore[arg-type]
            ready = {key.fileobj for key, _ in selector.select(_START_TIMEOUT_SECONDS)}
        if listener not in ready:
            if not ready:
                raise CommandFailed([QSD], None, "did not connect its monitor", timed_out=True)
            _, err = proc.communicate()
            raise CommandFailed([QSD], proc.returncode, err.decode(errors="replace"))
        self._sock, _ = listener.accept()
        self._reader = self._sock.makefile("r", encoding="utf-8")
        greeting = json.loads(self._reader.readline())
        if "QMP" not in greeting:
            raise QmpError(f"unexpected QMP greeting: {greeting}")

    def _read(self) -> dict[str, Any]:
        line = self._reader.readline()
        if not line:
            raise QmpError("qemu-storage-daemon closed its monitor")
        return json.loads(line)

    def command(self, execute: str, /, **arguments: Any) -> Any:
        """Execute one QMP command and return its result; events seen meanwhile are kept."""
        if self._sock is None:
            raise QmpError("qemu-storage-daemon is not running")
        message: dict[str, Any] = {"execute": execute}
        if arguments:
            message["arguments"] = arguments
        self._sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QmpError(f"{execute}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def wait_jobs(self, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Block until every job ended; return each job's BLOCK_JOB_COMPLETED data.

        A job that failed or was cancelled raises :class:`QmpError` with QEMU's reason.
        """
        pending = set(job_ids)
        done: dict[str, dict[str, Any]] = {}
        while pending:
            event = self.events.pop(0) if self.events else self._read()
            kind, data = event.get("event"), event.get("data", {})
            if (
                kind in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                and data.get("device") in pending
            ):
                pending.discard(data["device"])
                done[data["device"]] = data
                if kind == "BLOCK_JOB_CANCELLED" or data.get("error"):
                    raise QmpError(
                        f"block job {data['device']}: {data.get('error') or 'cancelled'}"
                    )
        return done

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            # Quit cleanly when the daemon still answers: a killed daemon leaves the images'
            # persistent bitmaps flagged in use, i.e. inconsistent at the next open.
            try:
                self._quit()
            except (QmpError, CommandFailed, OSError, ValueError):
                self._kill()
            return
        self._quit()

    def _quit(self) -> None:
        with contextlib.suppress(QmpError):  # the daemon may close the monitor as it quits
            self.command("quit")
        proc = self._process
        try:
            _, err = proc.communicate(timeout=_QUIT_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self._kill()
            raise CommandFailed([QSD], None, "did not quit", timed_out=True) from None
        finally:
            self._close()
        if proc.returncode != 0:
            raise CommandFailed([QSD], proc.returncode, err.decode(errors="replace"))

    @property
    def _process(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise QmpError("qemu-storage-daemon is not running")
        return self._proc

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()
        self._close()

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self._sock is not None:
            self._sock.close()
        self._remove_dir()

    def _remove_dir(self) -> None:
        for path in (self._socket_path, self._dir):
            with contextlib.suppress(OSError):
                path.unlink() if path.is_socket() else path.rmdir()


def node_bitmaps(daemon: StorageDaemon, node: str) -> dict[str, bool]:
    """Bitmap name -> consistent, for one node (an inconsistent one survived a crash)."""
    for info in daemon.command("query-named-block-nodes", flat=True):
        if info.get("node-name") == node:
            return {
                b["name"]: not b.get("inconsistent", False)
                for b in info.get("dirty-bitmaps", [])
                if b.get("persistent", True)
            }
    return {}


def blockdev_file(node: str, path: str | os.PathLike[str], *, read_only: bool = False) -> str:
    """A ``--blockdev`` for a file node with image locking on."""
    ro = ",read-only=on" if read_only else ""
    return f"driver=file,filename={_escape(os.fspath(path))},node-name={node},locking=on{ro}"


def blockdev_qcow2(node: str, file_node: str, *, read_only: bool = False) -> str:
    """A ``--blockdev`` for a qcow2 node over ``file_node`` (its backing chain opened too)."""
    ro = ",read-only=on" if read_only else ""
    return f"driver=qcow2,file={file_node},node-name={node}{ro}"


def _escape(value: str) -> str:
    # QEMU's option syntax: a comma inside a value is written twice.
    return value.replace(",", ",,")
