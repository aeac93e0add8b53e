"""Router selection policies, admission control, configs and the embedded registry (no sockets)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from pdserve.router.admission import Admission, Demand, Overloaded, TooLarge
from pdserve.router.config import (
    AdmissionConfig,
    HealthConfig,
    PolicyConfig,
    RegistryConfig,
    RouterConfig,
    RouterConfigError,
)
from pdserve.router.http_util import keys_match
from pdserve.router.policies import (
    PowerOfTwo,
    PrefixAware,
    RandomChoice,
    RoundRobin,
    RouteContext,
    build_policy,
)
from pdserve.router.registry import EmbeddedRegistry
from pdserve.rpc.registry import NodeInfo, NodeInfoError, RegistryAuth, decode_node, encode_node


def _nodes(n: int, role: str = "prefill") -> list[NodeInfo]:
    return [NodeInfo(node_id=f"n{i}", role=role, model="m", grpc_address=f"127.0.0.1:{1000 + i}")  # type: ignore[arg-type]
            for i in range(n)]


def _ctx(prompt: list[int], loads: dict[str, float] | None = None) -> RouteContext:
    return RouteContext(prompt, lambda node: (loads or {}).get(node.node_id, 0.0))


# ---- policies
def test_round_robin_cycles_through_every_node_in_order() -> None:
    nodes = _nodes(3)
    policy = RoundRobin(PolicyConfig())
    picks = [policy.choose(nodes, _ctx([1])).node_id for _ in range(7)]
    assert picks == ["n0", "n1", "n2", "n0", "n1", "n2", "n0"]


def test_random_is_seeded_and_covers_all_nodes() -> None:
    nodes = _nodes(4)
    a = [RandomChoice(PolicyConfig(), seed=7).choose(nodes, _ctx([1])).node_id for _ in range(1)]
    b = [RandomChoice(PolicyConfig(), seed=7).choose(nodes, _ctx([1])).node_id for _ in range(1)]
    assert a == b
    policy = RandomChoice(PolicyConfig(), seed=1)
    assert {policy.choose(nodes, _ctx([1])).node_id for _ in range(200)} == {"n0", "n1", "n2", "n3"}


def test_power_of_two_never_picks_the_more_loaded_of_two() -> None:
    nodes = _nodes(2)
    policy = PowerOfTwo(PolicyConfig(), seed=3)
    picks = {policy.choose(nodes, _ctx([1], {"n0": 5.0, "n1": 0.5})).node_id for _ in range(50)}
    assert picks == {"n1"}


def test_power_of_two_avoids_the_most_loaded_of_many() -> None:
    nodes = _nodes(4)
    policy = PowerOfTwo(PolicyConfig(), seed=3)
    picks = Counter(policy.choose(nodes, _ctx([1], {"n0": 0.0, "n1": 1.0, "n2": 2.0, "n3": 3.0})).node_id
                    for _ in range(400))
    assert picks["n3"] == 0  # it loses every pair it is sampled into
    assert picks["n0"] > picks["n1"] > picks["n2"]


def test_prefix_aware_sends_a_shared_long_prefix_to_one_node() -> None:
    nodes = _nodes(4)
    policy = PrefixAware(PolicyConfig(prefix_tokens=64, block_size=16))
    shared = list(range(100, 164))  # 64 tokens = 4 blocks
    picks = {policy.choose(nodes, _ctx(shared + [i] * (i + 1))).node_id for i in range(30)}
    assert len(picks) == 1


def test_prefix_aware_only_hashes_whole_blocks() -> None:
    policy = PrefixAware(PolicyConfig(prefix_tokens=64, block_size=16))
    base = list(range(40))  # 2 whole blocks + 8 tokens
    assert policy.prefix_key(base) == policy.prefix_key(base[:32] + [9999] * 8)
    assert policy.prefix_key(base) != policy.prefix_key([7] + base[1:])
    assert policy.prefix_key(list(range(15))) is None  # shorter than a block


def test_prefix_aware_spreads_distinct_prefixes_and_moves_only_a_leaving_nodes_share() -> None:
    nodes = _nodes(4)
    policy = PrefixAware(PolicyConfig(prefix_tokens=32, block_size=16))
    prompts = [[p] * 32 for p in range(400)]
    before = {i: policy.choose(nodes, _ctx(p)).node_id for i, p in enumerate(prompts)}
    counts = Counter(before.values())
    assert set(counts) == {"n0", "n1", "n2", "n3"} and min(counts.values()) > 50
    after = {i: policy.choose(nodes[:3], _ctx(p)).node_id for i, p in enumerate(prompts)}
    moved = [i for i in before if before[i] != after[i]]
    assert moved and all(before[i] == "n3" for i in moved)


def test_prefix_aware_short_prompt_falls_back_to_load() -> None:
    nodes = _nodes(2)
    policy = PrefixAware(PolicyConfig(prefix_tokens=32, block_size=16), seed=0)
    assert {policy.choose(nodes, _ctx([1, 2], {"n0": 9.0})).node_id for _ in range(20)} == {"n1"}


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        build_policy("fastest", PolicyConfig())


# ---- configs and node records
def test_config_errors_name_the_field() -> None:
    with pytest.raises(RouterConfigError, match="^max_inflight_requests"):
        AdmissionConfig(max_inflight_requests=0)
    with pytest.raises(RouterConfigError, match="^backend"):
        RegistryConfig(backend="etcd://x")
    with pytest.raises(RouterConfigError, match="^decode"):
        PolicyConfig(decode="fastest")
    with pytest.raises(RouterConfigError, match="^port"):
        RouterConfig(port=70000, insecure=True)
    with pytest.raises(RouterConfigError, match="^ping_interval_s .*what nodes accept"):
        HealthConfig(ping_interval_s=0.05)


def test_api_keys_never_show_in_repr_or_errors() -> None:
    config = RouterConfig(api_keys=("sk-secret-1",), insecure=True)
    assert "sk-secret-1" not in repr(config)
    with pytest.raises(RouterConfigError) as info:
        RouterConfig(api_keys=("sk-secret-2", ""), insecure=True)
    assert "sk-secret-2" not in str(info.value)


def test_keys_match_accepts_only_a_configured_key() -> None:
    keys = ("alpha-key", "beta-key")
    assert keys_match("beta-key", keys)
    assert not keys_match("beta-ke", keys)
    assert not keys_match("", keys)


def test_node_info_round_trips_and_rejects_bad_fields() -> None:
    node = _nodes(1)[0]
    assert decode_node(encode_node(node)) == node
    with pytest.raises(NodeInfoError, match="role"):
        decode_node(b'{"node_id":"a","role":"leader","model":"m","grpc_address":"h:1"}')
    with pytest.raises(NodeInfoError, match="capacity"):
        decode_node(b'{"node_id":"a","role":"mixed","model":"m","grpc_address":"h:1","capacity":0}')
    with pytest.raises(NodeInfoError, match="grpc_address"):
        decode_node(b'{"node_id":"a","role":"mixed","model":"m","grpc_address":"nohost"}')
    with pytest.raises(NodeInfoError, match="JSON"):
        decode_node(b"\x80not json")


def test_embedded_registry_expires_entries_not_renewed() -> None:
    async def scenario() -> None:
        registry = EmbeddedRegistry(ttl_s=0.3, auth=RegistryAuth(None))
        a, b = _nodes(2)
        await registry.upsert(a)
        await registry.upsert(b)
        assert [n.node_id for n in registry.snapshot()] == ["n0", "n1"]
        for _ in range(4):  # n0 keeps heartbeating, n1 stops
            await asyncio.sleep(0.1)
            await registry.upsert(a)
        assert [n.node_id for n in registry.snapshot()] == ["n0"]
        await registry.remove("n0")
        assert registry.snapshot() == []

    asyncio.run(scenario())


# ---- admission
def _admission(**kw: object) -> Admission:
    return Admission(AdmissionConfig(**{"queue_timeout_s": 1.0, **kw}))  # type: ignore[arg-type]


def _one(tokens: int) -> Demand:
    """One node request with a token budget of ``tokens`` (its KV charged the same)."""
    return Demand(slots=1, tokens=tokens, kv_tokens=tokens)


def test_admission_refuses_beyond_inflight_plus_queue_at_once() -> None:
    async def scenario() -> None:
        adm = _admission(max_inflight_requests=2, max_queued_requests=1)
        await adm.acquire(_one(1))
        await adm.acquire(_one(1))
        queued = asyncio.create_task(adm.acquire(_one(1)))
        await asyncio.sleep(0.01)
        assert adm.queued == 1
        t0 = time.perf_counter()
        with pytest.raises(Overloaded, match=r"1 queued \(limit 1\)"):
            await adm.acquire(_one(1))
        assert time.perf_counter() - t0 < 0.05  # refused without waiting
        adm.release(_one(1))
        await asyncio.wait_for(queued, 1.0)
        assert adm.inflight == 2 and adm.queued == 0

    asyncio.run(scenario())


def test_admission_token_budget_and_fifo_order() -> None:
    async def scenario() -> None:
        adm = _admission(max_inflight_tokens=100, max_queued_requests=4)
        await adm.acquire(_one(80))
        order: list[str] = []

        async def want(name: str, tokens: int) -> None:
            await adm.acquire(_one(tokens))
            order.append(name)

        big = asyncio.create_task(want("big", 60))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(want("small", 10))  # would fit now, but waits behind "big"
        await asyncio.sleep(0.01)
        assert order == []
        adm.release(_one(80))
        await asyncio.wait_for(asyncio.gather(big, small), 1.0)
        assert order == ["big", "small"]
        with pytest.raises(TooLarge, match="max_inflight_tokens"):
            await adm.acquire(_one(101))

    asyncio.run(scenario())


def test_admission_queue_timeout_is_overloaded_and_frees_the_queue() -> None:
    async def scenario() -> None:
        adm = Admission(AdmissionConfig(max_inflight_requests=1, max_queued_requests=1, queue_timeout_s=0.05))
        await adm.acquire(_one(1))
        with pytest.raises(Overloaded, match="queue_timeout_s"):
            await adm.acquire(_one(1))
        assert adm.queued == 0
        waiter = asyncio.create_task(adm.acquire(_one(1)))
        await asyncio.sleep(0.01)
        waiter.cancel()  # a client that went away while queued leaves no trace
        await asyncio.gather(waiter, return_exceptions=True)
        assert adm.queued == 0 and adm.inflight == 1

    asyncio.run(scenario())
