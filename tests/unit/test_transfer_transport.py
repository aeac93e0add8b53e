"""Real sockets and a real /dev/shm pool: shm and zmq transports end to end, and fuzz over the wire."""

from __future__ import annotations

import asyncio
import hashlib
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.common.kv_cache import KVCachePool, KVCacheSpec
from pdserve.common.tokens import SampledTokens
from pdserve.transfer.channel import Outbox, TransferError, keep_message_buffers
from pdserve.transfer.config import TransferConfig, TransferConfigError
from pdserve.transfer.endpoint import InboxDispatcher, KVEndpoint, Malformed
from pdserve.transfer.messages import (
    WIRE_VERSION,
    Abort,
    FirstToken,
    KVChunkHeader,
    KVTarget,
    WireCodec,
)
from pdserve.transfer.peers import PeerSenders
from pdserve.transfer.receiver import ChunkResult, RejectReason
from pdserve.transfer.transport import (
    KVChunker,
    choose_transport,
    local_host_id,
    open_kv_sender,
)

SPEC = KVCacheSpec(num_layers=3, num_blocks=32, block_size=4, num_kv_heads=2, head_dim=8)
CONFIG = TransferConfig(send_timeout_s=2.0)
EVENT_TIMEOUT_S = 5.0


class DecodeSide:
    """A decode node's data plane on a fresh shared pool, collecting its events."""

    def __init__(self) -> None:
        self.events: queue.Queue[object] = queue.Queue()
        self.pool = KVCachePool.create_shared(SPEC)
        self.pool.array[...] = -1.0  # stale KV from earlier requests
        self.endpoint = KVEndpoint(self.pool, CONFIG, self.events.put).start()

    def next_event(self) -> object:
        return self.events.get(timeout=EVENT_TIMEOUT_S)

    def checksum(self) -> str:
        return hashlib.sha256(np.asarray(self.pool.array).tobytes()).hexdigest()

    def close(self) -> None:
        if self.pool.shm_path is None:
            return  # closed already
        self.endpoint.close()
        self.pool.close()


@pytest.fixture
def decode() -> Iterator[DecodeSide]:
    side = DecodeSide()
    yield side
    side.close()


def prefill_pool(seed: int) -> KVCachePool:
    pool = KVCachePool.allocate(SPEC)
    pool.array[...] = np.random.default_rng(seed).standard_normal(SPEC.shape)
    return pool


def assert_blocks_equal(dst: KVCachePool, dst_ids: list[int], src: KVCachePool, src_ids: list[int]) -> None:
    for s, d in zip(src_ids, dst_ids, strict=True):
        np.testing.assert_array_equal(np.asarray(dst.array[:, :, d]), src.array[:, :, s])


def _blocks_equal(dst: KVCachePool, dst_ids: list[int], src: KVCachePool, src_ids: list[int]) -> bool:
    return all(np.array_equal(np.asarray(dst.array[:, :, d]), src.array[:, :, s])
               for s, d in zip(src_ids, dst_ids, strict=True))


@pytest.mark.parametrize("kind", ["zmq", "shm"])
def test_a_rejected_last_chunk_still_hands_over_its_first_token(decode: DecodeSide, kind: str) -> None:
    """The decode node must hear the token to fail the request (its KV is incomplete) at once."""
    src = prefill_pool(2)
    outbox = Outbox(decode.endpoint.address, CONFIG)
    sender = open_kv_sender(kind, outbox, decode.endpoint.target(), SPEC)
    first = FirstToken("r", token=SampledTokens([7], [-0.25], [1]))
    try:
        chunker = KVChunker("r", [1, 2], 8, SPEC.num_layers, SPEC.block_size)  # nothing reserved for "r"
        sender.send_chunk(chunker.next_chunk([5, 6], 8), src, lambda: first)
        result = decode.next_event()
        assert isinstance(result, ChunkResult) and result.reason == RejectReason.UNKNOWN_REQUEST
        assert decode.next_event() == first
    finally:
        sender.close()
        outbox.close()


