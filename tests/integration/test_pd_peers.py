"""The decode node's control sends to prefill peers (transfer/peers.py), over real ZMQ sockets.

One peer is a real inbox on loopback; the other is a port nothing listens on, so a first send to it
blocks its thread for the whole send timeout. Messages to the live peer must not wait behind it.
Liveness: a peer that dies is reported down within the heartbeat timeout, sends to it then fail at
once, and a peer that comes back is reported up and served on the same (never retired) connection.
"""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from pdserve.tests.support.cluster import free_port
from pdserve.transfer.channel import Inbox, SendWouldWait, TransferError
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.messages import MAX_MESSAGE_BYTES, LeaseRenewal, WireCodec, WireMessage
from pdserve.transfer.peers import Peer, PeerSenders

SEND_TIMEOUT_S = 1.5
CONFIG = TransferConfig(send_timeout_s=SEND_TIMEOUT_S)


class LivePeer:
    """A real inbox that records every message it gets, with the time it got it."""

    def __init__(self, port: int = 0) -> None:
        self.received: queue.Queue[tuple[float, WireMessage]] = queue.Queue()
        self._codec_lock = threading.Lock()
        self._codec = WireCodec()
        config = TransferConfig(port=port)
        self.inbox = Inbox(config, self._on_frames, MAX_MESSAGE_BYTES).start()
        self.address = self.inbox.address

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        with self._codec_lock:
            message = self._codec.decode(frames[0].buffer)
        self.received.put((time.monotonic(), message))

    def next_message(self, timeout_s: float) -> tuple[float, WireMessage]:
        return self.received.get(timeout=timeout_s)


@pytest.fixture
def live_peer() -> Iterator[LivePeer]:
    peer = LivePeer()
    yield peer
    peer.inbox.close()


def dead_address() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def stalled_address() -> Iterator[str]:
    """A TCP port that accepts connections (the kernel's backlog) but never speaks ZMTP: a send to
    it waits until the handshake or send timeout, as one to a stalled or cut-off host would."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"tcp://127.0.0.1:{listener.getsockname()[1]}"


def test_stalled_peer_does_not_delay_messages_to_a_live_peer(live_peer: LivePeer,
                                                             stalled_address: str) -> None:
    async def scenario() -> tuple[float, float, float]:
        senders = PeerSenders(CONFIG)
        try:
            dead = asyncio.ensure_future(senders.send(stalled_address, LeaseRenewal("to-dead", 1000)))
            await asyncio.sleep(0.1)  # the stalled peer's send is now blocking its thread
            started = time.monotonic()
            # Several messages in a row, as several requests' PrefillTasks would be.
            for i in range(5):
                await senders.send(live_peer.address, LeaseRenewal(f"to-live-{i}", 1000))
            sent = time.monotonic()
            # The property itself: the live sends completed while the dead peer's send still blocked.
            assert not dead.done(), "the live sends waited until the dead peer's send gave up"
            with pytest.raises(TransferError):
                await dead
            failed = time.monotonic()
            return started, sent, failed
        finally:
            await senders.close()

    started, sent, failed = asyncio.run(asyncio.wait_for(scenario(), 4 * SEND_TIMEOUT_S))
    assert sent - started < SEND_TIMEOUT_S / 3, f"live sends took {sent - started:.2f} s"
    got = [live_peer.next_message(1.0) for _ in range(5)]
    assert [m.request_id for _, m in got] == [f"to-live-{i}" for i in range(5)]
    assert max(t for t, _ in got) - started < SEND_TIMEOUT_S / 3
    # The stalled peer's send waited for it (its failure is its own), and not past the timeouts.
    assert SEND_TIMEOUT_S / 2 < failed - started < SEND_TIMEOUT_S + 0.5


def test_send_to_a_refused_address_fails_at_once() -> None:
    async def scenario() -> float:
        senders = PeerSenders(CONFIG)
        try:
            started = time.monotonic()
            with pytest.raises(TransferError):
                await senders.send(dead_address(), LeaseRenewal("x", 1000))
            return time.monotonic() - started
        finally:
            await senders.close()

    assert asyncio.run(scenario()) < 0.5


class LivenessLog:
    """Records PeerSenders' liveness callbacks (they run on watch threads) with their times."""

    def __init__(self) -> None:
        self.events: queue.Queue[tuple[float, str, bool]] = queue.Queue()

    def __call__(self, address: str, up: bool) -> None:
        self.events.put((time.monotonic(), address, up))

    def next(self, timeout_s: float) -> tuple[float, str, bool]:
        return self.events.get(timeout=timeout_s)


