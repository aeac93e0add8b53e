"""Paged attention over a block-table KV cache (reference ops in Paddle; CPU and GPU).

Cache layout per layer: ``[num_blocks, num_kv_heads, block_size, head_dim]``; a token's slot is
``block_id * block_size + offset`` (docs/architecture.md).

How a step reads the cache without transposing it (PADDLE_CPU.md: a transpose of a gathered cache
costs milliseconds on CPU; measured here too: an element-wise op that broadcasts over leading or
middle axes is ~20x slower than the same op on equal shapes):

- The cache is viewed as rows ``[num_blocks * num_kv_heads, block_size * head_dim]``: row
  ``block * Hkv + head`` is one head's keys of one block, contiguous. One ``index_select`` with rows
  ordered (sequence, head, block) yields ``[S, Hkv, nblocks * block_size, head_dim]`` directly: the
  contiguous-cache layout, so attention is then matmul + mask + softmax + matmul, as for a dense cache.
- Queries are gathered the same way (rows of ``[T * Hkv, G * D]`` in (sequence, head, token) order),
  and outputs are put back in token order with one more row gather.
- Sequences are batched by equal query length (decode steps, speculative verification), so queries
  are never padded; keys are padded to the group's longest context and masked.
- Everything that depends only on the step (gather indices, the additive causal mask at full shape)
  is planned once per step and shared by all layers (``AttentionMetadata._plan_for``).

Batch independence: a sequence's output does not depend on the other sequences in its batch except
through float rounding. Padded key positions (beyond its context, or block id 0 from the padded
block table) get ``-inf`` scores, hence exact-zero weights; only the order in which the softmax and
the weighted sum add the (unchanged) terms can differ with the group's padded width. This relies on
the cache holding finite values everywhere (a zero-initialised pool does): ``0 * nan`` is ``nan``.

On CPU with pdserve's ops loaded, models call ``write_and_attend_cpu`` instead: the KV write and the
attention in one C++ op (kernels/csrc/layer_ops.cc) that reads the cache through the block table,
so none of the planning above runs and no padding enters a row's sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import paddle
from paddle import _C_ops


@dataclass(frozen=True)
class _HeadLayout:
    """The cache geometry a plan is built for."""

    num_heads: int
    num_kv_heads: int
    block_size: int

    @property
    def heads_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class _GroupPlan:
    """Sequences attended together: all have the same query length."""

    num_seqs: int
    query_len: int
    padded_len: int  # keys per sequence after padding to whole blocks of the longest context
    query_rows: paddle.Tensor | None  # [S*Hkv*L] rows of q as [T*Hkv, G*D]; None: rows in order
    cache_rows: paddle.Tensor  # [S*Hkv*nblocks] rows of the cache as [num_blocks*Hkv, bs*D]
    # [S, Hkv, L*G, padded_len] float32: 0 where visible, -inf elsewhere. Full shape (as large as the
    # scores) because a broadcasting add is far slower; built once per step, shared by all layers.
    mask: paddle.Tensor


@dataclass(frozen=True)
class _StepPlan:
    """Everything one step's attention needs beyond the tensors, for one cache geometry."""

    groups: list[_GroupPlan]
    # Rows of the groups' concatenated outputs ([*, G*D]) in token order ([T*Hkv]); None: in order.
    output_rows: paddle.Tensor | None


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step attention inputs, built once by the model runner and shared by every layer."""

    slot_mapping: paddle.Tensor  # [T] int64: slot where each new token's K/V is written
    block_tables: paddle.Tensor  # [S, max_blocks] int64: each sequence's blocks, padded with 0
    query_lens: list[int]  # S: new tokens of each sequence, tokens grouped by sequence in order
    context_lens: list[int]  # S: tokens in the cache for each sequence after this step's writes
    seq_lens: paddle.Tensor  # [S, 2] int64: (query_len, context_len) rows, for the CPU op
    # Per-step plans keyed by cache geometry: built by the first layer, reused by the others. The
    # dict is the one mutable part of this object and holds only values derived from the fields.
    _plans: dict[_HeadLayout, _StepPlan] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        num_seqs = len(self.query_lens)
        if len(self.context_lens) != num_seqs or num_seqs == 0:
            raise ValueError(
                f"query_lens ({num_seqs}) and context_lens ({len(self.context_lens)}) must be equal, > 0"
            )
        for q_len, ctx_len in zip(self.query_lens, self.context_lens, strict=True):
            if not 1 <= q_len <= ctx_len:
                raise ValueError(f"need 1 <= query_len <= context_len, got {q_len}, {ctx_len}")
        if list(self.slot_mapping.shape) != [sum(self.query_lens)]:
            raise ValueError(f"slot_mapping shape {self.slot_mapping.shape} != [{sum(self.query_lens)}]")
        if len(self.block_tables.shape) != 2 or self.block_tables.shape[0] != num_seqs:
            raise ValueError(f"block_tables shape {self.block_tables.shape} != [{num_seqs}, max_blocks]")

    @classmethod
    def build(
        cls,
        block_tables: Sequence[Sequence[int]],
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_size: int,
    ) -> AttentionMetadata:
        """Metadata from per-sequence block lists; computes slot_mapping and pads block_tables."""
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        if not len(block_tables) == len(query_lens) == len(context_lens):
            raise ValueError("block_tables, query_lens and context_lens need one entry per sequence")
        slots: list[int] = []
        for table, q_len, ctx_len in zip(block_tables, query_lens, context_lens, strict=True):
            if len(table) * block_size < ctx_len:
                raise ValueError(f"{len(table)} blocks of {block_size} cannot hold {ctx_len} tokens")
            for pos in range(ctx_len - q_len, ctx_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        max_blocks = max(1, *(len(table) for table in block_tables))
        padded = np.zeros((len(block_tables), max_blocks), dtype=np.int64)
        for row, table in enumerate(block_tables):
            padded[row, : len(table)] = table
        return cls(
            slot_mapping=paddle.to_tensor(np.asarray(slots, dtype=np.int64)),
            block_tables=paddle.to_tensor(padded),
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            seq_lens=paddle.to_tensor(np.asarray([query_lens, context_lens], dtype=np.int64).T.copy()),
        )

    def _plan_for(self, layout: _HeadLayout) -> _StepPlan:
        plan = self._plans.get(layout)
        if plan is None:
            plan = _make_step_plan(self.query_lens, self.context_lens, self.block_tables.numpy(), layout)
            self._plans[layout] = plan
        return plan


def write_kv(
    k: paddle.Tensor,
    v: paddle.Tensor,
    k_cache: paddle.Tensor,
    v_cache: paddle.Tensor,
    slot_mapping: paddle.Tensor,
) -> None:
    """Write new tokens' K/V ([T, Hkv, D]) into their slots, in place in the given cache tensors.

    Written with advanced-index assignment (``cache[block, :, offset] = k``), which lands in the
    tensor's own buffer, so caches that view shared memory (``paddle.from_dlpack``) receive it.
    Slots must be distinct within one call.
    """
    block_size = k_cache.shape[2]
    block_ids = slot_mapping // block_size
    offsets = slot_mapping % block_size
    # cache[block_ids, :, offsets] has shape [T, Hkv, D]: the advanced axes come first.
    k_cache[block_ids, :, offsets] = k.astype(k_cache.dtype) if k.dtype != k_cache.dtype else k
    v_cache[block_ids, :, offsets] = v.astype(v_cache.dtype) if v.dtype != v_cache.dtype else v


def paged_attention(
    q: paddle.Tensor,
    k_cache: paddle.Tensor,
    v_cache: paddle.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> paddle.Tensor:
    """Causal GQA attention of q [T, Hq, D] over the paged cache; returns [T, Hq, D]."""
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, num_kv_heads, block_size, _ = k_cache.shape
    plan = meta._plan_for(_HeadLayout(num_heads, num_kv_heads, block_size))
    heads_per_kv = num_heads // num_kv_heads
    # Row views: q [T*Hkv, G*D], caches [num_blocks*Hkv, bs*D] (reshapes of contiguous tensors).
    q_rows = q.reshape([num_tokens * num_kv_heads, heads_per_kv * head_dim])
    k_rows = k_cache.reshape([num_blocks * num_kv_heads, block_size * head_dim])
    v_rows = v_cache.reshape([num_blocks * num_kv_heads, block_size * head_dim])
    outputs = [
        _attend_group(q_rows, k_rows, v_rows, group, num_kv_heads, head_dim, scale) for group in plan.groups
    ]
    out = outputs[0] if len(outputs) == 1 else paddle.concat(outputs, axis=0)
    if plan.output_rows is not None:
        out = paddle.index_select(out, plan.output_rows, axis=0)
    return out.reshape([num_tokens, num_heads, head_dim])


def write_and_attend_cpu(
    q: paddle.Tensor,
    k: paddle.Tensor,
    v: paddle.Tensor,
    k_cache: paddle.Tensor,
    v_cache: paddle.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> paddle.Tensor:
    """``write_kv`` then ``paged_attention`` in one call of pdserve's CPU op (float32 tensors;
    kernels/csrc/layer_ops.cc). It reads the cache through the block table directly: no gathers, no
    mask, no padding, and each query row sums its own visible keys in a fixed order, so its output
    does not depend on the rest of the batch even in rounding."""
    return _C_ops._run_custom_op(
        "pdserve_paged_attention",
        q, k, v, k_cache, v_cache, meta.slot_mapping, meta.block_tables, meta.seq_lens, float(scale),
    )[0]


def _attend_group(
    q_rows: paddle.Tensor,
    k_rows: paddle.Tensor,
    v_rows: paddle.Tensor,
    group: _GroupPlan,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
) -> paddle.Tensor:
    """Attention of one group as in a contiguous cache; returns rows [S*Hkv*L, G*D]."""
    num_seqs, q_len, padded_len = group.num_seqs, group.query_len, group.padded_len
    queries = q_rows if group.query_rows is None else paddle.index_select(q_rows, group.query_rows, axis=0)
    queries = paddle.scale(queries.reshape([num_seqs, num_kv_heads, -1, head_dim]), scale)  # [S,Hkv,L*G,D]
    keys = paddle.index_select(k_rows, group.cache_rows, axis=0)
    keys = keys.reshape([num_seqs, num_kv_heads, padded_len, head_dim])  # [S, Hkv, P, D]
    values = paddle.index_select(v_rows, group.cache_rows, axis=0)
    values = values.reshape([num_seqs, num_kv_heads, padded_len, head_dim])
    if keys.dtype != queries.dtype:  # a reduced-precision cache is read in the queries' precision
        keys, values = keys.astype(queries.dtype), values.astype(queries.dtype)
    mask = group.mask if group.mask.dtype == queries.dtype else group.mask.astype(queries.dtype)
    scores = paddle.matmul(queries, keys, transpose_y=True) + mask  # [S, Hkv, L*G, P]
    out = paddle.matmul(paddle.nn.functional.softmax(scores, axis=-1), values)  # [S, Hkv, L*G, D]
    return out.reshape([num_seqs * num_kv_heads * q_len, -1])


def _make_step_plan(
    query_lens: list[int], context_lens: list[int], block_tables: np.ndarray, layout: _HeadLayout
) -> _StepPlan:
    """Group sequences by query length and precompute each group's gather rows and mask."""
    starts = np.cumsum([0, *query_lens[:-1]])
    by_query_len: dict[int, list[int]] = {}
    for seq_id, q_len in enumerate(query_lens):
        by_query_len.setdefault(q_len, []).append(seq_id)
    groups: list[_GroupPlan] = []
    query_rows: list[np.ndarray] = []
    for q_len, seq_ids in by_query_len.items():
        rows = _query_rows(starts[seq_ids], q_len, layout.num_kv_heads)
        query_rows.append(rows)
        rows_in_order = len(by_query_len) == 1 and q_len == 1  # one decode group: rows (s, head)
        groups.append(
            _make_group_plan(q_len, seq_ids, context_lens, block_tables, layout, rows, rows_in_order)
        )
    # A group's output row (s, head, j) belongs to token starts[s] + j, head: its query row.
    order = np.concatenate(query_rows)
    in_order = bool(np.array_equal(order, np.arange(order.size)))
    output_rows = None if in_order else paddle.to_tensor(np.argsort(order))
    return _StepPlan(groups=groups, output_rows=output_rows)


