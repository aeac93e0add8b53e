"""Wire codec: round trips of every message, and rejection of bytes that are not a valid message."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.common.kv_cache import KVCacheSpec
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.tokens import SampledTokens
from pdserve.transfer.messages import (
    WIRE_VERSION,
    Abort,
    ErrorCode,
    FirstToken,
    KVChunkHeader,
    KVTarget,
    LeaseRenewal,
    PrefillTask,
    PrefillTimings,
    WireCodec,
    WireError,
)

CODEC = WireCodec()
LAYOUT = KVCacheSpec(num_layers=3, num_blocks=64, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
TARGET = KVTarget("tcp://127.0.0.1:5555", "boot/1", LAYOUT, shm_name="pdserve-kv-abc")

token_ids = st.integers(0, 2**31 - 1)
logprobs = st.floats(max_value=0.0, allow_nan=False)
request_ids = st.text(min_size=1, max_size=40)


@st.composite
def prefill_tasks(draw: st.DrawFn) -> PrefillTask:
    prompt = draw(st.lists(token_ids, min_size=1, max_size=60))
    needed = -(-len(prompt) // LAYOUT.block_size)
    blocks = draw(st.lists(st.integers(0, LAYOUT.num_blocks - 1), min_size=needed, max_size=needed + 2,
                           unique=True))
    sampling = SamplingParams(max_tokens=draw(st.integers(1, 4096)), temperature=draw(st.floats(0, 2)),
                              top_k=draw(st.integers(0, 50)), seed=draw(st.none() | st.integers(0, 2**62)),
                              stop=tuple(draw(st.lists(st.text(min_size=1, max_size=5), max_size=2))))
    return PrefillTask(draw(request_ids), tuple(prompt), sampling, tuple(blocks), "decode-0", TARGET,
                       lease_ms=draw(st.integers(1, 3_600_000)), num_draft_tokens=draw(st.integers(0, 8)))


@st.composite
def first_tokens(draw: st.DrawFn, ids: st.SearchStrategy[str] = request_ids) -> FirstToken:
    if draw(st.booleans()):  # the request asked for no logprobs: the token alone
        token = SampledTokens([draw(token_ids)])
    else:
        k = draw(st.integers(0, 20))
        token = SampledTokens([draw(token_ids)], [draw(logprobs)], [draw(st.integers(1, 10**6))], k,
                              draw(st.lists(token_ids, min_size=k, max_size=k)),
                              draw(st.lists(logprobs, min_size=k, max_size=k)))
    return FirstToken(
        draw(ids), token=token,
        draft_token_ids=tuple(draw(st.lists(token_ids, max_size=8))),
        timings=PrefillTimings(draw(st.floats(0, 1e6)), draw(st.floats(0, 1e6)), draw(st.floats(0, 1e6))))


@st.composite
def chunk_headers(draw: st.DrawFn) -> KVChunkHeader:
    block_size = draw(st.integers(1, 16))
    token_start = draw(st.integers(0, 200))
    token_end = draw(st.integers(token_start + 1, token_start + 200))
    n_blocks = -(-token_end // block_size) - token_start // block_size
    layer_start = draw(st.integers(0, 5))
    request_id = draw(request_ids)
    last = draw(st.booleans())
    # the last chunk may carry the request's first token
    first_token = draw(st.none() | first_tokens(st.just(request_id))) if last else None
    return KVChunkHeader(
        request_id=request_id, seq=draw(st.integers(0, 1000)), layer_start=layer_start,
        layer_end=draw(st.integers(layer_start + 1, 8)), token_start=token_start, token_end=token_end,
        block_ids=tuple(draw(st.lists(st.integers(0, 2**31 - 1), min_size=n_blocks, max_size=n_blocks))),
        dtype=draw(st.sampled_from(["float32", "float16", "bfloat16"])),
        block_shape=(draw(st.integers(1, 8)), block_size, draw(st.integers(1, 256))),
        payload_nbytes=draw(st.integers(0, 2**40)), last=last, in_place=draw(st.booleans()),
        first_token=first_token)


messages = st.one_of(
    prefill_tasks(), chunk_headers(), first_tokens(),
    st.builds(Abort, request_ids, st.text(max_size=100)),
    st.builds(LeaseRenewal, request_ids, st.integers(1, 3_600_000)),
)


@settings(max_examples=200, deadline=None)
@given(messages)
def test_every_message_round_trips(message: object) -> None:
    data = CODEC.encode(message)  # type: ignore[arg-type]
    assert data[0] == WIRE_VERSION
    assert CODEC.decode(data) == message


def test_error_first_token_round_trips() -> None:
    message = FirstToken("r", error_code=ErrorCode.KV_TRANSFER_FAILED, error_message="peer gone")
    decoded = CODEC.decode(CODEC.encode(message))
    assert decoded == message and isinstance(decoded, FirstToken) and not decoded.ok


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_a_wire_error_or_a_valid_message(data: bytes) -> None:
    try:
        message = CODEC.decode(data)
    except WireError:
        return
    # The rare random input that decodes must be a message that re-encodes to an equal message.
    assert CODEC.decode(CODEC.encode(message)) == message


@settings(max_examples=100, deadline=None)
@given(messages, st.data())
def test_truncated_messages_are_rejected(message: object, data: st.DataObject) -> None:
    encoded = CODEC.encode(message)  # type: ignore[arg-type]
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(WireError):
        CODEC.decode(encoded[:cut])


def test_wrong_version_byte_is_rejected() -> None:
    encoded = CODEC.encode(Abort("r"))
    with pytest.raises(WireError, match="version"):
        CODEC.decode(bytes([WIRE_VERSION + 1]) + encoded[1:])


def _raw(**fields: object) -> bytes:
    return bytes([WIRE_VERSION]) + msgspec.msgpack.encode(fields)


def _valid_header_fields() -> dict[str, object]:
    return dict(type="kv_chunk", request_id="r", seq=0, layer_start=0, layer_end=1, token_start=0,
                token_end=4, block_ids=[3], dtype="float32", block_shape=[2, 4, 8], payload_nbytes=512,
                last=True)


@pytest.mark.parametrize("change", [
    dict(block_ids=[3, 4]),  # more blocks than tokens [0, 4) span
    dict(block_ids=[-1]),
    dict(layer_end=0),
    dict(token_end=0),
    dict(dtype="int8"),
    dict(block_shape=[2, 4]),
    dict(block_shape=[0, 4, 8]),
    dict(payload_nbytes=-1),
    dict(request_id=""),
    dict(seq="0"),
    dict(type="nope"),
])
def test_header_bounds_are_checked(change: dict[str, object]) -> None:
    assert isinstance(CODEC.decode(_raw(**_valid_header_fields())), KVChunkHeader)  # the base is valid
    with pytest.raises(WireError):
        CODEC.decode(_raw(**(_valid_header_fields() | change)))


def _token(token_id: int = 5, logprob: float = -0.1, rank: int = 1, top_k: int = 0,
           top_ids: list[int] | None = None, top_logprobs: list[float] | None = None) -> list[object]:
    """A SampledTokens of one token as it travels (an array of its columns)."""
    return [[token_id], [logprob], [rank], top_k, top_ids or [], top_logprobs or []]


@pytest.mark.parametrize("change", [
    dict(token=_token(top_k=21, top_ids=list(range(21)), top_logprobs=[-1.0] * 21)),  # more than 20
    dict(token=_token(top_k=2, top_ids=[1, 2], top_logprobs=[-1.0])),
    dict(token=_token(logprob=0.5)),
    dict(token=_token(logprob=math.nan)),
    dict(token=_token(top_k=1, top_ids=[3], top_logprobs=[0.5])),
    dict(token=_token(rank=0)),
    dict(token=_token(token_id=-1)),
    dict(token=_token(token_id=2**31)),
    dict(token=[[5, 6], [-0.1, -0.2], [1, 1], 0, [], []]),  # two tokens
    dict(token=[[5], [], [1], 0, [], []]),  # a rank without its logprob
    dict(token=[[], [], [], 0, [], []]),  # no token
    dict(error_code=99),
    dict(error_code=1),  # an error that still carries a token
    dict(draft_token_ids=list(range(33))),
])
def test_first_token_bounds_are_checked(change: dict[str, object]) -> None:
    base = dict(type="first_token", request_id="r", token=_token())
    assert isinstance(CODEC.decode(_raw(**base)), FirstToken)
    with pytest.raises(WireError):
        CODEC.decode(_raw(**(base | change)))


def test_a_first_token_without_logprobs_is_the_token_alone() -> None:
    """A request that asked for no logprobs: P sends the token without them (and D checks that its
    request asked for none: decode_node.remote_prefill.missing_logprobs)."""
    decoded = CODEC.decode(_raw(type="first_token", request_id="r", token=[[5], [], [], 0, [], []]))
    assert isinstance(decoded, FirstToken) and decoded.token == SampledTokens([5])


@pytest.mark.parametrize("change", [
    dict(last=False),  # only the last chunk carries the first token
    dict(first_token=dict(type="first_token", request_id="other", token=_token())),  # another request's
    dict(first_token=dict(type="first_token", request_id="r", error_code=1)),  # an error travels alone
])
def test_a_first_token_rides_only_on_its_requests_last_chunk(change: dict[str, object]) -> None:
    base = _valid_header_fields() | dict(first_token=dict(type="first_token", request_id="r", token=_token()))
    assert isinstance(CODEC.decode(_raw(**base)).first_token, FirstToken)  # type: ignore[union-attr]
    with pytest.raises(WireError):
        CODEC.decode(_raw(**(base | change)))


@pytest.mark.parametrize("change", [
    dict(shm_name="../etc/passwd"),
    dict(shm_name=".hidden"),
    dict(address="http://x"),
    dict(block_ids=[1, 1]),
    dict(block_ids=[]),
    dict(block_ids=[64]),  # beyond the target pool
    dict(prompt_token_ids=list(range(9)), block_ids=[1, 2]),  # 9 tokens need 3 blocks of 4
    dict(sampling={"top_p": 2.0}),
    dict(lease_ms=0),
])
def test_prefill_task_bounds_are_checked(change: dict[str, object]) -> None:
    target = msgspec.to_builtins(TARGET)
    base: dict[str, object] = dict(type="prefill_task", request_id="r", prompt_token_ids=[1, 2, 3],
                                   sampling={}, block_ids=[7], decode_node_id="d", kv_target=target,
                                   lease_ms=1000)
    assert isinstance(CODEC.decode(_raw(**base)), PrefillTask)
    if "shm_name" in change or "address" in change:
        change = dict(kv_target=target | change)
    with pytest.raises(WireError):
        CODEC.decode(_raw(**(base | change)))


def test_oversized_message_is_rejected_before_decoding() -> None:
    with pytest.raises(WireError, match="limit"):
        CODEC.decode(bytes([WIRE_VERSION]) + b"\x00" * (16 * 1024 * 1024 + 1))


def test_a_layout_with_a_bad_geometry_is_rejected_on_decode() -> None:
    raw = msgspec.msgpack.encode(LAYOUT)
    assert msgspec.msgpack.decode(raw, type=KVCacheSpec) == LAYOUT
    bad = msgspec.msgpack.encode({**msgspec.structs.asdict(LAYOUT), "block_size": 0})
    with pytest.raises(msgspec.ValidationError, match="block_size"):
        msgspec.msgpack.decode(bad, type=KVCacheSpec)
