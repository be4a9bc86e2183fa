"""``-o restore``: flatten each disk's chain into its volume, proven identical first.

Every file of every chain passes the gate (:mod:`shim.gate`) before anything is written,
staged copies included: a chain that names a host file, another VM's directory or a network
address is refused with nothing touched, and QEMU reads each layer by the descriptor the
gate holds. Every file of every chain read is then ``qemu-img check``ed, in a worker thread
while the first copies are made: the 30th incremental of a chain is 31 files per disk, and
its checks cost as much as its copy. A file volume is restored beside itself and renamed
over the original only after ``qemu-img compare`` has proven the new file equal to the
chain and every check has passed: on any failure the original is untouched. A block device
or ``rbd:`` volume cannot be swapped by a rename; it is written in place once the checks
have passed, and compared afterwards. A volume that is the disk of a running VM is never
written. Restored volumes carry no bitmaps, so the next backup of the VM is a full one (the
management server clears its checkpoint too). The locks of the backup's VM and of the
target VM (when given) are held throughout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import libvirt

from shim import cancel, gate, proc, qemu_img
from shim.backupdir import fsync_dir
from shim.chain import backup_files
from shim.compat import strict_zip
from shim.contract import RestoreOutcome
from shim.errors import BackupFailed, CommandFailed, InputError, MountError
from shim.gate import Chain, Damaged, Layer, VmDirectory, split_vm
from shim.lock import VmLock
from shim.log import current_log_id, log_id
from shim.nas import MountSession
from shim.qemu_img import Spec
from shim.request import RestoreRequest
from shim.virt.connection import open_connection
from shim.virt.disks import parse_disks, volume_id_of
from shim.virt.host import attach_volume

log = logging.getLogger(__name__)

CHECKS_AT_ONCE = 8
"""``qemu-img check`` processes a restore runs side by side on the chains it reads."""
CHECKS_NICE = 19
"""The checks' CPU priority: the lowest, below the copies they overlap."""
COPY_COROUTINES = 16
"""Pieces ``qemu-img convert`` reads at once (its maximum): a deep chain's data is spread
over its files, and one piece at a time waits on each read (30th incremental: 0.9 s to
0.6 s)."""


MOUNT_FAILED = "Failed to mount the backup repository on the KVM host"


def restore_backup(request: RestoreRequest) -> RestoreOutcome:
    """Restore the backup ``request`` names into its target volumes, in disk order.

    Failures carry the Java restore's messages (contract §7), naming each volume by its
    uuid, and the gate's (naming the file and the rule) for what it refuses; the cause is
    in the log.
    """
    uuids = list(request.volume_uuids) or [volume_id_of(t) for t in request.targets]
    vm, backup = split_vm(request.backup_path)
    with contextlib.ExitStack() as stack:
        # The backup's VM (its chain must not change under the restore) and the VM whose
        # volumes these are, in one order for every taker.
        for name in sorted({vm} | ({request.vm} if request.vm else set())):
            stack.enter_context(VmLock(name))
        session = stack.enter_context(_mounted(request))
        vm_dir = session.vm_directory(vm)
        if vm_dir.kind(backup) != "directory":
            raise BackupFailed(f"backup {request.backup_path} does not exist")
        chains = _chains(vm_dir, backup, request.backup_files, uuids)
        if len(chains) != len(request.targets):
            raise InputError(
                f"{len(chains)} backup file(s) for {len(request.targets)} target volume(s)"
            )
        _refuse_running_disks(request.targets)
        sizes = []
        with _ChainChecks(chains, uuids) as checks:
            for chain, target, uuid in strict_zip(chains, request.targets, uuids):
                try:
                    sizes.append(_restore_one(chain, target, request.create_size, checks.require))
                except OSError:
                    checks.require()  # a corrupt chain is named as such, whatever failed
                    raise
                except (BackupFailed, CommandFailed) as exc:
                    checks.require()
                    log.error("restoring %s into %s failed: %s", chain.top.shown, target, exc)
                    raise BackupFailed(
                        f"Unable to restore contents from the backup volume [{uuid}]."
                    ) from exc
            checks.require()  # each volume waited for the checks; none succeeds without
        if request.attach_to is not None:
            attach_volume(request.attach_to, request.targets[0])
        return RestoreOutcome(targets=list(request.targets), virtual_sizes=sizes)


