"""The SysV message queue that carries per-step outputs from the engine process to the node server.

The node server owns the queue: `OutputQueueReader` creates it under a fresh random key and removes it
on close; it hands its `OutputQueueAddress` (key, pid, message size) to the engine process, where
`OutputQueueWriter` attaches. Only rank 0 of a tensor-parallel group creates a writer, so there is
exactly one writer and the FIFO queue keeps every step's parts in order.

Each message fits the kernel defaults (msgmax 8192, msgmnb 16384), so no sysctl is ever needed. A full
queue is backpressure: the writer waits (non-blocking sends with a capped backoff) instead of dropping,
and checks meanwhile that the reader is still alive, so a dead node server stops the engine with
`ReaderGoneError` instead of hanging it forever.
"""

from __future__ import annotations

import errno
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import sysv_ipc

from pdserve.engine.output_codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    HEADER,
    SLOT_HEADER,
    OutputQueueError,
    StepAssembler,
    StepOutput,
    decode_part,
    encode_step,
)

_MESSAGE_TYPE = 1  # SysV needs a positive type; one stream, so one type
_KEY_MAX = 2**31 - 1  # key_t is a 32-bit int on Linux; larger values are silently truncated
# Errors a send or receive gets once the queue was removed under a handle that was still open.
_GONE_ERRNOS = (errno.EINVAL, errno.EIDRM)


class ReaderGoneError(OutputQueueError):
    """The node server (the reader) died or removed the queue; the engine should stop cleanly."""


