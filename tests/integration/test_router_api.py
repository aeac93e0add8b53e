"""The router's HTTP API through the official ``openai`` client, against in-test stub gRPC nodes.

The stub nodes answer with a known token sequence (``stub_token``), so every expected text and count
below is computed from the stub's rule and the demo tokenizer, never from the router's own output.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx
import openai
import pytest

from pdserve.models.tokenizer import Tokenizer
from pdserve.router.config import HealthConfig, PolicyConfig, RouterConfig
from pdserve.router.server import BackgroundRouter
from pdserve.tests.support.stub_node import StubBehavior, StubNodeServer, register_with_router, stub_token

MODEL = "pdserve-demo"
KEY = "sk-test-7f3a9c"


def _config(**kw: object) -> RouterConfig:
    # lenient health checks: a stall of this shared machine must not eject the stub node
    health = HealthConfig(interval_s=0.2, timeout_s=2.0, eject_after=20)
    return RouterConfig(port=0, model_name=MODEL, health=health, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def node() -> Iterator[StubNodeServer]:
    with StubNodeServer("mixed-0", "mixed", MODEL, StubBehavior(tokens=6)) as server:
        yield server


@pytest.fixture(scope="module")
def router(node: StubNodeServer) -> Iterator[BackgroundRouter]:
    with BackgroundRouter(_config()) as r:
        register_with_router(r.url, node.info())
        yield r


@pytest.fixture(scope="module")
def client(router: BackgroundRouter) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=10)


def _expected_text(prompt_ids: list[int], n: int) -> tuple[list[int], str]:
    ids = [stub_token(prompt_ids, i) for i in range(n)]
    return ids, "".join(f" w{t}" for t in ids)


def _sse_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_health_is_ready_only_with_a_usable_node(node: StubNodeServer) -> None:
    with BackgroundRouter(_config()) as r:
        first = httpx.get(r.url + "/health")
        assert first.status_code == 503 and first.json()["error"]["code"] == "no_capacity"
        register_with_router(r.url, node.info())
        ready = httpx.get(r.url + "/health")
        assert ready.status_code == 200 and ready.json()["usable_nodes"]["mixed"] == 1


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_non_streaming(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    prompt = "def fib(n):"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
    prompt_ids = tokenizer.encode(prompt)
    _, text = _expected_text(prompt_ids, 4)
    choice = out.choices[0]
    assert choice.text == text and choice.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        len(prompt_ids), 4, len(prompt_ids) + 4)
    metrics = choice.model_extra["speculate_metrics"]
    assert metrics["accepted_tokens"] == 3 and metrics["rejected_tokens"] == 1


def test_completion_streaming_with_usage_and_done(router: BackgroundRouter, tokenizer: Tokenizer) -> None:
    body = {"model": MODEL, "prompt": "import os", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    _, text = _expected_text(tokenizer.encode("import os"), 5)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text
    last_choice = chunks[-2]["choices"][0]
    assert last_choice["finish_reason"] == "length" and "speculate_metrics" in last_choice
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_chat_streaming_through_openai_client(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=3, stream=True,
        logprobs=True, top_logprobs=2, stream_options={"include_usage": True})
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    prompt_ids = tokenizer.encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
                                  add_special_tokens=False)
    ids, text = _expected_text(prompt_ids, 3)
    assert "".join(c.choices[0].delta.content or "" for c in content) == text
    entries = [e for c in content for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert all(len(e.top_logprobs) == 2 for e in entries)
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids) and chunks[-1].usage.completion_tokens == 3


def test_chat_non_streaming_logprobs(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                         max_tokens=2, logprobs=True, top_logprobs=0)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert [e.logprob for e in choice.logprobs.content] == [-0.5, -0.5]
    assert "speculate_metrics" in choice.model_extra


def test_completion_echo_with_logprobs_relays_prompt_logprobs(client: openai.OpenAI, node: StubNodeServer,
                                                               tokenizer: Tokenizer) -> None:
    out = client.completions.create(model=MODEL, prompt="a = 1", max_tokens=2, echo=True, logprobs=1)
    assert node.counters.requests[-1].sampling.prompt_logprobs == 1
    prompt_ids = tokenizer.encode("a = 1")
    _, text = _expected_text(prompt_ids, 2)
    choice = out.choices[0]
    assert choice.text == "a = 1" + text
    lp = choice.logprobs
    # the stub scores prompt token i with -0.25 * i; the first prompt token has no logprob
    n = len(prompt_ids)
    assert lp.token_logprobs[:n] == [None] + [-0.25 * i for i in range(1, n)]
    assert lp.top_logprobs[0] is None and len(lp.top_logprobs[1]) == 1
    assert lp.token_logprobs[n:] == [-0.5, -0.5]
    assert lp.text_offset[0] == 0 and len(lp.tokens) == n + 2


def test_streamed_echo_carries_prompt_logprobs_first(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt="a = 1", max_tokens=2, echo=True, logprobs=1,
                                            stream=True))
    n = len(tokenizer.encode("a = 1"))
    assert chunks[0].choices[0].text == "a = 1"
    assert chunks[0].choices[0].logprobs.token_logprobs == [None] + [-0.25 * i for i in range(1, n)]


def test_no_prompt_logprobs_without_echo(client: openai.OpenAI, node: StubNodeServer) -> None:
    client.completions.create(model=MODEL, prompt="a = 1", max_tokens=2, logprobs=1)
    assert not node.counters.requests[-1].sampling.HasField("prompt_logprobs")


def test_sampling_parameters_reach_the_node(client: openai.OpenAI, node: StubNodeServer,
                                            tokenizer: Tokenizer) -> None:
    client.completions.create(
        model=MODEL, prompt="q", max_tokens=3, temperature=0.7, top_p=0.9, seed=11, stop=["\n\n", "END"],
        presence_penalty=0.5, frequency_penalty=-0.5, user="u1",
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 1,
                    "ignore_eos": True})
    sent = node.counters.requests[-1]
    s = sent.sampling
    assert list(sent.prompt_token_ids) == tokenizer.encode("q")
    assert (s.max_tokens, s.top_k, s.seed, list(s.stop), s.min_tokens, s.ignore_eos) == (
        3, 5, 11, ["\n\n", "END"], 1, True)
    floats = (s.temperature, s.top_p, s.min_p, s.repetition_penalty, s.presence_penalty, s.frequency_penalty)
    assert floats == (
        pytest.approx(0.7), pytest.approx(0.9), pytest.approx(0.05), pytest.approx(1.2), 0.5, -0.5)
    assert not s.HasField("logprobs") and not sent.HasField("prefill")


@pytest.mark.parametrize(("kwargs", "error", "code"), [
    ({"model": "gpt-4"}, openai.NotFoundError, "model_not_found"),
    ({"max_tokens": 5000}, openai.BadRequestError, "context_length_exceeded"),
    ({"temperature": 3.0}, openai.BadRequestError, "invalid_value"),
    ({"logprobs": 21}, openai.BadRequestError, "invalid_value"),
    ({"n": 2}, openai.BadRequestError, "invalid_value"),
])
def test_errors_carry_the_openai_body(client: openai.OpenAI, kwargs: dict[str, object],
                                      error: type[openai.APIStatusError], code: str) -> None:
    with pytest.raises(error) as info:
        client.completions.create(**{"model": MODEL, "prompt": "x", "max_tokens": 2, **kwargs})
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == code


def test_context_overflow_message_names_the_limit(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2048)
    assert "maximum context length is 2048 tokens" in info.value.body["message"]


def test_http_level_errors(router: BackgroundRouter) -> None:
    cases = [
        httpx.get(router.url + "/v1/completions"),  # wrong method
        httpx.get(router.url + "/v1/nope"),
        httpx.post(router.url + "/v1/completions", content=b"{",
                   headers={"content-type": "application/json"}),
        httpx.post(router.url + "/v1/completions", content=b"x" * (5 << 20)),
        httpx.post(router.url + "/internal/v1/nodes/heartbeat", content=b'{"node_id": 3}'),
    ]
    assert [r.status_code for r in cases] == [405, 404, 400, 413, 400]
    for r in cases:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_metrics_expose_latency_status_and_node_inflight(client: openai.OpenAI,
                                                         router: BackgroundRouter) -> None:
    client.completions.create(model=MODEL, prompt="m", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="m", max_tokens=2)
    text = httpx.get(router.url + "/metrics").text
    for name in ("pdserve_router_time_to_first_token_seconds_count",
                 "pdserve_router_inter_token_latency_seconds",
                 "pdserve_router_e2e_request_latency_seconds_count",
                 'pdserve_router_requests_total{status="200"}',
                 'pdserve_router_requests_total{status="404"}',
                 'pdserve_router_node_inflight{node_id="mixed-0",role="mixed"} 0.0'):
        assert name in text


def test_api_keys_guard_every_route_but_health(node: StubNodeServer,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with BackgroundRouter(_config(api_keys=(KEY, "sk-other"))) as r:
        assert httpx.post(r.url + "/internal/v1/nodes/heartbeat", content=b"{}").status_code == 401
        register_with_router(r.url, node.info(), api_key=KEY)
        assert httpx.get(r.url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {KEY}"}):
            response = httpx.get(r.url + "/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(r.url + "/metrics").status_code == 401
        bad = openai.OpenAI(base_url=r.url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
        good = openai.OpenAI(base_url=r.url + "/v1", api_key=KEY, max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=1).choices[0].text
    assert KEY not in caplog.text


def test_prefill_decode_pairs_and_prefix_affinity() -> None:
    behavior = StubBehavior(tokens=2)
    with StubNodeServer("p0", "prefill", MODEL) as p0, StubNodeServer("p1", "prefill", MODEL) as p1, \
            StubNodeServer("d0", "decode", MODEL, behavior) as d0, \
            BackgroundRouter(_config(policy=PolicyConfig(prefill="prefix_aware", prefix_tokens=32,
                                                         block_size=16))) as r:
        register_with_router(r.url, d0.info())
        client = openai.OpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:  # a decode node alone cannot serve
            client.completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert info.value.status_code == 503
        register_with_router(r.url, p0.info())
        register_with_router(r.url, p1.info())
        shared = "x = 1\n" * 40
        for suffix in ("a", "bb", "ccc", "dddd"):
            client.completions.create(model=MODEL, prompt=shared + suffix, max_tokens=2)
        targets = {req.prefill.node_id for req in d0.counters.requests}
        assert len(targets) == 1 and targets <= {"p0", "p1"}
        addresses = {p0.address, p1.address}
        assert {req.prefill.grpc_address for req in d0.counters.requests} <= addresses
        assert p0.counters.calls == p1.counters.calls == 0  # the router calls only the decode node
