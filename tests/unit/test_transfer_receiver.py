"""KVReceiver: every check before a write, counted rejections, untouched pool, and a transfer that goes on."""

from __future__ import annotations

import hashlib

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.common.kv_cache import KVCachePool, KVCacheSpec
from pdserve.transfer.messages import KVChunkHeader
from pdserve.transfer.receiver import KVReceiver, RejectReason
from pdserve.transfer.reservations import KVReservations

SPEC = KVCacheSpec(num_layers=3, num_blocks=16, block_size=4, num_kv_heads=2, head_dim=8)
BLOCK_NBYTES = 2 * 4 * 8 * 4
SRC_IDS = (0, 1, 2, 7)  # the prefill side's blocks
DST_IDS = (5, 6, 9, 2)  # the decode side's reserved blocks
NUM_TOKENS = 14


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, allow_in_place: bool = False) -> None:
        self.clock = FakeClock()
        rng = np.random.default_rng(0)
        self.src = rng.standard_normal(SPEC.shape).astype(np.float32)
        self.pool = KVCachePool.allocate(SPEC)
        self.pool.array[...] = rng.standard_normal(SPEC.shape)  # stale KV from earlier requests
        self.reservations = KVReservations(SPEC.num_layers, SPEC.num_blocks, SPEC.block_size, self.clock)
        self.reservations.reserve("good", DST_IDS, NUM_TOKENS, lease_s=10.0)
        self.receiver = KVReceiver(self.pool, self.reservations, allow_in_place=allow_in_place)

    def chunk(self, seq: int, token_start: int, token_end: int, layers: range = range(3),
              last: bool = False) -> tuple[KVChunkHeader, list[bytes]]:
        first, end = token_start // 4, -(-token_end // 4)
        src_ids = list(SRC_IDS[first:end])
        frames = [self.src[layer, kv][src_ids].tobytes() for layer in layers for kv in (0, 1)]
        header = KVChunkHeader("good", seq, layers.start, layers.stop, token_start, token_end,
                               DST_IDS[first:end], "float32", (2, 4, 8), sum(len(f) for f in frames), last)
        return header, frames

    def checksum(self) -> str:
        return hashlib.sha256(self.pool.array.tobytes()).hexdigest()

    def assert_delivered(self) -> None:
        for s, d in zip(SRC_IDS, DST_IDS, strict=True):
            np.testing.assert_array_equal(self.pool.array[:, :, d], self.src[:, :, s])


def test_multi_chunk_transfer_writes_exact_bytes_and_completes() -> None:
    rig = Rig()
    results = [rig.receiver.accept(*rig.chunk(0, 0, 5)), rig.receiver.accept(*rig.chunk(1, 5, 12)),
               rig.receiver.accept(*rig.chunk(2, 12, 14, last=True))]
    assert [r.reason for r in results] == [None, None, None]
    assert [r.complete for r in results] == [False, False, True]
    assert rig.reservations.get("good").complete  # type: ignore[union-attr]
    rig.assert_delivered()
    stats = rig.receiver.stats()
    assert stats["accepted_chunks"] == 3 and stats["completed_requests"] == 1


def test_layer_by_layer_chunks_complete_only_when_every_layer_has_every_token() -> None:
    rig = Rig()
    for seq, layer in enumerate(range(2)):
        result = rig.receiver.accept(*rig.chunk(seq, 0, 14, layers=range(layer, layer + 1)))
        assert result.accepted and not result.complete
    assert rig.receiver.accept(*rig.chunk(2, 0, 14, layers=range(2, 3), last=True)).complete
    rig.assert_delivered()


def _replace(header: KVChunkHeader, **changes: object) -> KVChunkHeader:
    return msgspec.structs.replace(header, **changes)


