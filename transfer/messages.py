"""Wire messages between prefill and decode nodes, and their one codec.

A message is one ZMQ frame: a version byte, then the msgpack of one tagged struct. msgspec decodes
into the declared types only and checks every bound declared here (`Meta`) plus the cross-field
rules in each `__post_init__`, so bytes from a peer can never build arbitrary objects (no pickle)
and a message that decodes is internally consistent. Whether it fits the *receiver's* state (known
request, reserved blocks, its own KV layout) is the receiver's check, not the codec's.

Durations travel as relative milliseconds (`lease_ms`), never as absolute times: the two nodes'
clocks are not comparable (each side turns a lease into a deadline on its own monotonic clock).
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Literal

import msgspec

from pdserve.common.kv_cache import KVCacheSpec
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.tokens import NO_TOKENS, SampledTokens

WIRE_VERSION = 5
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a 1M-token PrefillTask is ~5 MB of msgpack
MAX_PROMPT_TOKENS = 1 << 20
MAX_BLOCKS = 1 << 20
MAX_DRAFT_TOKENS = 32
MAX_LEASE_MS = 3_600_000
MAX_TEXT = 1024

RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]
BlockId = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]
Count = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]
Positive = Annotated[int, msgspec.Meta(ge=1, lt=2**31)]
LeaseMs = Annotated[int, msgspec.Meta(ge=1, le=MAX_LEASE_MS)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
DType = Literal["float32", "float16", "bfloat16"]

# A /dev/shm file name: no separators and no leading dot, so a peer cannot point us at another path.
_SHM_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
_ADDRESS = re.compile(r"(tcp|ipc)://\S{1,250}")


class WireError(ValueError):
    """Bytes that are not a valid message of this wire version."""


class ErrorCode(enum.IntEnum):
    OK = 0
    PREFILL_FAILED = 1  # the prefill engine failed on this request
    KV_TRANSFER_FAILED = 2  # P could not deliver the KV (peer unreachable, send timeout)
    ABORTED = 3  # the task was aborted before it finished
    LEASE_EXPIRED = 4  # P dropped the task: its lease ran out without renewal
    INVALID_TASK = 5  # the task does not fit P (KV layout mismatch, too few blocks, too long)
    OVERLOADED = 6  # P refused the task: its queue is full
    UNKNOWN_TASK = 7  # P holds no task for a renewed request: the task or its FirstToken was lost


class KVTarget(msgspec.Struct, frozen=True):
    """Where a decode node takes KV: its data address and, for peers on its host, its shared pool."""

    address: Annotated[str, msgspec.Meta(max_length=256)]  # D's inbox, tcp://host:port
    host_id: Annotated[str, msgspec.Meta(max_length=256)]  # `transport.local_host_id()` of D
    layout: KVCacheSpec  # D's pool; P checks its own layout matches before it prefills
    shm_name: Annotated[str, msgspec.Meta(max_length=200)] | None = None  # D's pool under /dev/shm
    # With tensor parallelism: the pools of D's engine ranks 1..N-1 (shm_name is rank 0's); `layout`
    # has all KV heads, and rank r of N holds common.kv_cache.kv_head_range(heads, r, N).
    rank_shm_names: Annotated[tuple[Annotated[str, msgspec.Meta(max_length=200)], ...],
                              msgspec.Meta(max_length=255)] = ()

    def __post_init__(self) -> None:
        if not _ADDRESS.fullmatch(self.address):
            raise ValueError(f"KVTarget.address must be tcp://... or ipc://... (got {self.address!r})")
        for name in (self.shm_name, *self.rank_shm_names):
            if name is not None and not _SHM_NAME.fullmatch(name):
                raise ValueError(f"KVTarget pool names must be plain file names (got {name!r})")
        if self.rank_shm_names and self.shm_name is None:
            raise ValueError("KVTarget.rank_shm_names needs shm_name (rank 0's pool)")


class MessageAuth(msgspec.Struct, frozen=True):
    """Who sent a decode -> prefill message, and that it is fresh: `transfer.auth` signs and checks it.

    `mac` is the HMAC of the whole message encoded with `mac` empty, under a key derived from the
    cluster secret. Unlike durations, `expires_unix_ms` is wall-clock time: a replayed message must be
    recognisable after any restart, so nodes' clocks must agree within the verifier's allowed skew.
    """

    nonce: Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
    expires_unix_ms: Annotated[int, msgspec.Meta(ge=0, lt=2**53)]
    mac: Annotated[bytes, msgspec.Meta(max_length=32)] = b""


class PrefillTask(msgspec.Struct, tag="prefill_task", frozen=True):
    """D -> P: prefill this prompt and write its KV into my blocks `block_ids` (in token order)."""

    request_id: RequestId
    prompt_token_ids: Annotated[tuple[TokenId, ...], msgspec.Meta(min_length=1, max_length=MAX_PROMPT_TOKENS)]
    sampling: SamplingParams
    block_ids: Annotated[tuple[BlockId, ...], msgspec.Meta(min_length=1, max_length=MAX_BLOCKS)]
    decode_node_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    kv_target: KVTarget
    lease_ms: LeaseMs  # P drops the task this long after receiving it unless a LeaseRenewal arrives
    num_draft_tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_DRAFT_TOKENS)] = 0  # MTP drafts wanted
    auth: MessageAuth | None = None  # the decode node's signature (None only in an insecure cluster)

    def __post_init__(self) -> None:
        if len(set(self.block_ids)) != len(self.block_ids):
            raise ValueError("PrefillTask.block_ids must be distinct")
        needed = -(-len(self.prompt_token_ids) // self.kv_target.layout.block_size)
        if len(self.block_ids) < needed:
            raise ValueError(f"PrefillTask.block_ids has {len(self.block_ids)} blocks, "
                             f"the prompt needs {needed}")
        if max(self.block_ids) >= self.kv_target.layout.num_blocks:
            raise ValueError("PrefillTask.block_ids must be < kv_target.layout.num_blocks")


class PrefillTimings(msgspec.Struct, frozen=True):
    """Where P spent the request's time, for the TTFT split D reports."""

    queue_ms: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    prefill_ms: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    transfer_ms: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0


