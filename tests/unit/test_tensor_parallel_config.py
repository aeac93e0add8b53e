"""Tensor-parallel sharding arithmetic and the refusals that come before any rank starts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.engine.engine import kv_spec_for_model
from pdserve.models.config import ModelConfig
from pdserve.models.loader import default_model_dir
from pdserve.models.tensor_parallel import (
    ShardingError,
    TensorParallel,
    attention_shard,
    check_shardable,
    intermediate_shard,
)
from pdserve.node.engine_client import EngineClient, EngineClientConfig, EngineError

DEMO = ModelConfig.from_dir(default_model_dir())  # 8 heads, 4 KV heads, intermediate 768


def test_heads_split_evenly_and_kv_heads_follow() -> None:
    shards = [attention_shard(DEMO, TensorParallel(r, 2)) for r in range(2)]
    assert [(s.num_heads, s.num_kv_heads, s.q_start, s.kv_start) for s in shards] == [(4, 2, 0, 0),
                                                                                      (4, 2, 4, 2)]
    assert [intermediate_shard(DEMO, TensorParallel(r, 2)) for r in range(2)] == [(0, 384), (384, 384)]


def test_more_ranks_than_kv_heads_replicate_each_kv_head_over_consecutive_ranks() -> None:
    shards = [attention_shard(DEMO, TensorParallel(r, 8)) for r in range(8)]
    assert [s.num_heads for s in shards] == [1] * 8
    assert [s.num_kv_heads for s in shards] == [1] * 8
    assert [s.kv_start for s in shards] == [0, 0, 1, 1, 2, 2, 3, 3]
    # a query head always reads the KV head it reads in the unsharded model (8 / 4 = 2 per group)
    assert all(s.kv_start == s.q_start // 2 for s in shards)


def test_one_rank_is_the_whole_model() -> None:
    shard = attention_shard(DEMO, TensorParallel())
    assert (shard.num_heads, shard.num_kv_heads) == (8, 4)
    assert kv_spec_for_model(DEMO, 8, 16).num_kv_heads == 4
    assert kv_spec_for_model(DEMO, 8, 16, tp=TensorParallel(1, 2)).num_kv_heads == 2


@pytest.mark.parametrize(("size", "why"), [(3, "attention heads"), (16, "attention heads")])
def test_sizes_that_do_not_divide_the_model_are_refused(size: int, why: str) -> None:
    with pytest.raises(ShardingError, match=why):
        check_shardable(DEMO, size)
    with pytest.raises(ShardingError, match="KV heads"):
        check_shardable(replace(DEMO, num_attention_heads=12, num_key_value_heads=3), 2)
    with pytest.raises(ShardingError, match="intermediate_size"):
        check_shardable(replace(DEMO, intermediate_size=769), 2)


@pytest.mark.parametrize(("rank", "size"), [(2, 2), (-1, 2), (0, 0)])
def test_a_rank_outside_its_group_is_refused(rank: int, size: int) -> None:
    with pytest.raises(ShardingError):
        TensorParallel(rank, size)


def test_the_client_refuses_an_unshardable_size_before_starting_a_process() -> None:
    config = EngineClientConfig(model_dir=str(default_model_dir()), engine=EngineConfig(cache=CacheConfig(8)),
                                tensor_parallel_size=3)
    client = EngineClient(config)
    with pytest.raises(EngineError, match="--tensor-parallel-size 3: 8 attention heads do not split over 3"):
        client.start()
    assert client.rank_pids == []


def test_every_role_takes_a_tensor_parallel_size_and_zero_is_refused() -> None:
    from pdserve.node.server import NodeConfig

    engine = EngineConfig(cache=CacheConfig(8))
    for role in ("prefill", "decode", "mixed"):
        NodeConfig(role=role, node_id="n", model_dir=str(default_model_dir()), engine=engine,
                   insecure=True, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        NodeConfig(role="decode", node_id="n", model_dir=str(default_model_dir()), engine=engine,
                   insecure=True, tensor_parallel_size=0)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        EngineClientConfig(model_dir=str(default_model_dir()), engine=engine, tensor_parallel_size=0)


def test_pdserve_up_gives_each_role_its_size() -> None:
    from pdserve.deploy.cluster import Cluster, ClusterSpec

    spec = ClusterSpec(prefill=1, decode=1, mixed=1, tensor_parallel_size=2, decode_tensor_parallel_size=1,
                       insecure=True)  # no generated secret to clean up
    def tp_flag(argv: list[str]) -> list[str]:
        i = argv.index("--tensor-parallel-size")
        return argv[i:i + 2]

    assert tp_flag(Cluster(spec).node_argv("mixed", 0)) == ["--tensor-parallel-size", "2"]
    assert tp_flag(Cluster(spec).node_argv("prefill", 0)) == ["--tensor-parallel-size", "2"]
    assert "--tensor-parallel-size" not in Cluster(spec).node_argv("decode", 0)
    assert "--tensor-parallel-size" not in Cluster(ClusterSpec(insecure=True)).node_argv("prefill", 0)
    with pytest.raises(ValueError, match="prefill tensor parallel size must be >= 1"):
        ClusterSpec(prefill_tensor_parallel_size=0)
