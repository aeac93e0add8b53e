"""Decode side: check each incoming KV chunk against this node's own pool and reservations, then write it.

Nothing from the wire is trusted. Before a byte lands in the pool, a chunk must match this node's
own `KVCacheSpec` (dtype, block shape, layer count), name a request that holds a live reservation,
list exactly the reserved blocks for its token range, come next in that request's sequence, and
carry exactly the bytes its header declares. A chunk that fails any check is counted by reason and
dropped without changing any state, so the transfer it belongs to (or any other) carries on.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.common.kv_cache import KVCachePool
from pdserve.transfer.head_shards import KVRankPools, rank_pools, scatter_heads
from pdserve.transfer.messages import KVChunkHeader
from pdserve.transfer.progress import ChunkRange, blocks_of
from pdserve.transfer.reservations import KVReservations, Reservation


class RejectReason(enum.StrEnum):
    MALFORMED = "malformed"  # not a decodable message, or frames that do not belong to one
    WRONG_LAYOUT = "wrong_layout"  # dtype, block shape or layer range differs from this pool
    UNKNOWN_REQUEST = "unknown_request"
    LEASE_EXPIRED = "lease_expired"
    WRONG_BLOCKS = "wrong_blocks"  # not the blocks reserved for that token range
    BAD_SEQUENCE = "bad_sequence"
    OUT_OF_RANGE = "out_of_range"  # tokens or layers beyond the reservation
    NOT_CONTIGUOUS = "not_contiguous"  # does not start where the layer's delivered tokens end
    WRONG_LENGTH = "wrong_length"  # payload bytes or frame count differ from what the header implies
    IN_PLACE_NOT_ALLOWED = "in_place_not_allowed"  # in-place notice to a node without a shared pool
    LAST_MISMATCH = "last_mismatch"  # `last` set on a chunk that does not complete, or missing


@dataclass(frozen=True)
class ChunkResult:
    request_id: str
    reason: RejectReason | None  # None: accepted
    complete: bool = False  # this chunk completed the request's KV
    nbytes: int = 0

    @property
    def accepted(self) -> bool:
        return self.reason is None


class KVReceiver:
    def __init__(self, pool: KVCachePool | KVRankPools, reservations: KVReservations,
                 allow_in_place: bool) -> None:
        pool = rank_pools(pool)  # a tensor-parallel node's ranks each hold some of the heads
        spec = pool.spec
        if (reservations.num_layers, reservations.num_blocks, reservations.block_size) != (
                spec.num_layers, spec.num_blocks, spec.block_size):
            raise ValueError("reservations and pool disagree on num_layers, num_blocks or block_size")
        self.pool = pool
        self.reservations = reservations
        self.allow_in_place = allow_in_place  # only a node whose pool is in shared memory
        self._block_nbytes = int(np.prod(spec.block_shape)) * spec.itemsize  # one block, one layer, K or V
        self._counts: Counter[str] = Counter()

    def stats(self) -> dict[str, int]:
        """Counters: accepted_chunks, completed_requests, bytes_delivered, rejected_<reason>."""
        with self.reservations.lock:
            return dict(self._counts)

    def count_malformed(self) -> ChunkResult:
        with self.reservations.lock:
            self._counts[f"rejected_{RejectReason.MALFORMED}"] += 1
        return ChunkResult("", RejectReason.MALFORMED)

    def accept(self, header: KVChunkHeader, frames: Sequence[memoryview | bytes]) -> ChunkResult:
        """Check, write and record one chunk. Held under the reservations lock from check to advance."""
        with self.reservations.lock:
            reservation = self.reservations.get(header.request_id)
            reason = self._problem(header, frames, reservation)
            if reason is not None:
                self._counts[f"rejected_{reason}"] += 1
                return ChunkResult(header.request_id, reason)
            assert reservation is not None  # _problem returns UNKNOWN_REQUEST otherwise
            if not header.in_place:
                self._write(header, frames)
            reservation.progress.advance(_range_of(header))
            self._counts["accepted_chunks"] += 1
            self._counts["bytes_delivered"] += header.payload_nbytes
            self._counts["completed_requests"] += int(header.last)
            return ChunkResult(header.request_id, None, complete=header.last, nbytes=header.payload_nbytes)

    def _problem(self, header: KVChunkHeader, frames: Sequence[memoryview | bytes],
                 reservation: Reservation | None) -> RejectReason | None:
        spec = self.pool.spec
        if (header.dtype != spec.dtype or header.block_shape != spec.block_shape
                or header.layer_end > spec.num_layers):
            return RejectReason.WRONG_LAYOUT
        if reservation is None:
            return RejectReason.UNKNOWN_REQUEST
        if reservation.deadline <= self.reservations.clock():
            return RejectReason.LEASE_EXPIRED
        chunk = _range_of(header)
        progress_problem = reservation.progress.problem(chunk)
        if progress_problem is not None:
            return RejectReason(progress_problem)
        if header.block_ids != blocks_of(reservation.block_ids, chunk.token_start, chunk.token_end,
                                         spec.block_size):
            return RejectReason.WRONG_BLOCKS
        payload_problem = self._payload_problem(header, frames)
        if payload_problem is not None:
            return payload_problem
        if header.last != reservation.progress.would_complete(chunk):
            return RejectReason.LAST_MISMATCH
        return None

    def _payload_problem(self, header: KVChunkHeader,
                         frames: Sequence[memoryview | bytes]) -> RejectReason | None:
        frame_nbytes = len(header.block_ids) * self._block_nbytes
        if header.payload_nbytes != 2 * header.num_layers * frame_nbytes or len(frames) != header.num_frames:
            return RejectReason.WRONG_LENGTH
        if header.in_place and not self.allow_in_place:
            return RejectReason.IN_PLACE_NOT_ALLOWED
        if any(memoryview(frame).nbytes != frame_nbytes for frame in frames):
            return RejectReason.WRONG_LENGTH
        return None

    def _write(self, header: KVChunkHeader, frames: Sequence[memoryview | bytes]) -> None:
        spec = self.pool.spec
        for i, layer in enumerate(range(header.layer_start, header.layer_end)):
            for kv in (0, 1):
                blocks = np.frombuffer(frames[2 * i + kv], dtype=spec.numpy_dtype())
                scatter_heads(blocks.reshape(len(header.block_ids), *spec.block_shape), self.pool.arrays,
                              layer, kv, header.block_ids, spec.num_kv_heads)


def _range_of(header: KVChunkHeader) -> ChunkRange:
    return ChunkRange(header.seq, header.layer_start, header.layer_end, header.token_start, header.token_end)