class _ChainChecks:
    """The checks of every chain a restore reads (:func:`_first_corrupt`), run in a worker
    thread from the moment it is made. Nothing is written in place, and no staged copy
    renamed over its volume, before :meth:`require` has returned. Leaving the block stops
    checks still running (their programs killed) and waits for the thread; a cancellation
    of the operation stops them too."""

    def __init__(self, chains: Sequence[Chain], uuids: Sequence[str]) -> None:
        self._uuids = list(uuids)
        self._token = cancel.CancelToken()
        self._outer = outer = cancel.current()
        if outer is not None:
            outer.on_cancel(lambda: self._token.cancel(outer.reason))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="restore-checks")
        self._verdict = self._pool.submit(self._check, list(chains), current_log_id())

    def _check(self, chains: list[Chain], logid: str | None) -> int | None:
        # Linux keeps a nice value per thread, and the programs this thread starts inherit
        # it: the checks take the CPU the copy leaves (P18: 0.15 s less than at equal rank).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CHECKS_NICE)
        with log_id(logid), cancel.bound(self._token):
            return _first_corrupt(chains)

    def require(self) -> None:
        """Wait for the checks; raise the Java message naming the first corrupt volume."""
        try:
            corrupt = self._verdict.result()
        except cancel.Cancelled:
            if self._outer is not None:
                # The operation's cancellation ended here: delivered, so the cleanup's own
                # programs (umount) run undisturbed, as after any stop (shim.cancel).
                self._outer.take()
            raise
        if corrupt is not None:
            raise BackupFailed(
                f"Backup qcow2 file for the volume [{self._uuids[corrupt]}] is corrupt."
            )

    def __enter__(self) -> _ChainChecks:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._verdict.done():
            self._token.cancel("the restore ended")
        self._pool.shutdown(wait=True)


def _first_corrupt(chains: Sequence[Chain]) -> int | None:
    """The index of the first chain a file of which fails ``qemu-img check`` or cannot be
    checked (None when every chain is clean). Each file is checked alone, by the gate's
    descriptor (the gate walked the chains), once however many chains share it, the checks
    side by side: the 30th incremental of a chain is 31 files per disk, and each check is a
    process start more than it is work (31 in a row took 1.2 s). A stopped restore
    (cancelled, signalled) raises: it says nothing about the chain."""
    files: dict[tuple[int, int], Layer] = {}
    for chain in chains:
        for layer in chain.layers:
            files.setdefault(layer.identity, layer)
    layers = list(files.values())
    found = qemu_img.check_many([gate.alone(layer) for layer in layers], at_once=CHECKS_AT_ONCE)
    verdicts = {layer.identity: verdict for layer, verdict in strict_zip(layers, found)}
    for index, chain in enumerate(chains):
        for layer in chain.layers:
            verdict = verdicts[layer.identity]
            if isinstance(verdict, CommandFailed):
                log.error("%s cannot be checked: %s", layer.shown, verdict)
                return index
            if not verdict.clean:
                log.error("%s fails qemu-img check", layer.shown)
                return index
    return None


@contextlib.contextmanager
def _mounted(request: RestoreRequest) -> Iterator[MountSession]:
    # The Java restore's message for any mount failure (the cause is in the log).
    session = MountSession(request.repository)
    try:
        session.__enter__()
    except MountError as exc:
        raise MountError(MOUNT_FAILED) from exc
    try:
        yield session
    finally:
        session.close()


