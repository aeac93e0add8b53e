"""Everything a node sends to one peer runs on that peer's own thread.

Decode nodes send control messages (PrefillTask, LeaseRenewal, Abort) to prefill peers; prefill nodes
send KV chunks, FirstToken and Abort acks to decode peers. A first send to a peer not yet connected
blocks its thread until the connection is made or the send timeout passes (the Outbox queues only to
a connected peer, so a dead peer is noticed instead of piling messages up); once the peer is known
down (its connection lost or refused: channel.ConnectionWatch), sends to it fail at once. With one
thread per peer address, a dead or stalled peer delays only the requests that involve it. Each Outbox
(and each KV sender built on it) is created and closed on its own peer's thread. Work reaches a
peer's thread from the event loop (`run`, `send`) or straight from another thread (`submit`: a
prefill node's engine-record reader queues a KV push without waiting for a turn of the loop); either
way one peer's work runs in the order it was queued.

A ZMQ socket may be used by one thread at a time, with a memory barrier between users: a peer's
`owner` lock is that barrier. Its thread holds it for each piece of queued work, and a caller may
instead run work in place, on its own thread, when nothing of the peer's is queued and the work can
finish without waiting (`submit`'s `in_place`: the connection is up, the socket takes a message now,
a same-host copy is small). That saves the wake-up of the peer's thread (65 µs median on an idle
2-vCPU VM, more under load) on the path to a PD request's first token: the decode node's
PrefillTask, the prefill node's last KV chunk with its FirstToken. Work that might wait (a first
connection, a large copy, zero-copy frames libzmq still holds) goes to the peer's thread, and a send
made in place never waits: if the peer cannot take it after all, it raises SendWouldWait (a work
that sent nothing is then queued instead), so a slow peer never stalls the caller.

A peer stays open through failures, so libzmq keeps reconnecting and `on_liveness(address, up)`
reports the moment it is back; `retire_down` closes peers down for longer than a given time, so
addresses that never answer do not keep threads alive. A decode peer's shared pool stays mapped
only while it is that peer's current pool: a task naming another pool (the peer restarted at the
same address) replaces the mapping, and `retire_stale` retires peers whose pool file is gone (the
peer died or restarted elsewhere), so a prefill node never keeps dead pools' memory mapped.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from pdserve.common.kv_cache import SHM_DIR
from pdserve.transfer.channel import Outbox, SendWouldWait, TransferError
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.messages import KVTarget, WireMessage
from pdserve.transfer.transport import KVSender, ShmKVSender, open_kv_sender

T = TypeVar("T")
PeerLivenessCallback = Callable[[str, bool], None]  # (address, up), called on a watch thread


class Peer:
    """One peer's Outbox, the KV senders built on it, and the single thread its work is queued on.
    Its methods that touch the outbox or the senders run under `owner`: queued work on the peer's
    thread, or work a caller runs in place (`try_in_place`)."""

    def __init__(self, address: str, config: TransferConfig,
                 on_liveness: PeerLivenessCallback | None = None) -> None:
        self.address = address
        self._config = config
        self._on_liveness = on_liveness
        self._outbox: Outbox | None = None
        self.heard_from_at = float("-inf")
        self._kv_senders: dict[str, KVSender] = {}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pd-peer")
        self.owner = threading.Lock()
        self._queued = 0  # queued work not finished yet (under _count): in-place work must not pass it
        self._count = threading.Lock()

    def queue(self, work: Callable[[Peer], T]) -> Future[T]:
        """Run `work(self)` on the peer's thread, after everything queued before it."""
        with self._count:
            self._queued += 1
        try:
            future = self._thread.submit(self._run_queued, work)
        except RuntimeError as exc:  # shut down: the peer was retired or the node is closing
            self._done_queued()
            raise TransferError(f"peer {self.address} is closed") from exc
        # A future cancelled before its turn (a caller that stopped waiting) never runs: count it done.
        future.add_done_callback(lambda f: f.cancelled() and self._done_queued())
        return future

    def _run_queued(self, work: Callable[[Peer], T]) -> T:
        try:
            with self.owner:
                return work(self)
        finally:
            self._done_queued()

    def _done_queued(self) -> None:
        with self._count:
            self._queued -= 1

    def try_in_place(self, work: Callable[[Peer], T], can_run: Callable[[Peer], bool]) -> Future[T] | None:
        """Run `work(self)` on the calling thread and return its settled future, when nothing is queued
        and `can_run(self)` says the work will not wait; None when nothing was done. Sends made by the
        work never wait: one the peer cannot take after all (its connection dropped since the check)
        raises SendWouldWait, and a work that raised it having sent nothing is queued again (None)."""
        if not self.owner.acquire(blocking=False):
            return None  # the peer's thread (or another caller) is using the socket
        outbox = self._outbox
        try:
            with self._count:
                if self._queued:
                    return None  # earlier work first
            if outbox is None or not can_run(self):
                return None
            outbox.may_wait = False
            done: Future[T] = Future()
            try:
                done.set_result(work(self))
            except SendWouldWait:
                return None
            except Exception as exc:
                done.set_exception(exc)
            return done
        finally:
            if outbox is not None:
                outbox.may_wait = True
            self.owner.release()

    def shutdown(self, wait: bool) -> None:
        """Stop the peer's thread once its queued work (its close among it) has run."""
        self._thread.shutdown(wait=wait)

    def ready_to_send(self) -> bool:
        """A message sent now goes out without waiting: connected, and room in the socket's queue
        (under `owner`)."""
        return self._outbox is not None and self._outbox.can_send_now()

    def has_kv_sender(self, kind: str, target: KVTarget) -> bool:
        """The `kind` sender to `target` is open already (opening one maps the peer's pool)."""
        sender = self._kv_senders.get(kind)
        return sender is not None and sender.target == target

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            callback = self._on_liveness
            self._outbox = Outbox(self.address, self._config,
                                  None if callback is None else lambda up: callback(self.address, up))
            self._outbox.heard_from_at = self.heard_from_at
        return self._outbox

    def heard_from(self) -> None:
        """The peer is alive (it just sent us something): sends wait for its connection to come back
        rather than fail at once (callable from any thread)."""
        self.heard_from_at = time.monotonic()
        if self._outbox is not None:
            self._outbox.heard_from_at = self.heard_from_at

    @property
    def down(self) -> bool:
        """Known down (read from any thread)."""
        outbox = self._outbox
        return outbox is not None and outbox.watch.down

    def down_for(self, now: float) -> float:
        """Seconds since the peer was last up (or since its outbox opened); 0 while up or unopened."""
        outbox = self._outbox
        since = None if outbox is None else outbox.watch.down_since
        return 0.0 if since is None else now - since

    def send(self, message: WireMessage) -> None:
        self.outbox.send(message)

    def kv_sender(self, kind: str, target: KVTarget, local_spec) -> KVSender:
        """The `kind` (shm or zmq) KV sender to this peer; both share the peer's outbox, so a message
        sent after a chunk reaches the peer after it. A target other than the sender's (a restarted
        peer: another pool, maybe another layout) replaces the sender and drops its mapping."""
        sender = self._kv_senders.get(kind)
        if sender is not None and sender.target != target:
            sender.close()
            del self._kv_senders[kind]
            sender = None
        if sender is None:
            sender = self._kv_senders[kind] = open_kv_sender(kind, self.outbox, target, local_spec)
        return sender

    def pools(self) -> list[str]:
        """The /dev/shm pools this peer's senders map (read from any thread: targets never change)."""
        return [s.target.shm_name for s in list(self._kv_senders.values())
                if isinstance(s, ShmKVSender) and s.target.shm_name]

    def close(self) -> None:
        for sender in self._kv_senders.values():
            sender.close()
        self._kv_senders = {}
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = None


