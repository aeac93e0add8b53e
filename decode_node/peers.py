"""Control messages to prefill peers (PrefillTask, LeaseRenewal, Abort): one sender thread per peer.

A ZMQ send to a peer that is down blocks its thread until the send timeout (the Outbox queues only
to a connected peer, so a dead peer is noticed instead of piling messages up). With one thread per
peer address, a dead or stalled prefill node delays only the requests sent to it; every other
peer's PrefillTasks leave at once. Each Outbox is created, used and closed on its own peer's thread
(ZMQ sockets belong to one thread).

A peer whose send failed is retired (its socket closed on its thread, after whatever was queued
behind the failure): the next message to that address opens a fresh one, so addresses that never
answer do not keep threads alive.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from pdserve.transfer.channel import Outbox, TransferError
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.messages import WireMessage


class _Peer:
    """One peer's Outbox and the single thread that owns it."""

    def __init__(self, address: str, config: TransferConfig) -> None:
        self.address = address
        self._config = config
        self._outbox: Outbox | None = None
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pd-control")

    def send(self, message: WireMessage) -> None:  # on self.thread
        if self._outbox is None:
            self._outbox = Outbox(self.address, self._config)
        self._outbox.send(message)

    def close(self) -> None:  # on self.thread
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = None


class PeerSenders:
    """Sends wire messages to prefill peers by address; used from one event loop."""

    def __init__(self, config: TransferConfig) -> None:
        self._config = config
        self._peers: dict[str, _Peer] = {}

    def __len__(self) -> int:
        return len(self._peers)

    async def send(self, address: str, message: WireMessage) -> None:
        """Send on `address`'s own thread; raises TransferError when the peer did not take it in time."""
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = _Peer(address, self._config)
        try:
            await asyncio.get_running_loop().run_in_executor(peer.thread, peer.send, message)
        except TransferError:
            self._retire(peer)
            raise

    def _retire(self, peer: _Peer) -> None:
        if self._peers.get(peer.address) is peer:
            del self._peers[peer.address]
            # Sends already queued on its thread run first (and fail fast or succeed); then it closes.
            peer.thread.submit(peer.close)
            peer.thread.shutdown(wait=False)

    async def close(self) -> None:
        """Close every peer's socket on its own thread and wait for the threads to end."""
        loop = asyncio.get_running_loop()
        peers, self._peers = list(self._peers.values()), {}
        await asyncio.gather(*(loop.run_in_executor(p.thread, p.close) for p in peers))
        for peer in peers:
            peer.thread.shutdown(wait=True)
