"""A partition between a prefill and a decode node on different hosts (network namespaces, KV over
ZMQ, nftables dropping every packet between the two addresses), with the router on the host.

Per partition/heal cycle it measures and bounds:
- detection: each node reports the other unreachable (NodeStats) within 3 s (the ZMTP heartbeat timeout
  is 1.25 s; the rest is room for a loaded host and this test's polling);
- in-flight failure: a request sent to the cut pair fails with CAUSE_PREFILL_PEER_UNREACHABLE within
  5 s (never the 120 s prefill timeout), and the prefill node frees what it held for the decode node;
- routing: requests through the router during the partition all succeed (via the other prefill
  node), none over 10 s;
- recovery: after the heal, the pair serves a request again within 5 s and the report clears.
The namespaces, bridge and rules are deleted however the test ends.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pdserve.router.config import HealthConfig, PolicyConfig, RetryConfig, RouterConfig
from pdserve.router.server import BackgroundRouter
from pdserve.rpc import node_pb2 as pb
from pdserve.tests.integration.netns import HostNetwork
from pdserve.tests.support.cluster import (
    Node,
    NodeSpec,
    generate,
    sampling,
    start_nodes,
    stop_nodes,
    wait_until,
)
from pdserve.tests.support.secret import TEST_SECRET

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")

MODEL = "pdserve-demo"
CYCLES = 3
DETECT_BOUND_S = 3.0
FAIL_BOUND_S = 5.0
RECOVER_BOUND_S = 5.0
REQUEST_BOUND_S = 10.0
TABLE = "pdserve_partition"


class Partition:
    """nftables rules in one host's namespace dropping all traffic to and from another address."""

    def __init__(self, net: HostNetwork, host: str, other: str) -> None:
        self._ns = net.namespaces[host]
        self._other = net.addresses[other]

    def cut(self) -> None:
        rules = (f"table inet {TABLE} {{\n"
                 f"  chain input {{ type filter hook input priority 0; ip saddr {self._other} drop; }}\n"
                 f"  chain output {{ type filter hook output priority 0; ip daddr {self._other} drop; }}\n"
                 "}\n")
        subprocess.run(["ip", "netns", "exec", self._ns, "nft", "-f", "-"], input=rules, text=True,
                       check=True, capture_output=True)

    def heal(self) -> None:
        subprocess.run(["ip", "netns", "exec", self._ns, "nft", "delete", "table", "inet", TABLE],
                       check=False, capture_output=True)


class Hosts:
    def __init__(self, net: HostNetwork, router: BackgroundRouter, nodes: dict[str, Node]) -> None:
        self.net, self.router, self.nodes = net, router, nodes

    def complete(self, prompt: str) -> tuple[int, float, str]:
        started = time.monotonic()
        response = httpx.post(self.router.url + "/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": prompt, "max_tokens": 8})
        return response.status_code, time.monotonic() - started, response.text

    def unreachable(self, node: str) -> list[str]:
        return list(self.nodes[node].stats().unreachable_peer_addresses)

    def view(self) -> list[dict]:
        return httpx.get(self.router.url + "/internal/v1/nodes", timeout=5).json()["nodes"]


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    if subprocess.run(["which", "nft"], capture_output=True).returncode != 0:
        pytest.fail("nftables is missing: deploy/setup.sh --test installs it")
    net = HostNetwork.create(["p1", "p2", "d1"])
    try:
        config = RouterConfig(host=net.prefix + "254", port=0, model_name=MODEL, cluster_secret=TEST_SECRET,
                              health=HealthConfig(interval_s=0.5, timeout_s=2.0, eject_after=2),
                              retry=RetryConfig(attempts=3, backoff_s=0.05, first_chunk_timeout_s=60.0),
                              policy=PolicyConfig(prefill="round_robin"))
        with BackgroundRouter(config) as router:
            specs = [NodeSpec(name, role, ("--host", net.addresses[name], "--registry", router.url,
                                           "--transport", "zmq"), netns=net.namespaces[name])
                     for name, role in (("p1", "prefill"), ("p2", "prefill"), ("d1", "decode"))]
            nodes = start_nodes(specs, tmp_path)
            try:
                yield Hosts(net, router, nodes)
            finally:
                stop_nodes(nodes.values())
    finally:
        net.close()
        assert not net.leftovers(), net.leftovers()


