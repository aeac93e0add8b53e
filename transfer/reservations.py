"""Decode side: which blocks are reserved for which request's incoming KV, and until when.

A reservation holds D's blocks for a request whose KV a prefill peer is writing, with a lease: if
the peer goes silent, `expire` hands the reservation back so the node frees the blocks. The
receiver consults it for every chunk and records progress on it; every access goes through one lock,
held by the receiver for the whole check-write-advance of a chunk, so a reservation is never
released (and its blocks reused) while a chunk is being written into them.

Same-host caveat: a prefill peer writing in place into D's shared pool does not take this lock. When
a request is aborted mid-transfer, D must keep its blocks out of use until P confirms the abort or a
grace period passes (the node's job; see `transport.ShmKVSender`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pdserve.transfer.progress import KVProgress


class ReservationError(ValueError):
    """A reservation that cannot be made as asked (the message says which argument)."""


@dataclass
class Reservation:
    request_id: str
    block_ids: tuple[int, ...]  # D's blocks for the request's tokens, in token order
    num_tokens: int  # tokens whose KV the peer delivers (the prompt)
    deadline: float  # on the reservations' clock
    progress: KVProgress = field(repr=False)

    @property
    def complete(self) -> bool:
        return self.progress.complete


class KVReservations:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.clock = clock
        self.lock = threading.RLock()
        self._by_request: dict[str, Reservation] = {}
        self._owner_of_block: dict[int, str] = {}

    def __len__(self) -> int:
        with self.lock:
            return len(self._by_request)

    def reserve(self, request_id: str, block_ids: Sequence[int], num_tokens: int,
                lease_s: float) -> Reservation:
        block_ids = tuple(int(b) for b in block_ids)
        with self.lock:
            self._check_new(request_id, block_ids, num_tokens, lease_s)
            reservation = Reservation(request_id, block_ids, num_tokens, self.clock() + lease_s,
                                      KVProgress(self.num_layers, num_tokens))
            self._by_request[request_id] = reservation
            self._owner_of_block.update(dict.fromkeys(block_ids, request_id))
            return reservation

    def _check_new(self, request_id: str, block_ids: tuple[int, ...], num_tokens: int,
                   lease_s: float) -> None:
        if request_id in self._by_request:
            raise ReservationError(f"request_id {request_id!r} already has a reservation")
        if not lease_s > 0:
            raise ReservationError(f"lease_s must be > 0 (got {lease_s})")
        if num_tokens < 1 or -(-num_tokens // self.block_size) > len(block_ids):
            raise ReservationError(f"num_tokens {num_tokens} does not fit {len(block_ids)} blocks")
        if len(set(block_ids)) != len(block_ids) or not all(0 <= b < self.num_blocks for b in block_ids):
            raise ReservationError(f"block_ids must be distinct and in [0, {self.num_blocks})")
        taken = [b for b in block_ids if b in self._owner_of_block]
        if taken:
            raise ReservationError(f"block_ids {taken[:8]} are already reserved for another request")

    def get(self, request_id: str) -> Reservation | None:
        with self.lock:
            return self._by_request.get(request_id)

    def renew(self, request_id: str, lease_s: float) -> bool:
        """Extend the lease to `lease_s` from now; False when the request holds no reservation."""
        if not lease_s > 0:
            raise ReservationError(f"lease_s must be > 0 (got {lease_s})")
        with self.lock:
            reservation = self._by_request.get(request_id)
            if reservation is None:
                return False
            reservation.deadline = self.clock() + lease_s
            return True

    def release(self, request_id: str) -> Reservation | None:
        """Drop the reservation (KV complete and handed to the engine, or the request ended)."""
        with self.lock:
            reservation = self._by_request.pop(request_id, None)
            if reservation is not None:
                for block_id in reservation.block_ids:
                    del self._owner_of_block[block_id]
            return reservation

    def expired(self, now: float | None = None) -> list[str]:
        """Requests whose lease ran out (still reserved: `expire` also releases them)."""
        now = self.clock() if now is None else now
        with self.lock:
            return [rid for rid, r in self._by_request.items() if r.deadline <= now]

    def expire(self, now: float | None = None) -> list[Reservation]:
        """Release and return every reservation whose lease ran out; the node frees their blocks."""
        with self.lock:
            return [r for r in map(self.release, self.expired(now)) if r is not None]
