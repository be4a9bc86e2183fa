"""Quiescing: the guest agent's response timeout is shortened for the freeze and put back
afterwards, whether the freeze worked, failed, or the thaw failed. No hypervisor needed."""

from __future__ import annotations

import libvirt
import pytest

from shim.virt import host

DEFAULT = libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT


class _Dom:
    def __init__(self, *, freezes: bool = True, thaws: bool = True) -> None:
        self.freezes, self.thaws = freezes, thaws
        self.timeouts: list[int] = []

    def agentSetResponseTimeout(self, seconds: int, _flags: int) -> int:
        self.timeouts.append(seconds)
        return 0

    def fsFreeze(self) -> int:
        if not self.freezes:
            raise libvirt.libvirtError("Guest agent is not responding")
        return 1

    def fsThaw(self) -> int:
        if not self.thaws:
            raise libvirt.libvirtError("Guest agent is not responding")
        return 1


@pytest.mark.parametrize("thaws", [True, False])
def test_the_agent_timeout_is_put_back_after_thaw(thaws: bool) -> None:
    dom = _Dom(thaws=thaws)
    assert host.freeze(dom) is True  # type: ignore[arg-type]
    assert dom.timeouts == [host.AGENT_TIMEOUT_SECONDS]
    host.thaw(dom)  # type: ignore[arg-type]
    assert dom.timeouts == [host.AGENT_TIMEOUT_SECONDS, DEFAULT]


def test_a_failed_freeze_puts_the_timeout_back_at_once() -> None:
    dom = _Dom(freezes=False)
    assert host.freeze(dom) is False  # type: ignore[arg-type]
    assert dom.timeouts == [host.AGENT_TIMEOUT_SECONDS, DEFAULT]
