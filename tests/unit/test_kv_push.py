"""A prefill request's KV push (prefill_node/kv_push.py), driven from a stand-in for the engine-record
reader thread into a real decode-side endpoint on a shared pool, over real ZMQ sockets."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from pdserve.common.kv_cache import KVCachePool, KVCacheSpec
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.tokens import SampledTokens
from pdserve.engine.protocol import PrefillProgress, RequestOutput
from pdserve.engine.request import RequestStatus
from pdserve.node.engine_bridge import BridgeItem, EngineGone
from pdserve.node.server import NodeMetrics
from pdserve.prefill_node import kv_push
from pdserve.prefill_node.kv_push import KVPush, PrefillFailed
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.endpoint import KVEndpoint
from pdserve.transfer.messages import Abort, ErrorCode, FirstToken, PrefillTask
from pdserve.transfer.peers import Peer, PeerSenders
from pdserve.transfer.receiver import ChunkResult

SPEC = KVCacheSpec(num_layers=3, num_blocks=32, block_size=4, num_kv_heads=2, head_dim=8)
CONFIG = TransferConfig(send_timeout_s=2.0)
TIMEOUT_S = 5.0
DST_BLOCKS = [10, 3]
SRC_BLOCKS = [5, 6]
TOKEN = SampledTokens([7], [-0.25], [1])


class Setup:
    """A decode endpoint with "r" reserved, a prefill pool, and a push of "r" between them."""

    def __init__(self) -> None:
        self.events: queue.Queue[object] = queue.Queue()
        self.dst = KVCachePool.create_shared(SPEC)
        self.endpoint = KVEndpoint(self.dst, CONFIG, self.events.put).start()
        self.endpoint.reservations.reserve("r", DST_BLOCKS, 8, lease_s=30.0)
        self.src = KVCachePool.allocate(SPEC)
        self.src.array[...] = np.random.default_rng(0).standard_normal(SPEC.shape)
        self.peers = PeerSenders(CONFIG)
        task = PrefillTask("r", tuple(range(8)), SamplingParams(), tuple(DST_BLOCKS), "decode-0",
                           self.endpoint.target(), lease_ms=30_000)
        self.push = KVPush(task, "shm", SPEC, self.src, self.peers, NodeMetrics("prefill"), time.monotonic())

    def from_reader(self, *items: BridgeItem) -> None:
        """Hand records over as the bridge's reader thread does: from a thread of its own."""
        reader = threading.Thread(target=lambda: [self.push.on_item(item) for item in items])
        reader.start()
        reader.join()

    def next_event(self) -> object:
        return self.events.get(timeout=TIMEOUT_S)

    def delivered(self) -> bool:
        return all(np.array_equal(np.asarray(self.dst.array[:, :, d]), self.src.array[:, :, s])
                   for s, d in zip(SRC_BLOCKS, DST_BLOCKS, strict=True))

    def close(self) -> None:
        asyncio.run(self.peers.close())
        self.endpoint.close()
        self.dst.close()


@pytest.fixture
def setup() -> Iterator[Setup]:
    s = Setup()
    yield s
    s.close()


def test_each_span_is_pushed_and_the_last_carries_the_first_token(setup: Setup) -> None:
    setup.from_reader(PrefillProgress("r", 4, SRC_BLOCKS[:1]), PrefillProgress("r", 8, SRC_BLOCKS),
                      RequestOutput("r", RequestStatus.FINISHED_PREFILLED, TOKEN, draft_token_ids=[3, 4]))
    assert setup.push.outcome.result(TIMEOUT_S) is None
    first, last = setup.next_event(), setup.next_event()
    assert isinstance(first, ChunkResult) and first.accepted and not first.complete
    assert isinstance(last, ChunkResult) and last.accepted and last.complete
    token = setup.next_event()
    assert isinstance(token, FirstToken) and token.token == TOKEN and token.draft_token_ids == (3, 4)
    assert token.timings.transfer_ms > 0
    assert setup.delivered()


@pytest.mark.parametrize(("item", "message"), [
    (EngineGone("engine process exited with code 9"), "engine process exited"),
    (RequestOutput("r", RequestStatus.PREEMPTED), "prefill preempted"),
    (RequestOutput("r", RequestStatus.FINISHED_PREFILLED, TOKEN), "first token before the prompt's last KV"),
])
def test_a_failed_prefill_ends_the_push_with_its_reason(setup: Setup, item: BridgeItem, message: str) -> None:
    setup.from_reader(item)
    with pytest.raises(PrefillFailed, match=message) as failed:
        setup.push.outcome.result(TIMEOUT_S)
    assert failed.value.code is ErrorCode.PREFILL_FAILED
    with pytest.raises(queue.Empty):  # nothing reached the decode node
        setup.events.get(timeout=0.2)


