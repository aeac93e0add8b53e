"""The router's failure decision table (router/blame.py) against stub gRPC nodes: each cause a
decode node reports leads to the right retry, the right node blamed, and the right final answer."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest

from pdserve.router.config import HealthConfig, PolicyConfig, RetryConfig, RouterConfig
from pdserve.router.server import BackgroundRouter
from pdserve.rpc import node_pb2 as pb
from pdserve.tests.support.stub_node import StubNodeServer, register_with_router

MODEL = "pdserve-demo"
BODY = {"model": MODEL, "prompt": "def f(", "max_tokens": 4}


def _config(health_interval_s: float) -> RouterConfig:
    return RouterConfig(port=0, model_name=MODEL,
                        health=HealthConfig(interval_s=health_interval_s, timeout_s=2.0, eject_after=2),
                        retry=RetryConfig(attempts=3, backoff_s=0.01, first_chunk_timeout_s=5.0),
                        policy=PolicyConfig(decode="round_robin", prefill="round_robin"))


def _wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


class Cluster:
    """Two prefill and two decode stubs registered with a router."""

    def __init__(self, stack: ExitStack, health_interval_s: float) -> None:
        self.prefill = {n: stack.enter_context(StubNodeServer(n, role="prefill")) for n in ("p1", "p2")}
        self.decode = {n: stack.enter_context(StubNodeServer(n, role="decode")) for n in ("d1", "d2")}
        self.router = stack.enter_context(BackgroundRouter(_config(health_interval_s)))
        for node in (*self.prefill.values(), *self.decode.values()):
            register_with_router(self.router.url, node.info())

    def address(self, node_id: str) -> str:
        """The node's data address as registered."""
        return self.prefill[node_id].info().data_address

    def view(self, node_id: str) -> dict[str, object]:
        nodes = httpx.get(self.router.url + "/internal/v1/nodes").json()["nodes"]
        return next(n for n in nodes if n["node_id"] == node_id)

    def post(self) -> httpx.Response:
        return httpx.post(self.router.url + "/v1/completions", json=BODY, timeout=20)

    def requests(self) -> list[tuple[str, pb.GenerateRequest]]:
        calls = [(n, r) for n, d in self.decode.items() for r in d.counters.requests]
        return sorted(calls, key=lambda c: c[1].request_id)

    def metric(self, text: str) -> bool:
        return text in httpx.get(self.router.url + "/metrics").text


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """Health checks rarely on their own: what ejects a node in these tests is the request path."""
    with ExitStack() as stack:
        yield Cluster(stack, health_interval_s=30.0)


@pytest.fixture
def polled_cluster() -> Iterator[Cluster]:
    """Health checks (and Stats polls) every 0.2 s."""
    with ExitStack() as stack:
        yield Cluster(stack, health_interval_s=0.2)


def _fail_first_call(cluster: Cluster, cause: int) -> None:
    for node in cluster.decode.values():
        node.behavior.error_calls, node.behavior.error_cause = 1, cause


@pytest.mark.parametrize("cause", [pb.CAUSE_PREFILL_PEER_FAILED, pb.CAUSE_PREFILL_PEER_UNREACHABLE])
def test_prefill_peer_failure_retries_same_decode_node_with_the_other_prefill_node(
        cluster: Cluster, cause: int) -> None:
    _fail_first_call(cluster, cause)
    response = cluster.post()
    assert response.status_code == 200, response.text
    (d_first, first), (d_retry, retry) = cluster.requests()
    assert d_first == d_retry  # the decode node was not blamed for its peer
    assert retry.prefill.node_id != first.prefill.node_id
    # a fresh id on the nodes for the retry; the client's id stays the prefix
    assert retry.request_id == f"{first.request_id}/retry-1"
    assert not any(cluster.view(n)["ejected"] for n in ("d1", "d2", "p1", "p2"))  # the peer is alive
    cause_name = pb.FailureCause.Name(cause).removeprefix("CAUSE_").lower()
    assert cluster.metric(f'pdserve_router_failures_total{{cause="{cause_name}"}} 1.0')
    assert cluster.metric("pdserve_router_node_ejections_total 0.0")


def test_dead_prefill_peer_is_ejected_and_the_decode_node_is_not(cluster: Cluster) -> None:
    cluster.prefill["p1"].stop()  # killed: the decode nodes cannot reach it, its health check fails
    for node in cluster.decode.values():
        node.behavior.unreachable_peers = (cluster.address("p1"),)
    for _ in range(4):
        assert cluster.post().status_code == 200
    failed = [r for _, r in cluster.requests() if r.prefill.node_id == "p1"]
    assert len(failed) == 1  # the failure's immediate health check took p1 out of rotation at once
    assert cluster.view("p1")["ejected"] is True
    assert cluster.view("d1")["ejected"] is False and cluster.view("d2")["ejected"] is False


def test_capacity_failure_goes_to_another_decode_node(cluster: Cluster) -> None:
    cluster.decode["d1"].behavior.error_first_chunk = True
    cluster.decode["d1"].behavior.error_cause = pb.CAUSE_KV_CAPACITY
    for _ in range(2):  # round robin: one of them starts on d1
        assert cluster.post().status_code == 200
    assert cluster.decode["d1"].counters.calls >= 1 and cluster.decode["d2"].counters.completed == 2
    assert cluster.view("d1")["ejected"] is False


