"""One prefill request's KV hand-over to its decode peer, run on that peer's own thread.

The engine bridge's reader thread hands every record of the request to `KVPush.on_item`, which queues
it on the peer's thread (transfer/peers.py): the span a step computed is pushed one thread wake-up
after the engine reported it, with no turn of the event loop in between. When the push cannot wait
(a same-host copy of a prompt whose KV is at most IN_PLACE_MAX_BYTES, into a peer already mapped and
connected, nothing of the peer's queued), the reader thread pushes it itself, without even that
wake-up. Each chunk's span is pushed as its progress arrives; the engine reports the last chunk's
progress right before the output with the first token, and that span goes out with the FirstToken in
its header: one message, so the decode node has all the KV when it reads the token.

`outcome` resolves once: with None when the FirstToken is sent, else with the PrefillFailed or
TransferError that ended the push; records after that are ignored. `stop` (an abort) ends it behind
the work already queued on the peer's thread, so a copy into the peer's pool that started before the
abort completes before anything the node sends the peer afterwards (its abort confirmation).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, InvalidStateError

import msgspec

from pdserve.common.kv_cache import KVCacheSpec
from pdserve.engine.protocol import PrefillProgress, RequestOutput, RequestRejected
from pdserve.engine.request import RequestStatus
from pdserve.node.engine_bridge import BridgeItem, EngineGone
from pdserve.node.server import NodeMetrics
from pdserve.transfer.channel import TransferError
from pdserve.transfer.head_shards import KVRankPools
from pdserve.transfer.messages import ErrorCode, FirstToken, PrefillTask, PrefillTimings
from pdserve.transfer.peers import Peer, PeerSenders
from pdserve.transfer.transport import KVChunker

log = logging.getLogger("pdserve.prefill")

DELIVERY_TIMEOUT_S = 30.0  # a KV chunk's frames not released by libzmq by then: the transfer failed
DELIVERY_POLL_S = 0.1  # how often a delivery wait checks that its peer is still up
# Largest prompt KV (bytes, every layer) the reader thread copies itself, a copy of well under a
# millisecond (the demo model: ~580 tokens; an 8B model in bf16: 32); larger copies run on the peer's
# thread, so records of other requests never wait behind a long copy.
IN_PLACE_MAX_BYTES = 4 << 20


class PrefillFailed(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class KVPush:
    """Pushes one request's KV (transport `kind`: shm or zmq) and then its FirstToken to the task's
    decode peer. `on_item` runs on the bridge's reader thread, `stop` on the event loop, everything
    else under the peer's `owner`: on the peer's thread, or in place on the reader thread."""

    def __init__(self, task: PrefillTask, kind: str, spec: KVCacheSpec, pool: KVRankPools,
                 peers: PeerSenders, metrics: NodeMetrics, received_at: float) -> None:
        self.task = task
        self.kind = kind
        self.received_at = received_at  # the task's receipt: the start of this node's part of TTFT
        self.outcome: Future[None] = Future()
        self._spec = spec
        self._pool = pool
        self._peers = peers
        self._metrics = metrics
        self._chunker = KVChunker(task.request_id, task.block_ids, len(task.prompt_token_ids),
                                  spec.num_layers, spec.block_size)
        self._last_span: PrefillProgress | None = None
        self._transfer_s = 0.0
        self._stopped = False
        prompt_blocks = -(-len(task.prompt_token_ids) // spec.block_size)
        # zmq frames may be held by libzmq after the send (a delivery wait): only shm copies run in place
        self._small_copy = kind == "shm" and prompt_blocks * spec.bytes_per_block <= IN_PLACE_MAX_BYTES

    def on_item(self, item: BridgeItem) -> None:
        """On the reader thread: push the record's span in place when that cannot wait, else queue it on
        the peer's thread (never blocks)."""
        try:
            self._peers.submit(self.task.kv_target.address, lambda peer: self._on_item(peer, item),
                               in_place=self._can_push_in_place if self._small_copy else None)
        except TransferError as exc:  # the node is closing its peers
            self._end(exc)

    def _can_push_in_place(self, peer: Peer) -> bool:
        return peer.has_kv_sender(self.kind, self.task.kv_target) and peer.ready_to_send()

    def stop(self, reason: str) -> None:
        """On the event loop: push nothing more; the outcome (ABORTED) follows the work queued so far."""
        self._stopped = True
        try:
            self._peers.submit(self.task.kv_target.address,
                               lambda peer: self._end(PrefillFailed(ErrorCode.ABORTED, reason)))
        except TransferError:  # no peer thread is left to wait for
            self._end(PrefillFailed(ErrorCode.ABORTED, reason))

    # -- under the peer's owner lock -----------------------------------------------------------------

    def _on_item(self, peer: Peer, item: BridgeItem) -> None:
        if self._stopped or self.outcome.done():
            return
        try:
            if isinstance(item, PrefillProgress):
                if item.num_computed_tokens < len(self.task.prompt_token_ids):
                    self._push(peer, item.block_ids, item.num_computed_tokens)
                else:
                    self._last_span = item
            elif isinstance(item, (RequestRejected, EngineGone)):
                raise PrefillFailed(ErrorCode.PREFILL_FAILED, item.message)
            elif isinstance(item, RequestOutput) and item.status is RequestStatus.FINISHED_PREFILLED:
                last = self._last_span
                if last is None:
                    raise PrefillFailed(ErrorCode.PREFILL_FAILED, "first token before the prompt's last KV")
                self._push(peer, last.block_ids, last.num_computed_tokens, then=item)
                self._end(None)
            elif isinstance(item, RequestOutput):
                # PREEMPTED: blocks already pushed may have been reused; ABORTED/ERROR: gone.
                raise PrefillFailed(ErrorCode.PREFILL_FAILED, f"prefill {item.status.name.lower()}")
            else:
                raise PrefillFailed(ErrorCode.PREFILL_FAILED,
                                    f"unexpected engine record {type(item).__name__}")
        except (PrefillFailed, TransferError) as exc:
            self._end(exc)
        except Exception as exc:  # a bug must fail the request, not leave it waiting for its lease
            log.exception("KV push of %s failed", self.task.request_id)
            self._end(PrefillFailed(ErrorCode.PREFILL_FAILED, f"KV push failed: {exc!r}"))

    def _push(self, peer: Peer, block_table: list[int], token_end: int,
              then: RequestOutput | None = None) -> None:
        """Push the span up to token_end; with `then` (the prefilled output), the span's header carries
        its FirstToken, whose timings count this push up to the header."""
        chunk = self._chunker.next_chunk(block_table, token_end)
        target = self.task.kv_target
        started = time.monotonic()
        try:
            sender = peer.kv_sender(self.kind, target, self._spec)
        except TransferError as exc:  # e.g. its pool cannot be mapped: the task cannot be served
            raise PrefillFailed(ErrorCode.INVALID_TASK, str(exc)) from exc
        first_token = None if then is None else (
            lambda: _first_token(self.task.request_id, then, self._timings(time.monotonic() - started)))
        delivery = sender.send_chunk(chunk, self._pool, first_token)
        # The source blocks are released once the push ends; zero-copy frames must be gone first.
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        while not delivery.wait(DELIVERY_POLL_S):
            if peer.down or time.monotonic() > deadline:
                raise TransferError(f"KV chunk of {chunk.request_id} not taken by the peer "
                                    f"({'it is down' if peer.down else 'in time'})")
        elapsed = time.monotonic() - started
        self._transfer_s += elapsed
        self._metrics.kv_bytes.labels(direction="out", transport=self.kind).inc(delivery.nbytes)
        self._metrics.kv_seconds.labels(direction="out", transport=self.kind).inc(elapsed)

    def _timings(self, pushing_s: float) -> PrefillTimings:
        """Where the request's time went so far; pushing_s: the push under way. The task goes to the
        engine as it arrives: no queue."""
        total_ms = max(0.0, (time.monotonic() - self.received_at) * 1000)
        transfer_ms = min((self._transfer_s + pushing_s) * 1000, total_ms)
        return PrefillTimings(queue_ms=0.0, prefill_ms=total_ms - transfer_ms, transfer_ms=transfer_ms)

    def _end(self, failure: BaseException | None) -> None:
        try:
            if failure is None:
                self.outcome.set_result(None)
            else:
                self.outcome.set_exception(failure)
        except InvalidStateError:  # ended already (a stop racing the last push's end)
            pass


def _first_token(request_id: str, prefilled: RequestOutput, timings: PrefillTimings) -> FirstToken:
    token = prefilled.tokens
    if not token.valid_logprobs():
        # float32 rounding can put a near-certain token's logprob a hair above 0: the wire wants <= 0.
        token = msgspec.structs.replace(token, logprobs=[min(x, 0.0) for x in token.logprobs],
                                        top_logprobs=[min(x, 0.0) for x in token.top_logprobs])
    return FirstToken(request_id=request_id, token=token, draft_token_ids=tuple(prefilled.draft_token_ids),
                      timings=timings)