class PeerSenders:
    """Sends to peers by address, each on its own thread; used from one event loop, except `submit`,
    which any thread may call. `on_liveness(address, up)` hears every peer's connection going down or
    coming back."""

    def __init__(self, config: TransferConfig, on_liveness: PeerLivenessCallback | None = None) -> None:
        self._config = config
        self._on_liveness = on_liveness
        self._peers: dict[str, Peer] = {}
        self._lock = threading.Lock()  # the map: `submit` may run on any thread
        self._closed = False

    def __len__(self) -> int:
        return len(self._peers)

    async def send(self, address: str, message: WireMessage) -> None:
        """Send on `address`'s own thread; raises TransferError when the peer did not take it in time."""
        await self.run(address, lambda peer: peer.send(message))

    async def run(self, address: str, work: Callable[[Peer], T]) -> T:
        """Run `work(peer)` on `address`'s own thread; a TransferError (the peer did not take a send
        in time, or is down) propagates, and the peer stays open to see it come back."""
        return await asyncio.wrap_future(self.submit(address, work))

    def submit(self, address: str, work: Callable[[Peer], T],
               in_place: Callable[[Peer], bool] | None = None) -> Future[T]:
        """Queue `work(peer)` on `address`'s own thread, from any thread; the future holds its result or
        its exception. With `in_place`, the work runs on the calling thread instead when nothing of
        the peer's is queued and `in_place(peer)` says it will not wait (module docstring); such a
        work lets SendWouldWait out only when it has done nothing yet (a plain send), since it is then
        queued as if never tried. Raises TransferError once the senders are closed."""
        if in_place is not None:
            with self._lock:
                peer = self._peer(address)
            done = peer.try_in_place(work, in_place)
            if done is not None:
                return done
        with self._lock:
            return self._peer(address).queue(work)

    def heard_from(self, address: str) -> None:
        """`address`'s peer sent us something just now (see Peer.heard_from)."""
        with self._lock:
            self._peer(address).heard_from()

    def _peer(self, address: str) -> Peer:
        """`address`'s peer, opened if new (under the lock)."""
        if self._closed:
            raise TransferError("the node is closing its peer connections")
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = Peer(address, self._config, self._on_liveness)
        return peer

    def knows(self, address: str) -> bool:
        """Whether `address` is a peer of this node (it sent something, or was sent to)."""
        return address in self._peers

    def is_down(self, address: str) -> bool:
        peer = self._peers.get(address)
        return peer is not None and peer.down

    def retire_down(self, max_down_s: float) -> list[str]:
        """Retire every peer down (or never up) for more than `max_down_s`; returns their addresses."""
        now = time.monotonic()
        with self._lock:
            gone = [peer for peer in self._peers.values() if peer.down_for(now) > max_down_s]
            for peer in gone:
                self._retire(peer)
        return [peer.address for peer in gone]

    def retire_stale(self) -> list[str]:
        """Retire every peer that maps a pool whose file is gone (its owner exited or restarted), so
        its memory is returned; returns their addresses. A later task to the address opens a new peer."""
        with self._lock:
            stale = [peer for peer in self._peers.values()
                     if any(not (SHM_DIR / name).exists() for name in peer.pools())]
            for peer in stale:
                self._retire(peer)
        return [peer.address for peer in stale]

    def _retire(self, peer: Peer) -> None:
        """Under the lock."""
        if self._peers.get(peer.address) is peer:
            del self._peers[peer.address]
            # Sends already queued on its thread run first (and fail fast or succeed); then it closes.
            peer.queue(Peer.close)
            peer.shutdown(wait=False)

    async def close(self) -> None:
        """Close every peer's socket on its own thread and wait for the threads to end."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._closed = True
            peers, self._peers = list(self._peers.values()), {}
        await asyncio.gather(*(asyncio.wrap_future(p.queue(Peer.close), loop=loop) for p in peers))
        for peer in peers:
            peer.shutdown(wait=True)