def test_stop_ends_the_push_only_after_the_work_under_way_and_pushes_nothing_more(setup: Setup) -> None:
    """An abort must not be confirmed to the decode node while a copy into its pool may still run."""
    gate = threading.Event()
    setup.peers.submit(setup.endpoint.address, lambda peer: gate.wait(TIMEOUT_S))  # a copy under way
    setup.from_reader(PrefillProgress("r", 4, SRC_BLOCKS[:1]))  # a span to push, queued behind it
    setup.push.stop("aborted by the decode node")
    time.sleep(0.1)
    assert not setup.push.outcome.done()
    gate.set()
    with pytest.raises(PrefillFailed) as failed:
        setup.push.outcome.result(TIMEOUT_S)
    assert failed.value.code is ErrorCode.ABORTED
    setup.from_reader(RequestOutput("r", RequestStatus.FINISHED_PREFILLED, TOKEN))  # too late: ignored
    with pytest.raises(queue.Empty):
        setup.events.get(timeout=0.2)
    assert not setup.delivered()


def _wait_ready(setup: Setup) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not setup.peers.submit(setup.endpoint.address, Peer.ready_to_send).result(TIMEOUT_S):
        assert time.monotonic() < deadline, "the connection to the decode endpoint never came up"
        time.sleep(0.01)


def _threads_pushing(push: KVPush) -> list[str]:
    """Names of the threads that run each of `push`'s spans."""
    names: list[str] = []
    push_span = push._push

    def recorded(*args: object, **kwargs: object) -> None:
        names.append(threading.current_thread().name)
        push_span(*args, **kwargs)  # type: ignore[arg-type]

    push._push = recorded  # type: ignore[method-assign]
    return names


def test_a_small_same_host_push_to_a_ready_peer_runs_on_the_reader_thread(setup: Setup) -> None:
    """The first span waits for the connection and the pool's mapping on the peer's thread; once both
    are there, the last span and its FirstToken go out from the reader thread itself."""
    threads = _threads_pushing(setup.push)
    setup.from_reader(PrefillProgress("r", 4, SRC_BLOCKS[:1]))
    assert isinstance(setup.next_event(), ChunkResult)
    _wait_ready(setup)
    reader = threading.Thread(name="reader", target=lambda: [setup.push.on_item(item) for item in (
        PrefillProgress("r", 8, SRC_BLOCKS), RequestOutput("r", RequestStatus.FINISHED_PREFILLED, TOKEN))])
    reader.start()
    reader.join()
    assert setup.push.outcome.done() and setup.push.outcome.result() is None  # settled in place
    assert threads[0].startswith("pd-peer") and threads[1:] == ["reader"]
    last, token = setup.next_event(), setup.next_event()
    assert isinstance(last, ChunkResult) and last.complete and isinstance(token, FirstToken)
    assert setup.delivered()


def test_a_large_or_zmq_push_stays_on_the_peers_thread(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy over IN_PLACE_MAX_BYTES (it would hold the reader back from other requests' records),
    and any zmq push (libzmq may still hold its frames after the send), run on the peer's thread."""
    monkeypatch.setattr(kv_push, "IN_PLACE_MAX_BYTES", 2 * SPEC.bytes_per_block - 1)  # the prompt: 2 blocks
    setup.push = KVPush(setup.push.task, "shm", SPEC, setup.src, setup.peers, NodeMetrics("prefill"),
                        time.monotonic())
    threads = _threads_pushing(setup.push)
    setup.from_reader(PrefillProgress("r", 4, SRC_BLOCKS[:1]))
    assert isinstance(setup.next_event(), ChunkResult)
    _wait_ready(setup)
    setup.from_reader(PrefillProgress("r", 8, SRC_BLOCKS),
                      RequestOutput("r", RequestStatus.FINISHED_PREFILLED, TOKEN))
    assert setup.push.outcome.result(TIMEOUT_S) is None
    assert len(threads) == 2 and all(name.startswith("pd-peer") for name in threads)
    monkeypatch.undo()
    zmq_push = KVPush(setup.push.task, "zmq", SPEC, setup.src, setup.peers, NodeMetrics("prefill"),
                      time.monotonic())
    assert not zmq_push._small_copy


def test_a_message_queued_while_a_push_runs_in_place_reaches_the_peer_after_it(setup: Setup) -> None:
    """The abort confirmation's rule holds for in-place pushes too: anything queued for the peer while
    the reader thread copies into its pool goes out only after that copy and its notice."""
    setup.from_reader(PrefillProgress("r", 4, SRC_BLOCKS[:1]))
    assert isinstance(setup.next_event(), ChunkResult)
    _wait_ready(setup)
    copying, gate = threading.Event(), threading.Event()
    push_span = setup.push._push

    def slow_push(*args: object, **kwargs: object) -> None:
        copying.set()
        assert gate.wait(TIMEOUT_S)
        push_span(*args, **kwargs)  # type: ignore[arg-type]

    setup.push._push = slow_push  # type: ignore[method-assign]
    reader = threading.Thread(name="reader", target=lambda: [setup.push.on_item(item) for item in (
        PrefillProgress("r", 8, SRC_BLOCKS), RequestOutput("r", RequestStatus.FINISHED_PREFILLED, TOKEN))])
    reader.start()
    assert copying.wait(TIMEOUT_S)
    confirmation = setup.peers.submit(setup.endpoint.address, lambda p: p.send(Abort("r", "abort confirmed")))
    time.sleep(0.1)
    assert not confirmation.done()
    gate.set()
    reader.join()
    confirmation.result(TIMEOUT_S)
    events = [setup.next_event() for _ in range(3)]
    assert [type(e).__name__ for e in events] == ["ChunkResult", "FirstToken", "Abort"]
