"""pdserve's CPU layer ops (kernels/csrc/layer_ops.cc) against the Paddle reference ops they replace."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import paddle
import pytest

from pdserve.kernels import cpu_ops
from pdserve.kernels.activation import silu_and_mul, silu_and_mul_cpu
from pdserve.kernels.attention import AttentionMetadata, paged_attention, write_and_attend_cpu, write_kv
from pdserve.kernels.linear import mtp_input_cpu, pack_weight, packed_matmul
from pdserve.kernels.norm import rms_norm, rms_norm_cpu
from pdserve.kernels.rope import apply_rope, split_qkv_rope_cpu
from pdserve.models.llama import MLP, Attention, RMSNorm
from pdserve.models.loader import default_model_dir, load_model

HEADS, KV_HEADS, DIM, BLOCK = 8, 4, 32, 4


@pytest.fixture(autouse=True, scope="module")
def _ops() -> None:
    assert cpu_ops.load()  # CI has AVX2: these tests must exercise the ops, never skip


def _tensor(rng: np.random.Generator, *shape: int) -> paddle.Tensor:
    return paddle.to_tensor(rng.standard_normal(shape).astype(np.float32))


def test_rms_norm_equals_the_reference_and_rows_do_not_see_each_other() -> None:
    rng = np.random.default_rng(0)
    x, weight = _tensor(rng, 9, 256), _tensor(rng, 256)
    got = rms_norm_cpu(x, weight, 1e-6).numpy()
    np.testing.assert_allclose(got, rms_norm(x, weight, 1e-6).numpy(), rtol=1e-6, atol=1e-6)
    assert np.array_equal(rms_norm_cpu(x[3:4], weight, 1e-6).numpy(), got[3:4])
    odd = _tensor(rng, 3, 37)  # a width with a partial chunk of 8
    np.testing.assert_allclose(rms_norm_cpu(odd, weight[:37], 1e-6).numpy(),
                               rms_norm(odd, weight[:37], 1e-6).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("width", [768, 37])
def test_silu_and_mul_equals_the_reference_and_rows_do_not_see_each_other(width: int) -> None:
    rng = np.random.default_rng(2)
    gate_up = rng.standard_normal((9, 2 * width)).astype(np.float32) * 6
    gate_up[0, :4] = [0.0, -0.0, 100.0, -100.0]  # sigmoid's ends and zero
    x = paddle.to_tensor(gate_up)
    got = silu_and_mul_cpu(x).numpy()
    g, u = gate_up[:, :width].astype(np.float64), gate_up[:, width:].astype(np.float64)
    exact = g / (1 + np.exp(-g)) * u
    np.testing.assert_allclose(got, exact, rtol=3e-6, atol=1e-6)
    np.testing.assert_allclose(got, silu_and_mul(x).numpy(), rtol=3e-6, atol=1e-6)
    assert np.array_equal(silu_and_mul_cpu(x[4:6]).numpy(), got[4:6])


@pytest.mark.parametrize("rows", [1, 6, 13])
def test_mtp_input_is_the_norm_projection_and_table_rows_one_by_one(rows: int) -> None:
    # The fused call must give the bits of the three steps it replaces (models/mtp.py's fallback).
    rng = np.random.default_rng(rows)
    hidden, weight = _tensor(rng, rows, 256), _tensor(rng, 256)
    packed = pack_weight(rng.standard_normal((256, 256)).astype(np.float32))
    table = _tensor(rng, 50, 256)
    ids = rng.integers(0, 50, rows).tolist()
    expected = packed_matmul(rms_norm_cpu(hidden, weight, 1e-6), packed).numpy()
    expected += table.numpy()[ids]
    assert np.array_equal(mtp_input_cpu(hidden, weight, packed, table, ids, 1e-6).numpy(), expected)


def test_mtp_input_rejects_bad_ids_instead_of_reading_out_of_bounds() -> None:
    rng = np.random.default_rng(0)
    hidden, weight, table = _tensor(rng, 2, 256), _tensor(rng, 256), _tensor(rng, 50, 256)
    packed = pack_weight(rng.standard_normal((256, 256)).astype(np.float32))
    with pytest.raises((OSError, ValueError), match="out of range"):
        mtp_input_cpu(hidden, weight, packed, table, [3, 50], 1e-6)
    with pytest.raises((OSError, ValueError), match="one token id per row"):
        mtp_input_cpu(hidden, weight, packed, table, [3], 1e-6)


def test_rope_split_equals_split_reshape_and_apply_rope() -> None:
    rng = np.random.default_rng(1)
    tokens = 7
    qkv = _tensor(rng, tokens, (HEADS + 2 * KV_HEADS) * DIM)
    cos, sin = _tensor(rng, tokens, DIM), _tensor(rng, tokens, DIM)
    q, k, v = split_qkv_rope_cpu(qkv, cos, sin, HEADS, KV_HEADS)
    q_ref, k_ref, v_ref = paddle.split(qkv, [HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], axis=-1)
    q_expected = apply_rope(q_ref.reshape([tokens, HEADS, DIM]), cos, sin).numpy()
    k_expected = apply_rope(k_ref.reshape([tokens, KV_HEADS, DIM]), cos, sin).numpy()
    np.testing.assert_allclose(q.numpy(), q_expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k.numpy(), k_expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(v.numpy(), v_ref.reshape([tokens, KV_HEADS, DIM]).numpy())


def _batch(rng: np.random.Generator, tables: list[list[int]], query_lens: list[int], context_lens: list[int],
           dim: int = DIM):
    tokens = sum(query_lens)
    meta = AttentionMetadata.build(tables, query_lens, context_lens, BLOCK)
    q = _tensor(rng, tokens, HEADS, dim)
    k, v = _tensor(rng, tokens, KV_HEADS, dim), _tensor(rng, tokens, KV_HEADS, dim)
    return meta, q, k, v


class BothPaths(NamedTuple):
    expected: np.ndarray  # the Paddle reference: write_kv, then paged_attention
    got: np.ndarray  # the op: write_and_attend_cpu
    initial: np.ndarray  # [2, blocks, Hkv, BLOCK, D]: the random K and V caches both started from
    ref_caches: tuple[paddle.Tensor, paddle.Tensor]  # the caches after each path's writes
    op_caches: tuple[paddle.Tensor, paddle.Tensor]


def _both_paths(rng: np.random.Generator, meta: AttentionMetadata, q: paddle.Tensor, k: paddle.Tensor,
                v: paddle.Tensor, num_blocks: int, scale: float) -> BothPaths:
    """The same batch over the same random caches through the reference ops and through the op."""
    initial = rng.standard_normal((2, num_blocks, KV_HEADS, BLOCK, q.shape[2])).astype(np.float32)
    ref_caches = paddle.to_tensor(initial[0]), paddle.to_tensor(initial[1])
    write_kv(k, v, *ref_caches, meta.slot_mapping)
    expected = paged_attention(q, *ref_caches, meta, scale).numpy()
    op_caches = paddle.to_tensor(initial[0]), paddle.to_tensor(initial[1])
    got = write_and_attend_cpu(q, k, v, *op_caches, meta, scale).numpy()
    return BothPaths(expected, got, initial, ref_caches, op_caches)


# A decode row, a 3-token verification, a fresh 5-token prefill and a prefill chunk after cached tokens.
MIXED = ([[3, 5, 7, 1], [2, 9, 11], [4, 6], [8, 10, 12]], [1, 3, 5, 4], [13, 9, 5, 12])


# The op works 8 head_dim lanes at a time: 32 fills them, 20 and 6 end in a masked partial chunk.
# A scale of 3 spreads the scores over ~100, so some weights fall below exp's clamp at -87; scores
# that large carry float32 rounding of ~4e-6 into exp, hence the looser tolerance there.
@pytest.mark.parametrize("dim, scale, rtol", [
    (32, DIM**-0.5, 1e-5), (20, 20**-0.5, 1e-5), (6, 6**-0.5, 1e-5), (32, 3.0, 1e-4),
])
def test_write_and_attend_equals_write_kv_then_paged_attention(dim: int, scale: float, rtol: float) -> None:
    rng = np.random.default_rng(2)
    meta, q, k, v = _batch(rng, *MIXED, dim=dim)
    both = _both_paths(rng, meta, q, k, v, 16, scale)
    np.testing.assert_allclose(both.got, both.expected, rtol=rtol, atol=rtol / 10)
    for op_cache, ref_cache in zip(both.op_caches, both.ref_caches, strict=True):
        assert np.array_equal(op_cache.numpy(), ref_cache.numpy())


def test_write_and_attend_over_a_long_context_equals_the_reference() -> None:
    """A 6-row verification after 145 cached tokens: many groups of four keys and of eight scores."""
    rng = np.random.default_rng(5)
    table = list(rng.permutation(48)[:38])
    meta, q, k, v = _batch(rng, [table], [6], [151])
    both = _both_paths(rng, meta, q, k, v, 48, DIM**-0.5)
    np.testing.assert_allclose(both.got, both.expected, rtol=1e-5, atol=1e-6)


def test_a_sequences_attention_is_the_same_bits_alone_or_in_a_batch() -> None:
    rng = np.random.default_rng(3)
    meta, q, k, v = _batch(rng, *MIXED)
    caches = rng.standard_normal((2, 16, KV_HEADS, BLOCK, DIM)).astype(np.float32)
    whole = write_and_attend_cpu(q, k, v, *map(paddle.to_tensor, caches), meta, 0.2).numpy()
    alone = AttentionMetadata.build([MIXED[0][1]], [3], [9], BLOCK)
    rows = slice(1, 4)  # the verification's 3 tokens
    part = write_and_attend_cpu(q[rows], k[rows], v[rows], *map(paddle.to_tensor, caches), alone, 0.2).numpy()
    assert np.array_equal(part, whole[rows])


def test_rows_that_share_key_loads_are_the_same_bits_alone() -> None:
    """A decode row, a 6-row verification and a 13-row prefill chunk (two tiles of 8 rows) in one call:
    the op scores two queries per key load and sums three per value load, across rows that see
    different numbers of keys and a head_dim of 20 (a masked partial chunk). Each sequence must equal
    the reference and be the same bits computed alone, and so must each row as a one-row sequence."""
    rng = np.random.default_rng(6)
    dim, scale = 20, 20**-0.5
    blocks = [int(b) for b in rng.permutation(40)]
    tables = [blocks[:10], blocks[10:19], blocks[19:27]]  # disjoint: no sequence writes another's keys
    query_lens, context_lens = [1, 6, 13], [37, 35, 29]
    meta, q, k, v = _batch(rng, tables, query_lens, context_lens, dim=dim)
    both = _both_paths(rng, meta, q, k, v, 40, scale)
    whole = both.got
    np.testing.assert_allclose(whole, both.expected, rtol=1e-5, atol=1e-6)
    start = 0
    for table, query_len, context_len in zip(tables, query_lens, context_lens, strict=True):
        rows = slice(start, start + query_len)
        alone = AttentionMetadata.build([table], [query_len], [context_len], BLOCK)
        caches = paddle.to_tensor(both.initial[0]), paddle.to_tensor(both.initial[1])
        got = write_and_attend_cpu(q[rows], k[rows], v[rows], *caches, alone, scale).numpy()
        assert np.array_equal(got, whole[rows])
        for j in range(query_len):  # over the caches the whole call filled: the keys before it are there
            row = slice(start + j, start + j + 1)
            one = AttentionMetadata.build([table], [1], [context_len - query_len + j + 1], BLOCK)
            got = write_and_attend_cpu(q[row], k[row], v[row], *both.op_caches, one, scale).numpy()
            assert np.array_equal(got, whole[row])
        start += query_len


def test_bad_metadata_raises_instead_of_reading_out_of_bounds() -> None:
    rng = np.random.default_rng(4)
    meta, q, k, v = _batch(rng, [[3, 99]], [2], [6])  # block 99 is past the 16-block cache
    caches = [paddle.zeros([16, KV_HEADS, BLOCK, DIM]) for _ in range(2)]
    with pytest.raises((OSError, ValueError), match="out of range"):
        write_and_attend_cpu(q, k, v, *caches, meta, 0.2)
    meta, q, k, v = _batch(rng, [[3, 5]], [2], [6])
    with pytest.raises((OSError, ValueError), match="one slot per token"):
        write_and_attend_cpu(q[:1], k[:1], v[:1], *caches, meta, 0.2)


def test_the_loader_puts_norms_and_attention_on_the_ops_and_logits_match_the_reference() -> None:
    fast = load_model(default_model_dir())
    reference = load_model(default_model_dir(), cpu_fast_path=False)
    def switched(model):
        layers = model.sublayers(include_self=True)
        return [m._cpu_op for m in layers if isinstance(m, (RMSNorm, Attention, MLP))]

    assert switched(fast) and all(switched(fast))
    assert not any(switched(reference))
    rng = np.random.default_rng(5)
    config = fast.config
    ids = paddle.to_tensor(rng.integers(1, config.vocab_size, 11).astype(np.int64))
    positions = paddle.to_tensor(np.arange(11, dtype=np.int64))
    outputs = []
    for model in (fast, reference):
        shape = [8, config.num_key_value_heads, BLOCK, config.head_dim]
        caches = [(paddle.zeros(shape), paddle.zeros(shape)) for _ in range(config.num_hidden_layers)]
        meta = AttentionMetadata.build([[1, 2, 3]], [11], [11], BLOCK)
        outputs.append(model.compute_logits(model(ids, positions, caches, meta)).numpy())
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