@pytest.mark.parametrize("kind", ["zmq", "shm"])
@pytest.mark.parametrize(("src_ids", "dst_ids"), [
    ([0, 1, 2, 3, 4], [10, 11, 12, 13, 14]),  # consecutive: zero-copy frames, one run per copy
    ([9, 2, 7, 30, 4], [5, 6, 20, 1, 17]),  # fragmented on both sides
])
def test_multi_chunk_transfer_delivers_exact_bytes_then_first_token(
        decode: DecodeSide, kind: str, src_ids: list[int], dst_ids: list[int]) -> None:
    src = prefill_pool(1)
    num_tokens = 19
    decode.endpoint.reservations.reserve("r", dst_ids, num_tokens, lease_s=30.0)
    outbox = Outbox(decode.endpoint.address, CONFIG)
    sender = open_kv_sender(kind, outbox, decode.endpoint.target(), SPEC)
    chunker = KVChunker("r", dst_ids, num_tokens, SPEC.num_layers, SPEC.block_size)
    first = FirstToken("r", token=SampledTokens([7], [-0.25], [1]))
    built_after_copy = []

    def first_token() -> FirstToken:  # the last chunk's bytes are in place (shm) or gathered by now
        built_after_copy.append(kind != "shm" or _blocks_equal(decode.pool, dst_ids, src, src_ids))
        return first

    try:
        for token_end in (6, 13):  # chunk boundaries inside blocks: partial blocks are re-sent
            assert sender.send_chunk(chunker.next_chunk(src_ids, token_end), src).wait(EVENT_TIMEOUT_S)
        assert sender.send_chunk(chunker.next_chunk(src_ids, 19), src, first_token).wait(EVENT_TIMEOUT_S)
        results = [decode.next_event() for _ in range(3)]
        assert [(r.accepted, r.complete) for r in results] == [(True, False), (True, False), (True, True)]
        assert decode.next_event() == first  # the last chunk's header carried it: after the chunk
        assert built_after_copy == [True]
    finally:
        sender.close()
        outbox.close()
    assert chunker.done and decode.endpoint.reservations.get("r").complete  # type: ignore[union-attr]
    assert_blocks_equal(decode.pool, dst_ids, src, src_ids)
    untouched = sorted(set(range(SPEC.num_blocks)) - set(dst_ids))
    assert (np.asarray(decode.pool.array[:, :, untouched]) == -1.0).all()


@pytest.mark.parametrize("kind", ["zmq", "shm"])
def test_layer_by_layer_streaming(decode: DecodeSide, kind: str) -> None:
    src, src_ids, dst_ids = prefill_pool(2), [3, 4, 8], [0, 2, 1]
    decode.endpoint.reservations.reserve("r", dst_ids, 12, lease_s=30.0)
    outbox = Outbox(decode.endpoint.address, CONFIG)
    sender = open_kv_sender(kind, outbox, decode.endpoint.target(), SPEC)
    chunker = KVChunker("r", dst_ids, 12, SPEC.num_layers, SPEC.block_size)
    try:
        for layer in range(SPEC.num_layers):
            sender.send_chunk(chunker.next_chunk(src_ids, 12, layers=range(layer, layer + 1)), src)
        results = [decode.next_event() for _ in range(SPEC.num_layers)]
    finally:
        sender.close()
        outbox.close()
    assert [r.complete for r in results] == [False, False, True]  # type: ignore[attr-defined]
    assert_blocks_equal(decode.pool, dst_ids, src, src_ids)


@pytest.fixture(scope="module")
def fuzz_rig() -> Iterator[tuple[DecodeSide, zmq.Socket]]:
    side = DecodeSide()
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(side.endpoint.address)
    yield side, push
    push.close()
    context.term()
    side.close()


CODEC = WireCodec()
GOOD_HEADER = KVChunkHeader("fuzz", 0, 0, 3, 0, 8, (3, 4), "float32", (2, 4, 8), 6 * 2 * 256, last=True)
GOOD_FRAMES = [np.full((2, 2, 4, 8), 5.0, np.float32).tobytes() for _ in range(6)]


@st.composite
def bad_messages(draw: st.DrawFn) -> list[bytes]:
    header = CODEC.encode(GOOD_HEADER)
    kind = draw(st.sampled_from(["random", "truncated_header", "wrong_blocks", "truncated_payload",
                                 "wrong_shape", "unknown_request", "missing_frames"]))
    if kind == "random":
        return draw(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
    if kind == "truncated_header":
        return [header[:draw(st.integers(0, len(header) - 1))], *GOOD_FRAMES]
    if kind == "truncated_payload":
        i = draw(st.integers(0, 5))
        frames = list(GOOD_FRAMES)
        frames[i] = frames[i][:draw(st.integers(0, len(frames[i]) - 1))]
        return [header, *frames]
    if kind == "missing_frames":
        return [header, *GOOD_FRAMES[:draw(st.integers(0, 5))]]
    change: dict[str, object] = {
        "wrong_blocks": {"block_ids": draw(st.tuples(st.integers(0, 31), st.integers(0, 31)).filter(
            lambda ids: ids != (3, 4)))},
        "wrong_shape": {"block_shape": (2, 4, 4), "payload_nbytes": 6 * 2 * 128},
        "unknown_request": {"request_id": draw(st.text(min_size=1, max_size=8).filter("fuzz".__ne__))},
    }[kind]
    return [CODEC.encode(msgspec.structs.replace(GOOD_HEADER, **change)), *GOOD_FRAMES]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad_messages())
