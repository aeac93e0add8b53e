"""Admission: what the cluster can hold, as its nodes report it, bounds what the router lets in.

A request (``Demand``) needs one slot per node request it fans out to (its choices) and its token
budget (prompt + max_tokens per choice), which is also the KV it may come to hold. It runs when both
fit under the limits below; else it waits in FIFO order while
the queue has room; else it is refused at once (429, no node asked). A wait longer than
``queue_timeout_s`` is refused too. FIFO: a large request at the head is not starved by small ones.

Limits, recomputed at every decision from the node pool (``ClusterCapacity``):
- slots: the sum of ``capacity`` (max_num_seqs) over the usable decode and mixed nodes, less what
  other routers run there when the registry is shared (a node's reported running + waiting beyond
  this router's own requests on it), capped by ``max_inflight_requests``;
- KV tokens: the sum of the usable decode/mixed nodes' KV (total blocks x block size, from Stats)
  times ``kv_overcommit``, once reported; a request whose KV alone exceeds the largest node's is
  refused (413); a request alone in flight runs whenever some slot exists (the nodes judge it then);
- tokens: ``max_inflight_tokens`` (a static ceiling on prompt + max_tokens in flight);
- queue: ``min(max_queued_requests, queue_per_slot x slots)`` requests may wait.
At ``kv_overcommit`` 1 (the default) the admitted requests fit the nodes' KV even when every one
runs to max_tokens, so no engine preempts (a preempted stream stalls while it is recomputed); above 1
the engines' preemption absorbs what the overcommit bets on early stops.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.router.config import AdmissionConfig
from pdserve.router.nodes import NodePool

HEAD_ROLES = ("decode", "mixed")  # where requests run and KV is reserved


class Overloaded(RuntimeError):
    """Refused by admission: the cluster's slots and the queue are full (HTTP 429)."""


class TooLarge(ValueError):
    """One request alone needs more than the router or any node admits (HTTP 413)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Demand:
    slots: int  # node requests: one per choice
    tokens: int  # prompt + max_tokens over the choices
    kv_tokens: int  # prompt + 1 over the choices: what the nodes reserve before the first token


@dataclass(frozen=True)
class ClusterCapacity:
    slots: int  # node requests the usable decode/mixed nodes run at once, less other routers' share
    kv_tokens: int | None  # KV tokens of those nodes; None until a node reports its blocks
    largest_node_kv_tokens: int | None


UNBOUNDED = ClusterCapacity(slots=1 << 30, kv_tokens=None, largest_node_kv_tokens=None)


def cluster_capacity(pool: NodePool, block_size: int, shared: bool,
                     kv_overcommit: float = 1.0) -> ClusterCapacity:
    """The capacity of ``pool``'s usable decode and mixed nodes (decode nodes only while a prefill
    node can feed them), as their heartbeats and Stats last reported it. ``shared``: other routers
    may send to the same nodes (a Redis registry, several workers), so their load counts against it;
    otherwise every request on the nodes is this router's, and its own count is the current one."""
    heads = list(pool.usable("mixed"))
    if pool.usable("prefill"):
        heads += pool.usable("decode")
    slots = 0
    kv: list[int] = []
    for node in heads:
        others = math.ceil(pool.foreign_load(node)) if shared else 0
        slots += max(0, node.capacity - others)
        blocks = pool.total_blocks(node.node_id)
        if blocks:
            kv.append(blocks * block_size)
    total = int(sum(kv) * kv_overcommit) if kv else None
    return ClusterCapacity(slots, total, max(kv) if kv else None)