def test_capacity_failure_everywhere_is_429_with_retry_after(cluster: Cluster) -> None:
    for node in cluster.decode.values():
        node.behavior.error_first_chunk, node.behavior.error_cause = True, pb.CAUSE_KV_CAPACITY
    started = time.monotonic()
    response = cluster.post()
    assert response.status_code == 429, response.text
    assert response.headers.get("Retry-After")
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert time.monotonic() - started < 2.0
    assert not any(cluster.view(n)["ejected"] for n in ("d1", "d2"))


def test_bad_request_is_400_and_never_retried(cluster: Cluster) -> None:
    _fail_first_call(cluster, pb.CAUSE_BAD_REQUEST)
    response = cluster.post()
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_value"
    assert len(cluster.requests()) == 1


def test_decode_node_failure_retries_elsewhere_and_keeps_a_healthy_node(cluster: Cluster) -> None:
    _fail_first_call(cluster, pb.CAUSE_DECODE_NODE_FAILED)
    response = cluster.post()
    assert response.status_code == 200  # each node fails its first call: the third try succeeds
    (d_first, _), (d_retry, _), _ = cluster.requests()
    assert d_first != d_retry
    time.sleep(0.3)  # the immediate health check of the blamed node has answered SERVING
    assert cluster.view(d_first)["ejected"] is False


def test_decode_node_failure_with_failing_health_ejects_only_that_node(cluster: Cluster) -> None:
    _fail_first_call(cluster, pb.CAUSE_DECODE_NODE_FAILED)
    cluster.decode["d1"].set_serving(False)  # d1's engine is gone: its health says NOT_SERVING
    response = cluster.post()
    assert response.status_code == 200  # a later try went to d2
    _wait_until(lambda: cluster.view("d1")["ejected"] is True)
    time.sleep(0.3)  # d2's own check (if it failed a try too) has answered SERVING
    assert cluster.view("d2")["ejected"] is False


def test_unreachable_prefill_report_in_stats_steers_routes_away_from_the_pair(
        polled_cluster: Cluster) -> None:
    cluster = polled_cluster
    p1, p2 = cluster.address("p1"), cluster.address("p2")
    cluster.decode["d1"].behavior.unreachable_peers = (p1,)
    cluster.decode["d2"].behavior.unreachable_peers = (p2,)
    _wait_until(lambda: _reported(cluster, "d1") == [p1] and _reported(cluster, "d2") == [p2])
    for _ in range(6):
        assert cluster.post().status_code == 200
    pairs = {(d, r.prefill.node_id) for d, r in cluster.requests()}
    assert pairs == {("d1", "p2"), ("d2", "p1")}  # no try was made on a pair reported unreachable
    # healed: the reports are empty again and the pairs return
    cluster.decode["d1"].behavior.unreachable_peers = ()
    cluster.decode["d2"].behavior.unreachable_peers = ()
    _wait_until(lambda: _reported(cluster, "d1") == [] and _reported(cluster, "d2") == [])
    for _ in range(8):
        assert cluster.post().status_code == 200
    assert {("d1", "p1"), ("d2", "p2")} <= {(d, r.prefill.node_id) for d, r in cluster.requests()}


def _reported(cluster: Cluster, node_id: str) -> list[str]:
    return cluster.view(node_id)["unreachable_peer_addresses"]  # type: ignore[return-value]


def test_try_on_a_pair_reported_broken_by_the_prefill_node_is_cancelled_and_retried(
        polled_cluster: Cluster) -> None:
    """Only the prefill node sees that it cannot reach the decode node (a one-way failure): the
    router cancels the try waiting on that pair and retries it with another prefill node."""
    cluster = polled_cluster
    cluster.decode["d2"].set_serving(False)  # one decode node, so the pairs are (d1, p1) and (d1, p2)
    _wait_until(lambda: cluster.view("d2")["ejected"] is True)
    d1 = cluster.decode["d1"]
    d1_address = d1.info().data_address
    d1.behavior.stall_with_prefills = (cluster.address("p1"),)
    cluster.prefill["p2"].behavior.unreachable_peers = (d1_address,)  # first route: (d1, p1)
    _wait_until(lambda: _reported(cluster, "p2") == [d1_address])
    with ThreadPoolExecutor(1) as pool:
        response = pool.submit(cluster.post)
        _wait_until(lambda: d1.counters.calls == 1)
        assert cluster.requests()[0][1].prefill.node_id == "p1"
        cluster.prefill["p2"].behavior.unreachable_peers = ()
        cluster.prefill["p1"].behavior.unreachable_peers = (d1_address,)  # p1 now says it cannot reach d1
        reported = time.monotonic()
        assert response.result().status_code == 200
    retried_s = time.monotonic() - reported
    (_, first), (_, retry) = cluster.requests()
    assert (first.prefill.node_id, retry.prefill.node_id) == ("p1", "p2")
    assert d1.counters.cancelled == 1  # the stalled try was cancelled on the node
    assert retried_s < 2.0, f"retried {retried_s:.2f} s after the report"