def _query_rows(starts: np.ndarray, query_len: int, num_kv_heads: int) -> np.ndarray:
    """Rows of q as [T*Hkv, G*D] in (sequence, kv head, query token) order."""
    tokens = starts[:, None, None] + np.arange(query_len)[None, None, :]
    return (tokens * num_kv_heads + np.arange(num_kv_heads)[None, :, None]).reshape(-1).astype(np.int64)


def _make_group_plan(
    query_len: int,
    seq_ids: list[int],
    context_lens: list[int],
    block_tables: np.ndarray,
    layout: _HeadLayout,
    query_rows: np.ndarray,
    query_rows_in_order: bool,
) -> _GroupPlan:
    """Gather rows and the causal mask for sequences sharing one query length."""
    num_kv_heads, block_size = layout.num_kv_heads, layout.block_size
    ctx_lens = np.asarray([context_lens[s] for s in seq_ids], dtype=np.int64)
    num_blocks = math.ceil(int(ctx_lens.max()) / block_size)
    if block_tables.shape[1] < num_blocks:
        raise ValueError(f"block_tables has {block_tables.shape[1]} columns, context needs {num_blocks}")
    tables = block_tables[seq_ids, :num_blocks]  # [S, nblocks]
    cache_rows = tables[:, None, :] * num_kv_heads + np.arange(num_kv_heads)[None, :, None]
    padded_len = num_blocks * block_size
    # Query j of a sequence sits at context_len - query_len + j and sees keys 0 .. that position.
    query_pos = ctx_lens[:, None] - query_len + np.arange(query_len)[None, :]  # [S, L]
    visible = np.arange(padded_len)[None, None, :] <= query_pos[:, :, None]  # [S, L, P]
    mask = np.where(visible, np.float32(0.0), np.float32(-np.inf))[:, None, :, None, :]
    mask_shape = (len(seq_ids), num_kv_heads, query_len, layout.heads_per_kv, padded_len)
    full_mask = np.ascontiguousarray(np.broadcast_to(mask, mask_shape))
    return _GroupPlan(
        num_seqs=len(seq_ids),
        query_len=query_len,
        padded_len=padded_len,
        query_rows=None if query_rows_in_order else paddle.to_tensor(query_rows),
        cache_rows=paddle.to_tensor(cache_rows.reshape(-1).astype(np.int64)),
        mask=paddle.to_tensor(full_mask.reshape(len(seq_ids), num_kv_heads, -1, padded_len)),
    )
