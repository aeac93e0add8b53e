"""Prefill side of the data plane: cutting a request's KV into chunks and sending them with a transport.

Two transports implement `KVSender`, chosen by name from `KV_SENDERS`:
- `shm`: the decode node's pool is a /dev/shm file on this host; the sender maps it and copies the
  blocks straight into the reserved ones, then tells D over its outbox (an `in_place` header);
- `zmq`: header + one payload frame per (layer, K/V) to D's inbox, which checks and writes them.

With tensor parallelism either side's KV is in one pool per engine rank (`KVRankPools`): the shm
sender copies each of its ranks' heads into the peer's ranks that hold them, and zmq frames carry all
heads whatever either side's TP size (transfer/head_shards.py).

Both end at the same decode-side receiver (`endpoint.KVEndpoint`), and both send through the
request's `Outbox`, so a message sent on that outbox after a chunk reaches D after it. The request's
first token rides on its last chunk's header (`KVChunkHeader.first_token`): one message, one wake-up
of D's inbox thread, for the last KV and the token.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import msgspec
import numpy as np
import zmq

from pdserve.common.kv_cache import SHM_DIR, KVCachePool, KVCacheSpec
from pdserve.transfer.channel import Outbox, TransferError
from pdserve.transfer.head_shards import KVRankPools, copy_heads, gather_heads, rank_pools
from pdserve.transfer.messages import FirstToken, KVChunkHeader, KVTarget
from pdserve.transfer.progress import ChunkRange, KVProgress, blocks_of


@dataclass(frozen=True)
class KVChunk:
    """One chunk to deliver: `range` of a request's KV, from our blocks into the peer's."""

    request_id: str
    range: ChunkRange
    src_block_ids: tuple[int, ...]  # this node's blocks holding range's tokens, in token order
    dst_block_ids: tuple[int, ...]  # the peer's reserved blocks for the same tokens
    last: bool

    def header(self, spec: KVCacheSpec, in_place: bool,
               first_token: FirstToken | None = None) -> KVChunkHeader:
        r = self.range
        nbytes = 2 * (r.layer_end - r.layer_start) * len(self.dst_block_ids) * int(np.prod(spec.block_shape))
        return KVChunkHeader(
            request_id=self.request_id, seq=r.seq, layer_start=r.layer_start, layer_end=r.layer_end,
            token_start=r.token_start, token_end=r.token_end, block_ids=self.dst_block_ids,
            dtype=spec.dtype, block_shape=spec.block_shape, payload_nbytes=nbytes * spec.itemsize,  # type: ignore[arg-type]
            last=self.last, in_place=in_place, first_token=first_token)


class KVChunker:
    """Cuts one request's KV into chunks as its prefill progresses (the peer checks the same rules)."""

    def __init__(self, request_id: str, dst_block_ids: Sequence[int], num_tokens: int, num_layers: int,
                 block_size: int) -> None:
        self.request_id = request_id
        self.dst_block_ids = tuple(dst_block_ids)
        self.block_size = block_size
        self._progress = KVProgress(num_layers, num_tokens)

    @property
    def done(self) -> bool:
        return self._progress.complete

    def next_chunk(self, src_block_table: Sequence[int], token_end: int,
                   layers: range | None = None) -> KVChunk:
        """The chunk carrying `layers` (default: all) from where they stand up to `token_end`."""
        layers = layers if layers is not None else range(len(self._progress.delivered))
        token_start = self._progress.delivered[layers.start]
        chunk = ChunkRange(self._progress.next_seq, layers.start, layers.stop, token_start, token_end)
        problem = self._progress.problem(chunk) if token_end > token_start else "empty"
        if problem is not None:
            raise ValueError(f"request {self.request_id!r}: no chunk for layers {layers} up to token "
                             f"{token_end} ({problem})")
        last = self._progress.would_complete(chunk)
        self._progress.advance(chunk)
        src = blocks_of(src_block_table, token_start, token_end, self.block_size)
        dst = blocks_of(self.dst_block_ids, token_start, token_end, self.block_size)
        return KVChunk(self.request_id, chunk, src, dst, last)


FirstTokenSource = Callable[[], FirstToken]  # builds the token as the last chunk is about to go


class Delivery:
    """A sent chunk: `wait` says when the source blocks may be overwritten."""

    def __init__(self, nbytes: int, trackers: Sequence[zmq.MessageTracker] = ()) -> None:
        self.nbytes = nbytes
        self._trackers = list(trackers)

    def wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        for tracker in self._trackers:
            try:
                tracker.wait(max(deadline - time.monotonic(), 0.0))
            except zmq.NotDone:
                return False
        return True