@dataclass(frozen=True)
class OutputQueueConfig:
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # per message, header included; <= kernel msgmax
    poll_min_s: float = 50e-6  # first wait after finding the queue empty (reader) or full (writer)
    poll_max_s: float = 1e-3  # backoff cap: the extra latency an idle reader may add to a step
    liveness_interval_s: float = 0.05  # how often a blocked writer checks that the reader lives
    create_attempts: int = 64  # fresh random keys tried before giving up on creating a queue

    def __post_init__(self) -> None:
        smallest = HEADER.size + SLOT_HEADER.size
        checks = [
            ("max_message_bytes", smallest <= self.max_message_bytes <= 1 << 20,
             f"must be in [{smallest}, 1 MiB]"),
            ("poll_min_s", 0.0 < self.poll_min_s <= self.poll_max_s, "must be in (0, poll_max_s]"),
            ("poll_max_s", self.poll_max_s <= 1.0, "must be <= 1 s"),
            ("liveness_interval_s", 0.0 < self.liveness_interval_s <= 10.0, "must be in (0, 10] s"),
            ("create_attempts", self.create_attempts >= 1, "must be >= 1"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"OutputQueueConfig.{name} {why} (got {getattr(self, name)!r})")


@dataclass(frozen=True)
class OutputQueueAddress:
    """What the engine process needs to attach to the node server's queue (plain ints: any launcher can
    pass them on a command line)."""

    key: int
    reader_pid: int
    max_message_bytes: int


class _Backoff:
    """Sleeps that double from `min_s` to `max_s`: fast wake-ups right after traffic, little CPU when idle."""

    def __init__(self, min_s: float, max_s: float) -> None:
        self._delay = min_s
        self._max_s = max_s

    def sleep(self, limit_s: float | None = None) -> None:
        time.sleep(self._delay if limit_s is None else max(0.0, min(self._delay, limit_s)))
        self._delay = min(self._delay * 2.0, self._max_s)


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie (a killed, not yet reaped reader is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no procfs here (or the process just vanished; the next kill(0) says so)
    # The command name in parentheses may contain spaces; the state is the first field after it.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state in ("Z", "X")


def _remove_queue(queue: sysv_ipc.MessageQueue) -> None:
    try:
        queue.remove()
    except sysv_ipc.ExistentialError:
        return  # removed already (by the other side): exactly the state we want


def _random_key() -> int:
    return 1 + secrets.randbelow(_KEY_MAX)  # never 0: that is IPC_PRIVATE


def _create_unique_queue(config: OutputQueueConfig, key_source: Callable[[], int]) -> sysv_ipc.MessageQueue:
    for _ in range(config.create_attempts):
        try:
            # IPC_CREX fails on a key in use, so two node servers can never share a queue; 0600 keeps
            # other users from reading outputs or injecting messages.
            return sysv_ipc.MessageQueue(key_source(), sysv_ipc.IPC_CREX, mode=0o600,
                                         max_message_size=config.max_message_bytes)
        except sysv_ipc.ExistentialError:
            continue
    raise OutputQueueError(f"no free SysV key found in {config.create_attempts} attempts")


class OutputQueueReader:
    """Node-server side: owns the queue, reassembles steps, removes the queue on close."""

    def __init__(self, config: OutputQueueConfig | None = None,
                 key_source: Callable[[], int] = _random_key) -> None:
        self._config = config or OutputQueueConfig()
        self._queue = _create_unique_queue(self._config, key_source)
        self._assembler = StepAssembler()
        self._closed = False

    @property
    def address(self) -> OutputQueueAddress:
        return OutputQueueAddress(self._queue.key, os.getpid(), self._config.max_message_bytes)

    def receive(self, timeout: float | None = None) -> StepOutput | None:
        """The next whole step, or None if none completed within `timeout` seconds (None: wait forever).
        Parts of a step that arrived before the timeout are kept for the next call."""
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = _Backoff(self._config.poll_min_s, self._config.poll_max_s)
        while True:
            message = self._try_receive()
            if message is not None:
                step_output = self._assembler.add(decode_part(message))
                if step_output is not None:
                    return step_output
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0.0:
                return None
            backoff.sleep(left)

    def _try_receive(self) -> bytes | None:
        if self._closed:
            raise OutputQueueError("receive on a closed output queue")
        try:
            message, _type = self._queue.receive(block=False, type=_MESSAGE_TYPE)
        except sysv_ipc.BusyError:
            return None
        except sysv_ipc.ExistentialError as err:
            raise OutputQueueError(f"output queue {self._queue.key:#x} was removed") from err
        except OSError as err:  # E2BIG: a foreign writer sent more than our receive buffer holds
            raise OutputQueueError(f"unreadable message on output queue: {err}") from err
        return message

    def close(self) -> None:
        """Remove the queue (idempotent); a writer still attached gets ReaderGoneError."""
        if self._closed:
            return
        self._closed = True
        _remove_queue(self._queue)

    def __enter__(self) -> OutputQueueReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class OutputQueueWriter:
    """Engine side (rank 0 only): sends whole steps; waits while the queue is full, never drops."""

    def __init__(self, address: OutputQueueAddress, config: OutputQueueConfig | None = None,
                 reader_alive: Callable[[], bool] | None = None) -> None:
        self._config = config or OutputQueueConfig()
        self._max_message_bytes = address.max_message_bytes  # the reader's receive buffer decides
        self._reader_alive = reader_alive or partial(pid_alive, address.reader_pid)
        try:
            self._queue = sysv_ipc.MessageQueue(address.key, max_message_size=address.max_message_bytes)
        except sysv_ipc.ExistentialError as err:
            raise ReaderGoneError(f"no output queue with key {address.key:#x}") from err
        self._blocked_s = 0.0

    @property
    def blocked_s(self) -> float:
        """Total seconds spent waiting on a full queue: the backpressure the reader applied."""
        return self._blocked_s

    def send(self, step_output: StepOutput) -> None:
        """Send one step; returns once all of its messages are queued. Raises ReaderGoneError if the
        reader dies or removes the queue meanwhile."""
        for message in encode_step(step_output, self._max_message_bytes):
            self._send_message(message)

    def _send_message(self, message: bytes) -> None:
        if self._try_send(message):
            return
        started = time.monotonic()
        backoff = _Backoff(self._config.poll_min_s, self._config.poll_max_s)
        next_liveness_check = started + self._config.liveness_interval_s
        try:
            while not self._try_send(message):
                now = time.monotonic()
                if now >= next_liveness_check:
                    self._check_reader_alive()
                    next_liveness_check = now + self._config.liveness_interval_s
                backoff.sleep()
        finally:
            self._blocked_s += time.monotonic() - started

    def _try_send(self, message: bytes) -> bool:
        try:
            self._queue.send(message, block=False, type=_MESSAGE_TYPE)
        except sysv_ipc.BusyError:
            return False
        except sysv_ipc.ExistentialError as err:
            raise ReaderGoneError("the output queue was removed") from err
        except OSError as err:
            if err.errno in _GONE_ERRNOS:
                raise ReaderGoneError("the output queue was removed") from err
            raise OutputQueueError(f"sending on the output queue failed: {err}") from err
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
        _remove_queue(self._queue)

    def _check_reader_alive(self) -> None:
        if self._reader_alive():
            return
        # The owner died without closing: remove its queue so it does not outlive both processes.
        _remove_queue(self._queue)
        raise ReaderGoneError("the node server reading the output queue is gone")
