"""Moving KV blocks between nodes whose engines hold the KV heads in different tensor-parallel shards.

A node with TP size N keeps one pool per rank (`[layers, 2, blocks, heads of that rank, block_size,
head_dim]`, common/kv_cache.py), rank r holding the heads `kv_head_range(H, r, N)`. Between a node
with a ranks and one with b ranks, each sender rank's head range goes to the receiver ranks whose
ranges overlap it:

- same host (`copy_heads`): every (sender rank, receiver rank) pair with overlapping heads copies the
  overlap straight from one pool into the other, block run by block run (transfer/block_copy.py);
- across hosts (`gather_heads` / `scatter_heads`): a (layer, K/V) frame on the wire holds all H heads,
  as a TP=1 node's pool does, so the wire format does not depend on either side's TP size; the sender
  assembles it from its ranks' pools, the receiver cuts it into its ranks' pools.

With more ranks than KV heads several ranks hold the same head: a sender reads it from the first of
them, a receiver writes it into every one (they all attend with it). One rank with all heads is the
plain pool; these functions then reduce to the single-pool copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np

from pdserve.common.kv_cache import KVCachePool, KVCacheSpec, kv_head_range
from pdserve.transfer.block_copy import copy_blocks_runs, gather_blocks, scatter_blocks
from pdserve.transfer.prefault import Prefault


def head_ranges(num_kv_heads: int, size: int) -> list[tuple[int, int]]:
    """Every rank's `[start, stop)` of the KV heads, rank 0 first."""
    return [kv_head_range(num_kv_heads, rank, size) for rank in range(size)]


def _sources(ranges: Sequence[tuple[int, int]]) -> list[int]:
    """The ranks a sender reads: the first holder of each distinct head range, in head order."""
    first: dict[tuple[int, int], int] = {}
    for rank, head_range in enumerate(ranges):
        first.setdefault(head_range, rank)
    return sorted(first.values(), key=lambda rank: ranges[rank][0])


class KVRankPools:
    """A node's KV as its engine ranks hold it: one pool per rank, rank r holding the heads
    `kv_head_range(spec.num_kv_heads, r, len(pools))`. `spec` is the node's geometry with all heads
    (what peers compare and what travels on the wire); one pool with all heads is a node without
    tensor parallelism."""

    def __init__(self, pools: Sequence[KVCachePool], num_kv_heads: int) -> None:
        ranges = head_ranges(num_kv_heads, len(pools))
        for pool, (start, stop) in zip(pools, ranges, strict=True):
            if pool.spec.num_kv_heads != stop - start:
                raise ValueError(f"a rank pool with {pool.spec.num_kv_heads} KV heads where heads "
                                 f"[{start}, {stop}) belong")
        self.pools = list(pools)
        self.spec = msgspec.structs.replace(pools[0].spec, num_kv_heads=num_kv_heads)
        self.arrays = [pool.array for pool in pools]
        self._prefaults: list[Prefault] = []

    @classmethod
    def attach(cls, spec: KVCacheSpec, names: Sequence[str]) -> KVRankPools:
        """Map the shared pools `names` (rank 0 first) of a node whose all-heads geometry is `spec`."""
        pools: list[KVCachePool] = []
        try:
            for name, (start, stop) in zip(names, head_ranges(spec.num_kv_heads, len(names)), strict=True):
                rank_spec = msgspec.structs.replace(spec, num_kv_heads=stop - start)
                pools.append(KVCachePool.attach(rank_spec, name))
        except BaseException:
            for pool in pools:
                pool.unmap()
            raise
        return cls(pools, spec.num_kv_heads)

    @property
    def array(self) -> np.ndarray:
        """The one pool's array of a node without tensor parallelism."""
        if len(self.arrays) != 1:
            raise ValueError("a tensor-parallel node's KV is in several rank pools: use .arrays")
        return self.arrays[0]

    @property
    def shm_name(self) -> str | None:
        return self.pools[0].shm_name

    @property
    def rank_shm_names(self) -> list[str]:
        """The shared pools of ranks 1..N-1."""
        return [pool.shm_name for pool in self.pools[1:] if pool.shm_name is not None]

    def prefault(self) -> KVRankPools:
        """Fault every pool's pages into this mapping in the background (transfer/prefault.py)."""
        if not self._prefaults:
            self._prefaults = [Prefault(pool.array, pool.shm_name or "pool") for pool in self.pools]
        return self

    def unmap(self) -> None:
        self._stop_prefaults()
        self.arrays = []
        for pool in self.pools:
            pool.unmap()

    def close(self) -> None:
        self._stop_prefaults()
        self.arrays = []
        for pool in self.pools:
            pool.close()

    def _stop_prefaults(self) -> None:
        for prefault in self._prefaults:
            prefault.stop()
        self._prefaults = []