def _direct(hosts: Hosts, tag: str, timeout_s: float = 30.0) -> tuple[str, int, float]:
    """One request on d1 with p1 as its prefill node, bypassing the router: (finish, cause, seconds)."""
    started = time.monotonic()
    result = generate(hosts.nodes["d1"], f"{tag}-{time.monotonic_ns()}", [5, 6, 7, 8, 9, 10], sampling(4),
                      prefill=hosts.nodes["p1"], timeout_s=timeout_s)
    return result.finish_reason, result.chunks[-1].cause, time.monotonic() - started


def test_partition_between_prefill_and_decode_fails_fast_routes_around_and_heals(hosts: Hosts) -> None:
    partition = Partition(hosts.net, "d1", "p1")
    d1, p1 = hosts.nodes["d1"], hosts.nodes["p1"]
    assert wait_until(lambda: len(hosts.view()) == 3, 30)
    assert _direct(hosts, "warm")[0] in ("stop", "length")  # d1 holds a connection to p1
    detect, fail, recover, slowest = [], [], [], 0.0
    try:
        for cycle in range(CYCLES):
            partition.cut()
            cut_at = time.monotonic()
            finish, cause, fail_s = _direct(hosts, f"cut-{cycle}")  # in flight on the cut pair
            assert finish == "error" and cause == pb.CAUSE_PREFILL_PEER_UNREACHABLE, (finish, cause)
            assert fail_s < FAIL_BOUND_S, f"in-flight request failed after {fail_s:.1f} s"
            fail.append(fail_s)
            assert wait_until(lambda: p1.info["data"] in hosts.unreachable("d1")
                              and d1.info["data"] in hosts.unreachable("p1"), DETECT_BOUND_S + 1.0)
            detect.append(time.monotonic() - cut_at)
            with ThreadPoolExecutor(4) as pool:  # the router routes around the cut pair
                results = list(pool.map(hosts.complete, [f"cycle {cycle} request {i}" for i in range(8)]))
            assert all(status == 200 for status, _, _ in results), results
            slowest = max(slowest, *(latency for _, latency, _ in results))
            assert wait_until(lambda: p1.stats().free_blocks == p1.stats().total_blocks, FAIL_BOUND_S)
            partition.heal()
            healed_at = time.monotonic()
            while True:  # the pair serves again
                finish, _, _ = _direct(hosts, f"heal-{cycle}", timeout_s=RECOVER_BOUND_S)
                if finish in ("stop", "length"):
                    break
                assert time.monotonic() - healed_at < RECOVER_BOUND_S, "the pair did not serve again in time"
                time.sleep(0.1)
            recover.append(time.monotonic() - healed_at)
            assert wait_until(lambda: not hosts.unreachable("d1") and not hosts.unreachable("p1"),
                              RECOVER_BOUND_S)
            assert wait_until(lambda: not any(n["unreachable_peer_addresses"] for n in hosts.view()), 2.0)
    finally:
        partition.heal()
    assert slowest < REQUEST_BOUND_S, f"slowest routed request {slowest:.1f} s"
    assert max(detect) < DETECT_BOUND_S, detect
    assert max(recover) < RECOVER_BOUND_S, recover
    assert hosts.router and d1.all_blocks_free()
    print(f"\npartition d1<->p1 over {CYCLES} cycles (median): detected {statistics.median(detect):.2f} s, "
          f"in-flight failed {statistics.median(fail):.2f} s, pair serving after heal "
          f"{statistics.median(recover):.2f} s; routed requests all ok, slowest {slowest:.2f} s\n"
          f"  detected {[round(x, 2) for x in detect]}, failed {[round(x, 2) for x in fail]}, "
          f"recovered {[round(x, 2) for x in recover]}")