class Admission:
    def __init__(self, config: AdmissionConfig,
                 capacity: Callable[[], ClusterCapacity] = lambda: UNBOUNDED) -> None:
        self._config = config
        self._capacity = capacity
        self._slots = 0
        self._tokens = 0
        self._kv_tokens = 0
        self._waiters: deque[tuple[Demand, asyncio.Future[None]]] = deque()
        self.arriving = 0  # requests past the door, not yet at acquire (the router's hot path counts)

    @property
    def inflight(self) -> int:
        """Node requests admitted and not yet finished."""
        return self._slots

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def slot_limit(self, capacity: ClusterCapacity) -> int:
        return min(self._config.max_inflight_requests, capacity.slots)

    def queue_limit(self, capacity: ClusterCapacity) -> int:
        by_slots = math.ceil(self._config.queue_per_slot * self.slot_limit(capacity))
        return min(self._config.max_queued_requests, by_slots)

    def saturated(self) -> str | None:
        """Why any new request would be refused now, whatever its size (None: it may fit or queue).
        Checked before a body is read or parsed, so a refusal costs next to nothing.

        Requests past the door but not yet at ``acquire`` (their bodies are read and tokenized)
        count as one slot each: in a burst, every request passes the door before the first one is
        admitted, and without them the excess would be refused only after being parsed in turn."""
        capacity = self._capacity()
        limit, queue_limit = self.slot_limit(capacity), self.queue_limit(capacity)
        occupied = self._slots + self.arriving
        full = occupied >= limit and (occupied > 0 or limit == 0)
        # arriving requests take the free slots first; the rest of them would queue
        would_queue = len(self._waiters) + max(0, self.arriving - max(0, limit - self._slots))
        if (full or self._waiters) and would_queue >= queue_limit:
            return (f"{self._slots} node requests in flight and {self.arriving} arriving (cluster limit "
                    f"{limit}), {len(self._waiters)} queued (limit {queue_limit})")
        return None

    def _fits(self, demand: Demand, capacity: ClusterCapacity) -> bool:
        limit = self.slot_limit(capacity)
        if self._slots == 0 and limit > 0 and demand.tokens <= self._config.max_inflight_tokens:
            return True  # alone, anything not refused as too large runs: the nodes are the judge then
        kv_fits = capacity.kv_tokens is None or self._kv_tokens + demand.kv_tokens <= capacity.kv_tokens
        return (self._slots + demand.slots <= limit
                and self._tokens + demand.tokens <= self._config.max_inflight_tokens and kv_fits)

    def _take(self, demand: Demand) -> None:
        self._slots += demand.slots
        self._tokens += demand.tokens
        self._kv_tokens += demand.kv_tokens

    def _refuse_too_large(self, demand: Demand, capacity: ClusterCapacity) -> None:
        if demand.tokens > self._config.max_inflight_tokens:
            raise TooLarge(f"the request needs {demand.tokens} tokens (prompt + max_tokens); the router "
                           f"admits at most {self._config.max_inflight_tokens} in flight "
                           f"(max_inflight_tokens)", "max_tokens")
        largest = capacity.largest_node_kv_tokens
        if largest is not None and demand.kv_tokens > largest:
            raise TooLarge(f"the request may hold {demand.kv_tokens} KV tokens (prompt + max_tokens); the "
                           f"largest node holds {largest}", "max_tokens")

    async def acquire(self, demand: Demand) -> None:
        capacity = self._capacity()
        self._refuse_too_large(demand, capacity)
        if not self._waiters and self._fits(demand, capacity):
            self._take(demand)
            return
        if len(self._waiters) >= self.queue_limit(capacity):
            raise Overloaded(f"{self._slots} node requests in flight (cluster limit "
                             f"{self.slot_limit(capacity)}) and {len(self._waiters)} queued "
                             f"(limit {self.queue_limit(capacity)})")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (demand, waiter)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self._config.queue_timeout_s)
        except (TimeoutError, asyncio.CancelledError) as e:
            if waiter.done() and not waiter.cancelled():
                self.release(demand)  # granted in the same instant it gave up: hand the slot on
            else:
                waiter.cancel()
                self._waiters.remove(entry)
                self.wake()
            if isinstance(e, TimeoutError):
                raise Overloaded(f"waited {self._config.queue_timeout_s} s for the cluster to take the "
                                 f"request (queue_timeout_s)") from None
            raise

    def release(self, demand: Demand) -> None:
        self._slots -= demand.slots
        self._tokens -= demand.tokens
        self._kv_tokens -= demand.kv_tokens
        self.wake()

    def wake(self) -> None:
        """Admit queued requests that fit now (after a release, or when the cluster grew)."""
        if not self._waiters:  # the common release: nothing queued, no capacity to work out
            return
        capacity = self._capacity()
        while self._waiters and self._fits(self._waiters[0][0], capacity):
            demand, waiter = self._waiters.popleft()
            self._take(demand)
            waiter.set_result(None)
