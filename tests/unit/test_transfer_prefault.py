"""transfer/prefault.py on real /dev/shm pools: the whole mapping is faulted in (and the pool file
allocated), in the background, and stop() ends it before the pool is unmapped."""

from __future__ import annotations

import os

import pytest

from pdserve.common.kv_cache import SHM_DIR, KVCachePool, KVCacheSpec
from pdserve.transfer.head_shards import KVRankPools
from pdserve.transfer.prefault import Prefault

SPEC = KVCacheSpec(num_layers=2, num_blocks=256, block_size=16, num_kv_heads=4, head_dim=32, dtype="float32")


def allocated_bytes(pool: KVCachePool) -> int:
    return os.stat(SHM_DIR / pool.shm_name).st_blocks * 512


def test_a_peer_mapping_is_faulted_in_and_the_pool_file_allocated() -> None:
    owner = KVCachePool.create_shared(SPEC)
    try:
        assert allocated_bytes(owner) == 0  # a fresh pool file is sparse
        mapped = KVRankPools.attach(SPEC, [owner.shm_name]).prefault()
        prefault = mapped._prefaults[0]
        assert prefault.done.wait(30.0)
        assert prefault.faulted_all
        assert allocated_bytes(owner) == SPEC.total_bytes
        mapped.unmap()
        assert not mapped._prefaults
    finally:
        owner.close()


def test_stop_returns_after_at_most_one_slice() -> None:
    spec = KVCacheSpec(num_layers=8, num_blocks=4096, block_size=16, num_kv_heads=4, head_dim=32,
                       dtype="float32")  # 256 MiB
    owner = KVCachePool.create_shared(spec)
    try:
        prefault = Prefault(owner.array, slice_bytes=1 << 20)
        prefault.stop()
        assert prefault.done.is_set() and not prefault.faulted_all
        assert allocated_bytes(owner) < spec.total_bytes
    finally:
        owner.close()


def test_slice_must_be_whole_pages() -> None:
    owner = KVCachePool.create_shared(SPEC)
    try:
        with pytest.raises(ValueError, match="slice_bytes"):
            Prefault(owner.array, slice_bytes=1000)
    finally:
        owner.close()