def test_fuzzed_wire_messages_are_rejected_and_never_written(
        fuzz_rig: tuple[DecodeSide, zmq.Socket], frames: list[bytes]) -> None:
    side, push = fuzz_rig
    if side.endpoint.reservations.get("fuzz") is None:
        side.endpoint.reservations.reserve("fuzz", [3, 4], 8, lease_s=600.0)
    before = side.checksum()
    push.send_multipart(frames)
    event = side.next_event()
    if isinstance(event, ChunkResult):
        assert not event.accepted
    else:  # every non-KV message needs no payload; anything else is malformed
        assert isinstance(event, Malformed) or len(frames) == 1
    assert side.checksum() == before
    assert side.endpoint.reservations.get("fuzz").progress.next_seq == 0  # type: ignore[union-attr]


def test_receiver_keeps_serving_after_bad_messages(fuzz_rig: tuple[DecodeSide, zmq.Socket]) -> None:
    side, push = fuzz_rig
    if side.endpoint.reservations.get("fuzz") is None:
        side.endpoint.reservations.reserve("fuzz", [3, 4], 8, lease_s=600.0)
    header = CODEC.encode(GOOD_HEADER)
    wrong_blocks = CODEC.encode(msgspec.structs.replace(GOOD_HEADER, block_ids=(4, 3)))
    for bad in ([header[:-3], *GOOD_FRAMES], [wrong_blocks, *GOOD_FRAMES], [header, *GOOD_FRAMES[:-1]]):
        push.send_multipart(bad)
        assert isinstance(side.next_event(), Malformed | ChunkResult)
    rejected = {k: v for k, v in side.endpoint.receiver.stats().items() if k.startswith("rejected_")}
    assert {"rejected_malformed", "rejected_wrong_blocks", "rejected_wrong_length"} <= rejected.keys()
    push.send_multipart([header, *GOOD_FRAMES])
    result = side.next_event()
    assert isinstance(result, ChunkResult) and result.complete
    assert (np.asarray(side.pool.array[:, :, [3, 4]]) == 5.0).all()


def test_inbox_survives_a_failing_event_handler() -> None:
    pool = KVCachePool.create_shared(SPEC)
    seen: queue.Queue[object] = queue.Queue()

    def on_event(event: object) -> None:
        seen.put(event)
        if isinstance(event, Abort) and event.reason == "boom":
            raise RuntimeError("handler bug")

    endpoint = KVEndpoint(pool, CONFIG, on_event).start()
    outbox = Outbox(endpoint.address, CONFIG)
    try:
        outbox.send(Abort("a", "boom"))
        outbox.send(Abort("b", "fine"))
        assert seen.get(timeout=EVENT_TIMEOUT_S) == Abort("a", "boom")
        assert seen.get(timeout=EVENT_TIMEOUT_S) == Abort("b", "fine")
    finally:
        outbox.close()
        endpoint.close()
        pool.close()


def test_chunk_after_lease_expiry_is_rejected_and_expire_releases(decode: DecodeSide) -> None:
    src = prefill_pool(3)
    decode.endpoint.reservations.reserve("r", [1, 2], 8, lease_s=0.05)
    time.sleep(0.1)
    outbox = Outbox(decode.endpoint.address, CONFIG)
    sender = open_kv_sender("zmq", outbox, decode.endpoint.target(), SPEC)
    before = decode.checksum()
    try:
        chunker = KVChunker("r", [1, 2], 8, SPEC.num_layers, SPEC.block_size)
        sender.send_chunk(chunker.next_chunk([5, 6], 8), src)
        result = decode.next_event()
    finally:
        outbox.close()
    assert isinstance(result, ChunkResult) and result.reason == RejectReason.LEASE_EXPIRED
    assert decode.checksum() == before
    assert [r.request_id for r in decode.endpoint.reservations.expire()] == ["r"]
    assert decode.endpoint.reservations.get("r") is None


