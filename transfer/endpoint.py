"""Decode side of the data plane in one object: pool, reservations, receiver and inbox.

Whatever transport a prefill peer uses, its messages end here: `zmq` chunks carry their payload,
`shm` chunks arrive as in-place notices after the peer wrote D's shared pool, and the first token
rides on the last chunk's header (a failed prefill's `FirstToken` comes as a message of its own,
on the same connection, after any chunk sent before it). The node server gets every event through one
callback, on the inbox thread (hand it to the event loop with `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zmq

from pdserve.common.kv_cache import KVCachePool
from pdserve.transfer.channel import Inbox
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.head_shards import KVRankPools, rank_pools
from pdserve.transfer.messages import KVChunkHeader, KVTarget, WireCodec, WireError, WireMessage
from pdserve.transfer.receiver import ChunkResult, KVReceiver
from pdserve.transfer.reservations import KVReservations
from pdserve.transfer.transport import local_host_id


@dataclass(frozen=True)
class Malformed:
    """An inbox message that was dropped before reaching anyone: why, for logs and metrics."""

    reason: str


InboxEvent = WireMessage | ChunkResult | Malformed
EventCallback = Callable[[InboxEvent], None]


class InboxDispatcher:
    """Decodes inbox messages: KV chunks go to `receiver` (if this node has one) and their results,
    like every other message, to `on_event`; a chunk's `first_token` follows its result, accepted or
    not (the decode node then finds the KV incomplete). Runs on the inbox thread."""

    def __init__(self, on_event: EventCallback, receiver: KVReceiver | None) -> None:
        self._on_event = on_event
        self._receiver = receiver
        self._codec = WireCodec()
        self.counts: Counter[str] = Counter()  # malformed messages, by kind

    def __call__(self, frames: list[zmq.Frame]) -> None:
        try:
            message = self._codec.decode(frames[0].buffer)
        except WireError as exc:
            self._drop("undecodable", str(exc))
            return
        payload = [frame.buffer for frame in frames[1:]]
        if isinstance(message, KVChunkHeader):
            if self._receiver is None:
                self._drop("unexpected_kv_chunk", "this node takes no KV")
                return
            self._on_event(self._receiver.accept(message, payload))
            if message.first_token is not None:
                self._on_event(message.first_token)
        elif payload:
            self._drop("unexpected_payload", f"{type(message).__name__} with {len(payload)} payload frames")
        else:
            self._on_event(message)

    def _drop(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        if self._receiver is not None:
            self._receiver.count_malformed()
        self._on_event(Malformed(f"{kind}: {detail}"))


class KVEndpoint:
    """A decode node's data plane. `target()` is what goes into each `PrefillTask`."""

    def __init__(self, pool: KVCachePool | KVRankPools, config: TransferConfig, on_event: EventCallback,
                 clock: Callable[[], float] = time.monotonic) -> None:
        pool = rank_pools(pool)  # a tensor-parallel node's ranks each hold some of the heads
        spec = pool.spec
        self.pool = pool
        self.config = config
        self.reservations = KVReservations(spec.num_layers, spec.num_blocks, spec.block_size, clock)
        self.receiver = KVReceiver(pool, self.reservations, allow_in_place=pool.shm_name is not None)
        self.dispatcher = InboxDispatcher(on_event, self.receiver)
        # The largest valid frame is one layer's K (or V) for every block of the pool.
        max_frame = spec.num_blocks * int(np.prod(spec.block_shape)) * spec.itemsize
        self.inbox = Inbox(config, self.dispatcher, max_frame)
        self._host_id = local_host_id()

    def start(self) -> KVEndpoint:
        self.inbox.start()
        return self

    @property
    def address(self) -> str:
        host = self.config.advertise_host or self.config.bind_host
        return f"tcp://{host}:{self.inbox.port}"

    def target(self) -> KVTarget:
        return KVTarget(self.address, self._host_id, self.pool.spec, shm_name=self.pool.shm_name,
                        rank_shm_names=tuple(self.pool.rank_shm_names))

    def close(self) -> None:
        self.inbox.close()
