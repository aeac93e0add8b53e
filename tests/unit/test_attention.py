"""Paged attention and write_kv against a float64 NumPy reference over contiguous K/V."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.kernels.attention import AttentionMetadata, paged_attention, write_kv


def reference_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, context_len: int, scale: float
) -> np.ndarray:
    """Causal GQA attention in float64; q [L, Hq, D] are the last L of context_len positions."""
    q_len, num_heads, _ = q.shape
    heads_per_kv = num_heads // k.shape[1]
    k = np.repeat(k[:context_len].astype(np.float64), heads_per_kv, axis=1)  # [ctx, Hq, D]
    v = np.repeat(v[:context_len].astype(np.float64), heads_per_kv, axis=1)
    scores = np.einsum("lhd,chd->hlc", q.astype(np.float64), k) * scale
    query_pos = context_len - q_len + np.arange(q_len)
    scores[:, np.arange(context_len)[None, :] > query_pos[:, None]] = -np.inf
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hlc,chd->lhd", weights, v)


class PagedScenario:
    """Random contiguous K/V per sequence, stored into a paged cache at random non-contiguous blocks."""

    def __init__(
        self,
        rng: np.random.Generator,
        query_lens: list[int],
        context_lens: list[int],
        block_size: int,
        num_kv_heads: int = 2,
        heads_per_kv: int = 3,
        head_dim: int = 8,
    ) -> None:
        self.query_lens, self.context_lens, self.block_size = query_lens, context_lens, block_size
        # Some tables hold spare blocks past the context (reserved for drafts), as the engine's do.
        blocks_held = [-(-c // block_size) + int(rng.integers(0, 3)) for c in context_lens]
        num_blocks = sum(blocks_held) + 3  # unreferenced blocks hold garbage that must never be read
        permuted = rng.permutation(num_blocks).tolist()
        self.block_tables = []
        for n in blocks_held:
            self.block_tables.append(permuted[:n])
            permuted = permuted[n:]
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        # Garbage (large values) everywhere a sequence's keys are not written.
        self.k_cache_np = (rng.standard_normal(shape) * 50).astype(np.float32)
        self.v_cache_np = (rng.standard_normal(shape) * 50).astype(np.float32)
        kv_shape = (num_kv_heads, head_dim)
        self.keys = [rng.standard_normal((c, *kv_shape)).astype(np.float32) for c in context_lens]
        self.values = [rng.standard_normal((c, *kv_shape)).astype(np.float32) for c in context_lens]
        q_shape = (num_kv_heads * heads_per_kv, head_dim)
        self.queries = [rng.standard_normal((n, *q_shape)).astype(np.float32) for n in query_lens]
        self.scale = head_dim**-0.5

    def write_history(self) -> None:
        """Place the tokens before each sequence's new queries directly (independent of write_kv)."""
        per_seq = zip(self.block_tables, self.keys, self.values, self.query_lens, strict=True)
        for table, keys, values, q_len in per_seq:
            for pos in range(keys.shape[0] - q_len):
                block, offset = table[pos // self.block_size], pos % self.block_size
                self.k_cache_np[block, :, offset] = keys[pos]
                self.v_cache_np[block, :, offset] = values[pos]

    def metadata(self) -> AttentionMetadata:
        return AttentionMetadata.build(self.block_tables, self.query_lens, self.context_lens, self.block_size)

    def new_kv(self) -> tuple[np.ndarray, np.ndarray]:
        new_k = np.concatenate([k[-n:] for k, n in zip(self.keys, self.query_lens, strict=True)])
        new_v = np.concatenate([v[-n:] for v, n in zip(self.values, self.query_lens, strict=True)])
        return new_k, new_v

    def expected(self) -> np.ndarray:
        parts = [
            reference_attention(q, k, v, c, self.scale)
            for q, k, v, c in zip(self.queries, self.keys, self.values, self.context_lens, strict=True)
        ]
        return np.concatenate(parts)

    def run(self) -> np.ndarray:
        """write_kv of the new tokens into numpy-backed caches, then paged_attention."""
        self.write_history()
        k_cache = paddle.from_dlpack(self.k_cache_np.__dlpack__())
        v_cache = paddle.from_dlpack(self.v_cache_np.__dlpack__())
        meta = self.metadata()
        new_k, new_v = self.new_kv()
        write_kv(paddle.to_tensor(new_k), paddle.to_tensor(new_v), k_cache, v_cache, meta.slot_mapping)
        q = paddle.to_tensor(np.concatenate(self.queries))
        return paged_attention(q, k_cache, v_cache, meta, self.scale).numpy()


MIXED_BATCHES = [
    # (query_lens, context_lens): decode, spec-verify q_len 3, prefill chunks mid-sequence, full prompts
    ([1, 1, 1], [5, 17, 40]),
    ([3, 3], [3, 20]),
    ([20, 1, 3, 7, 1], [45, 9, 33, 7, 64]),
    ([33, 18], [70, 18]),
    ([1, 6, 25, 6, 1, 2], [1, 30, 60, 6, 16, 2]),
]


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("query_lens,context_lens", MIXED_BATCHES)
def test_paged_attention_matches_reference(
    block_size: int, query_lens: list[int], context_lens: list[int]
) -> None:
    scenario = PagedScenario(np.random.default_rng(block_size * 100 + len(query_lens)), query_lens,
                             context_lens, block_size)
    np.testing.assert_allclose(scenario.run(), scenario.expected(), atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    block_size=st.sampled_from([1, 2, 4, 16]),
    num_kv_heads=st.integers(1, 3),
    heads_per_kv=st.integers(1, 4),
    head_dim=st.sampled_from([4, 8, 16]),
)
def test_paged_attention_matches_reference_random_shapes(
    data: st.DataObject, block_size: int, num_kv_heads: int, heads_per_kv: int, head_dim: int
) -> None:
    num_seqs = data.draw(st.integers(1, 5))
    context_lens = data.draw(st.lists(st.integers(1, 48), min_size=num_seqs, max_size=num_seqs))
    query_lens = [data.draw(st.integers(1, c)) for c in context_lens]
    scenario = PagedScenario(np.random.default_rng(data.draw(st.integers(0, 2**31))), query_lens,
                             context_lens, block_size, num_kv_heads, heads_per_kv, head_dim)
    np.testing.assert_allclose(scenario.run(), scenario.expected(), atol=1e-5, rtol=1e-5)


def test_output_of_a_sequence_does_not_depend_on_its_batch() -> None:
    scenario = PagedScenario(np.random.default_rng(7), [1, 1, 1], [3, 50, 21], block_size=4)
    batched = scenario.run()
    k_cache = paddle.from_dlpack(scenario.k_cache_np.__dlpack__())
    v_cache = paddle.from_dlpack(scenario.v_cache_np.__dlpack__())
    alone_meta = AttentionMetadata.build(scenario.block_tables[:1], [1], [3], 4)
    alone = paged_attention(paddle.to_tensor(scenario.queries[0]), k_cache, v_cache, alone_meta,
                            scenario.scale).numpy()
    np.testing.assert_allclose(batched[:1], alone, atol=1e-6, rtol=1e-6)


def test_one_metadata_serves_layers_of_different_head_layouts() -> None:
    # The per-step plan is cached in the metadata; a layer with another head layout must get its
    # own plan, not a stale one.
    query_lens, context_lens = [2, 1], [9, 30]
    wide = PagedScenario(np.random.default_rng(3), query_lens, context_lens, 4, 2, heads_per_kv=2)
    narrow = PagedScenario(np.random.default_rng(3), query_lens, context_lens, 4, 1, heads_per_kv=4)
    assert narrow.block_tables == wide.block_tables  # same seed: the same blocks for both layers
    for scenario in (wide, narrow):
        scenario.write_history()
    meta = wide.metadata()
    for scenario in (wide, narrow, wide):
        k_cache = paddle.to_tensor(scenario.k_cache_np)
        v_cache = paddle.to_tensor(scenario.v_cache_np)
        new_k, new_v = scenario.new_kv()
        write_kv(paddle.to_tensor(new_k), paddle.to_tensor(new_v), k_cache, v_cache, meta.slot_mapping)
        q = paddle.to_tensor(np.concatenate(scenario.queries))
        out = paged_attention(q, k_cache, v_cache, meta, scenario.scale).numpy()
        np.testing.assert_allclose(out, scenario.expected(), atol=1e-5, rtol=1e-5)


def test_write_kv_lands_in_numpy_buffer_at_slots() -> None:
    num_blocks, num_kv_heads, block_size, head_dim = 5, 2, 4, 3
    k_buffer = np.zeros((num_blocks, num_kv_heads, block_size, head_dim), dtype=np.float32)
    v_buffer = np.zeros_like(k_buffer)
    k_cache = paddle.from_dlpack(k_buffer.__dlpack__())
    v_cache = paddle.from_dlpack(v_buffer.__dlpack__())
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((3, num_kv_heads, head_dim)).astype(np.float32)
    slots = [4 * 3 + 2, 0, 4 * 4 + 3]  # (block 3, offset 2), (0, 0), (4, 3)
    slot_mapping = paddle.to_tensor(slots, dtype="int64")
    write_kv(paddle.to_tensor(k), paddle.to_tensor(v), k_cache, v_cache, slot_mapping)

    expected_k, expected_v = np.zeros_like(k_buffer), np.zeros_like(v_buffer)
    for token, (block, offset) in enumerate([(3, 2), (0, 0), (4, 3)]):
        expected_k[block, :, offset] = k[token]
        expected_v[block, :, offset] = v[token]
    np.testing.assert_array_equal(k_buffer, expected_k)
    np.testing.assert_array_equal(v_buffer, expected_v)


def test_build_computes_slot_mapping_and_pads_block_tables() -> None:
    meta = AttentionMetadata.build([[7, 2], [5]], query_lens=[3, 1], context_lens=[6, 2], block_size=4)
    # seq 0 positions 3, 4, 5 -> (block 7, off 3), (block 2, off 0), (block 2, off 1); seq 1 pos 1.
    assert meta.slot_mapping.numpy().tolist() == [7 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 5 * 4 + 1]
    assert meta.block_tables.numpy().tolist() == [[7, 2], [5, 0]]


@pytest.mark.parametrize(
    "query_lens,context_lens,tables",
    [([2], [1], [[0]]), ([0], [3], [[0]]), ([1, 1], [2], [[0], [1]]), ([1], [9], [[0, 1]])],
)
def test_build_rejects_inconsistent_lengths(
    query_lens: list[int], context_lens: list[int], tables: list[list[int]]
) -> None:
    with pytest.raises(ValueError):
        AttentionMetadata.build(tables, query_lens, context_lens, block_size=4)
