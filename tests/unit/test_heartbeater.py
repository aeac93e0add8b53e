"""A node's heartbeater stops within its bound even when the registry hangs: a node's shutdown never
waits on a registry that does not answer (its entry expires on its own)."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.node.registry_client import Heartbeater, RegistryClient, RegistryUnavailable
from pdserve.rpc.registry import NodeInfo

INFO = NodeInfo(node_id="n0", role="mixed", model="m", grpc_address="127.0.0.1:1")


class _Registry(RegistryClient):
    """Answers heartbeats; its deregister and close hang (``hang``) or answer at once."""

    def __init__(self, hang: bool, fail: bool = False) -> None:
        self.hang = hang
        self.fail = fail
        self.beats = 0
        self.deregistered: list[str] = []
        self.closed = False

    async def heartbeat(self, node: NodeInfo) -> None:
        self.beats += 1

    async def deregister(self, node_id: str) -> None:
        if self.fail:
            raise RegistryUnavailable("the registry is down")
        if self.hang:
            await asyncio.Event().wait()
        self.deregistered.append(node_id)

    async def close(self) -> None:
        if self.hang:
            await asyncio.Event().wait()
        self.closed = True


def _stop(registry: _Registry, stop_timeout_s: float) -> float:
    """Start a heartbeater, let it beat, stop it; the seconds stop() took."""
    async def scenario() -> float:
        beater = Heartbeater(registry, lambda: INFO, interval_s=0.02, stop_timeout_s=stop_timeout_s)
        await beater.start()
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await beater.stop(deregister=True)
        return time.monotonic() - started

    return asyncio.run(scenario())


def test_stop_gives_up_on_a_hung_registry_within_its_bound() -> None:
    registry = _Registry(hang=True)
    took = _stop(registry, stop_timeout_s=0.3)
    assert 0.3 <= took < 1.5, took
    assert registry.beats >= 2 and not registry.deregistered and not registry.closed


def test_stop_deregisters_and_closes_a_registry_that_answers() -> None:
    registry = _Registry(hang=False)
    assert _stop(registry, stop_timeout_s=5.0) < 1.0
    assert registry.deregistered == ["n0"] and registry.closed


def test_stop_closes_the_client_after_a_failed_deregister() -> None:
    registry = _Registry(hang=False, fail=True)
    assert _stop(registry, stop_timeout_s=5.0) < 1.0
    assert not registry.deregistered and registry.closed


def test_a_stop_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stop_timeout_s"):
        Heartbeater(_Registry(hang=False), lambda: INFO, interval_s=1.0, stop_timeout_s=0)