def _chains(
    vm_dir: VmDirectory, backup: str, given: Sequence[str], uuids: Sequence[str]
) -> list[Chain]:
    """The chain of each volume's backup file, every file through the gate. ``given``
    names the files (bare names in the backup, or mount-relative paths in the same VM's
    directory); else the manifest does, else the directory's listing. A chain the gate
    finds damaged is "corrupt", as the Java restore says; one it refuses, refused."""
    names: list[str] = []
    for name in given:
        if "/" in name:
            vm, rest = split_vm(name)
            if vm != vm_dir.vm or not rest:
                raise InputError(f"backup file {name} is not a backup of this VM")
            names.append(rest)
        else:
            names.append(f"{backup}/{name}")
    if not given:
        manifest = vm_dir.manifest(backup)
        files = [d.file for d in manifest.disks] if manifest else backup_files(vm_dir, backup)
        names = [f"{backup}/{file}" for file in files]
    chains = []
    for index, relative in enumerate(names):
        uuid = uuids[index] if index < len(uuids) else relative
        try:
            chains.append(vm_dir.chain(relative))
        except FileNotFoundError:
            log.error("backup file %s does not exist", vm_dir.shown(relative))
            raise BackupFailed(f"Backup file for the volume [{uuid}] does not exist.") from None
        except Damaged as exc:
            # Not a readable qcow2 chain (damage, not intent): the Java restore's word for it.
            log.error("%s", exc)
            raise BackupFailed(f"Backup qcow2 file for the volume [{uuid}] is corrupt.") from exc
    return chains


def _refuse_running_disks(targets: Sequence[str]) -> None:
    wanted = {_volume_key(t): t for t in targets}
    conn = open_connection()
    try:
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                xml = dom.XMLDesc()
            except libvirt.libvirtError:
                continue  # stopped since it was listed: its disks are free
            for disk in parse_disks(xml):
                key = _volume_key(disk.source)
                if key in wanted:
                    raise BackupFailed(
                        f"volume {wanted[key]} is a disk of running VM {dom.name()}: "
                        "refusing to overwrite it"
                    )
    finally:
        conn.close()


def _volume_key(source: str) -> str:
    # Files and devices by real path; rbd as pool/image (the domain XML says rbd:pool/image,
    # a target URI may carry :mon_host=... options after it).
    if source.startswith("rbd:"):
        return "rbd:" + source[4:].split(":", 1)[0]
    return os.path.realpath(source)


def _restore_one(
    chain: Chain, target: str, create_size: int | None, require_clean: Callable[[], None]
) -> int:
    """Restore one chain into ``target``; ``require_clean`` is called (and may raise)
    before anything is written over data."""
    virtual_size = chain.virtual_size
    source = chain.spec()
    if target.startswith("rbd:"):
        require_clean()
        if create_size is not None:
            # A new Ceph volume: created at the size the management server gave it.
            qemu_img.create(target, max(create_size, virtual_size), fmt="raw")
        _write_in_place(chain, source, target, "raw", target)
        return virtual_size
    path = Path(target)
    try:
        link = stat.S_ISLNK(os.lstat(target).st_mode)
        mode: int | None = path.stat().st_mode
    except FileNotFoundError:
        link, mode = False, None
    if mode is None and target.startswith("/dev/"):
        raise BackupFailed(f"block volume {target} does not exist on this host")
    if mode is not None and stat.S_ISBLK(mode):
        # Device names are links (LINSTOR's by-res, LVM, by-id): the device is what counts.
        fd = os.open(target, os.O_RDONLY)
        try:
            device_size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        if device_size < virtual_size:
            raise BackupFailed(
                f"volume {target} ({device_size} bytes) is smaller than the backup "
                f"({virtual_size} bytes)"
            )
        require_clean()
        limited = json.dumps(
            {"driver": "raw", "size": virtual_size,
             "file": {"driver": "host_device", "filename": target}}
        )  # fmt: skip
        _write_in_place(chain, source, target, "raw", f"json:{limited}")
        return virtual_size
    if link:
        raise BackupFailed(
            f"volume {target} is a symbolic link: a restore never writes through one"
        )
    if mode is not None and not stat.S_ISREG(mode):
        raise BackupFailed(f"volume {target} is neither a file nor a block device")
    _replace_file(chain, source, path, exists=mode is not None, require_clean=require_clean)
    return virtual_size


