"""The decode node's backstop sweep of expired KV reservations (remote_prefill.fail_expired).

Real `KVReservations` on a controlled clock and real asyncio futures, as the node's event loop
holds them: an expired reservation is released (its blocks reservable again) and the request waiting
on it fails with a retryable error; live or renewed reservations, and requests whose first token
already arrived, are left alone.
"""

from __future__ import annotations

import asyncio

import pytest

from pdserve.common.tokens import SampledTokens
from pdserve.decode_node.remote_prefill import PendingPrefill, RemotePrefillError, fail_expired
from pdserve.transfer.messages import FirstToken
from pdserve.transfer.reservations import KVReservations

LEASE_S = 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_sweep_fails_expired_waiters_and_frees_their_blocks() -> None:
    async def scenario() -> None:
        clock = Clock()
        reservations = KVReservations(num_layers=2, num_blocks=8, block_size=4, clock=clock)
        loop = asyncio.get_running_loop()
        pending = {rid: PendingPrefill(loop.create_future(), peer_address="tcp://127.0.0.1:1")
                   for rid in ("stale", "renewed", "answered")}
        reservations.reserve("stale", [0, 1], 5, LEASE_S)
        reservations.reserve("renewed", [2, 3], 5, LEASE_S)
        reservations.reserve("answered", [4], 3, LEASE_S)
        reservations.reserve("orphan", [5], 3, LEASE_S)  # no one waits on it any more
        first = FirstToken("answered", token=SampledTokens([7], [-0.1], [1]))
        pending["answered"].first_token.set_result(first)

        clock.now += LEASE_S / 2
        assert fail_expired(reservations, pending) == []
        assert reservations.renew("renewed", LEASE_S)
        clock.now += LEASE_S / 2 + 0.01
        expired = fail_expired(reservations, pending)

        assert sorted(expired) == ["answered", "orphan", "stale"]
        with pytest.raises(RemotePrefillError) as err:
            await pending["stale"].first_token
        assert err.value.retryable and "lease expired" in str(err.value)
        assert pending["answered"].first_token.result() is first  # an arrived token is not overwritten
        assert not pending["renewed"].first_token.done()
        assert reservations.get("renewed") is not None and len(reservations) == 1
        # The expired blocks are free to reserve again; the renewed ones are still taken.
        reservations.reserve("next", [0, 1, 4, 5], 9, LEASE_S)
        with pytest.raises(ValueError, match="already reserved"):
            reservations.reserve("clash", [2], 1, LEASE_S)

    asyncio.run(asyncio.wait_for(scenario(), 5.0))
