"""The decode node's side of PD: reserve blocks, hand the prompt to a prefill node, take its KV, and
hand the engine the first token.

    Generate -> engine ReserveRequest -> KVReserved(block ids) -> reservation in the KV endpoint
             -> PrefillTask to P (our block ids, our data address, a lease; renewed while waiting)
             <- KV chunks (zmq frames, or in-place notices after P wrote our shared pool); the last
                chunk's header carries the FirstToken (an error comes as a FirstToken of its own)
             -> engine RemoteKVReady(first token, drafts): the request decodes on here.

The inbox thread that receives a good FirstToken for a complete reservation tells the engine at once
(`kv_ready`), before handing the token to the event loop: the first token is not held back by a turn
of the loop. The loop then finishes the hand-over (and tells the engine itself when the inbox thread
did not). Whatever the loop decides afterwards (an abort: the client left) reaches the engine behind
that task, on the same pipe, and ends the request there.

Abort while P works: tell P, and free our blocks only once P confirms (or a grace period passed) —
a same-host copy already under way writes into our pool whatever we do.

Liveness: our connection to each prefill peer runs heartbeats (transfer/channel.py). When it goes
down (P killed, or cut off), every request waiting on that peer fails at once with
CAUSE_PREFILL_PEER_UNREACHABLE (the router retries it with another prefill node), and the peer is
listed in `unreachable_peer_addresses` (NodeStats) until the connection is back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from pdserve.common.kv_cache import KVCacheSpec
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.protocol import KVReserved, RequestRejected
from pdserve.node.engine_bridge import EngineBridge, EngineGone, RequestHandle
from pdserve.node.engine_client import EngineError
from pdserve.node.server import NodeConfig, NodeMetrics
from pdserve.rpc import node_pb2 as pb
from pdserve.transfer.auth import MessageSigner
from pdserve.transfer.channel import TransferError
from pdserve.transfer.endpoint import KVEndpoint, Malformed
from pdserve.transfer.head_shards import KVRankPools
from pdserve.transfer.messages import Abort, FirstToken, LeaseRenewal, PrefillTask
from pdserve.transfer.peers import Peer, PeerSenders
from pdserve.transfer.receiver import ChunkResult
from pdserve.transfer.reservations import KVReservations

Cause = pb.FailureCause.ValueType

log = logging.getLogger("pdserve.decode.pd")

ABORT_GRACE_S = 0.5  # how long we wait for P to confirm an abort before reusing the blocks
SWEEP_INTERVAL_S = 0.5  # how often expired reservations are looked for (a backstop, see fail_expired)
PEER_FORGET_S = 60.0  # a prefill peer down this long is closed (and no longer reported unreachable)


class RemotePrefillError(Exception):
    """The remote prefill failed, with its cause (rpc FailureCause): the peer failed or cannot be
    reached, this node has no room, or the request cannot be served at all."""

    def __init__(self, message: str, cause: Cause) -> None:
        super().__init__(message)
        self.cause = cause

    @property
    def retryable(self) -> bool:
        """Another try (another pair, or later) may succeed."""
        return self.cause != pb.CAUSE_BAD_REQUEST


def reject_cause(rejected: RequestRejected) -> Cause:
    """An engine rejection: no room now (another node may have it), or never servable."""
    return pb.CAUSE_KV_CAPACITY if rejected.retryable else pb.CAUSE_BAD_REQUEST


def missing_logprobs(first: FirstToken, logprobs: int | None) -> str:
    """How the peer's first token differs from the logprobs the request asks for ('' when it does
    not): a prefill node computes them only when asked, so a token without them must not be streamed
    as if the request had none, and its top-k must be the request's (the stream joins it with the
    decode engine's tokens, column by column). Logprobs on a token of a request that asked for none
    are harmless: its stream drops them."""
    if logprobs is None:
        return ""
    token = first.token
    if not token.logprobs:
        return "without its logprob"
    if token.top_k != logprobs:
        return f"with {token.top_k} top logprobs where the request asks for {logprobs}"
    return ""


@dataclass
class PendingPrefill:
    """A request waiting for its prefill peer: the FirstToken (or an error) lands in `first_token`."""

    first_token: asyncio.Future[FirstToken]
    handle: RequestHandle | None = None  # the engine's reservation (None in tests without an engine)
    logprobs: int | None = None  # the request's top-k logprobs (None: none), which its first token carries
    abort_confirmed: asyncio.Event = field(default_factory=asyncio.Event)
    peer_address: str = ""
    task_sent: bool = False  # the peer took the PrefillTask: losing the peer now fails the request
    engine_told: bool = False  # the inbox thread sent the engine kv_ready (set before first_token is)
    # The PrefillTask's send, queued by the reader thread once the engine reserved our blocks; from
    # `abandoned` on, none is queued any more (under `lock`: the reader thread and the loop both look).
    task_send: Future[None] | None = None
    abandoned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class RemotePrefill:
    def __init__(self, config: NodeConfig, bridge: EngineBridge, kv_spec: KVCacheSpec,
                 metrics: NodeMetrics) -> None:
        self.config = config
        self.bridge = bridge
        self.kv_spec = kv_spec
        self.metrics = metrics
        # A send to a dead peer blocks until send_timeout_s: never longer than a prefill may take.
        base = config.transfer_config()
        self.transfer = replace(base, send_timeout_s=min(base.send_timeout_s, config.prefill_timeout_s))
        self.endpoint: KVEndpoint | None = None
        self.pool: KVRankPools | None = None  # the engine ranks' pools (one without tensor parallelism)
        self._pending: dict[str, PendingPrefill] = {}
        # one sender thread per prefill peer; liveness events from their connection watches
        self._peers = PeerSenders(self.transfer, self._from_watch_thread)
        self._unreachable: set[str] = set()  # data addresses of peers whose connection is down
        # Our own reservation lease: renewed every kv_lease_s / 3 while we wait, and long enough to
        # outlast one send blocked on a slow peer, so only a request nobody tends any more expires.
        self._reservation_lease_s = config.kv_lease_s + self.transfer.send_timeout_s
        self._sweeper: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        secret = config.cluster_secret
        self._signer = MessageSigner(secret) if secret is not None else None

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self, pool_names: list[str]) -> str:
        """Serve the data plane for the engine's shared pools (one per rank, rank 0 first)."""
        self._loop = asyncio.get_running_loop()
        self.pool = KVRankPools.attach(self.kv_spec, pool_names).prefault()
        self.endpoint = KVEndpoint(self.pool, self.transfer, self._from_inbox_thread).start()
        self._sweeper = self._loop.create_task(self._sweep_expired())
        return self.endpoint.address

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.endpoint is not None:
            self.endpoint.close()
        await self._peers.close()
        if self.pool is not None:
            self.pool.close()

    # -- one request -----------------------------------------------------------------------------------

    async def prefill(self, request_id: str, prompt: list[int], params: SamplingParams, peer_address: str,
                      num_extra_tokens: int) -> tuple[RequestHandle, FirstToken]:
        """Reserve blocks, have the peer fill them; returns the engine handle (now decoding) and the
        peer's first token. Raises RemotePrefillError; on any failure our blocks are freed."""
        pending = PendingPrefill(self._loop.create_future(), peer_address=peer_address,
                                 logprobs=params.logprobs)

        def on_reserved(reserved: KVReserved) -> None:  # on the bridge's reader thread
            self._send_task(pending, request_id, prompt, params, reserved.block_ids)

        handle = pending.handle = self.bridge.reserve(request_id, prompt, params, num_extra_tokens,
                                                      on_reserved=on_reserved)
        self._pending[request_id] = pending
        try:
            await self._reserved_blocks(handle)
            try:
                await asyncio.wrap_future(pending.task_send)
            except TransferError as exc:
                pending.peer_address = ""  # P never got the task: nothing to abort, nothing it writes
                raise RemotePrefillError(f"prefill node {peer_address} is unreachable: {exc}",
                                         pb.CAUSE_PREFILL_PEER_UNREACHABLE) from exc
            pending.task_sent = True
            if self._peers.is_down(peer_address):  # lost between the send and now: no event will come
                self._fail_waiting_on(peer_address)
            first = await self._await_first_token(request_id, pending)
            self._check_complete(request_id)
            missing = missing_logprobs(first, pending.logprobs)
            if missing:
                raise RemotePrefillError(f"prefill node {peer_address} sent a first token {missing}",
                                         pb.CAUSE_PREFILL_PEER_FAILED)
        except BaseException:
            # Keep the pending entry until the peer confirms: abandon() waits for its Abort.
            self._loop.create_task(self.abandon(request_id, handle, pending))
            raise
        self._pending.pop(request_id, None)
        self.endpoint.reservations.release(request_id)
        if not pending.engine_told:
            self.bridge.kv_ready(handle, first.token, list(first.draft_token_ids))
        return handle, first

    def _send_task(self, pending: PendingPrefill, request_id: str, prompt: list[int], params: SamplingParams,
                   block_ids: list[int]) -> None:
        """On the bridge's reader thread, as the engine's reservation lands: register it and queue the
        signed PrefillTask on the peer's thread, with no turn of the event loop in between. Nothing is
        sent for a request already abandoned (its blocks may be another's by now)."""
        with pending.lock:
            if pending.abandoned:
                return
            try:
                lease_s = self._reservation_lease_s
                self.endpoint.reservations.reserve(request_id, block_ids, len(prompt), lease_s)
                task = PrefillTask(
                    request_id=request_id, prompt_token_ids=tuple(prompt), sampling=params,
                    block_ids=tuple(block_ids), decode_node_id=self.config.node_id,
                    kv_target=self.endpoint.target(), lease_ms=int(self.config.kv_lease_s * 1000),
                )
                # in place when the peer's connection takes it now: no wake-up of the peer's thread
                pending.task_send = self._submit(pending.peer_address, task, in_place=Peer.ready_to_send)
            except Exception as exc:  # the event loop raises it; the reader thread must go on
                pending.task_send = Future()
                pending.task_send.set_exception(exc)

    async def _reserved_blocks(self, handle: RequestHandle) -> list[int]:
        item = await handle.items.get()
        if isinstance(item, KVReserved):
            return item.block_ids
        if isinstance(item, RequestRejected):
            raise RemotePrefillError(item.message, reject_cause(item))
        if isinstance(item, EngineGone):
            raise RemotePrefillError(item.message, pb.CAUSE_DECODE_NODE_FAILED)
        raise RemotePrefillError(f"unexpected engine event {type(item).__name__} while reserving",
                                 pb.CAUSE_DECODE_NODE_FAILED)

    async def _await_first_token(self, request_id: str, pending: PendingPrefill) -> FirstToken:
        """Wait for the peer, renewing its lease; a silent or failed peer becomes an error."""
        deadline = time.monotonic() + self.config.prefill_timeout_s
        renew_every = self.config.kv_lease_s / 3
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemotePrefillError(f"prefill node {pending.peer_address} sent no first token within "
                                         f"{self.config.prefill_timeout_s} s", pb.CAUSE_PREFILL_PEER_FAILED)
            try:
                first = await asyncio.wait_for(asyncio.shield(pending.first_token), min(renew_every, left))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    continue  # out of time: fail now, not after a renewal to a peer that may be dead
                self.endpoint.reservations.renew(request_id, self._reservation_lease_s)
                renewal = LeaseRenewal(request_id, int(self.config.kv_lease_s * 1000),
                                       reply_to=self.endpoint.address)
                try:
                    await self._send(pending.peer_address, renewal)
                except TransferError as exc:
                    raise RemotePrefillError(f"prefill node {pending.peer_address} stopped taking messages: "
                                             f"{exc}", pb.CAUSE_PREFILL_PEER_UNREACHABLE) from exc
                continue
            if not first.ok:
                # whatever the peer reports, the failure is the peer's
                message = f"prefill node failed: {first.error_code.name}: {first.error_message}"
                raise RemotePrefillError(message, pb.CAUSE_PREFILL_PEER_FAILED)
            return first

    def _check_complete(self, request_id: str) -> None:
        reservation = self.endpoint.reservations.get(request_id)
        if reservation is None or not reservation.complete:
            # FirstToken travels with or behind the last chunk: this means chunks were rejected.
            self.metrics.kv_failures.labels(reason="incomplete").inc()
            raise RemotePrefillError("the prefill node's KV did not all arrive", pb.CAUSE_PREFILL_PEER_FAILED)

    async def abandon(self, request_id: str, handle: RequestHandle, pending: PendingPrefill | None) -> None:
        """Stop the peer, wait for it to confirm (bounded), then free our blocks."""
        if pending is not None:
            with pending.lock:
                pending.abandoned = True  # no PrefillTask goes out from now on
        if pending is not None and pending.peer_address:
            try:
                # One bound for send and confirmation: a send to a dead peer blocks until the send
                # timeout, and our blocks must not wait for that.
                await asyncio.wait_for(self._abort_peer(request_id, pending), ABORT_GRACE_S)
            except (TransferError, TimeoutError):
                pass  # the peer is gone or slow: after the grace period its copies are over too
        self._pending.pop(request_id, None)
        self.endpoint.reservations.release(request_id)
        self.bridge.abort(handle)

    async def _abort_peer(self, request_id: str, pending: PendingPrefill) -> None:
        await self._send(pending.peer_address, Abort(request_id, "abandoned by the decode node"))
        await pending.abort_confirmed.wait()

    def pending(self, request_id: str) -> PendingPrefill | None:
        return self._pending.get(request_id)

    # -- peer liveness (watch threads -> event loop) ---------------------------------------------------

    def _from_watch_thread(self, address: str, up: bool) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_liveness, address, up)
        except RuntimeError:  # the loop is closed: the node is shutting down
            pass

    def _on_liveness(self, address: str, up: bool) -> None:
        if up:
            if address in self._unreachable:
                log.info("prefill peer %s is reachable again", address)
            self._unreachable.discard(address)
            return
        if address not in self._unreachable:
            log.warning("prefill peer %s is unreachable (data-plane connection down)", address)
        self._unreachable.add(address)
        self._fail_waiting_on(address)

    def _fail_waiting_on(self, address: str) -> None:
        for request_id, pending in self._pending.items():
            if pending.peer_address == address and pending.task_sent and not pending.first_token.done():
                self.metrics.kv_failures.labels(reason="peer_unreachable").inc()
                pending.first_token.set_exception(RemotePrefillError(
                    f"prefill node {address} became unreachable while {request_id} waited for it",
                    pb.CAUSE_PREFILL_PEER_UNREACHABLE))

    def unreachable_peer_addresses(self) -> list[str]:
        """Data addresses of the prefill peers our data plane cannot reach now."""
        return sorted(self._unreachable)

    async def _sweep_expired(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            for address in self._peers.retire_down(PEER_FORGET_S):
                self._unreachable.discard(address)
            for request_id in fail_expired(self.endpoint.reservations, self._pending):
                self.metrics.kv_failures.labels(reason="lease_expired").inc()
                log.warning("KV reservation of %r expired; failing the request", request_id)

    # -- data-plane events (inbox thread -> event loop) -------------------------------------------------

    def _from_inbox_thread(self, event) -> None:
        if isinstance(event, ChunkResult):
            self._on_chunk(event)  # counters and a log line: no turn of the loop between chunk and token
            return
        if isinstance(event, FirstToken):
            self._tell_engine_early(event)
        self._loop.call_soon_threadsafe(self._on_event, event)

    def _on_chunk(self, result: ChunkResult) -> None:
        """On the inbox thread (prometheus metrics are thread-safe)."""
        if result.accepted:
            self.metrics.kv_bytes.labels(direction="in", transport="any").inc(result.nbytes)
        else:
            self.metrics.kv_failures.labels(reason=str(result.reason)).inc()
            log.warning("rejected a KV chunk of %r: %s", result.request_id, result.reason)

    def _tell_engine_early(self, first: FirstToken) -> None:
        """On the inbox thread: a good first token for a request whose KV all arrived goes to the
        engine now. Anything else is left to the loop, which checks and fails it as before."""
        pending = self._pending.get(first.request_id)
        if pending is None or pending.handle is None or not first.ok or pending.first_token.done():
            return
        if missing_logprobs(first, pending.logprobs):
            return
        reservation = self.endpoint.reservations.get(first.request_id)
        if reservation is None or not reservation.complete:
            return
        try:
            self.bridge.kv_ready(pending.handle, first.token, list(first.draft_token_ids))
        except EngineError:
            return  # the loop's own kv_ready meets the same error
        pending.engine_told = True

    def _on_event(self, event) -> None:
        if isinstance(event, FirstToken):
            pending = self._pending.get(event.request_id)
            if pending is not None and not pending.first_token.done():
                pending.first_token.set_result(event)
        elif isinstance(event, Abort):
            pending = self._pending.get(event.request_id)
            if pending is not None:
                pending.abort_confirmed.set()
        elif isinstance(event, Malformed):
            self.metrics.kv_failures.labels(reason="malformed").inc()
            log.warning("dropped a malformed data-plane message: %s", event.reason)

    async def _send(self, address: str, message: PrefillTask | LeaseRenewal | Abort) -> None:
        await asyncio.wrap_future(self._submit(address, message))

    def _submit(self, address: str, message: PrefillTask | LeaseRenewal | Abort,
                in_place: Callable[[Peer], bool] | None = None) -> Future[None]:
        """Queue `message` on the peer's thread, from any thread (see PeerSenders.submit's `in_place`)."""
        if self._signer is not None:  # signed per send: each carries a fresh nonce and expiry
            message = self._signer.sign(message)
        return self._peers.submit(address, lambda peer: peer.send(message), in_place)


def fail_expired(reservations: KVReservations, pending: Mapping[str, PendingPrefill],
                 now: float | None = None) -> list[str]:
    """Backstop for reservations nobody renews any more: release every expired one (later chunks for
    it are then rejected, never written) and fail its waiting request, whose failure path aborts the
    peer and frees the engine's blocks. Returns the expired request ids.

    The waiting request renews its own lease, so this fires only when that wait is stuck or gone.
    """
    expired = []
    for reservation in reservations.expire(now):
        entry = pending.get(reservation.request_id)
        if entry is not None and not entry.first_token.done():
            message = f"KV reservation lease expired waiting for prefill node {entry.peer_address}"
            entry.first_token.set_exception(RemotePrefillError(message, pb.CAUSE_PREFILL_PEER_FAILED))
        expired.append(reservation.request_id)
    return expired
