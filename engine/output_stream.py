"""The writing end of the engine's one record stream: a SysV message queue owned by the node server.

The node server creates the queue (node/engine_stream.py) and hands its `StreamAddress` to the engine
process, where `RecordWriter` attaches. Only rank 0 of a tensor-parallel group writes, so there is one
writer and the FIFO queue keeps every record's fragments in order.

Each message fits the kernel defaults (msgmax 8192, msgmnb 16384), so no sysctl is ever needed. A
full queue is backpressure: the writer waits (non-blocking sends with a capped backoff, only while
the queue is full) instead of dropping, and checks meanwhile that the reader is still alive, so a
dead node server stops the engine with `ReaderGoneError` instead of hanging it forever.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import sysv_ipc

from pdserve.common.leftovers import pid_alive
from pdserve.engine.protocol import (
    EngineRecord,
    ProtocolError,
    StreamAddress,
    encode_record,
    fragments,
)

RECORD_MESSAGE_TYPE = 1  # the engine's records; SysV needs a positive type
EXIT_NOTICE_TYPE = 2  # the node server's own note that the engine process exited (never the engine's)
_GONE_ERRNOS = (errno.EINVAL, errno.EIDRM)  # a send on a queue removed under an open handle


class StreamError(ProtocolError):
    """The record stream is unusable (removed, broken, or a message that is not ours)."""


class ReaderGoneError(StreamError):
    """The node server (the reader) died or removed the queue; the engine should stop cleanly."""


@dataclass(frozen=True)
class WriterConfig:
    backoff_min_s: float = 50e-6  # first wait after finding the queue full
    backoff_max_s: float = 1e-3  # cap of the doubling wait while the reader catches up
    liveness_interval_s: float = 0.05  # how often a blocked writer checks that the reader lives

    def __post_init__(self) -> None:
        if not 0.0 < self.backoff_min_s <= self.backoff_max_s <= 1.0:
            raise ValueError("WriterConfig needs 0 < backoff_min_s <= backoff_max_s <= 1 s")
        if not 0.0 < self.liveness_interval_s <= 10.0:
            raise ValueError(f"WriterConfig.liveness_interval_s must be in (0, 10] s "
                             f"(got {self.liveness_interval_s})")


def remove_queue(queue: sysv_ipc.MessageQueue) -> None:
    try:
        queue.remove()
    except sysv_ipc.ExistentialError:
        return  # removed already (by the other side): exactly the state we want


class RecordWriter:
    """Engine side: sends whole records; waits while the queue is full, never drops."""

    def __init__(self, address: StreamAddress, config: WriterConfig | None = None,
                 reader_alive: Callable[[], bool] | None = None) -> None:
        self._config = config or WriterConfig()
        self._max_message_bytes = address.max_message_bytes  # the reader's receive buffer decides
        self._reader_alive = reader_alive or partial(pid_alive, address.reader_pid)
        try:
            self._queue = sysv_ipc.MessageQueue(address.key, max_message_size=address.max_message_bytes)
        except sysv_ipc.ExistentialError as err:
            raise ReaderGoneError(f"no record queue with key {address.key:#x}") from err
        self._seq = 0
        self._blocked_s = 0.0

    @property
    def blocked_s(self) -> float:
        """Total seconds spent waiting on a full queue: the backpressure the reader applied."""
        return self._blocked_s

    def send(self, record: EngineRecord) -> None:
        """Send one record; returns once all of its fragments are queued. Raises ReaderGoneError if the
        reader dies or removes the queue meanwhile."""
        for message in fragments(encode_record(record), self._seq, self._max_message_bytes):
            self._send_message(message)
        self._seq = (self._seq + 1) & 0xFFFF_FFFF

    def _send_message(self, message: bytes) -> None:
        if self._try_send(message):
            return
        started = time.monotonic()
        delay = self._config.backoff_min_s
        next_liveness_check = started + self._config.liveness_interval_s
        try:
            while not self._try_send(message):
                now = time.monotonic()
                if now >= next_liveness_check:
                    self._check_reader_alive()
                    next_liveness_check = now + self._config.liveness_interval_s
                time.sleep(delay)
                delay = min(delay * 2.0, self._config.backoff_max_s)
        finally:
            self._blocked_s += time.monotonic() - started

    def _try_send(self, message: bytes) -> bool:
        try:
            self._queue.send(message, block=False, type=RECORD_MESSAGE_TYPE)
        except sysv_ipc.BusyError:
            return False
        except sysv_ipc.ExistentialError as err:
            raise ReaderGoneError("the record queue was removed") from err
        except OSError as err:
            if err.errno in _GONE_ERRNOS:
                raise ReaderGoneError("the record queue was removed") from err
            raise StreamError(f"sending on the record queue failed: {err}") from err
        return True

    def release(self, grace_s: float = 0.05) -> None:
        """The engine is stopping: remove the queue if its reader died without closing it (a live
        reader removes its own queue on close). A reader whose pipes just closed may still be exiting,
        so its death is awaited for up to grace_s."""
        deadline = time.monotonic() + grace_s
        while self._reader_alive():
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01)
        remove_queue(self._queue)

    def _check_reader_alive(self) -> None:
        if self._reader_alive():
            return
        # The owner died without closing: remove its queue so it does not outlive both processes.
        remove_queue(self._queue)
        raise ReaderGoneError("the node server reading the record queue is gone")