class FirstToken(msgspec.Struct, tag="first_token", frozen=True):
    """P -> D, never before the request's last KV chunk: the first sampled token (carried by that
    chunk's header, `KVChunkHeader.first_token`), or an error (a message of its own).

    `token` is the prefill engine's own record of it: one token, with its raw logprob, rank and the
    top-k exactly when the request asked for logprobs (a prefill node computes no more than a mixed
    node would); the decode engine emits it unchanged as the request's first output.
    When `error_code` is not OK the token fields carry nothing and must be left at their defaults.
    """

    request_id: RequestId
    token: SampledTokens = NO_TOKENS
    draft_token_ids: Annotated[tuple[TokenId, ...], msgspec.Meta(max_length=MAX_DRAFT_TOKENS)] = ()
    error_code: ErrorCode = ErrorCode.OK
    error_message: Text = ""
    timings: PrefillTimings = PrefillTimings()

    def __post_init__(self) -> None:
        if self.error_code != ErrorCode.OK:
            if self.token.token_ids or self.draft_token_ids:
                raise ValueError("FirstToken with an error must carry no token data")
            return
        token = self.token
        if len(token) != 1:
            raise ValueError("FirstToken.token must be one token")
        if not 0 <= token.token_ids[0] < 2**31 or not all(0 <= t < 2**31 for t in token.top_ids):
            raise ValueError("FirstToken.token ids must be in [0, 2**31)")
        if token.ranks and token.ranks[0] < 1:
            raise ValueError("FirstToken.token rank must be >= 1")
        if not token.valid_logprobs():
            raise ValueError("FirstToken logprobs must be <= 0 and not NaN")

    @property
    def ok(self) -> bool:
        return self.error_code == ErrorCode.OK


