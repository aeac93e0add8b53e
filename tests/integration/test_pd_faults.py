"""Blame and liveness with real nodes: kill -9 of one of two prefill nodes (behind the router) while it
prefills. Its decode peer notices the lost connection at once and fails the waiting requests with
CAUSE_PREFILL_PEER_UNREACHABLE; the router retries them on the same decode node with the other
prefill node, health-checks the blamed prefill node (dead: ejected) and never ejects the decode node.
Every request succeeds, none takes over 10 s. And kill -9 of a decode node while its prefill peer
works for it: the prefill node aborts those jobs and frees their blocks within 5 s.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pdserve.common.leftovers import pid_alive
from pdserve.common.leftovers import remove_leftovers as remove_dead_leftovers
from pdserve.router.config import HealthConfig, PolicyConfig, RetryConfig, RouterConfig
from pdserve.router.server import BackgroundRouter
from pdserve.tests.support.cluster import (
    Node,
    NodeSpec,
    generate,
    leftovers,
    sampling,
    start_nodes,
    stop_nodes,
    tokenizer,
    wait_until,
)

MODEL = "pdserve-demo"
CONCURRENT = 8
REQUEST_BOUND_S = 10.0
TEXT = ("def main(argv):\n    parser = argparse.ArgumentParser()\n    for name in sorted(os.listdir(path)):\n"
        "        if name.endswith('.py'):\n            print(name)\n    return 0\n\nclass Stack:\n")


def _router_config() -> RouterConfig:
    return RouterConfig(port=0, model_name=MODEL,
                        health=HealthConfig(interval_s=0.5, timeout_s=2.0, eject_after=2),
                        retry=RetryConfig(attempts=3, backoff_s=0.05, first_chunk_timeout_s=60.0),
                        policy=PolicyConfig(prefill="round_robin"))


class PDCluster:
    def __init__(self, router: BackgroundRouter, nodes: dict[str, Node]) -> None:
        self.router = router
        self.nodes = nodes

    def view(self) -> dict[str, dict]:
        nodes = httpx.get(self.router.url + "/internal/v1/nodes", timeout=5).json()["nodes"]
        return {n["node_id"]: n for n in nodes}

    def complete(self, prompt: str, max_tokens: int) -> tuple[int, float, str]:
        started = time.monotonic()
        response = httpx.post(self.router.url + "/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens})
        return response.status_code, time.monotonic() - started, response.text

    def metrics(self) -> str:
        return httpx.get(self.router.url + "/metrics", timeout=5).text


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[PDCluster]:
    with BackgroundRouter(_router_config()) as router:
        common = ("--registry", router.url, "--transport", "zmq")
        specs = [NodeSpec("p1", "prefill", (*common, "--max-num-batched-tokens", "64")),
                 NodeSpec("p2", "prefill", (*common, "--max-num-batched-tokens", "64")),
                 NodeSpec("d1", "decode", common)]
        nodes = start_nodes(specs, tmp_path)
        try:
            cluster = PDCluster(router, nodes)
            assert wait_until(lambda: len(cluster.view()) == 3, 30.0), cluster.view()
            yield cluster
        finally:
            _stop(nodes)


def _kill(node: Node) -> None:
    """kill -9 of the node: its server and its engine process."""
    node.expect_clean_exit = False
    for pid in (node.process.pid, node.engine_pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _stop(nodes: dict[str, Node]) -> None:
    for node in nodes.values():
        if not node.expect_clean_exit:  # killed (also by a test that then failed)
            _clean_after_kill(node)
    stop_nodes(nodes.values())


def _clean_after_kill(node: Node) -> None:
    """What a node starting on this host (or `pdserve up`) does about a killed node's pool and queue."""
    node.process.wait(timeout=10)
    assert wait_until(lambda: not pid_alive(node.engine_pid), 10.0)
    remove_dead_leftovers()
    assert not leftovers(node), leftovers(node)


def test_kill_of_a_prefill_node_is_retried_on_the_other_and_never_blames_the_decode_node(
        cluster: PDCluster) -> None:
    for i in range(2):  # round robin: the decode node has a connection to each prefill node
        status, _, body = cluster.complete(f"warm {i}", 4)
        assert status == 200, body
    p1, d1 = cluster.nodes["p1"], cluster.nodes["d1"]
    with ThreadPoolExecutor(CONCURRENT) as pool:
        futures = [pool.submit(cluster.complete, f"{i} {TEXT * 3}", 16) for i in range(CONCURRENT)]
        assert wait_until(lambda: (s := p1.stats()).running + s.waiting > 0, 20.0), "p1 never got work"
        killed = time.monotonic()
        _kill(p1)
        assert wait_until(lambda: p1.info["data"] in d1.stats().unreachable_peer_addresses, 5.0)
        detected_s = time.monotonic() - killed
        results = [f.result() for f in futures]
    failed = [(status, body) for status, _, body in results if status != 200]
    assert not failed, failed
    slowest = max(latency for _, latency, _ in results)
    assert slowest < REQUEST_BOUND_S, f"slowest request {slowest:.1f} s"
    view = cluster.view()
    assert view["d1"]["ejected"] is False
    assert view["p1"]["ejected"] is True  # the router's immediate check of the blamed node found it dead
    metrics = cluster.metrics()
    assert 'pdserve_router_failures_total{cause="prefill_peer_unreachable"}' in metrics  # the path ran
    assert "decode_node" not in "".join(line for line in metrics.splitlines() if "failures_total{" in line)
    assert wait_until(d1.all_blocks_free, 5.0), d1.stats()
    _clean_after_kill(p1)
    print(f"\nkill -9 of p1: decode node reported it unreachable {detected_s:.3f} s after the kill; "
          f"{len(results)} requests all ok, slowest {slowest:.2f} s")


def _idle(node: Node) -> bool:
    stats = node.stats()
    return stats.free_blocks == stats.total_blocks and stats.running + stats.waiting == 0


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[dict[str, Node]]:
    """One prefill and one decode node, KV over ZMQ, no router: the test drives the decode node."""
    specs = [NodeSpec("p1", "prefill", ("--transport", "zmq", "--max-num-batched-tokens", "32")),
             NodeSpec("d1", "decode", ())]
    nodes = start_nodes(specs, tmp_path)
    try:
        yield nodes
    finally:
        _stop(nodes)


def test_kill_of_a_decode_node_aborts_its_prefill_jobs_and_frees_their_blocks(pair: dict[str, Node]) -> None:
    p1, d1 = pair["p1"], pair["d1"]
    prompt = tokenizer().encode(TEXT * 6)
    assert generate(d1, "warm", prompt[:8], sampling(2), prefill=p1).finish_reason in ("stop", "length")
    with ThreadPoolExecutor(CONCURRENT) as pool:
        for i in range(CONCURRENT):  # the calls fail when d1 dies: only the prefill side matters here
            pool.submit(generate, d1, f"doomed-{i}", [3 + i, *prompt], sampling(4), p1, 30.0)
        assert wait_until(lambda: p1.stats().free_blocks < p1.stats().total_blocks, 20.0), "p1 never got work"
        killed = time.monotonic()
        _kill(d1)
        # p1's connection to d1 goes down: every job for it is aborted and its blocks freed
        assert wait_until(lambda: _idle(p1), 5.0), p1.stats()
        freed_s = time.monotonic() - killed
        assert wait_until(lambda: d1.info["data"] in p1.stats().unreachable_peer_addresses, 2.0)
    _clean_after_kill(d1)
    print(f"\nkill -9 of d1: its prefill peer aborted its jobs and freed their blocks {freed_s:.3f} s after")
