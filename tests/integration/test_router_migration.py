"""Mid-stream migration at the router against stub gRPC nodes: a stream whose node fails after some
tokens continues on another node with the original prompt + the tokens sent, and the client sees one
uninterrupted stream (text, logprobs, usage, finish reason); the number of migrations is bounded."""

from __future__ import annotations

import dataclasses
import json
import re
import time

import httpx

from pdserve.router.config import HealthConfig, PolicyConfig, RetryConfig, RouterConfig
from pdserve.router.server import BackgroundRouter
from pdserve.rpc import node_pb2
from pdserve.tests.support.secret import TEST_SECRET
from pdserve.tests.support.stub_node import StubBehavior, StubNodeServer, register_with_router, stub_token

MODEL = "pdserve-demo"


def _config(migrations: int = 3, chunk_timeout_s: float = 2.0) -> RouterConfig:
    return RouterConfig(port=0, model_name=MODEL, cluster_secret=TEST_SECRET,
                        health=HealthConfig(interval_s=0.1, timeout_s=2.0, eject_after=1),
                        retry=RetryConfig(attempts=3, backoff_s=0.01, first_chunk_timeout_s=2.0,
                                          chunk_timeout_s=chunk_timeout_s, migrations=migrations),
                        policy=PolicyConfig(decode="round_robin"))


