"""Fixtures shared by the suite: the lab hypervisor, checked once, never skipped."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from shim import settings
from shim.errors import VirtError
from shim.virt import host
from shim.virt.connection import open_connection
from tests.lab import Lab, MiB, sweep_stale_labs
from tests.lab.lab import start_libvirtd_if_down
from tests.support import Chain


@functools.cache
def _lab_backs_up_running_vms() -> bool | None:
    """Whether the lab's libvirt backs up a running (TCG) domain, by the shim's own checks;
    None when no libvirtd answers (the tests then fail on the hypervisor fixture)."""
    try:
        conn = open_connection()
    except VirtError:
        return None
    try:
        return host.versions_back_up(conn) and host.backup_capability(conn, virttype="qemu")
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a host whose libvirt cannot back up a running VM (Debian 11: libvirt 7.0), the
    tests marked ``live_backup`` cannot run: they are deselected, loudly, and the tests
    marked ``no_live_backup`` (the refusal, in upstream's words) run in their place. On
    every other host it is the other way round. Nothing is skipped."""
    if os.environ.get("SHIM_RELEASE_CHROOT"):
        # In a release chroot (scripts/release-chroot): the tests that build chroots of each
        # release themselves ran from the host already.
        nested = [item for item in items if item.get_closest_marker("release_chroots")]
        config.hook.pytest_deselected(items=nested)
        items[:] = [item for item in items if not item.get_closest_marker("release_chroots")]
    capable = _lab_backs_up_running_vms()
    if capable is None:
        return
    unwanted = "no_live_backup" if capable else "live_backup"
    dropped = [item for item in items if item.get_closest_marker(unwanted)]
    if not dropped:
        return
    config.hook.pytest_deselected(items=dropped)
    items[:] = [item for item in items if not item.get_closest_marker(unwanted)]
    config.stash[_DESELECTED_BY_CAPABILITY] = (capable, len(dropped))


_DESELECTED_BY_CAPABILITY = pytest.StashKey[tuple[bool, int]]()


def pytest_report_header(config: pytest.Config) -> str:
    capable = _lab_backs_up_running_vms()
    return f"lab hypervisor backs up running VMs: {capable}"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    found = config.stash.get(_DESELECTED_BY_CAPABILITY, None)
    if found is None:
        return
    capable, count = found
    if capable:
        why = "they prove the refusal on hosts that cannot back up running VMs"
    else:
        why = "they back up running VMs, which this host's libvirt cannot (upstream refuses too)"
    terminalreporter.write_line(f"{count} tests deselected: {why}")


@pytest.fixture(scope="session")
def _lab_swept() -> None:
    """Leftovers of killed runs removed, once per session."""
    removed = sweep_stale_labs()
    if removed:
        print(f"removed leftovers of earlier runs: {', '.join(removed)}")


@pytest.fixture
def hypervisor(_lab_swept: None) -> Iterator[libvirt.virConnect]:
    """A connection to the lab's libvirtd (per test: the fault suite restarts libvirtd);
    the run fails, it never skips, without one."""
    try:
        conn = open_connection()
    except VirtError as exc:
        pytest.fail(
            f"the lab hypervisor is not reachable ({exc}); run scripts/setup-host as root",
            pytrace=False,
        )
    yield conn
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


@pytest.fixture
def lab(hypervisor: libvirt.virConnect) -> Iterator[Lab]:
    """A fresh lab, closed (everything removed) after the test whatever its outcome.

    A libvirtd that died during the test fails it, and is started again so that the tests
    after it run against a hypervisor.
    """
    with Lab() as the_lab:
        yield the_lab
        died = start_libvirtd_if_down()
        if died:
            the_lab.reconnect()
    if died:
        pytest.fail("libvirtd died during this test (started again)", pytrace=False)


@pytest.fixture
def push_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Push mode forced for the drop-ins and services the test runs (fulls of running VMs
    default to pull mode): for what only push mode's job does."""
    monkeypatch.setenv(settings.METHOD.name, "push")


@pytest.fixture
def chain(lab: Lab, tmp_path: Path) -> Chain:
    """A running two-disk lab VM and a repository to back it up to."""
    vm = lab.create_vm(disks=(32 * MiB, 16 * MiB))
    return Chain(lab=lab, vm=vm, repo=lab.repository(), log=tmp_path / "agent.log")


@pytest.fixture(autouse=True)
def _restore_shim_logger() -> Iterator[None]:
    """Undo what an in-process ``cli.main`` does to the ``shim`` logger (caplog needs it)."""
    logger = logging.getLogger("shim")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()
    logger.handlers[:], logger.propagate, logger.level = saved
