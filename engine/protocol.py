"""Messages from a node server to its engine process, and their one codec.

Frames travel over the engine process's stdin pipe: a 4-byte little-endian length, then the payload
(a version byte + msgpack of one tagged struct). msgspec decodes into the declared types only, so
untrusted bytes can never construct arbitrary objects (no pickle), and `SamplingParams.__post_init__`
re-validates every field on the engine side.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

import msgspec

from pdserve.common.kv_cache import KVCacheSpec
from pdserve.common.sampling_params import SamplingParams

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 * 1024 * 1024  # a 1M-token prompt is ~5 MB of msgpack; anything near this is garbage
_LENGTH = struct.Struct("<I")


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


class AddRequest(msgspec.Struct, tag="add", frozen=True):
    seq_id: int  # the compact id used on the output queue; unique among live requests of a node
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams


class AbortRequest(msgspec.Struct, tag="abort", frozen=True):
    seq_id: int


class AddPrefillRequest(msgspec.Struct, tag="add_prefill", frozen=True):
    """Prefill node: compute the prompt's KV and first token, then hold the blocks (PrefillDone)."""

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams


class ReleaseRequest(msgspec.Struct, tag="release", frozen=True):
    """Prefill node: the request's KV has been handed over (or never will be): free its blocks."""

    seq_id: int


class ReserveRequest(msgspec.Struct, tag="reserve", frozen=True):
    """Decode node: reserve blocks for a prompt whose KV a prefill node will write (KVReserved)."""

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    num_extra_tokens: int  # room beyond the prompt: the first token and the drafts to verify


class RemoteKVReady(msgspec.Struct, tag="kv_ready", frozen=True):
    """Decode node: the reserved blocks hold the prompt's KV; decode on from the peer's first token."""

    seq_id: int
    first_token_id: int
    draft_token_ids: list[int] = []


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    pass


EngineTask = (AddRequest | AbortRequest | Shutdown | AddPrefillRequest | ReleaseRequest | ReserveRequest
              | RemoteKVReady)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(EngineTask)


def encode_task(task: EngineTask) -> bytes:
    return bytes([PROTOCOL_VERSION]) + _encoder.encode(task)


def decode_task(payload: bytes) -> EngineTask:
    if not payload or payload[0] != PROTOCOL_VERSION:
        raise ProtocolError(f"unknown engine protocol version {payload[:1]!r}, expected {PROTOCOL_VERSION}")
    try:
        return _decoder.decode(payload[1:])
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
        raise ProtocolError(f"bad engine task: {exc}") from exc


def write_frame(stream: BinaryIO, payload: bytes) -> None:
    stream.write(_LENGTH.pack(len(payload)) + payload)
    stream.flush()


def read_frame(stream: BinaryIO) -> bytes | None:
    """The next frame's payload, or None at a clean end of stream (the peer closed the pipe).
    Works on raw (unbuffered) streams too: short reads are completed."""
    header = _read_exact(stream, _LENGTH.size)
    if not header:
        return None
    if len(header) < _LENGTH.size:
        raise ProtocolError("stream ended inside a frame header")
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    payload = _read_exact(stream, length)
    if len(payload) < length:
        raise ProtocolError(f"stream ended inside a frame ({len(payload)} of {length} bytes)")
    return payload


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    """Up to size bytes: fewer only at end of stream."""
    parts: list[bytes] = []
    remaining = size
    while remaining:
        part = stream.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


# -- engine process -> node server, over the engine's stdout (control only; tokens go over SysV) ------


class EngineReady(msgspec.Struct, tag="ready", frozen=True):
    pid: int
    kv_spec: KVCacheSpec  # the pool's geometry, derived once from the model (node servers and peers use it)
    kv_pool_name: str | None  # the shared-memory pool a same-host peer may attach to


class RequestRejected(msgspec.Struct, tag="rejected", frozen=True):
    seq_id: int
    message: str  # why the engine does not serve it (e.g. prompt longer than max_model_len)
    retryable: bool = False  # no room right now (CapacityError): another node may serve it


class EngineFailed(msgspec.Struct, tag="failed", frozen=True):
    message: str  # the engine loop stopped on this error; the process exits after sending it


class EngineStats(msgspec.Struct, tag="stats", frozen=True):
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    steps: int


class KVReserved(msgspec.Struct, tag="kv_reserved", frozen=True):
    seq_id: int
    block_ids: list[int]


class PrefillProgress(msgspec.Struct, tag="prefill_progress", frozen=True):
    """Prefill node: the first num_computed_tokens of the prompt have their KV in block_ids."""

    seq_id: int
    num_computed_tokens: int
    block_ids: list[int]


class PrefillDone(msgspec.Struct, tag="prefill_done", frozen=True):
    """Prefill node: the whole prompt's KV is in block_ids (held until ReleaseRequest), and the first
    token was sampled with its raw logprob, rank and top-k."""

    seq_id: int
    num_prompt_tokens: int
    block_ids: list[int]
    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]
    draft_token_ids: list[int] = []


class PromptLogprobs(msgspec.Struct, tag="prompt_logprobs", frozen=True):
    """Raw logprobs of prompt tokens first_position .. first_position + len(logprobs) - 1 (each scored
    against the prompt token at its position; position 0 has none). Sent on the control pipe because
    the SysV slot format cannot hold them, always before the request's first token slot, in parts of at
    most PROMPT_LOGPROBS_PART positions (a frame stays far below MAX_FRAME_BYTES); `last` ends them."""

    seq_id: int
    first_position: int
    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    last: bool


PROMPT_LOGPROBS_PART = 4096  # positions per PromptLogprobs frame: 4096 x 20 pairs is ~1 MB of msgpack

EngineEvent = (EngineReady | RequestRejected | EngineFailed | EngineStats | KVReserved | PrefillProgress
               | PrefillDone | PromptLogprobs)

_event_decoder = msgspec.msgpack.Decoder(EngineEvent)


def encode_event(event: EngineEvent) -> bytes:
    return bytes([PROTOCOL_VERSION]) + _encoder.encode(event)


def decode_event(payload: bytes) -> EngineEvent:
    if not payload or payload[0] != PROTOCOL_VERSION:
        raise ProtocolError(f"unknown engine protocol version {payload[:1]!r}, expected {PROTOCOL_VERSION}")
    try:
        return _event_decoder.decode(payload[1:])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"bad engine event: {exc}") from exc
