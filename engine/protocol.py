"""The engine process's contract with its node server: one stream each way, typed records, one codec.

    node server --tasks (stdin: length-prefixed frames)----------------> engine process
    node server <--records (SysV message queue: fragments of records)--- engine process

Every request is named by its request id on both streams (the node's one id for it). Tasks are
msgpack frames on the engine's stdin. Records (tokens and every lifecycle event: ready, rejected,
failed, stats, KV reserved, step outputs with the step's prefill progress, the prefill's first token
and the prompt logprobs) travel in ONE ordered stream over a SysV queue, so their order is the order the
engine wrote them and nothing needs a rule about which of two channels to read first.

A record is msgpack (a version byte, then one tagged struct). The queue holds messages of at most
`max_message_bytes` (the kernel's msgmax default, 8192), so a record is cut into fragments:

    fragment = magic "PD" | version u8 | flags u8 (bit 0: more fragments follow) | record seq u32
               | a slice of the record's bytes                                          (8-byte header)

There is one writer (the engine; rank 0 under tensor parallelism) and the queue is FIFO: fragments
arrive in order and records carry consecutive sequence numbers, so a lost or foreign message is
detected, never papered over. msgspec decodes into the declared types only (no pickle), and
`SamplingParams.__post_init__` re-validates every task's parameters on the engine side.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Annotated, BinaryIO

import msgspec

from pdserve.common.kv_cache import KVCacheSpec
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.tokens import NO_TOKENS, SampledTokens
from pdserve.engine.config import EngineConfig
from pdserve.engine.request import RequestStatus

PROTOCOL_VERSION = 3
MAX_FRAME_BYTES = 64 * 1024 * 1024  # a 1M-token prompt is ~5 MB of msgpack; anything near this is garbage
MAX_RECORD_BYTES = 256 * 1024 * 1024  # a step of 1024 requests with 20 top logprobs is ~0.5 MB
FRAME_LENGTH = struct.Struct("<I")  # a task frame's length prefix
DEFAULT_MAX_MESSAGE_BYTES = 8192  # Linux kernel.msgmax default: no sysctl is ever required
FRAGMENT_HEADER = struct.Struct("<2sBBI")  # see the module docstring

RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class ProtocolError(ValueError):
    """Bytes that are not a valid task, record or fragment of this protocol version."""


# -- how the node server starts the engine ----------------------------------------------------------


@dataclass(frozen=True)
class StreamAddress:
    """What the engine process needs to attach to the node server's queue (plain ints: any launcher can
    pass them on a command line)."""

    key: int
    reader_pid: int
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if not FRAGMENT_HEADER.size < self.max_message_bytes <= 1 << 20:
            raise ValueError(f"max_message_bytes must be in ({FRAGMENT_HEADER.size}, 1 MiB] "
                             f"(got {self.max_message_bytes})")


@dataclass(frozen=True)
class RankPlacement:
    """One engine rank among the node's tensor-parallel ranks: rank 0 reads the tasks, broadcasts
    them to the others and alone writes the record stream; all ranks meet at rank 0's rendezvous
    port on the loopback interface."""

    rank: int
    size: int
    rendezvous_port: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size}) (got {self.rank})")
        if not 0 < self.rendezvous_port <= 65535:
            raise ValueError(f"rendezvous_port must be in [1, 65535] (got {self.rendezvous_port})")


@dataclass(frozen=True)
class EngineProcessConfig:
    model_dir: str
    engine: EngineConfig
    records: StreamAddress
    dtype: str = "float32"
    shared_kv_pool: bool = False  # put the KV pool in /dev/shm so a same-host peer can write into it
    eos_token_ids: tuple[int, ...] = ()
    log_level: str = "WARNING"
    ranks: RankPlacement | None = None  # None: one engine process, no collectives


def encode_config(config: EngineProcessConfig) -> str:
    return msgspec.json.encode(config).decode()


def decode_config(text: str) -> EngineProcessConfig:
    return msgspec.json.decode(text.encode(), type=EngineProcessConfig)


# -- node server -> engine: tasks ------------------------------------------------------------------


class GenerateTask(msgspec.Struct, tag="generate", frozen=True):
    """Prefill the prompt here and decode it to the end (a mixed node, or a decode node prefilling)."""

    request_id: RequestId
    prompt_token_ids: list[int]
    sampling: SamplingParams


class PrefillTask(msgspec.Struct, tag="prefill", frozen=True):
    """Prefill node: compute the prompt's KV and first token, then hold the blocks until ReleaseTask."""

    request_id: RequestId
    prompt_token_ids: list[int]
    sampling: SamplingParams