def _stream(r: BackgroundRouter, body: dict[str, object]) -> list[dict[str, object] | str]:
    body = {"model": MODEL, "prompt": "def f(", **body, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", r.url + "/v1/completions", json=body, timeout=20) as resp:
        assert resp.status_code == 200
        events = [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def _node_requests(*nodes: StubNodeServer) -> list[node_pb2.GenerateRequest]:
    """Every Generate the stubs got, the first try first, then migration 1, 2, ..."""
    requests = [req for node in nodes for req in node.counters.requests]

    def order(req: node_pb2.GenerateRequest) -> int:
        found = re.search(r"/migrate-(\d+)", req.request_id)
        return int(found.group(1)) if found else 0
    return sorted(requests, key=order)


def _expected_text(prompt: list[int], count: int) -> str:
    return "".join(f" w{stub_token(prompt, i)}" for i in range(count))


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_stream_that_fails_mid_way_continues_on_other_nodes_without_a_seam() -> None:
    # every node fails after 2 chunks: 8 tokens take the first try and 3 migrations
    behavior = dict(tokens=8, fail_after_chunks=2)
    with StubNodeServer("a", behavior=StubBehavior(**behavior)) as a, \
            StubNodeServer("b", behavior=StubBehavior(**behavior)) as b, BackgroundRouter(_config()) as r:
        register_with_router(r.url, a.info())
        register_with_router(r.url, b.info())
        events = _stream(r, {"max_tokens": 8, "logprobs": 1, "temperature": 1.0})
        assert events[-1] == "[DONE]"
        payloads = [e for e in events[:-1] if isinstance(e, dict)]
        assert not any("error" in p for p in payloads), payloads
        choices = [p["choices"][0] for p in payloads if p["choices"]]
        requests = _node_requests(a, b)
        prompt = list(requests[0].prompt_token_ids)
        assert "".join(c["text"] for c in choices) == _expected_text(prompt, 8)
        assert sum(len(c["logprobs"]["tokens"]) for c in choices) == 8
        assert [c["finish_reason"] for c in choices] == [None] * 7 + ["length"]
        assert payloads[-1]["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 8,
                                         "total_tokens": len(prompt) + 8}
        # each continuation: the original prompt + what was sent, the rest of the budget, one seed
        client_id = requests[0].request_id
        migrated_ids = [f"{client_id}/migrate-{n}" for n in (1, 2, 3)]
        assert [req.request_id for req in requests] == [client_id, *migrated_ids]
        assert [req.sampling.resumed_output_tokens for req in requests] == [0, 2, 4, 6]
        assert [req.sampling.max_tokens for req in requests] == [8, 6, 4, 2]
        sent_chars = [len(_expected_text(prompt, k)) for k in (0, 2, 4, 6)]
        assert [req.resumed_output_chars for req in requests] == sent_chars
        for k, req in zip((0, 2, 4, 6), requests, strict=True):
            assert list(req.prompt_token_ids) == prompt + [stub_token(prompt, i) for i in range(k)]
        assert requests[0].sampling.HasField("seed")  # drawn by the router: the continuations share it
        assert {req.sampling.seed for req in requests} == {requests[0].sampling.seed}
        metrics = httpx.get(r.url + "/metrics").text
        assert _metric(metrics, 'pdserve_router_migrations_total{cause="decode_node_failed"}') == 3.0
        assert _metric(metrics, "pdserve_router_migration_latency_seconds_count") == 3.0


def test_a_stream_that_goes_silent_mid_way_is_migrated_after_the_chunk_timeout() -> None:
    # every node stops after 2 chunks: 6 tokens take the first try and 2 migrations, each started by
    # 1.5 s of silence; the chunks before it come 0.3 s apart, well within the timeout even on a host
    # slowed several times over
    behavior = dict(tokens=6, silent_after_chunks=2, token_delay_s=0.3)
    with StubNodeServer("a", behavior=StubBehavior(**behavior)) as a, \
            StubNodeServer("b", behavior=StubBehavior(**behavior)) as b, \
            BackgroundRouter(_config(chunk_timeout_s=1.5)) as r:
        register_with_router(r.url, a.info())
        register_with_router(r.url, b.info())
        started = time.monotonic()
        events = _stream(r, {"max_tokens": 6, "temperature": 0})
        elapsed = time.monotonic() - started
        payloads = [e for e in events[:-1] if isinstance(e, dict)]
        assert events[-1] == "[DONE]" and not any("error" in p for p in payloads), payloads
        requests = _node_requests(a, b)
        prompt = list(requests[0].prompt_token_ids)
        assert "".join(p["choices"][0]["text"] for p in payloads if p["choices"]) == _expected_text(prompt, 6)
        assert [req.sampling.resumed_output_tokens for req in requests] == [0, 2, 4]
        metrics = httpx.get(r.url + "/metrics").text
        assert _metric(metrics, 'pdserve_router_migrations_total{cause="deadline"}') == 2.0
        assert a.counters.cancelled + b.counters.cancelled == 2  # the silent calls were cancelled
        # two silences of 1.5 s and three chunk gaps of 0.3 s, with room for a slow host
        assert 3.9 <= elapsed < 12.0, elapsed


def test_a_non_streaming_request_gets_one_whole_body_across_migrations() -> None:
    # each Complete answer carries two tokens and an engine failure: the router continues from them
    # elsewhere, and the last continuation (one token left) finishes
    behavior = dict(tokens=5, error_after_chunks=2)
    with StubNodeServer("a", behavior=StubBehavior(**behavior)) as a, \
            StubNodeServer("b", behavior=StubBehavior(**behavior)) as b, BackgroundRouter(_config()) as r:
        register_with_router(r.url, a.info())
        register_with_router(r.url, b.info())
        response = httpx.post(r.url + "/v1/completions", timeout=20, json={
            "model": MODEL, "prompt": "def f(", "max_tokens": 5, "temperature": 0})
        assert response.status_code == 200, response.text
        requests = _node_requests(a, b)
        prompt = list(requests[0].prompt_token_ids)
        body = response.json()
        assert body["choices"][0]["text"] == _expected_text(prompt, 5)
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["prompt_tokens"] == len(prompt) and body["usage"]["completion_tokens"] == 5
        assert [req.sampling.resumed_output_tokens for req in requests] == [0, 2, 4]
        metrics = httpx.get(r.url + "/metrics").text
        assert _metric(metrics, 'pdserve_router_migrations_total{cause="decode_node_failed"}') == 2.0


def test_a_non_streaming_request_whose_node_dies_mid_way_is_retried_whole() -> None:
    # the call itself fails (the node died): its tokens never reached the router, so the next try
    # starts over, with the same seed, and the client gets what an undisturbed run gives
    with StubNodeServer("a", behavior=StubBehavior(tokens=6, fail_after_chunks=3)) as a, \
            StubNodeServer("b", behavior=StubBehavior(tokens=6)) as b, BackgroundRouter(_config()) as r:
        register_with_router(r.url, a.info())
        register_with_router(r.url, b.info())
        texts = []
        for _ in range(2):  # round robin: one of the two requests goes to the failing node first
            response = httpx.post(r.url + "/v1/completions", timeout=20, json={
                "model": MODEL, "prompt": "def f(", "max_tokens": 6, "temperature": 0.8})
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["finish_reason"] == "length"
            texts.append(response.json()["choices"][0]["text"])
        prompt = list(b.counters.requests[0].prompt_token_ids)
        assert texts == [_expected_text(prompt, 6)] * 2
        assert a.counters.calls >= 1 and a.counters.completed == 0
        retried = [req for req in b.counters.requests if "/retry-" in req.request_id]
        assert retried and all(req.sampling.resumed_output_tokens == 0 for req in retried)
        failed = a.counters.requests[0]
        assert failed.sampling.HasField("seed") and retried[0].sampling.seed == failed.sampling.seed


def test_a_migration_waits_for_a_node_briefly_out_of_rotation() -> None:
    # the only node fails the stream as unreachable: it is ejected, and back at the next health pass
    # (1 s here); the migration waits for it instead of failing the half-sent stream
    behavior = StubBehavior(tokens=4, error_after_chunks=2,
                            error_cause=node_pb2.CAUSE_DECODE_NODE_UNREACHABLE)
    config = dataclasses.replace(_config(), health=HealthConfig(interval_s=1.0, timeout_s=1.0, eject_after=1))
    with StubNodeServer("a", behavior=behavior) as a, BackgroundRouter(config) as r:
        register_with_router(r.url, a.info())
        events = _stream(r, {"max_tokens": 4, "temperature": 0})
        assert events[-1] == "[DONE]"
        payloads = [e for e in events[:-1] if isinstance(e, dict) and e.get("choices")]
        prompt = list(a.counters.requests[0].prompt_token_ids)
        assert "".join(p["choices"][0]["text"] for p in payloads) == _expected_text(prompt, 4)
        assert payloads[-1]["choices"][0]["finish_reason"] == "length"
        assert a.counters.calls == 2
        metrics = httpx.get(r.url + "/metrics").text
        assert "pdserve_router_node_ejections_total 1.0" in metrics


def test_migrations_are_bounded_then_the_stream_ends_with_an_error_event() -> None:
    behavior = dict(tokens=12, fail_after_chunks=2)
    with StubNodeServer("a", behavior=StubBehavior(**behavior)) as a, \
            StubNodeServer("b", behavior=StubBehavior(**behavior)) as b, \
            BackgroundRouter(_config(migrations=2)) as r:
        register_with_router(r.url, a.info())
        register_with_router(r.url, b.info())
        events = _stream(r, {"max_tokens": 12, "temperature": 0})
        assert events[-1] == "[DONE]"
        payloads = [e for e in events[:-1] if isinstance(e, dict)]
        assert payloads[-1]["error"]["code"] == "node_failed"
        assert "after 2 migrations" in payloads[-1]["error"]["message"]
        prompt = list(_node_requests(a, b)[0].prompt_token_ids)
        text = "".join(p["choices"][0]["text"] for p in payloads[:-1])
        assert text == _expected_text(prompt, 6)  # 2 tokens from each of the 3 tries, none twice
        assert a.counters.calls + b.counters.calls == 3
        metrics = httpx.get(r.url + "/metrics").text
        assert _metric(metrics, 'pdserve_router_migrations_total{cause="decode_node_failed"}') == 2.0
