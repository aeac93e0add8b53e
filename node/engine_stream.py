"""The reading end of the engine's one record stream (engine/protocol.py has the format).

The node server owns the SysV queue: `RecordReader` creates it under a fresh random key and removes it
on close. `receive` blocks in the kernel until a message arrives (the GIL is released meanwhile): no
poll interval, no busy wait. Two things besides the engine's records can end a wait:

- the engine process exits: whoever reaps it calls `notify_exit`, which queues a notice of a message
  type the engine never writes. It lands behind every record the engine wrote before dying, so the
  reader sees all of them first;
- the node server closes the reader: removing the queue wakes a blocked `receive` with StreamClosed.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass

import sysv_ipc

from pdserve.common.leftovers import queue_marker
from pdserve.engine.output_stream import EXIT_NOTICE_TYPE, RECORD_MESSAGE_TYPE, StreamError, remove_queue
from pdserve.engine.protocol import DEFAULT_MAX_MESSAGE_BYTES, EngineRecord, RecordAssembler, StreamAddress

_KEY_MAX = 2**31 - 1  # key_t is a 32-bit int on Linux; larger values are silently truncated
_CREATE_ATTEMPTS = 64
_EXIT_CODE = struct.Struct("<i")


class StreamClosed(StreamError):
    """The reader was closed (the node server is stopping)."""


@dataclass(frozen=True)
class EngineExited:
    """The engine process is gone; every record it wrote came before this."""

    returncode: int


def _random_key() -> int:
    return 1 + secrets.randbelow(_KEY_MAX)  # never 0: that is IPC_PRIVATE


class RecordReader:
    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 key_source: Callable[[], int] = _random_key) -> None:
        self._max_message_bytes = max_message_bytes
        self._queue = self._create(key_source)
        # Marks the queue as this process's, so a node started after a kill -9 can remove it.
        self._marker = queue_marker(os.getpid(), self._queue.key)
        self._marker.touch()
        self._assembler = RecordAssembler()
        self._closed = False

    def _create(self, key_source: Callable[[], int]) -> sysv_ipc.MessageQueue:
        for _ in range(_CREATE_ATTEMPTS):
            try:
                # IPC_CREX fails on a key in use, so two node servers never share a queue; 0600 keeps
                # other users from reading records or injecting messages.
                return sysv_ipc.MessageQueue(key_source(), sysv_ipc.IPC_CREX, mode=0o600,
                                             max_message_size=self._max_message_bytes)
            except sysv_ipc.ExistentialError:
                continue
        raise StreamError(f"no free SysV key found in {_CREATE_ATTEMPTS} attempts")

    @property
    def address(self) -> StreamAddress:
        return StreamAddress(self._queue.key, os.getpid(), self._max_message_bytes)

    def receive(self) -> EngineRecord | EngineExited:
        """The next whole record, or EngineExited once the engine is gone. Blocks until then. Raises
        StreamClosed after close, StreamError on a message that breaks the stream."""
        while True:
            message, kind = self._receive_message()
            if kind == EXIT_NOTICE_TYPE:
                return EngineExited(_EXIT_CODE.unpack(message)[0])
            if kind != RECORD_MESSAGE_TYPE:
                raise StreamError(f"message of unknown type {kind} on the record queue")
            record = self._assembler.add(message)
            if record is not None:
                return record

    def _receive_message(self) -> tuple[bytes, int]:
        if self._closed:
            raise StreamClosed("receive on a closed record stream")
        try:
            return self._queue.receive(block=True, type=0)
        except sysv_ipc.ExistentialError as err:
            raise StreamClosed(f"record queue {self._queue.key:#x} was removed") from err
        except OSError as err:  # E2BIG: a foreign writer sent more than our receive buffer holds
            raise StreamError(f"unreadable message on the record queue: {err}") from err

    def notify_exit(self, returncode: int) -> None:
        """The engine process exited (its reaper calls this): wake the reader behind its last record."""
        try:
            self._queue.send(_EXIT_CODE.pack(returncode), block=True, type=EXIT_NOTICE_TYPE)
        except sysv_ipc.ExistentialError:
            return  # closed already: nobody is waiting

    def close(self) -> None:
        """Remove the queue (idempotent): a blocked receive wakes with StreamClosed, a writer still
        attached gets ReaderGoneError."""
        if self._closed:
            return
        self._closed = True
        remove_queue(self._queue)
        self._marker.unlink(missing_ok=True)

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