class ReserveTask(msgspec.Struct, tag="reserve", frozen=True):
    """Decode node: reserve blocks for a prompt whose KV a prefill node will write (KVReserved)."""

    request_id: RequestId
    prompt_token_ids: list[int]
    sampling: SamplingParams
    num_extra_tokens: int  # room beyond the prompt: the first token and the drafts to verify


class RemoteKVReadyTask(msgspec.Struct, tag="kv_ready", frozen=True):
    """Decode node: the reserved blocks hold the prompt's KV; the peer sampled `first` (one token, with
    the logprobs the request asked for). The engine emits it as the request's first output and decodes on."""

    request_id: RequestId
    first: SampledTokens
    draft_token_ids: list[int] = []


class ReleaseTask(msgspec.Struct, tag="release", frozen=True):
    """Prefill node: the request's KV has been handed over (or never will be): free its blocks."""

    request_id: RequestId


class AbortTask(msgspec.Struct, tag="abort", frozen=True):
    request_id: RequestId


class ShutdownTask(msgspec.Struct, tag="shutdown", frozen=True):
    pass


EngineTask = (GenerateTask | PrefillTask | ReserveTask | RemoteKVReadyTask | ReleaseTask | AbortTask
              | ShutdownTask)

_encoder = msgspec.msgpack.Encoder()
_task_decoder = msgspec.msgpack.Decoder(EngineTask)


def encode_task(task: EngineTask) -> bytes:
    return bytes([PROTOCOL_VERSION]) + _encoder.encode(task)


def decode_task(payload: bytes) -> EngineTask:
    if not payload or payload[0] != PROTOCOL_VERSION:
        raise ProtocolError(f"unknown engine protocol version {payload[:1]!r}, expected {PROTOCOL_VERSION}")
    try:
        return _task_decoder.decode(payload[1:])
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
        raise ProtocolError(f"bad engine task: {exc}") from exc


def write_frame(stream: BinaryIO, payload: bytes) -> None:
    stream.write(FRAME_LENGTH.pack(len(payload)) + payload)
    stream.flush()


# -- engine -> node server: records ----------------------------------------------------------------


class RequestOutput(msgspec.Struct, frozen=True, array_like=True):
    """What one step did to one request; also the engine's in-process output (LLMEngine.step)."""

    request_id: str
    status: RequestStatus  # RUNNING, PREEMPTED or a FINISHED_* status after the step
    tokens: SampledTokens = NO_TOKENS  # new tokens; logprob columns only when the request asked
    num_accepted_drafts: int = 0
    error: str = ""  # FINISHED_ERROR: why
    # On the request's first output, when asked for: raw logprobs of prompt tokens 1 .. n-1.
    prompt_logprobs: SampledTokens | None = None
    # FINISHED_PREFILLED (prefill node): the MTP / n-gram drafts the decode node's first step verifies.
    draft_token_ids: list[int] = []

    @property
    def finished(self) -> bool:
        return self.status.is_finished


class PrefillProgress(msgspec.Struct, frozen=True, array_like=True):
    """Prefill node: the first num_computed_tokens of the prompt have their KV in block_ids. Reported
    for every chunk, the last one included, in the record of the step that computed it."""

    request_id: str
    num_computed_tokens: int
    block_ids: list[int]


class StepOutputs(msgspec.Struct, tag="step", frozen=True):
    """Every request output of one engine step (or of one task, such as an abort or a first token),
    with the prefill progress the step made. One record per step: a prefill node's server learns of
    a request's last KV and of its first token in one wake-up, and takes the progress first."""

    step: int
    outputs: list[RequestOutput]
    progress: list[PrefillProgress] = []


