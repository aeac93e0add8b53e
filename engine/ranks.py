"""The engine's channels under tensor parallelism: rank 0 decides what every rank steps on, and alone emits.

Every rank runs the same `LLMEngine` on its shard of the model (models/tensor_parallel.py). Rank 0
alone reads the node server's task pipe; each turn of the loop it broadcasts the tasks it took (one
header, then the task frames when there are any) through Paddle's collective, and every rank applies
the same tasks in the same order. From there each rank's scheduler, sampler and speculative decoder
compute the same things: the scheduler is a function of the tasks and the sampled tokens, and every
rank samples the same tokens (the LM head is replicated over hidden states that the all-reduces make
the same bits on every rank, and rank 0 fixes each request's seed before the broadcast). So the
step's inputs are decided once, by rank 0, and only rank 0 writes records: the other ranks' loops
report to `NoRecords`, which drops everything.

The header also carries rank 0's engine state (`engine_state`: its step count, free blocks and a
checksum of its running requests' latest tokens): a rank whose own state differs has diverged, and
stops the node instead of running collectives that no longer match or emitting tokens rank 0 did not
sample.

An idle rank 0 broadcasts an empty turn at least every IDLE_WAIT_S, so the other ranks never wait in
a collective longer than that (gloo's own timeout is 30 s); a rank that dies breaks the collective
the others are in, and they exit (the node server then stops the rest, node/engine_client.py).
"""

from __future__ import annotations

import secrets
import zlib
from collections.abc import Callable
from dataclasses import replace

import msgspec
import numpy as np
import paddle
from paddle import distributed

from pdserve.engine.engine import LLMEngine
from pdserve.engine.protocol import (
    FRAME_LENGTH,
    EngineRecord,
    EngineTask,
    ProtocolError,
    decode_task,
    encode_task,
)

EngineState = Callable[[], tuple[int, int, int]]  # see engine_state: equal on every rank
STATE_FIELDS = 3


def engine_state(engine: LLMEngine) -> tuple[int, int, int]:
    """(steps taken, free KV blocks, checksum of each running request's latest token): what every
    rank must agree on at the start of a turn. A token sampled differently on two ranks shows in
    the checksum at the next turn."""
    running = engine.scheduler.running
    latest = np.asarray([r.output_token_ids[-1] if r.output_token_ids else -1 for r in running],
                        dtype=np.int64)
    return engine.steps, engine.block_manager.num_free_blocks, zlib.crc32(latest.tobytes())


class RankDivergedError(RuntimeError):
    """This rank's engine state no longer matches rank 0's."""


def _with_seed(task: EngineTask) -> EngineTask:
    """A task whose sampling seed is fixed, so every rank samples the same tokens for it."""
    sampling = getattr(task, "sampling", None)
    if sampling is None or sampling.seed is not None:
        return task
    return msgspec.structs.replace(task, sampling=replace(sampling, seed=secrets.randbits(63)))


def _broadcast_turn(header: np.ndarray, payload: bytes | None) -> tuple[np.ndarray, bytes]:
    """Broadcast rank 0's [payload length, *engine state] header, then its payload when there is one."""
    header_tensor = paddle.to_tensor(header)
    distributed.broadcast(header_tensor, src=0)
    header = header_tensor.numpy()
    length = int(header[0])
    if length == 0:
        return header, b""
    if payload is None:
        body = paddle.zeros([length], dtype="uint8")
    else:
        body = paddle.to_tensor(np.frombuffer(payload, dtype=np.uint8))
    distributed.broadcast(body, src=0)
    return header, payload if payload is not None else body.numpy().tobytes()


class LeaderInbox:
    """Rank 0: the tasks of the node server's pipe (any `TaskInbox`), shared with the other ranks."""

    def __init__(self, inbox, state: EngineState) -> None:
        self._inbox = inbox
        self._state = state

    def take(self, wait_s: float) -> list[EngineTask | ProtocolError]:
        items = [item if isinstance(item, ProtocolError) else _with_seed(item)
                 for item in self._inbox.take(wait_s)]
        tasks = [item for item in items if not isinstance(item, ProtocolError)]  # bad frames stay here
        payload = b"".join(FRAME_LENGTH.pack(len(frame)) + frame for frame in map(encode_task, tasks))
        _broadcast_turn(np.asarray([len(payload), *self._state()], dtype=np.int64), payload)
        return items


class FollowerInbox:
    """Ranks 1..N-1: the tasks rank 0 broadcast this turn (blocks until rank 0's next turn)."""

    def __init__(self, state: EngineState) -> None:
        self._state = state

    def take(self, wait_s: float) -> list[EngineTask | ProtocolError]:
        header, payload = _broadcast_turn(np.zeros(1 + STATE_FIELDS, dtype=np.int64), None)
        mine = self._state()
        if tuple(header[1:].tolist()) != mine:
            raise RankDivergedError(f"rank 0 is at (steps, free blocks, token checksum) "
                                    f"{tuple(header[1:].tolist())}, this rank at {mine}")
        tasks: list[EngineTask | ProtocolError] = []
        offset = 0
        while offset < len(payload):
            (length,) = FRAME_LENGTH.unpack_from(payload, offset)
            offset += FRAME_LENGTH.size
            tasks.append(decode_task(payload[offset:offset + length]))
            offset += length
        return tasks


POOL_NAME_BYTES = 255


def share_pool_names(name: str | None, size: int) -> list[str | None]:
    """Every rank's KV pool name (None for a private pool), rank 0 first: an all-gather, so it also
    returns only once every rank has its pool."""
    raw = (name or "").encode()
    if len(raw) > POOL_NAME_BYTES:
        raise ValueError(f"KV pool name {name!r} is longer than {POOL_NAME_BYTES} bytes")
    mine = np.zeros(POOL_NAME_BYTES + 1, dtype=np.uint8)
    mine[0] = len(raw)
    mine[1:1 + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    gathered: list[paddle.Tensor] = []
    distributed.all_gather(gathered, paddle.to_tensor(mine))
    names = []
    for tensor in gathered[:size]:
        data = tensor.numpy()
        names.append(bytes(data[1:1 + int(data[0])]).decode() or None)
    return names


class NoRecords:
    """The record sink of ranks other than 0: they compute what rank 0 reports, and report nothing."""

    def send(self, record: EngineRecord) -> None:
        pass

    def release(self) -> None:
        pass