class KVSender(ABC):
    """Delivers chunks of KV from this node's pool into a decode node's reserved blocks.

    Invariants: chunks of one request reach the peer in the order sent, through `outbox` (so a
    message sent on it afterwards arrives after them); a send that cannot complete within the
    configured timeout raises `TransferError`; once the returned `Delivery.wait` is true, the
    source blocks may be overwritten. One thread per sender.
    """

    def __init__(self, outbox: Outbox, target: KVTarget, local_spec: KVCacheSpec) -> None:
        check_compatible(local_spec, target.layout)
        self.outbox = outbox
        self.target = target
        self.spec = local_spec

    @abstractmethod
    def send_chunk(self, chunk: KVChunk, src: KVCachePool | KVRankPools,
                   first_token: FirstTokenSource | None = None) -> Delivery:
        """Deliver `chunk` from `src` (this node's pool, or its engine ranks' pools). On the last chunk,
        `first_token()` is called once the chunk's bytes are in the peer's pool (shm) or gathered (zmq),
        and its result travels in the chunk's header."""

    def close(self) -> None:  # noqa: B027 - most senders hold nothing beyond the caller's outbox
        """Release what the sender holds (not the outbox, which the caller owns)."""


class ShmKVSender(KVSender):
    """Same host: copy into the peer's mapped pool, then notify it over the outbox.

    The copy bypasses D's lock, so D must not reuse an aborted request's blocks until P has confirmed
    the abort or a grace period passed: a copy in progress when D aborts still completes.
    """

    def __init__(self, outbox: Outbox, target: KVTarget, local_spec: KVCacheSpec) -> None:
        super().__init__(outbox, target, local_spec)
        if target.shm_name is None:
            raise TransferError(f"decode node at {target.address} has no shared pool: use the zmq transport")
        try:
            self._dst = KVRankPools.attach(target.layout, [target.shm_name, *target.rank_shm_names])
        except (OSError, ValueError) as exc:
            raise TransferError(f"cannot map the decode node's pool {target.shm_name}: {exc}") from exc
        self._dst.prefault()

    def send_chunk(self, chunk: KVChunk, src: KVCachePool | KVRankPools,
                   first_token: FirstTokenSource | None = None) -> Delivery:
        r = chunk.range
        copy_heads(rank_pools(src).arrays, chunk.src_block_ids, self._dst.arrays, chunk.dst_block_ids,
                   slice(r.layer_start, r.layer_end), self.spec.num_kv_heads)
        header = chunk.header(self.spec, in_place=True, first_token=_call(first_token))
        self.outbox.send(header)
        return Delivery(header.payload_nbytes)

    def close(self) -> None:
        self._dst.unmap()  # copies run on this sender's thread only: no view of it outlives them


class ZmqKVSender(KVSender):
    """Any host: header + payload frames to the peer's inbox (zero-copy for consecutive block ids)."""

    def send_chunk(self, chunk: KVChunk, src: KVCachePool | KVRankPools,
                   first_token: FirstTokenSource | None = None) -> Delivery:
        r = chunk.range
        arrays = rank_pools(src).arrays
        frames = [gather_heads(arrays, layer, kv, chunk.src_block_ids, self.spec.num_kv_heads)
                  for layer in range(r.layer_start, r.layer_end) for kv in (0, 1)]
        # A gathered frame is our own copy; only views of the pool need tracking before reuse.
        zero_copy = np.may_share_memory(frames[0], arrays[0])
        header = chunk.header(self.spec, in_place=False, first_token=_call(first_token))
        tracker = self.outbox.send(header, frames, track=zero_copy)
        return Delivery(header.payload_nbytes, [tracker] if tracker is not None else [])


def _call(first_token: FirstTokenSource | None) -> FirstToken | None:
    return None if first_token is None else first_token()


KV_SENDERS: MappingProxyType[str, type[KVSender]] = MappingProxyType({"shm": ShmKVSender, "zmq": ZmqKVSender})


def choose_transport(configured: str, target: KVTarget, local_host: str) -> str:
    """`configured` unless "auto"; auto picks shm when the peer's pool is on this host."""
    if configured != "auto":
        return configured
    return "shm" if target.shm_name is not None and target.host_id == local_host else "zmq"


def open_kv_sender(kind: str, outbox: Outbox, target: KVTarget, local_spec: KVCacheSpec) -> KVSender:
    if kind not in KV_SENDERS:
        raise TransferError(f"unknown KV transport {kind!r} (known: {sorted(KV_SENDERS)})")
    return KV_SENDERS[kind](outbox, target, local_spec)


def check_compatible(local: KVCacheSpec, layout: KVCacheSpec) -> None:
    """Both pools must agree on everything but their block count, or KV cannot move between them."""
    peer = msgspec.structs.replace(layout, num_blocks=local.num_blocks)
    if peer != local:
        raise TransferError(f"KV layout mismatch: this node {local}, peer {layout}")


def local_host_id() -> str:
    """Same value in two processes iff they share a kernel and a /dev/shm mount (containers may not)."""
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{boot_id}/{os.stat(SHM_DIR).st_dev}"
