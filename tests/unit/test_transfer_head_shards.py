"""KV moved between rank pools of different tensor-parallel sizes equals KV moved between whole pools."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.common.kv_cache import kv_head_range
from pdserve.transfer.head_shards import copy_heads, gather_heads, head_ranges, scatter_heads

HEADS, LAYERS, BLOCKS, BLOCK_SIZE, HEAD_DIM = 4, 3, 10, 2, 3
SIZES = [1, 2, 4, 8]  # 8 ranks share 4 KV heads: two ranks per head
SRC_IDS, DST_IDS = [1, 2, 3, 7], [5, 6, 0, 9]  # a run of three, then scattered ids


def _full(seed: int) -> np.ndarray:
    shape = (LAYERS, 2, BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _shard(full: np.ndarray, size: int) -> list[np.ndarray]:
    """The rank pools of a node with `size` ranks holding `full`'s KV."""
    return [np.ascontiguousarray(full[:, :, :, a:b]) for a, b in head_ranges(HEADS, size)]


def _expected(src_full: np.ndarray, dst_full: np.ndarray, layers: slice) -> np.ndarray:
    out = dst_full.copy()
    out[layers, :, DST_IDS] = src_full[layers, :, SRC_IDS]
    return out


def test_head_ranges_cover_every_head_and_replicate_past_the_head_count() -> None:
    assert head_ranges(4, 1) == [(0, 4)]
    assert head_ranges(4, 2) == [(0, 2), (2, 4)]
    assert head_ranges(4, 8) == [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3), (3, 4), (3, 4)]
    for bad in [(4, 3), (4, 6)]:
        with pytest.raises(ValueError):
            kv_head_range(bad[0], 0, bad[1])


@pytest.mark.parametrize("dst_size", SIZES)
@pytest.mark.parametrize("src_size", SIZES)
def test_same_host_copy_across_tp_sizes(src_size: int, dst_size: int) -> None:
    src_full, dst_full = _full(1), _full(2)
    src, dst = _shard(src_full, src_size), _shard(dst_full, dst_size)
    layers = slice(1, 3)
    copy_heads(src, SRC_IDS, dst, DST_IDS, layers, HEADS)
    for pool, want in zip(dst, _shard(_expected(src_full, dst_full, layers), dst_size), strict=True):
        np.testing.assert_array_equal(pool, want)


@pytest.mark.parametrize("dst_size", SIZES)
@pytest.mark.parametrize("src_size", SIZES)
def test_wire_frames_across_tp_sizes(src_size: int, dst_size: int) -> None:
    src_full, dst_full = _full(3), _full(4)
    src, dst = _shard(src_full, src_size), _shard(dst_full, dst_size)
    for layer in range(LAYERS):
        for kv in (0, 1):
            frame = gather_heads(src, layer, kv, SRC_IDS, HEADS)
            assert frame.shape == (len(SRC_IDS), HEADS, BLOCK_SIZE, HEAD_DIM)  # the TP=1 wire format
            scatter_heads(frame, dst, layer, kv, DST_IDS, HEADS)
    want = _shard(_expected(src_full, dst_full, slice(None)), dst_size)
    for pool, expected in zip(dst, want, strict=True):
        np.testing.assert_array_equal(pool, expected)


def test_one_rank_frames_are_views_of_the_pool_for_consecutive_blocks() -> None:
    pool = _full(5)
    frame = gather_heads([pool], 0, 1, [2, 3, 4], HEADS)
    assert np.shares_memory(frame, pool)
