"""ZMQ endpoints of the data plane: an `Outbox` (PUSH, connects) and an `Inbox` (PULL, binds, one thread).

A ZMQ message is `[wire message, *payload frames]`; ZMQ delivers multipart messages whole and, per
connection, in order, which is what lets a prefill node send `FirstToken` right behind a request's
last KV chunk on the same outbox: when D handles the FirstToken, every chunk before it is handled.

Payload frames go out with `copy=False`: libzmq reads the numpy buffer itself, and the receiver gets
the frame's memory without a Python-side copy. Each socket belongs to one thread.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

from pdserve.transfer.config import TransferConfig
from pdserve.transfer.messages import MAX_MESSAGE_BYTES, WireCodec, WireMessage

logger = logging.getLogger(__name__)

POLL_INTERVAL_MS = 100  # how quickly an inbox thread notices close()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc refuses larger on 64-bit hosts


class TransferError(RuntimeError):
    """A send could not be completed (peer unreachable, stalled, or refused the handshake)."""


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


class Outbox:
    """Sends wire messages, with optional payload frames, to one peer's inbox."""

    def __init__(self, address: str, config: TransferConfig) -> None:
        self.address = address
        keep_message_buffers(config)  # gathered frames of fragmented blocks are fresh buffers too
        self._codec = WireCodec()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUSH)
        # IMMEDIATE: queue only to a connected (and, with CURVE, authenticated) peer, so a send to a
        # peer that is down or refused us fails after SNDTIMEO instead of piling up silently.
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._socket.setsockopt(zmq.SNDTIMEO, int(config.send_timeout_s * 1000))
        self._socket.setsockopt(zmq.SNDHWM, config.send_hwm)
        self._socket.setsockopt(zmq.LINGER, int(config.send_timeout_s * 1000))
        if config.curve is not None:
            self._socket.curve_publickey = config.curve.public
            self._socket.curve_secretkey = config.curve.secret
            self._socket.curve_serverkey = config.curve.public  # one cluster key pair: see CurveKeys
        self._socket.connect(address)

    def send(self, message: WireMessage, payload: Sequence[np.ndarray] = (),
             track: bool = False) -> zmq.MessageTracker | None:
        """Queue one message; with `track`, the returned tracker is done once libzmq let go of `payload`."""
        parts: list[bytes | np.ndarray] = [self._codec.encode(message), *payload]
        try:
            return self._socket.send_multipart(parts, copy=False, track=track)
        except zmq.Again as exc:
            raise TransferError(f"peer {self.address} did not take a message in time "
                                "(unreachable, stalled, or refused the handshake)") from exc

    def close(self) -> None:
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
            frames = self._socket.recv_multipart(copy=False)
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