def rank_pools(pool: KVCachePool | KVRankPools) -> KVRankPools:
    """A node's pools as rank pools (one plain pool: one rank with all heads)."""
    return pool if isinstance(pool, KVRankPools) else KVRankPools([pool], pool.spec.num_kv_heads)


def copy_heads(src: Sequence[np.ndarray], src_ids: Sequence[int], dst: Sequence[np.ndarray],
               dst_ids: Sequence[int], layers: slice, num_kv_heads: int) -> None:
    """Same host: blocks `src_ids` of the sender's rank pools `src` into blocks `dst_ids` of the
    receiver's rank pools `dst`, for `layers`, each overlap of a sender's and a receiver's heads copied
    once per receiver rank."""
    if len(src) == 1 and len(dst) == 1:
        copy_blocks_runs(src[0], src_ids, dst[0], dst_ids, layers)
        return
    src_ranges, dst_ranges = head_ranges(num_kv_heads, len(src)), head_ranges(num_kv_heads, len(dst))
    for d, (d_start, d_stop) in zip(dst, dst_ranges, strict=True):
        for s_rank in _sources(src_ranges):
            s_start, s_stop = src_ranges[s_rank]
            start, stop = max(s_start, d_start), min(s_stop, d_stop)
            if start >= stop:
                continue
            s_heads = src[s_rank][:, :, :, start - s_start:stop - s_start]
            d_heads = d[:, :, :, start - d_start:stop - d_start]
            copy_blocks_runs(s_heads, src_ids, d_heads, dst_ids, layers)


def gather_heads(src: Sequence[np.ndarray], layer: int, kv: int, block_ids: Sequence[int],
                 num_kv_heads: int) -> np.ndarray:
    """One wire frame: blocks `block_ids` of one layer's K (kv=0) or V (kv=1), all heads,
    `[n, num_kv_heads, block_size, head_dim]`. With one rank, a view of its pool when the ids are
    consecutive (as gather_blocks); otherwise a new array."""
    if len(src) == 1:
        return gather_blocks(src[0][layer, kv], block_ids)
    ranges = head_ranges(num_kv_heads, len(src))
    parts = [gather_blocks(src[rank][layer, kv], block_ids) for rank in _sources(ranges)]
    return np.concatenate(parts, axis=1)


def scatter_heads(blocks: np.ndarray, dst: Sequence[np.ndarray], layer: int, kv: int,
                  block_ids: Sequence[int], num_kv_heads: int) -> None:
    """Write a wire frame `[n, num_kv_heads, block_size, head_dim]` into blocks `block_ids` of one
    layer's K or V in every receiver rank pool, each rank taking its heads."""
    if len(dst) == 1:
        scatter_blocks(blocks, dst[0][layer, kv], block_ids)
        return
    for pool, (start, stop) in zip(dst, head_ranges(num_kv_heads, len(dst)), strict=True):
        scatter_blocks(blocks[:, start:stop], pool[layer, kv], block_ids)
