"""Copying KV blocks between pools and wire buffers with as few numpy calls and passes as possible.

Pools are `[layers, 2, blocks, heads, block_size, head_dim]` arrays. Block ids of a request are
often consecutive (a fresh free list hands them out in order), so copies go by *runs*: maximal
stretches where source and destination ids both step by one, each copied as one slice assignment
across every layer at once. Numpy fancy indexing on both sides (`dst[ids] = src[ids]`) gathers into
a temporary first and so moves every byte twice; bench/bench_transfer.py measures the strategies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def block_runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs `(src_start, dst_start, length)` where both id lists step by one."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"src_ids and dst_ids differ in length ({len(src_ids)} vs {len(dst_ids)})")
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((int(s), int(d), 1))
    return runs


def copy_blocks_runs(src: np.ndarray, src_ids: Sequence[int], dst: np.ndarray, dst_ids: Sequence[int],
                     layers: slice) -> None:
    """Pool to pool: for `layers`, K and V of blocks `src_ids` of `src` into `dst_ids` of `dst`."""
    for s, d, n in block_runs(src_ids, dst_ids):
        dst[layers, :, d:d + n] = src[layers, :, s:s + n]


def copy_blocks_fancy(src: np.ndarray, src_ids: Sequence[int], dst: np.ndarray, dst_ids: Sequence[int],
                      layers: slice) -> None:
    """The fancy-index variant (one call per layer and K/V; gathers into a temporary). For the bench."""
    src_index, dst_index = np.asarray(src_ids), np.asarray(dst_ids)
    for layer in range(*layers.indices(src.shape[0])):
        for kv in (0, 1):
            dst[layer, kv, dst_index] = src[layer, kv, src_index]


def copy_blocks_per_block(src: np.ndarray, src_ids: Sequence[int], dst: np.ndarray, dst_ids: Sequence[int],
                          layers: slice) -> None:
    """One slice assignment per block, across all layers. For the bench."""
    for s, d in zip(src_ids, dst_ids, strict=True):
        dst[layers, :, d] = src[layers, :, s]


CopyFn = Callable[[np.ndarray, Sequence[int], np.ndarray, Sequence[int], slice], None]
COPY_STRATEGIES: dict[str, CopyFn] = {
    "runs": copy_blocks_runs,
    "fancy": copy_blocks_fancy,
    "per_block": copy_blocks_per_block,
}


def gather_blocks(layer_kv: np.ndarray, block_ids: Sequence[int]) -> np.ndarray:
    """Blocks `block_ids` of one layer's K or V `[blocks, ...]` as one contiguous array.

    A view (no copy) when the ids are consecutive, so the zmq sender can hand the pool's own memory
    to the socket; otherwise one gathering copy.
    """
    first = int(block_ids[0])
    if all(int(b) == first + i for i, b in enumerate(block_ids)):
        return layer_kv[first:first + len(block_ids)]
    return np.take(layer_kv, np.asarray(block_ids), axis=0)


def scatter_blocks(blocks: np.ndarray, layer_kv: np.ndarray, block_ids: Sequence[int]) -> None:
    """Write `blocks` `[n, ...]` into blocks `block_ids` of one layer's K or V, run by run."""
    for s, d, n in block_runs(range(len(block_ids)), block_ids):
        layer_kv[d:d + n] = blocks[s:s + n]