def test_in_place_notice_is_refused_by_a_node_without_a_shared_pool() -> None:
    pool = KVCachePool.allocate(SPEC)  # private: peers cannot have written it
    events: queue.Queue[object] = queue.Queue()
    endpoint = KVEndpoint(pool, CONFIG, events.put).start()
    endpoint.reservations.reserve("r", [1], 4, lease_s=30.0)
    outbox = Outbox(endpoint.address, CONFIG)
    try:
        header = KVChunkHeader("r", 0, 0, 3, 0, 4, (1,), "float32", (2, 4, 8), 6 * 256, True, in_place=True)
        outbox.send(header)
        result = events.get(timeout=EVENT_TIMEOUT_S)
    finally:
        outbox.close()
        endpoint.close()
    assert isinstance(result, ChunkResult) and result.reason == RejectReason.IN_PLACE_NOT_ALLOWED
    assert endpoint.target().shm_name is None


def test_prefill_side_inbox_drops_kv_chunks() -> None:
    events: list[object] = []
    dispatcher = InboxDispatcher(events.append, receiver=None)
    context = zmq.Context()
    try:
        frames = [zmq.Frame(CODEC.encode(GOOD_HEADER)), *map(zmq.Frame, GOOD_FRAMES)]
        dispatcher(frames)
        dispatcher([zmq.Frame(CODEC.encode(Abort("x"))), zmq.Frame(b"extra")])
        dispatcher([zmq.Frame(CODEC.encode(Abort("x")))])
    finally:
        context.term()
    assert [type(e) for e in events] == [Malformed, Malformed, Abort]
    assert dispatcher.counts == {"unexpected_kv_chunk": 1, "unexpected_payload": 1}


def test_send_to_a_dead_peer_fails_within_the_timeout() -> None:
    with zmq.Context() as context, context.socket(zmq.PULL) as probe:
        port = probe.bind_to_random_port("tcp://127.0.0.1")
    outbox = Outbox(f"tcp://127.0.0.1:{port}", TransferConfig(send_timeout_s=0.3))  # nobody listens now
    started = time.monotonic()
    try:
        # refused: known down as soon as the connect fails, or at the latest after the send timeout
        with pytest.raises(TransferError, match="is down|within"):
            outbox.send(Abort("r"))
    finally:
        outbox.close()
    assert time.monotonic() - started < 2.0


def test_sender_choice_and_refusals(decode: DecodeSide) -> None:
    target = decode.endpoint.target()
    assert target.host_id == local_host_id() and target.shm_name == decode.pool.shm_name
    assert choose_transport("auto", target, local_host_id()) == "shm"
    assert choose_transport("auto", target, "another-host") == "zmq"
    assert choose_transport("zmq", target, local_host_id()) == "zmq"
    outbox = Outbox(target.address, CONFIG)
    try:
        with pytest.raises(TransferError, match="unknown KV transport"):
            open_kv_sender("rdma", outbox, target, SPEC)
        no_pool = msgspec.structs.replace(target, shm_name=None)
        with pytest.raises(TransferError, match="no shared pool"):
            open_kv_sender("shm", outbox, no_pool, SPEC)
        gone = msgspec.structs.replace(target, shm_name="pdserve-kv-does-not-exist")
        with pytest.raises(TransferError, match="cannot map"):
            open_kv_sender("shm", outbox, gone, SPEC)
        other = KVCacheSpec(num_layers=3, num_blocks=32, block_size=4, num_kv_heads=2, head_dim=16)
        with pytest.raises(TransferError, match="layout mismatch"):
            open_kv_sender("zmq", outbox, target, other)
    finally:
        outbox.close()


def test_peer_pool_with_another_block_count_is_compatible(decode: DecodeSide) -> None:
    local = KVCacheSpec(num_layers=3, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8)
    outbox = Outbox(decode.endpoint.address, CONFIG)
    try:
        open_kv_sender("shm", outbox, decode.endpoint.target(), local).close()
    finally:
        outbox.close()


def test_chunker_refuses_chunks_that_do_not_follow() -> None:
    chunker = KVChunker("r", [1, 2, 3], 10, num_layers=2, block_size=4)
    with pytest.raises(ValueError, match="empty"):
        chunker.next_chunk([7, 8, 9], 0)
    with pytest.raises(ValueError, match="out_of_range"):
        chunker.next_chunk([7, 8, 9], 11)
    first = chunker.next_chunk([7, 8, 9], 5)
    assert (first.src_block_ids, first.dst_block_ids, first.last) == ((7, 8), (1, 2), False)
    second = chunker.next_chunk([7, 8, 9], 10)
    assert (second.range.token_start, second.src_block_ids, second.dst_block_ids) == (5, (8, 9), (2, 3))
    assert second.last and chunker.done


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(transport="rdma"), "transport"),
    (dict(port=70000), "port"),
    (dict(bind_host=""), "bind_host"),
    (dict(send_timeout_s=0), "send_timeout_s"),
    (dict(send_hwm=0), "send_hwm"),
    (dict(advertise_host=""), "advertise_host"),
    (dict(malloc_retain_bytes=2**31), "malloc_retain_bytes"),
])
def test_config_errors_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(TransferConfigError, match=f"transfer.{field} "):
        TransferConfig(**kwargs)  # type: ignore[arg-type]