class EngineReady(msgspec.Struct, tag="ready", frozen=True):
    pid: int
    kv_spec: KVCacheSpec  # the pool's geometry, derived once from the model (node servers and peers use it)
    kv_pool_name: str | None  # the shared-memory pool a same-host peer may attach to
    # With tensor parallelism: the shared pools of ranks 1..N-1 (kv_spec is each rank's geometry, its
    # num_kv_heads that rank's share; models/tensor_parallel.py says which heads).
    rank_kv_pool_names: list[str] = []


class RequestRejected(msgspec.Struct, tag="rejected", frozen=True):
    request_id: str
    message: str  # why the engine does not serve it (e.g. prompt longer than max_model_len)
    retryable: bool = False  # no room right now (CapacityError): another node may serve it


class EngineFailed(msgspec.Struct, tag="failed", frozen=True):
    message: str  # the engine loop stopped on this error; the process exits after sending it


# An engine sends its stats at least this often between steps, whatever changed: a reader can tell a
# quiet engine from a stuck one (node/engine_client.py's stall watchdog).
STATS_MAX_INTERVAL_S = 1.0


class EngineStats(msgspec.Struct, tag="stats", frozen=True):
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    steps: int


class KVReserved(msgspec.Struct, tag="kv_reserved", frozen=True):
    request_id: str
    block_ids: list[int]


EngineRecord = StepOutputs | EngineReady | RequestRejected | EngineFailed | EngineStats | KVReserved

_record_decoder = msgspec.msgpack.Decoder(EngineRecord)


def encode_record(record: EngineRecord) -> bytes:
    return bytes([PROTOCOL_VERSION]) + _encoder.encode(record)


def decode_record(payload: bytes) -> EngineRecord:
    if not payload or payload[0] != PROTOCOL_VERSION:
        raise ProtocolError(f"unknown engine protocol version {payload[:1]!r}, expected {PROTOCOL_VERSION}")
    try:
        return _record_decoder.decode(memoryview(payload)[1:])
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
        raise ProtocolError(f"bad engine record: {exc}") from exc


# -- the record stream's fragments ------------------------------------------------------------------

_MAGIC = b"PD"
_MORE = 0x01
_SEQ_MODULUS = 1 << 32


def fragments(payload: bytes, seq: int, max_message_bytes: int) -> list[bytes]:
    """One encoded record as queue messages of at most max_message_bytes each (header included)."""
    budget = max_message_bytes - FRAGMENT_HEADER.size
    if budget < 1:
        raise ProtocolError(f"a message of {max_message_bytes} bytes cannot hold a fragment")
    view = memoryview(payload)
    starts = range(0, len(payload), budget) or range(1)
    last = starts[-1]
    return [FRAGMENT_HEADER.pack(_MAGIC, PROTOCOL_VERSION, 0 if start == last else _MORE, seq)
            + view[start:start + budget] for start in starts]


class RecordAssembler:
    """Joins fragments into records and checks they arrive as one writer sent them."""

    def __init__(self, max_record_bytes: int = MAX_RECORD_BYTES) -> None:
        self._max_record_bytes = max_record_bytes
        self._parts: list[bytes] = []
        self._size = 0
        self._expected_seq: int | None = None  # the first record fixes the sequence

    def add(self, message: bytes) -> EngineRecord | None:
        """Take the next message; returns the record once its last fragment arrived."""
        if len(message) < FRAGMENT_HEADER.size:
            raise ProtocolError(f"{len(message)}-byte message is shorter than the fragment header")
        magic, version, flags, seq = FRAGMENT_HEADER.unpack_from(message)
        if magic != _MAGIC or version != PROTOCOL_VERSION or flags & ~_MORE:
            raise ProtocolError(f"not a fragment of protocol {PROTOCOL_VERSION}: {bytes(message[:4])!r}")
        if self._expected_seq is not None and seq != self._expected_seq:
            raise ProtocolError(f"fragment of record {seq} where record {self._expected_seq} was due")
        self._expected_seq = seq
        self._size += len(message) - FRAGMENT_HEADER.size
        if self._size > self._max_record_bytes:
            raise ProtocolError(f"record exceeds {self._max_record_bytes} bytes")
        self._parts.append(message[FRAGMENT_HEADER.size:])
        if flags & _MORE:
            return None
        payload = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts, self._size = [], 0
        self._expected_seq = (seq + 1) % _SEQ_MODULUS
        return decode_record(payload)