class KVChunkHeader(msgspec.Struct, tag="kv_chunk", frozen=True):
    """P -> D: KV of tokens [token_start, token_end) for layers [layer_start, layer_end).

    `block_ids` are D's blocks holding those tokens, in token order (a block partly filled by an
    earlier chunk is sent again whole). Unless `in_place`, `2 * (layer_end - layer_start)` payload
    frames follow, one per (layer, K then V), each the chunk's blocks `[n, *block_shape]` in order.
    `in_place`: the sender already wrote the bytes into D's shared pool (same host), no frames follow.
    `first_token`: only on the `last` chunk, the request's (good) first token, so the request's last
    KV and its token travel as one message; D takes the token after the chunk, whatever became of it.
    """

    request_id: RequestId
    seq: Count  # 0, 1, 2, ... per request: D rejects a chunk out of order
    layer_start: Count
    layer_end: Positive  # exclusive
    token_start: Count
    token_end: Positive  # exclusive
    block_ids: Annotated[tuple[BlockId, ...], msgspec.Meta(min_length=1, max_length=MAX_BLOCKS)]
    dtype: DType
    block_shape: tuple[Positive, Positive, Positive]  # [num_kv_heads, block_size, head_dim]
    payload_nbytes: Annotated[int, msgspec.Meta(ge=0, lt=2**48)]
    last: bool  # this chunk completes the request's KV (every layer, every token)
    in_place: bool = False
    first_token: FirstToken | None = None

    def __post_init__(self) -> None:
        if self.first_token is not None and not (
                self.last and self.first_token.ok and self.first_token.request_id == self.request_id):
            raise ValueError("KVChunkHeader.first_token must be the request's good token, on its last chunk")
        if self.layer_end <= self.layer_start:
            raise ValueError("KVChunkHeader.layer_end must be > layer_start")
        if self.token_end <= self.token_start:
            raise ValueError("KVChunkHeader.token_end must be > token_start")
        block_size = self.block_shape[1]
        expected_blocks = -(-self.token_end // block_size) - self.token_start // block_size
        if len(self.block_ids) != expected_blocks:
            raise ValueError(f"KVChunkHeader.block_ids has {len(self.block_ids)} blocks, tokens "
                             f"[{self.token_start}, {self.token_end}) span {expected_blocks}")

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def num_frames(self) -> int:
        """Payload frames that follow the header (0 when in place)."""
        return 0 if self.in_place else 2 * self.num_layers


class Abort(msgspec.Struct, tag="abort", frozen=True):
    """Either direction: stop working on this request and free its blocks."""

    request_id: RequestId
    reason: Text = ""
    auth: MessageAuth | None = None  # signed when a decode node sends it; P's confirmations are not


class LeaseRenewal(msgspec.Struct, tag="lease_renewal", frozen=True):
    """D -> P: the request is still wanted; hold the task for `lease_ms` more from receipt.

    A renewal is also D's question "are you still on it?": P answers one for a request it holds no
    task for with a FirstToken(UNKNOWN_TASK) to `reply_to` (D's data address). A task, or a FirstToken,
    that was queued on a connection when heartbeats closed it is gone without a trace on either
    side; without the answer D would wait for it until its prefill timeout. The answer travels behind
    any FirstToken P sent earlier on the same connection, so it never overtakes a real one.
    """

    request_id: RequestId
    lease_ms: LeaseMs
    auth: MessageAuth | None = None
    reply_to: Annotated[str, msgspec.Meta(max_length=256)] = ""


WireMessage = PrefillTask | KVChunkHeader | FirstToken | Abort | LeaseRenewal


class WireCodec:
    """Encodes and decodes `WireMessage`s: one instance per thread (msgspec coders are not shared)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(WireMessage)

    def encode(self, message: WireMessage) -> bytes:
        return bytes([WIRE_VERSION]) + self._encoder.encode(message)

    def decode(self, data: bytes | memoryview) -> WireMessage:
        if len(data) < 2:
            raise WireError(f"message of {len(data)} bytes is too short")
        if len(data) > MAX_MESSAGE_BYTES:
            raise WireError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
        if data[0] != WIRE_VERSION:
            raise WireError(f"unknown wire version {data[0]}, expected {WIRE_VERSION}")
        try:
            return self._decoder.decode(memoryview(data)[1:])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise WireError(f"bad message: {exc}") from exc
