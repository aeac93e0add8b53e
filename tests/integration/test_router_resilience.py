"""Router failure handling against stub gRPC nodes: retries, mid-stream failures, timeouts, health
ejection and re-admission, drain, client disconnect cancelling the node call, admission limits."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import grpc
import httpx
import pytest

from pdserve.router.config import AdmissionConfig, HealthConfig, PolicyConfig, RetryConfig, RouterConfig
from pdserve.router.nodes import node_channel_options
from pdserve.router.server import BackgroundRouter
from pdserve.rpc import node_pb2, node_pb2_grpc
from pdserve.tests.support.secret import TEST_SECRET
from pdserve.tests.support.stub_node import StubBehavior, StubNodeServer, register_with_router

MODEL = "pdserve-demo"
BODY = {"model": MODEL, "prompt": "def f(", "max_tokens": 4}


def _config(**kw: object) -> RouterConfig:
    # NOT_SERVING answers eject at once; the generous timeout keeps a stalled machine from doing so
    kw.setdefault("health", HealthConfig(interval_s=0.1, timeout_s=2.0, eject_after=1))
    kw.setdefault("retry", RetryConfig(attempts=3, backoff_s=0.01, first_chunk_timeout_s=2.0,
                                       chunk_timeout_s=2.0))
    kw.setdefault("policy", PolicyConfig(decode="round_robin"))
    return RouterConfig(port=0, model_name=MODEL, cluster_secret=TEST_SECRET, **kw)  # type: ignore[arg-type]


def _wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _node_view(r: BackgroundRouter, node_id: str) -> dict[str, object]:
    nodes = httpx.get(r.url + "/internal/v1/nodes").json()["nodes"]
    return next(n for n in nodes if n["node_id"] == node_id)


def _stream_events(r: BackgroundRouter, body: dict[str, object]) -> list[str]:
    with httpx.stream("POST", r.url + "/v1/completions", json={**body, "stream": True}, timeout=10) as resp:
        assert resp.status_code == 200
        return [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]


def test_failure_before_first_token_is_retried_on_another_node_and_ejects_it() -> None:
    with StubNodeServer("a", behavior=StubBehavior(fail_first_calls=1)) as a, StubNodeServer("b") as b, \
            BackgroundRouter(_config(health=HealthConfig(interval_s=0.3, timeout_s=2.0))) as r:
        register_with_router(r.url, a.info())
        register_with_router(r.url, b.info())
        response = httpx.post(r.url + "/v1/completions", json=BODY, timeout=10)
        assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length"
        assert (a.counters.calls, b.counters.calls, b.counters.completed) == (1, 1, 1)
        # a answers its health checks, so the next pass re-admits it
        _wait_until(lambda: _node_view(r, "a")["ejected"] is False)
        metrics = httpx.get(r.url + "/metrics").text
        assert "pdserve_router_retries_total 1.0" in metrics
        assert "pdserve_router_node_ejections_total 1.0" in metrics


def test_failure_after_first_token_ends_the_stream_with_an_error_event_without_migrations() -> None:
    retry = RetryConfig(attempts=3, backoff_s=0.01, first_chunk_timeout_s=2.0, chunk_timeout_s=2.0,
                        migrations=0)
    with StubNodeServer("a", behavior=StubBehavior(tokens=6, fail_after_chunks=2)) as a, \
            BackgroundRouter(_config(retry=retry)) as r:
        register_with_router(r.url, a.info())
        t0 = time.monotonic()
        events = _stream_events(r, BODY | {"max_tokens": 6})
        assert time.monotonic() - t0 < 3
        assert events[-1] == "[DONE]"
        payloads = [json.loads(e) for e in events[:-1]]
        assert [p["choices"][0]["text"] != "" for p in payloads[:2]] == [True, True]
        assert payloads[-1]["error"]["code"] == "node_failed"
        assert a.counters.calls == 1  # tokens were out and migrations are off: no retry
        response = httpx.post(r.url + "/v1/completions", json=BODY | {"max_tokens": 6}, timeout=10)
        assert response.status_code == 503 and response.json()["error"]["code"] == "node_failed"


def test_a_silent_node_times_out_and_the_call_is_cancelled() -> None:
    retry = RetryConfig(attempts=2, backoff_s=0.01, first_chunk_timeout_s=0.3)
    with StubNodeServer("a", behavior=StubBehavior(hang=True)) as a, \
            BackgroundRouter(_config(retry=retry)) as r:
        register_with_router(r.url, a.info())
        t0 = time.monotonic()
        response = httpx.post(r.url + "/v1/completions", json=BODY, timeout=10)
        assert time.monotonic() - t0 < 2.0
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "no first token within 0.3 s" in response.json()["error"]["message"]  # the node timed it
        _wait_until(lambda: a.counters.cancelled == 2)


def test_node_error_chunks_exhaust_the_bounded_retries() -> None:
    with StubNodeServer("a", behavior=StubBehavior(error_first_chunk=True)) as a, \
            BackgroundRouter(_config()) as r:
        register_with_router(r.url, a.info())
        response = httpx.post(r.url + "/v1/completions", json=BODY, timeout=10)
        assert response.status_code == 503 and "injected node error" in response.json()["error"]["message"]
        assert a.counters.calls == 3


def test_health_checks_eject_and_readmit_a_node() -> None:
    with StubNodeServer("a") as a, BackgroundRouter(_config()) as r:
        register_with_router(r.url, a.info())
        assert httpx.get(r.url + "/health").status_code == 200
        a.set_serving(False)
        _wait_until(lambda: httpx.get(r.url + "/health").status_code == 503)
        response = httpx.post(r.url + "/v1/completions", json=BODY, timeout=10)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        calls = a.counters.calls
        a.set_serving(True)
        _wait_until(lambda: httpx.get(r.url + "/health").status_code == 200)
        assert httpx.post(r.url + "/v1/completions", json=BODY, timeout=10).status_code == 200
        assert a.counters.calls == calls + 1


def test_a_draining_node_gets_no_new_requests() -> None:
    with StubNodeServer("a") as a, StubNodeServer("b") as b, BackgroundRouter(_config()) as r:
        register_with_router(r.url, a.info(draining=True))
        register_with_router(r.url, b.info())
        for _ in range(4):
            assert httpx.post(r.url + "/v1/completions", json=BODY, timeout=10).status_code == 200
        assert (a.counters.calls, b.counters.calls) == (0, 4)


def test_power_of_two_reads_load_from_the_stats_rpc() -> None:
    # both register with load 0; only b's Stats says it is busy, so only Stats can steer traffic away
    with StubNodeServer("a") as a, StubNodeServer("b", behavior=StubBehavior(reported_waiting=50)) as b, \
            BackgroundRouter(_config(policy=PolicyConfig(decode="power_of_two"))) as r:
        register_with_router(r.url, a.info(capacity=8))
        register_with_router(r.url, b.info(capacity=8))
        _wait_until(lambda: _node_view(r, "b")["router_load"] == pytest.approx(50 / 8))
        assert _node_view(r, "a")["router_load"] == 0.0
        for _ in range(10):  # a tie would pick either: 2**-10 odds of this passing without Stats
            assert httpx.post(r.url + "/v1/completions", json=BODY, timeout=10).status_code == 200
        assert (a.counters.calls, b.counters.calls) == (10, 0)
        b.behavior.reported_waiting = 0  # newer Stats win over the (older) registration
        _wait_until(lambda: _node_view(r, "b")["router_load"] == 0.0)


# Left alone, the stub's call would run 200 x 0.1 s = 20 s: a cancellation seen within 10 s can only
# come from the router. (3 s was once too short when the shared host stalled the test process.)
CANCEL_WAIT_S = 10.0


def test_client_disconnect_cancels_the_node_call_streaming() -> None:
    slow = StubBehavior(tokens=200, token_delay_s=0.1)
    with StubNodeServer("a", behavior=slow) as a, BackgroundRouter(_config()) as r:
        register_with_router(r.url, a.info())
        with httpx.stream("POST", r.url + "/v1/completions", json=BODY | {"max_tokens": 200, "stream": True},
                          timeout=10) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            time.sleep(0.3)  # still streaming while the client is connected
            assert a.counters.cancelled == 0 and a.servicer.running == 1
        _wait_until(lambda: a.counters.cancelled == 1, timeout_s=CANCEL_WAIT_S)
        assert a.counters.completed == 0
        _wait_until(lambda: _node_view(r, "a")["router_inflight"] == 0)


def test_client_disconnect_cancels_the_node_call_non_streaming() -> None:
    slow = StubBehavior(tokens=200, token_delay_s=0.1)
    with StubNodeServer("a", behavior=slow) as a, BackgroundRouter(_config()) as r:
        register_with_router(r.url, a.info())
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(r.url + "/v1/completions", json=BODY | {"max_tokens": 200}, timeout=0.5)
        _wait_until(lambda: a.counters.cancelled == 1, timeout_s=CANCEL_WAIT_S)
        assert a.counters.completed == 0


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_client_disconnect_cancels_every_choice_of_a_fanned_out_request(stream: bool) -> None:
    slow = StubBehavior(tokens=200, token_delay_s=0.1)
    body = BODY | {"prompt": ["a", "b"], "n": 2, "max_tokens": 200, "stream": stream}
    with StubNodeServer("a", behavior=slow) as a, BackgroundRouter(_config()) as r:
        register_with_router(r.url, a.info(capacity=8))
        if stream:
            with httpx.stream("POST", r.url + "/v1/completions", json=body, timeout=10) as resp:
                assert next(resp.iter_lines()).startswith("data: ")
                assert a.servicer.running == 4
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(r.url + "/v1/completions", json=body, timeout=0.5)
        _wait_until(lambda: a.counters.cancelled == 4, timeout_s=CANCEL_WAIT_S)
        assert a.counters.completed == 0
        _wait_until(lambda: _node_view(r, "a")["router_inflight"] == 0)


def test_a_stream_that_ended_is_not_cancelled_on_its_node_while_its_status_is_on_the_way() -> None:
    # the node ends the call 0.5 s after its last chunk: the client has its whole answer at once, and
    # the finished request is not aborted on the node meanwhile
    late_status = StubBehavior(tokens=4, end_delay_s=0.5)
    with StubNodeServer("a", behavior=late_status) as a, BackgroundRouter(_config()) as r:
        register_with_router(r.url, a.info())
        started = time.monotonic()
        body = BODY | {"stream": True}
        with httpx.stream("POST", r.url + "/v1/completions", json=body, timeout=10) as resp:
            events = [line for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and time.monotonic() - started < 0.5
        _wait_until(lambda: a.counters.completed == 1)
        assert a.counters.cancelled == 0


def test_admission_answers_429_fast_beyond_its_limits() -> None:
    slow = StubBehavior(tokens=30, token_delay_s=0.05)
    admission = AdmissionConfig(max_inflight_requests=1, max_queued_requests=0, retry_after_s=2,
                                max_inflight_tokens=1000)
    with StubNodeServer("a", behavior=slow) as a, BackgroundRouter(_config(admission=admission)) as r:
        register_with_router(r.url, a.info())
        with httpx.stream("POST", r.url + "/v1/completions", json=BODY | {"max_tokens": 30, "stream": True},
                          timeout=10) as held:
            lines = held.iter_lines()  # kept: dropping the iterator would close the response
            next(lines)
            t0 = time.monotonic()
            refused = httpx.post(r.url + "/v1/completions", json=BODY, timeout=10)
            assert time.monotonic() - t0 < 0.5
            assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert sum(1 for _ in lines) > 0 and a.counters.cancelled == 0
        too_big = httpx.post(r.url + "/v1/completions", json=BODY | {"max_tokens": 2000}, timeout=10)
        assert too_big.status_code == 413 and "max_inflight_tokens" in too_big.json()["error"]["message"]
        assert httpx.post(r.url + "/v1/completions", json=BODY, timeout=10).status_code == 200


def test_no_node_is_a_fast_503() -> None:
    with BackgroundRouter(_config()) as r:
        response = httpx.post(r.url + "/v1/chat/completions", timeout=10,
                              json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "service_unavailable_error"


def test_a_complete_answer_over_4_mib_reaches_the_router() -> None:
    # one message holds a whole non-streaming answer: 40,000 tokens with top-20 logprobs is ~5 MB,
    # past gRPC's default 4 MiB receive limit
    behavior = StubBehavior(tokens=40_000, tokens_per_chunk=2000, speculate=False)
    request = node_pb2.GenerateRequest(request_id="big", prompt_token_ids=[5],
                                       sampling=node_pb2.SamplingParams(max_tokens=40_000, logprobs=20))

    async def ask(address: str) -> node_pb2.GenerateChunk:
        options = node_channel_options(HealthConfig())
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            return await node_pb2_grpc.NodeStub(channel).Complete(request, timeout=60)

    with StubNodeServer("a", behavior=behavior) as a:
        answer = asyncio.run(ask(a.address))
    assert answer.ByteSize() > 4 << 20 and len(answer.tokens.token_ids) == 40_000
    assert answer.finish_reason == "length"