def test_peer_that_comes_back_is_reported_up_and_served_on_the_same_peer() -> None:
    liveness = LivenessLog()

    async def scenario() -> None:
        senders = PeerSenders(CONFIG, liveness)
        port = free_port()
        address = f"tcp://127.0.0.1:{port}"
        try:
            with pytest.raises(TransferError):
                await senders.send(address, LeaseRenewal("while-down", 1000))
            assert liveness.next(0.5)[1:] == (address, False)
            started = time.monotonic()
            with pytest.raises(TransferError):  # known down now: fails at once, no send timeout
                await senders.send(address, LeaseRenewal("still-down", 1000))
            assert time.monotonic() - started < 0.2
            assert len(senders) == 1  # kept open: libzmq keeps reconnecting
            peer = LivePeer(port)  # the prefill node comes back on the same address
            try:
                back_at, _, up = await asyncio.to_thread(liveness.next, 2.0)
                assert up and back_at - time.monotonic() < 1.0
                await senders.send(address, LeaseRenewal("after-restart", 1000))
                _, message = await asyncio.to_thread(peer.next_message, 2.0)
                assert message == LeaseRenewal("after-restart", 1000)
            finally:
                peer.inbox.close()
        finally:
            await senders.close()

    asyncio.run(asyncio.wait_for(scenario(), 4 * SEND_TIMEOUT_S))


def test_peer_that_dies_is_reported_down_within_the_heartbeat_timeout() -> None:
    liveness = LivenessLog()

    async def scenario() -> float:
        senders = PeerSenders(CONFIG, liveness)
        peer = LivePeer()
        try:
            await senders.send(peer.address, LeaseRenewal("a", 1000))
            assert liveness.next(1.0)[1:] == (peer.address, True)
            killed = time.monotonic()
            peer.inbox.close()  # the process is gone: its sockets close
            down_at, address, up = await asyncio.to_thread(liveness.next, 3.0)
            assert (address, up) == (peer.address, False)
            assert senders.is_down(peer.address)
            return down_at - killed
        finally:
            await senders.close()

    detected_s = asyncio.run(asyncio.wait_for(scenario(), 10.0))
    assert detected_s < CONFIG.heartbeat_timeout_s + 0.5, f"detected after {detected_s:.2f} s"


def test_peer_down_for_long_is_retired() -> None:
    async def scenario() -> None:
        senders = PeerSenders(CONFIG)
        try:
            with pytest.raises(TransferError):
                await senders.send(dead_address(), LeaseRenewal("x", 1000))
            assert senders.retire_down(60.0) == [] and len(senders) == 1
            assert len(senders.retire_down(0.0)) == 1 and len(senders) == 0
        finally:
            await senders.close()

    asyncio.run(asyncio.wait_for(scenario(), 4 * SEND_TIMEOUT_S))


def test_close_ends_every_peer_thread(live_peer: LivePeer) -> None:
    def pd_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("pd-peer")}

    before = pd_threads()

    async def scenario() -> None:
        senders = PeerSenders(CONFIG)
        other = LivePeer()
        try:
            await senders.send(live_peer.address, LeaseRenewal("a", 1000))
            await senders.send(other.address, LeaseRenewal("b", 1000))
            assert len(senders) == 2
            assert len(pd_threads() - before) == 2  # one thread per peer
            await senders.close()
            assert len(senders) == 0
        finally:
            await senders.close()  # idempotent; after a failed assertion it stops the threads we started
            other.inbox.close()

    asyncio.run(asyncio.wait_for(scenario(), 4 * SEND_TIMEOUT_S))
    assert not {t for t in pd_threads() - before if t.is_alive()}


def _on_thread(peer: Peer) -> str:
    return threading.current_thread().name