MUTATIONS = {
    "unknown request": (lambda h, f: (_replace(h, request_id="ghost"), f), RejectReason.UNKNOWN_REQUEST),
    "wrong block ids": (lambda h, f: (_replace(h, block_ids=(5, 7)), f), RejectReason.WRONG_BLOCKS),
    "foreign block ids": (lambda h, f: (_replace(h, block_ids=(0, 1)), f), RejectReason.WRONG_BLOCKS),
    "wrong dtype": (lambda h, f: (_replace(h, dtype="float16"), f), RejectReason.WRONG_LAYOUT),
    "wrong shape": (lambda h, f: (_replace(h, block_shape=(2, 4, 16)), f), RejectReason.WRONG_LAYOUT),
    "layer beyond pool": (lambda h, f: (_replace(h, layer_start=1, layer_end=4), f),
                          RejectReason.WRONG_LAYOUT),
    "out of sequence": (lambda h, f: (_replace(h, seq=1), f), RejectReason.BAD_SEQUENCE),
    "tokens beyond reservation": (
        lambda h, f: (_replace(h, token_end=20, block_ids=DST_IDS + (11,)), f), RejectReason.OUT_OF_RANGE),
    "gap": (lambda h, f: (_replace(h, token_start=4, token_end=8, block_ids=(6,)), f),
            RejectReason.NOT_CONTIGUOUS),
    "declared length": (lambda h, f: (_replace(h, payload_nbytes=h.payload_nbytes + 4), f),
                        RejectReason.WRONG_LENGTH),
    "missing frame": (lambda h, f: (h, f[:-1]), RejectReason.WRONG_LENGTH),
    "truncated frame": (lambda h, f: (h, [*f[:-1], f[-1][:-1]]), RejectReason.WRONG_LENGTH),
    "extra frame": (lambda h, f: (h, [*f, f[0]]), RejectReason.WRONG_LENGTH),
    "in place, not allowed": (lambda h, f: (_replace(h, in_place=True), []),
                              RejectReason.IN_PLACE_NOT_ALLOWED),
    "last too early": (lambda h, f: (_replace(h, last=True), f), RejectReason.LAST_MISMATCH),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_each_bad_chunk_is_rejected_counted_and_never_written(name: str) -> None:
    mutate, reason = MUTATIONS[name]
    rig = Rig()
    before = rig.checksum()
    result = rig.receiver.accept(*mutate(*rig.chunk(0, 0, 5)))
    assert result.reason == reason
    assert rig.checksum() == before
    assert rig.receiver.stats() == {f"rejected_{reason}": 1}
    # The request's transfer is unaffected: the valid chunks still go through from seq 0.
    assert rig.receiver.accept(*rig.chunk(0, 0, 5)).accepted
    assert rig.receiver.accept(*rig.chunk(1, 5, 14, last=True)).complete
    rig.assert_delivered()


def test_chunk_after_lease_expiry_is_rejected() -> None:
    rig = Rig()
    rig.clock.now = 10.0
    before = rig.checksum()
    assert rig.receiver.accept(*rig.chunk(0, 0, 5)).reason == RejectReason.LEASE_EXPIRED
    assert rig.checksum() == before


def test_chunk_after_completion_is_rejected() -> None:
    rig = Rig()
    assert rig.receiver.accept(*rig.chunk(0, 0, 14, last=True)).complete
    header, frames = rig.chunk(1, 0, 14, last=True)
    assert rig.receiver.accept(header, frames).reason == RejectReason.NOT_CONTIGUOUS


def test_in_place_notice_advances_without_writing() -> None:
    rig = Rig(allow_in_place=True)
    before = rig.checksum()
    header, _ = rig.chunk(0, 0, 14, last=True)
    result = rig.receiver.accept(_replace(header, in_place=True), [])
    assert result.complete and rig.checksum() == before


def test_receiver_refuses_reservations_of_another_geometry() -> None:
    with pytest.raises(ValueError, match="disagree"):
        KVReceiver(KVCachePool.allocate(SPEC), KVReservations(3, 8, 4), allow_in_place=False)


FUZZ_VALUES = {
    "request_id": st.sampled_from(["good", "ghost", "goo", "good "]),
    "seq": st.integers(0, 3),
    "layer_start": st.integers(0, 3),
    "layer_end": st.integers(1, 5),
    "token_start": st.integers(0, 16),
    "token_end": st.integers(1, 24),
    "block_ids": st.lists(st.integers(0, 20), min_size=2, max_size=2).map(tuple)
    | st.lists(st.integers(0, 20), min_size=1, max_size=6).map(tuple),
    "dtype": st.sampled_from(["float32", "float16", "bfloat16"]),
    "block_shape": st.tuples(st.integers(1, 3), st.sampled_from([4]), st.sampled_from([4, 8, 16])),
    "payload_nbytes": st.integers(0, 8192),
    "last": st.booleans(),
    "in_place": st.booleans(),
}
# One or two fields changed at a time, so each single check is exercised on its own as well.
FUZZ_FIELDS = st.lists(st.sampled_from(sorted(FUZZ_VALUES)), min_size=0, max_size=2, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({name: FUZZ_VALUES[name] for name in names}))


@settings(max_examples=300, deadline=None)
@given(FUZZ_FIELDS, st.integers(-2, 2), st.integers(0, 3))
def test_fuzzed_chunks_never_touch_the_pool(changes: dict[str, object], frame_delta: int, cut: int) -> None:
    rig = Rig()
    header, frames = rig.chunk(0, 0, 5)
    try:
        bad = _replace(header, **changes)
    except (msgspec.ValidationError, ValueError):
        return  # not even a well-formed header: the codec refuses it (test_transfer_messages)
    bad_frames = (frames + frames[:frame_delta] if frame_delta > 0 else frames[:len(frames) + frame_delta])
    bad_frames = [*bad_frames[:-1], bad_frames[-1][:len(bad_frames[-1]) - cut]] if bad_frames else bad_frames
    if bad == header and bad_frames == frames:
        return  # no change at all: that is the valid chunk
    before = rig.checksum()
    result = rig.receiver.accept(bad, bad_frames)
    if result.accepted:
        # Only a change the receiver may ignore can be accepted: the bytes then land exactly as sent.
        assert bad.block_ids == header.block_ids and bad_frames == frames
    else:
        assert rig.checksum() == before
        assert sum(v for k, v in rig.receiver.stats().items() if k.startswith("rejected_")) == 1
        assert rig.receiver.accept(*rig.chunk(0, 0, 5)).accepted