def _write_in_place(chain: Chain, source: Spec, target: str, fmt: str, readable: str) -> None:
    log.info("restoring %s into %s in place", chain.top.shown, target)
    qemu_img.convert(source, target, target_fmt=fmt, existing=True, coroutines=COPY_COROUTINES)
    device = None if target.startswith("rbd:") else Path(target)
    if not _compare_flushing(chain, source, readable, None, device):
        raise BackupFailed(f"restored {target} differs from the backup")
    log.info("restored %s (%d bytes), verified identical", target, chain.virtual_size)


def _volume_format(target: Path) -> str:
    """The format of an existing file volume: qcow2 when its first bytes say so, else raw.
    Read here rather than probed by qemu-img, which would open the backing file a qcow2
    header names (the guest's data may be such a header). Then opened with that format and
    no backing, which fails while a QEMU holds the volume."""
    with open(target, "rb") as fh:
        fmt = "qcow2" if fh.read(4) == gate.QCOW2_MAGIC else "raw"
    node: dict[str, object] = {"driver": fmt, "file": {"driver": "file", "filename": str(target)}}
    if fmt == "qcow2":
        node["backing"] = None
    try:
        qemu_img.info("json:" + json.dumps(node))
    except CommandFailed as exc:
        raise BackupFailed(f"volume {target} cannot be opened (in use?): {exc}") from None
    return fmt


def _replace_file(
    chain: Chain,
    source: Spec,
    target: Path,
    *,
    exists: bool,
    require_clean: Callable[[], None],
) -> None:
    fmt = _volume_format(target) if exists else "qcow2"
    staged = target.with_name(f".{target.name}.restore-{os.getpid()}")
    # Made here, new (O_EXCL) and not through a link: qemu-img then writes this very file.
    os.close(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    try:
        qemu_img.convert(source, staged, target_fmt=fmt, coroutines=COPY_COROUTINES)
        if not _compare_flushing(chain, source, staged, fmt, staged):
            raise BackupFailed(f"restored copy of {target} differs from the backup")
        require_clean()
        if exists:
            st = target.stat()
            os.chown(staged, st.st_uid, st.st_gid)
            os.chmod(staged, stat.S_IMODE(st.st_mode))
        os.rename(staged, target)
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
    log.info("restored %s (%s), verified identical before it replaced the volume", target, fmt)


def _compare_flushing(
    chain: Chain, source: Spec, written: str | Path, written_fmt: str | None, flush: Path | None
) -> bool:
    """Whether what was ``written`` holds the data of ``chain`` (``source``: ``qemu-img
    compare``; a compressed chain in slices side by side), while ``flush`` (the file or
    device written, a device often by a symlink; None for rbd, which librbd flushes as
    qemu-img closes it) goes to stable storage with ``sync --data``: ``qemu-img convert``
    leaves its target's data in the page cache, and a restore that says it is done must
    survive the host's crash. All run as programs, side by side: a cancellation or signal
    stops them like any other."""
    if flush is None:
        return qemu_img.compare(source, written, second_fmt=written_fmt)
    slices = qemu_img.COMPARE_SLICES if chain.zstd else 1
    with qemu_img.compare_slices(
        source, written, size=chain.virtual_size, copy_fmt=written_fmt, slices=slices
    ) as compares:
        *compared, flushed = proc.run_many(
            [*compares, ["sync", "--data", os.fspath(flush)]],
            at_once=len(compares) + 1,
            check=False,
            # In slices a server reads the NAS's files, not the compares.
            pass_fds=qemu_img.fds_of(source) if len(compares) == 1 else (),
            network=False,  # compare reads the NAS's files
        )
    if flushed.returncode != 0:
        raise BackupFailed(f"flushing {flush} failed: {flushed.stderr.strip()}")
    # Every slice's verdict is read: a failure anywhere raises, whatever another says.
    verdicts = strict_zip(compares, compared)
    return all([qemu_img.compare_result(argv, done) for argv, done in verdicts])