def test_work_runs_in_place_only_when_nothing_is_queued_and_it_cannot_wait(live_peer: LivePeer) -> None:
    """`submit(in_place=...)` runs the work on the caller's thread when the peer's thread has nothing
    queued and the check holds (connection up, room to send), and queues it otherwise: behind work
    queued before it, so one peer's messages keep their order."""
    senders = PeerSenders(CONFIG)
    caller = threading.current_thread().name
    try:
        # No connection yet: the first send must wait for it, on the peer's thread.
        assert not senders.submit(live_peer.address, Peer.ready_to_send).result(2.0)
        first = senders.submit(live_peer.address, lambda p: p.send(LeaseRenewal("0", 1000)),
                               in_place=Peer.ready_to_send)
        first.result(2.0)
        deadline = time.monotonic() + 2.0
        while not senders.submit(live_peer.address, Peer.ready_to_send).result(2.0):
            assert time.monotonic() < deadline, "the connection never came up"
            time.sleep(0.01)
        assert senders.submit(live_peer.address, _on_thread).result(2.0).startswith("pd-peer")
        # Idle and connected: in place, its future already settled.
        done = senders.submit(live_peer.address, _on_thread, in_place=Peer.ready_to_send)
        assert done.done() and done.result() == caller
        # The check says no: queued.
        assert senders.submit(live_peer.address, _on_thread, in_place=lambda p: False).result(2.0) != caller
        # Work queued and not finished: the next one queues behind it, whatever the check says.
        release = threading.Event()
        blocker = senders.submit(live_peer.address, lambda p: release.wait(2.0))
        order: list[str] = []
        later = senders.submit(live_peer.address, lambda p: order.append(_on_thread(p)),
                               in_place=Peer.ready_to_send)
        assert not later.done()
        release.set()
        blocker.result(2.0)
        later.result(2.0)
        assert order and order[0] != caller
        # A failure in place lands in the future, as on the thread.
        failed = senders.submit(live_peer.address, lambda p: 1 / 0, in_place=Peer.ready_to_send)
        assert isinstance(failed.exception(0), ZeroDivisionError)
        for i in range(1, 4):
            senders.submit(live_peer.address, lambda p, i=i: p.send(LeaseRenewal(str(i), 1000)),
                           in_place=Peer.ready_to_send).result(2.0)
    finally:
        asyncio.run(senders.close())
    assert [live_peer.next_message(1.0)[1].request_id for _ in range(4)] == ["0", "1", "2", "3"]


def test_in_place_work_waits_for_nothing_on_a_stalled_peer(stalled_address: str) -> None:
    """A peer whose connection never completes its handshake: `ready_to_send` never holds, so the
    caller's thread is never the one that waits; the send waits (and fails) on the peer's thread."""
    senders = PeerSenders(CONFIG)
    try:
        started = time.monotonic()
        sent = senders.submit(stalled_address, lambda p: p.send(LeaseRenewal("x", 1000)),
                              in_place=Peer.ready_to_send)
        assert time.monotonic() - started < 0.2 and not sent.done()
        again = senders.submit(stalled_address, lambda p: p.send(LeaseRenewal("y", 1000)),
                               in_place=Peer.ready_to_send)
        assert time.monotonic() - started < 0.2 and not again.done()
        with pytest.raises(TransferError):
            sent.result(SEND_TIMEOUT_S + 1.0)
    finally:
        asyncio.run(senders.close())


def test_work_cancelled_before_its_turn_does_not_hold_back_in_place_work(live_peer: LivePeer) -> None:
    """A queued send whose caller stopped waiting (its future cancelled before the thread reached it)
    never runs; the peer must not count it as queued for ever."""
    senders = PeerSenders(CONFIG)
    caller = threading.current_thread().name
    try:
        senders.submit(live_peer.address, lambda p: p.send(LeaseRenewal("0", 1000))).result(2.0)
        deadline = time.monotonic() + 2.0
        while not senders.submit(live_peer.address, Peer.ready_to_send).result(2.0):
            assert time.monotonic() < deadline, "the connection never came up"
            time.sleep(0.01)
        release = threading.Event()
        blocker = senders.submit(live_peer.address, lambda p: release.wait(2.0))
        cancelled = senders.submit(live_peer.address, _on_thread)
        assert cancelled.cancel()
        release.set()
        blocker.result(2.0)
        done = senders.submit(live_peer.address, _on_thread, in_place=Peer.ready_to_send)
        assert done.done() and done.result() == caller
    finally:
        asyncio.run(senders.close())


def test_a_send_in_place_that_would_wait_is_queued_instead(stalled_address: str) -> None:
    """The check said the send would not wait, but the peer cannot take it (here: a connection that
    never completed its handshake, checked by a `can_run` that says yes): the caller's thread does
    not wait; the send goes to the peer's thread, which gives its own verdict on the peer."""
    senders = PeerSenders(CONFIG)
    try:
        with pytest.raises(TransferError):  # opens the outbox; the peer never answers
            senders.submit(stalled_address, lambda p: p.send(LeaseRenewal("first", 1000))).result(
                SEND_TIMEOUT_S + 1.0)
        started = time.monotonic()
        sent = senders.submit(stalled_address, lambda p: p.send(LeaseRenewal("x", 1000)),
                              in_place=lambda p: True)
        assert time.monotonic() - started < 0.2
        with pytest.raises(TransferError) as failed:
            sent.result(SEND_TIMEOUT_S + 1.0)
        assert not isinstance(failed.value, SendWouldWait)  # the peer thread's own verdict
        assert "cannot take a message now" not in str(failed.value)
    finally:
        asyncio.run(senders.close())
