"""Decode-step attention timing: paged cache (kernels/attention.py) vs a contiguous [B, H, S, D] cache.

Run: ``OMP_NUM_THREADS=1 python bench/bench_attention.py`` (a script, not a test).

Shapes follow the demo model: 8 query heads, 4 KV heads, head_dim 32, block size 16, 6 layers,
hidden 256. Each row times one decode step (one new token per sequence, context ~256):

- ``attn per layer``: write the new K/V + attention of one layer; the step's AttentionMetadata and
  its plan are already built (they are shared by all layers). The contiguous side writes into a
  preallocated [B, Hkv, S_max, D] cache and runs matmul + softmax + matmul over it.
- ``attn step 6 layers``: a whole step's attention; the paged side also builds the metadata and
  its plan, once per step, as the model runner does.
- ``model-like 6 layers``: the same plus each layer's dense work (QKV/O projections, a SwiGLU MLP of
  intermediate 768) and the tied LM head (vocab 8192), so the ratio approximates a whole decode step
  of the demo model (norms, RoPE and sampling left out: the same work on both sides).

glibc malloc serves allocations above its mmap threshold (128 KiB until a larger block is freed)
with fresh pages each time; a gather of a batch's cache (MiBs at batch 32) then page-faults on every
call and runs ~15x slower. Any real process that loads weights has freed a large block and raised
the threshold; the bench does the same on purpose (``--cold-malloc`` skips it to show the effect).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import paddle

from pdserve.kernels.attention import AttentionMetadata, paged_attention, write_kv


@dataclass(frozen=True)
class BenchShape:
    batch: int
    context_len: int
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 32
    block_size: int = 16
    hidden: int = 256
    intermediate: int = 768
    vocab: int = 8192

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads or self.batch < 1 or self.context_len < 1:
            raise ValueError(f"bad bench shape {self}")


class DenseLayer:
    """Projections and MLP of one decoder layer: identical work on both sides of the comparison."""

    def __init__(self, shape: BenchShape) -> None:
        qkv_out = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
        self.qkv = paddle.randn([shape.hidden, qkv_out]) * 0.05
        self.o = paddle.randn([shape.num_heads * shape.head_dim, shape.hidden]) * 0.05
        self.gate_up = paddle.randn([shape.hidden, 2 * shape.intermediate]) * 0.05
        self.down = paddle.randn([shape.intermediate, shape.hidden]) * 0.05
        self.shape = shape

    def qkv_proj(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        s = self.shape
        q, k, v = paddle.split(
            paddle.matmul(x, self.qkv),
            [s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim],
            axis=-1,
        )
        return (
            q.reshape([-1, s.num_heads, s.head_dim]),
            k.reshape([-1, s.num_kv_heads, s.head_dim]),
            v.reshape([-1, s.num_kv_heads, s.head_dim]),
        )

    def finish(self, x: paddle.Tensor, attn: paddle.Tensor) -> paddle.Tensor:
        h = x + paddle.matmul(attn.reshape([x.shape[0], -1]), self.o)
        gate, up = paddle.chunk(paddle.matmul(h, self.gate_up), 2, axis=-1)
        return h + paddle.matmul(paddle.nn.functional.silu(gate) * up, self.down)


class DenseModel:
    """The demo model's dense work per decode step: its layers' projections and MLPs, the LM head."""

    def __init__(self, shape: BenchShape) -> None:
        self.layers = [DenseLayer(shape) for _ in range(shape.num_layers)]
        self.embedding = paddle.randn([shape.vocab, shape.hidden]) * 0.05  # tied LM head

    def lm_head(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(x, self.embedding, transpose_y=True)  # [B, vocab]


class PagedStep:
    """One decode step through the paged cache (blocks of each sequence shuffled in the pool)."""

    def __init__(self, shape: BenchShape, dense: DenseModel | None) -> None:
        self.shape, self.dense = shape, dense
        blocks_per_seq = -(-(shape.context_len + 1) // shape.block_size)
        num_blocks = shape.batch * blocks_per_seq + 1
        ids = np.random.default_rng(0).permutation(np.arange(1, num_blocks)).reshape(shape.batch, -1)
        self.block_tables = ids.tolist()
        cache_shape = [num_blocks, shape.num_kv_heads, shape.block_size, shape.head_dim]
        self.caches = [
            (paddle.randn(cache_shape), paddle.randn(cache_shape)) for _ in range(shape.num_layers)
        ]

    def metadata(self) -> AttentionMetadata:
        s = self.shape
        return AttentionMetadata.build(
            self.block_tables, [1] * s.batch, [s.context_len + 1] * s.batch, s.block_size
        )

    def __call__(
        self,
        x: paddle.Tensor,
        q: paddle.Tensor,
        k: paddle.Tensor,
        v: paddle.Tensor,
        meta: AttentionMetadata | None = None,
    ) -> None:
        s = self.shape
        meta = self.metadata() if meta is None else meta
        for layer, (k_cache, v_cache) in enumerate(self.caches):
            if self.dense is not None:
                q, k, v = self.dense.layers[layer].qkv_proj(x)
            write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            attn = paged_attention(q, k_cache, v_cache, meta, s.head_dim**-0.5)
            if self.dense is not None:
                x = self.dense.layers[layer].finish(x, attn)
        if self.dense is not None:
            self.dense.lm_head(x)


class ContiguousStep:
    """The baseline: a preallocated [B, Hkv, S_max, D] cache per layer, matmul + softmax."""

    def __init__(self, shape: BenchShape, dense: DenseModel | None) -> None:
        self.shape, self.dense = shape, dense
        cache_shape = [shape.batch, shape.num_kv_heads, shape.context_len + 1, shape.head_dim]
        self.caches = [
            (paddle.randn(cache_shape), paddle.randn(cache_shape)) for _ in range(shape.num_layers)
        ]

    def __call__(self, x: paddle.Tensor, q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor) -> None:
        s = self.shape
        group = s.num_heads // s.num_kv_heads
        for layer, (k_cache, v_cache) in enumerate(self.caches):
            if self.dense is not None:
                q, k, v = self.dense.layers[layer].qkv_proj(x)
            k_cache[:, :, s.context_len] = k  # the new token's slot, in place
            v_cache[:, :, s.context_len] = v
            q_heads = q.reshape([s.batch, s.num_kv_heads, group, s.head_dim])  # [B, Hkv, G, D]
            scores = paddle.matmul(q_heads * s.head_dim**-0.5, k_cache, transpose_y=True)
            attn = paddle.matmul(paddle.nn.functional.softmax(scores, axis=-1), v_cache)
            if self.dense is not None:
                x = self.dense.layers[layer].finish(x, attn)
        if self.dense is not None:
            self.dense.lm_head(x)


def paired_medians_ms(
    first: Callable[[], None], second: Callable[[], None], repeats: int
) -> tuple[float, float]:
    """Medians of both steps, timed alternately so that load from other processes hits both alike."""
    for _ in range(3):
        first()
        second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for step, samples in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            step()
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def bench_row(shape: BenchShape, with_dense: bool, reuse_meta: bool, repeats: int) -> tuple[float, float]:
    dense = DenseModel(shape) if with_dense else None
    x = paddle.randn([shape.batch, shape.hidden])
    q = paddle.randn([shape.batch, shape.num_heads, shape.head_dim])
    k = paddle.randn([shape.batch, shape.num_kv_heads, shape.head_dim])
    v = paddle.randn([shape.batch, shape.num_kv_heads, shape.head_dim])
    paged, contiguous = PagedStep(shape, dense), ContiguousStep(shape, dense)
    meta = paged.metadata() if reuse_meta else None
    return paired_medians_ms(lambda: paged(x, q, k, v, meta), lambda: contiguous(x, q, k, v), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--cold-malloc", action="store_true", help="skip raising the mmap threshold")
    args = parser.parse_args()
    if not args.cold_malloc:
        np.ones(2 << 20).sum()  # allocate and free 16 MiB: glibc raises its mmap threshold to that
    print(f"context {args.context_len}, medians of {args.repeats} steps, ms")
    print(f"{'case':<22}{'batch':>6}{'paged':>10}{'contiguous':>12}{'ratio':>8}")
    cases = [
        ("attn per layer", 1, False, True),
        ("attn step 6 layers", 6, False, False),
        ("model-like 6 layers", 6, True, False),
    ]
    for name, num_layers, with_dense, reuse_meta in cases:
        for batch in args.batches:
            shape = BenchShape(batch=batch, context_len=args.context_len, num_layers=num_layers)
            paged_ms, contiguous_ms = bench_row(shape, with_dense, reuse_meta, args.repeats)
            ratio = paged_ms / contiguous_ms
            print(f"{name:<22}{batch:>6}{paged_ms:>10.3f}{contiguous_ms:>12.3f}{ratio:>8.2f}")


if __name__ == "__main__":
    main()