def test_inbox_binds_the_configured_interface_and_port(decode: DecodeSide) -> None:
    assert decode.endpoint.address.startswith("tcp://127.0.0.1:") and decode.endpoint.inbox.port > 0
    assert decode.endpoint.target() == KVTarget(decode.endpoint.address, local_host_id(), SPEC,
                                                decode.pool.shm_name)
    assert WIRE_VERSION == 5


def test_malloc_tuning_applies_on_glibc_and_can_be_switched_off() -> None:
    assert keep_message_buffers(TransferConfig())  # this host's Python runs on glibc
    assert not keep_message_buffers(TransferConfig(tune_malloc=False))


def _mappings(name: str) -> int:
    """How many times this process maps /dev/shm/<name> (also after the file was unlinked)."""
    return sum(name in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_work_submitted_from_any_thread_runs_on_the_peers_thread_in_order(decode: DecodeSide) -> None:
    """A prefill node's record reader queues pushes with `submit` while its event loop queues sends
    (abort confirmations) with `run`: one peer's work runs on one thread, in the order it was queued."""
    async def run() -> None:
        peers = PeerSenders(CONFIG)
        address = decode.endpoint.address
        ran: list[tuple[str, str]] = []
        gate = threading.Event()
        try:
            blocked = peers.submit(address, lambda p: gate.wait(EVENT_TIMEOUT_S))
            from_thread = []
            worker = threading.Thread(target=lambda: from_thread.append(peers.submit(
                address, lambda p: ran.append(("thread", threading.current_thread().name)))))
            worker.start()
            worker.join()
            from_loop = asyncio.ensure_future(peers.run(
                address, lambda p: ran.append(("loop", threading.current_thread().name))))
            await asyncio.sleep(0.05)
            assert ran == []  # both wait behind the blocked work
            gate.set()
            await from_loop
            assert blocked.result() and from_thread[0].result() is None
            assert [who for who, _ in ran] == ["thread", "loop"]
            assert len({name for _, name in ran}) == 1 and ran[0][1].startswith("pd-peer")
        finally:
            gate.set()
            await peers.close()
        with pytest.raises(TransferError):  # closed: nothing more is queued, from any thread
            peers.submit(address, lambda p: None)

    asyncio.run(run())


def test_a_restarted_or_exited_decode_peer_leaves_no_pool_mapped() -> None:
    """The prefill side maps a decode peer's pool to copy into it; when that peer restarts (a new pool
    at the same address) or exits (its pool file removed), the old mapping must go, or every decode
    restart would leave a whole pool's memory mapped on each prefill node."""
    async def run() -> None:
        first, second = DecodeSide(), DecodeSide()
        peers = PeerSenders(CONFIG)
        old_pool = first.pool.shm_name
        try:
            # Both "decode sides" live in this process: each pool is mapped once by its owner, and once
            # more by the sender that copies into it.
            owned = _mappings(old_pool)
            target = first.endpoint.target()
            await peers.run(first.endpoint.address, lambda p: p.kv_sender("shm", target, SPEC))
            assert _mappings(old_pool) > owned
            # The same address now names another pool (the peer restarted): the sender is replaced.
            restarted = msgspec.structs.replace(target, shm_name=second.pool.shm_name)
            sender = await peers.run(first.endpoint.address, lambda p: p.kv_sender("shm", restarted, SPEC))
            assert sender.target == restarted and _mappings(old_pool) == owned
            # The peer exits: its pool file goes, and the sweep retires the peer and its mapping.
            assert peers.retire_stale() == []
            second_pool = second.pool.shm_name
            with_sender = _mappings(second_pool)
            second.close()  # the owner removes the file (its own mapping goes with its last reference)
            assert peers.retire_stale() == [first.endpoint.address] and len(peers) == 0
            await asyncio.sleep(0.2)  # the retired peer closes on its own thread
            assert _mappings(second_pool) < with_sender
        finally:
            await peers.close()
            first.close()
            second.close()  # idempotent: a failure above must not leave its pool behind

    asyncio.run(run())
