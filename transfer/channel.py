"""ZMQ endpoints of the data plane: an `Outbox` (PUSH, connects) and an `Inbox` (PULL, binds, one thread).

A ZMQ message is `[wire message, *payload frames]`; ZMQ delivers multipart messages whole and, per
connection, in order, which is what lets a prefill node send a message right behind a request's KV
chunks on the same outbox (an error FirstToken, an abort confirmation): when D handles it, every
chunk before it is handled.

Payload frames go out with `copy=False`: libzmq reads the numpy buffer itself, and the receiver gets
the frame's memory without a Python-side copy. A socket is used by one thread at a time (an Outbox:
under its peer's `owner` lock, transfer/peers.py; an Inbox: by its own thread).

Liveness: every connection runs ZMTP heartbeats (a PING each `heartbeat_interval_s`; no traffic for
`heartbeat_timeout_s` closes it), and an Outbox follows its connection through a socket monitor on a
`ConnectionWatch` thread: a peer that is killed (TCP reset: at once) or cut off (heartbeat timeout)
is reported down within `heartbeat_timeout_s`, and up again when libzmq's own reconnect (every
`RECONNECT_IVL_MS`, each attempt bounded by the heartbeat timeout) completes a handshake. Sends to a
peer known down fail at once instead of waiting for the send timeout, unless the peer was heard
from (by other means: a task it sent) within that time: then its connection is coming back, and
the send waits for it.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from pdserve.transfer.config import TransferConfig
from pdserve.transfer.messages import MAX_MESSAGE_BYTES, WireCodec, WireMessage

logger = logging.getLogger(__name__)

POLL_INTERVAL_MS = 100  # how quickly an inbox (or connection watch) thread notices close()
SEND_POLL_MS = 20  # how often a waiting send checks whether its peer is now known down
RECONNECT_IVL_MS = 100  # libzmq's reconnect interval, kept fixed (no backoff): a healed peer is back at once
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc refuses larger on 64-bit hosts


class TransferError(RuntimeError):
    """A send could not be completed (peer unreachable, stalled, or refused the handshake)."""


class SendWouldWait(TransferError):
    """A send made where waiting is not allowed (`Outbox.may_wait` off) found the peer unable to take
    the message now; nothing was sent."""


def keep_message_buffers(config: TransferConfig) -> bool:
    """Let glibc malloc reuse freed message buffers instead of returning them to the kernel.

    libzmq allocates a fresh buffer for every received frame. By default glibc serves buffers above
    128 KiB with mmap and unmaps them on free, so every frame's pages fault in again and are zeroed
    by the kernel: a 64 MiB transfer then takes 16k page faults and runs at half the speed of
    plain TCP. With the mmap threshold at 32 MiB and trimming above
    `config.malloc_retain_bytes`, freed frames are reused (a few hundred faults per transfer). It is
    process-wide, hence a config switch; False where malloc is not glibc's (returns False).
    """
    if not config.tune_malloc:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD)
                    and libc.mallopt(_M_TRIM_THRESHOLD, config.malloc_retain_bytes))
    except (OSError, AttributeError):
        return False


def set_heartbeats(socket: zmq.Socket, config: TransferConfig) -> None:
    """ZMTP heartbeats on every connection of `socket`, and connect attempts bounded by the same time."""
    timeout_ms = int(config.heartbeat_timeout_s * 1000)
    socket.setsockopt(zmq.HEARTBEAT_IVL, int(config.heartbeat_interval_s * 1000))
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
    socket.setsockopt(zmq.HEARTBEAT_TTL, timeout_ms)  # the peer drops us too when our pings stop
    socket.setsockopt(zmq.CONNECT_TIMEOUT, timeout_ms)
    socket.setsockopt(zmq.HANDSHAKE_IVL, timeout_ms)  # a peer that accepts but never speaks ZMTP
    socket.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    socket.setsockopt(zmq.RECONNECT_IVL_MAX, 0)


LivenessCallback = Callable[[bool], None]

_UP_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED
_DOWN_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_watch_ids = itertools.count()


class ConnectionWatch:
    """Follows one connecting socket's connection through libzmq's socket monitor, on a thread of
    its own (the socket's owner thread may be blocked in a send): `up` once a handshake completed
    (with CURVE: the peer accepted us), down on a disconnect or a failed connect or handshake.
    `on_change(up)` runs on the watch thread, once per change."""

    def __init__(self, context: zmq.Context, socket: zmq.Socket, on_change: LivenessCallback | None) -> None:
        self.up = False
        self.down = False  # known down: lost, or failing to connect (not merely not connected yet)
        self.down_since: float | None = time.monotonic()  # None while up; never up counts from now
        self._on_change = on_change
        self._endpoint = f"inproc://pd-connection-watch-{next(_watch_ids)}"
        socket.monitor(self._endpoint, _UP_EVENTS | _DOWN_EVENTS)
        self._stop = threading.Event()
        connected = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(context, connected),
                                        name=f"watch {self._endpoint}", daemon=True)
        self._thread.start()
        connected.wait()  # no event is missed: the monitor's reader is there before the first connect

    def _watch(self, context: zmq.Context, connected: threading.Event) -> None:
        monitor = context.socket(zmq.PAIR)
        monitor.connect(self._endpoint)
        connected.set()
        try:
            while not self._stop.is_set():
                if monitor.poll(POLL_INTERVAL_MS):
                    self._on_event(recv_monitor_message(monitor)["event"])
        finally:
            monitor.close(linger=0)

    def _on_event(self, event: int) -> None:
        up = bool(event & _UP_EVENTS)
        if up == self.up and self.down != up:
            return  # no change: another failed attempt of a peer already known down
        self.up, self.down = up, not up
        if up:
            self.down_since = None
        elif self.down_since is None:
            self.down_since = time.monotonic()
        if self._on_change is not None:
            self._on_change(up)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Outbox:
    """Sends wire messages, with optional payload frames, to one peer's inbox; `on_liveness(up)`
    hears when the connection comes up or goes down (on the watch thread)."""

    def __init__(self, address: str, config: TransferConfig,
                 on_liveness: LivenessCallback | None = None) -> None:
        self.address = address
        keep_message_buffers(config)  # gathered frames of fragmented blocks are fresh buffers too
        self._codec = WireCodec()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUSH)
        # IMMEDIATE: queue only to a connected (and, with CURVE, authenticated) peer, so a send to a
        # peer that is down or refused us fails instead of piling up silently.
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._send_timeout_s = config.send_timeout_s
        # Off while its user must not block (work run in place on another thread: transfer/peers.py):
        # a send the peer cannot take now raises SendWouldWait instead of waiting for it.
        self.may_wait = True
        self.heard_from_at = float("-inf")  # monotonic time the peer was last known alive by other means
        self._socket.setsockopt(zmq.SNDHWM, config.send_hwm)
        self._socket.setsockopt(zmq.LINGER, int(config.send_timeout_s * 1000))
        set_heartbeats(self._socket, config)
        if config.curve is not None:
            self._socket.curve_publickey = config.curve.public
            self._socket.curve_secretkey = config.curve.secret
            self._socket.curve_serverkey = config.curve.public  # one cluster key pair: see CurveKeys
        self.watch = ConnectionWatch(self._context, self._socket, on_liveness)
        self._socket.connect(address)

    def send(self, message: WireMessage, payload: Sequence[np.ndarray] = (),
             track: bool = False) -> zmq.MessageTracker | None:
        """Queue one message; with `track`, the returned tracker is done once libzmq let go of `payload`.

        Waits while the peer cannot take it (not connected yet, or its queue full) up to the send
        timeout, and no longer once the peer is known down (unless heard from within that time);
        raises TransferError then."""
        parts: list[bytes | np.ndarray] = [self._codec.encode(message), *payload]
        deadline = time.monotonic() + self._send_timeout_s
        while True:
            try:
                return self._socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False, track=track)
            except zmq.Again:
                if not self.may_wait:
                    raise SendWouldWait(f"peer {self.address} cannot take a message now") from None
            if self.watch.down and time.monotonic() - self.heard_from_at > self._send_timeout_s:
                raise TransferError(f"peer {self.address} is down (connection lost or refused, "
                                    "or it refused the handshake)")
            if time.monotonic() >= deadline:
                raise TransferError(f"peer {self.address} did not take a message in time "
                                    f"({self._send_timeout_s} s): unreachable, stalled, or refused "
                                    "the handshake")
            self._socket.poll(SEND_POLL_MS, zmq.POLLOUT)

    def can_send_now(self) -> bool:
        """A `send` now would not wait: the connection is up (handshake done) and the socket has room
        for a message (with IMMEDIATE, POLLOUT means a connected pipe below its high-water mark)."""
        return self.watch.up and bool(self._socket.get(zmq.EVENTS) & zmq.POLLOUT)

    def close(self) -> None:
        self._socket.disable_monitor()
        self.watch.close()
        self._socket.close()
        self._context.term()


FrameHandler = Callable[[list[zmq.Frame]], None]


class Inbox:
    """A PULL socket bound on the configured interface, drained by one thread into `handler`.

    The handler runs on the inbox thread, one message at a time; an exception in it is logged and
    the inbox keeps serving.
    """

    def __init__(self, config: TransferConfig, handler: FrameHandler, max_frame_bytes: int) -> None:
        self._handler = handler
        keep_message_buffers(config)
        self._context = zmq.Context()
        self._authenticator = _start_curve_server(self._context, config)
        self._socket = self._context.socket(zmq.PULL)
        # Refuse a frame larger than any valid one before libzmq allocates it.
        self._socket.setsockopt(zmq.MAXMSGSIZE, max(max_frame_bytes, MAX_MESSAGE_BYTES))
        self._socket.setsockopt(zmq.LINGER, 0)
        set_heartbeats(self._socket, config)  # connections of dead peers are closed here too
        if config.curve is not None:
            self._socket.curve_publickey = config.curve.public
            self._socket.curve_secretkey = config.curve.secret
            self._socket.curve_server = True
        port = "*" if config.port == 0 else str(config.port)
        self._socket.bind(f"tcp://{config.bind_host}:{port}")
        self.address: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"inbox {self.address}", daemon=True)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def start(self) -> Inbox:
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._socket.poll(POLL_INTERVAL_MS):
                continue
            try:
                # poll() may report a socket readable with nothing to take (a peer whose connection was
                # just dropped): a blocking recv would then outlive close()
                frames = self._socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue
            try:
                self._handler(frames)
            except Exception:  # one bad message must not take the data plane down
                logger.exception("inbox %s: handler failed", self.address)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._socket.close()
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()


class _ClusterKeyOnly:
    """ZAP credentials check: admit exactly the cluster's public key (a peer holding the secret)."""

    def __init__(self, public: bytes) -> None:
        self._public = public

    def callback(self, domain: str, client_public: bytes) -> bool:
        return client_public == self._public


def _start_curve_server(context: zmq.Context, config: TransferConfig) -> ThreadAuthenticator | None:
    if config.curve is None:
        return None
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback(domain="*",
                                           credentials_provider=_ClusterKeyOnly(config.curve.public))
    return authenticator
