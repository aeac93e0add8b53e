"""The router's HTTP API through the official ``openai`` client, against in-test stub gRPC nodes.

The stub nodes answer with a known token sequence (``stub_token``), so every expected text and count
below is computed from the stub's rule and the demo tokenizer, never from the router's own output.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import msgspec
import openai
import pytest

from pdserve.common.secret import ClusterSecret
from pdserve.models.tokenizer import Tokenizer
from pdserve.router.config import HealthConfig, PolicyConfig, RegistryConfig, RouterConfig
from pdserve.router.server import BackgroundRouter
from pdserve.rpc.registry import HEARTBEAT_PATH, NODES_PATH, REMOVAL_HEADER, RegistryAuth
from pdserve.tests.support.secret import TEST_SECRET, secret_flags
from pdserve.tests.support.stub_node import StubBehavior, StubNodeServer, register_with_router, stub_token

MODEL = "pdserve-demo"
KEY = "sk-test-7f3a9c"


def _config(**kw: object) -> RouterConfig:
    # lenient health checks: a stall of this shared machine must not eject the stub node; the one
    # registration of the module's node must not expire either (nothing renews it)
    health = HealthConfig(interval_s=0.2, timeout_s=2.0, eject_after=20)
    return RouterConfig(port=0, model_name=MODEL, health=health, cluster_secret=TEST_SECRET,  # type: ignore[arg-type]
                        registry=RegistryConfig(heartbeat_ttl_s=3600.0), **kw)


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
    ({"n": 0}, openai.BadRequestError, "invalid_value"),
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


def _requests_with_status(router: BackgroundRouter, status: int) -> float:
    prefix = f'pdserve_router_requests_total{{status="{status}"}} '
    lines = [line for line in httpx.get(router.url + "/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


def test_a_client_gone_before_its_whole_body_is_counted_499_and_logs_no_error(
        client: openai.OpenAI, router: BackgroundRouter, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    before = _requests_with_status(router, 499)
    host, port = router.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")
        time.sleep(0.2)  # the router has the headers and part of the body
    deadline = time.monotonic() + 5
    while _requests_with_status(router, 499) == before:
        assert time.monotonic() < deadline, "the abandoned request was never counted"
        time.sleep(0.02)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert client.completions.create(model=MODEL, prompt="m", max_tokens=2).choices[0].text


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
            assert response.headers["www-authenticate"] == "Bearer"
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


# ---- every field honoured or refused
@pytest.mark.parametrize(("path", "extra", "param"), [
    ("/v1/completions", {"suffix": "}"}, "suffix"),
    ("/v1/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ("/v1/completions", {"guided_grammar": "root ::= 'a'"}, "guided_grammar"),
    ("/v1/completions", {"stream": True, "stream_options": {"continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"service_tier": "flex"}, "service_tier"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}]}]}, "messages"),
])
def test_unimplemented_fields_get_a_400_naming_them(router: BackgroundRouter, path: str,
                                                    extra: dict[str, object], param: str) -> None:
    body: dict[str, object] = {"model": MODEL, "max_tokens": 2}
    body.update({"prompt": "x"} if path == "/v1/completions" else
                {"messages": [{"role": "user", "content": "x"}]})
    body.update(extra)
    response = httpx.post(router.url + path, json=body, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split(".")[-1] in error["message"] or "image_url" in error["message"]


def test_model_is_optional_with_one_served_model(router: BackgroundRouter) -> None:
    response = httpx.post(router.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=10)
    assert response.status_code == 200 and response.json()["model"] == MODEL


def test_max_completion_tokens_on_completions(client: openai.OpenAI, node: StubNodeServer) -> None:
    out = client.completions.create(model=MODEL, prompt="q", max_tokens=5,
                                    extra_body={"max_completion_tokens": 2})
    assert node.counters.requests[-1].sampling.max_tokens == 2 and out.usage.completion_tokens == 2


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_zero_with_echo_scores_the_prompt_only(client: openai.OpenAI, tokenizer: Tokenizer,
                                                          stream: bool) -> None:
    n = len(tokenizer.encode("a = 1"))
    out = client.completions.create(model=MODEL, prompt="a = 1", max_tokens=0, echo=True, logprobs=1,
                                    stream=stream)
    choice = list(out)[0].choices[0] if stream else out.choices[0]
    assert choice.text == "a = 1" and choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs == [None] + [-0.25 * i for i in range(1, n)]
    if not stream:
        assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == n
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="a = 1", max_tokens=0)
    assert info.value.body["param"] == "max_tokens"


# ---- the endpoints tools expect
def test_models_retrieve(client: openai.OpenAI) -> None:
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_tokenize_then_detokenize_round_trips(router: BackgroundRouter, tokenizer: Tokenizer) -> None:
    text = "def fib(n):\n    return n<|endoftext|>"
    out = httpx.post(router.url + "/tokenize", json={"prompt": text, "add_special_tokens": False,
                                                     "return_token_strs": True}).json()
    assert out["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 2048
    assert "".join(out["token_strs"]) == text
    back = httpx.post(router.url + "/detokenize", json={"model": MODEL, "tokens": out["tokens"]}).json()
    assert back == {"prompt": text}
    chat = httpx.post(router.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                                              add_special_tokens=False)
    bad = httpx.post(router.url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_tokenizer_info_version_and_ping(router: BackgroundRouter, tokenizer: Tokenizer) -> None:
    info = httpx.get(router.url + "/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.special_tokens.eos_token and info["chat_template"]
    assert httpx.get(router.url + "/version").json()["version"]
    assert httpx.get(router.url + "/ping").status_code == 200
    assert httpx.post(router.url + "/ping").status_code == 200


# ---- n > 1 and batched prompts: one node request per (prompt, choice)
def test_n_choices_get_distinct_reproducible_seeds(client: openai.OpenAI, node: StubNodeServer,
                                                   tokenizer: Tokenizer) -> None:
    out = client.completions.create(model=MODEL, prompt="def g(", max_tokens=2, n=3, seed=5)
    assert [c.index for c in out.choices] == [0, 1, 2]
    _, text = _expected_text(tokenizer.encode("def g("), 2)
    assert all(c.text == text and c.finish_reason == "length" for c in out.choices)
    seeds = [r.sampling.seed for r in node.counters.requests[-3:]]
    assert seeds[0] == 5 and len(set(seeds)) == 3
    client.completions.create(model=MODEL, prompt="def g(", max_tokens=2, n=3, seed=5)
    assert sorted(r.sampling.seed for r in node.counters.requests[-3:]) == sorted(seeds)
    assert out.usage.prompt_tokens == len(tokenizer.encode("def g(")) and out.usage.completion_tokens == 6


def test_batched_prompts_come_back_in_order(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    prompts = ["import os", "x = [", "def h():"]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [_expected_text(tokenizer.encode(p), 3)[1] for p in prompts]
    assert out.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)


def test_streamed_batch_times_n_interleaves_indexed_choices(client: openai.OpenAI,
                                                            tokenizer: Tokenizer) -> None:
    prompts = ["a", "bb"]
    chunks = list(client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, n=2, stream=True,
                                            stream_options={"include_usage": True}))
    texts: dict[int, str] = {}
    finished = set()
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason:
            finished.add(choice.index)
    expected = [_expected_text(tokenizer.encode(p), 3)[1] for p in prompts]
    assert texts == {0: expected[0], 1: expected[0], 2: expected[1], 3: expected[1]}
    assert finished == {0, 1, 2, 3} and chunks[-1].usage.completion_tokens == 12


def test_chat_n_returns_n_messages(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=2, n=2)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content == out.choices[1].message.content


def test_worker_processes_share_the_port_and_one_registry_view(node: StubNodeServer,
                                                               tokenizer: Tokenizer) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "router", "--port", "0", "--workers", "2",
                             "--health-interval", "0.5", *secret_flags()], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[-1]
        register_with_router(url, node.info())  # one heartbeat, taken by one of the workers
        time.sleep(1.0)  # the other worker reads the shared registry directory within 0.2 s
        with httpx.Client(base_url=url, timeout=10) as http:
            workers = set()
            for _ in range(20):  # a new connection each time: the kernel spreads them over the workers
                reply = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                                  headers={"connection": "close"})
                assert reply.status_code == 200, reply.text
                assert reply.json()["choices"][0]["text"] == _expected_text(tokenizer.encode("x"), 2)[1]
                workers.add(reply.json()["id"].split("-")[1][:16])  # ids carry a per-process prefix
        assert len(workers) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_best_of_asks_the_node_for_logprobs_and_returns_n(client: openai.OpenAI,
                                                          node: StubNodeServer) -> None:
    out = client.completions.create(model=MODEL, prompt="def k(", max_tokens=2, best_of=3, n=1)
    assert [c.index for c in out.choices] == [0] and out.choices[0].logprobs is None
    assert [r.sampling.logprobs for r in node.counters.requests[-3:]] == [0, 0, 0]
    assert out.usage.completion_tokens == 6


def test_spoofed_heartbeats_and_removals_are_refused_and_counted(node: StubNodeServer) -> None:
    """A registration needs the cluster secret: unsigned, foreign and altered ones get 401, are
    counted, and never route a request; the genuine node's entry cannot be removed by anyone else."""
    with BackgroundRouter(_config()) as r:
        spoof = msgspec.structs.replace(node.info(), node_id="spoof-0")
        unsigned = RegistryAuth(None).seal(spoof)
        foreign = RegistryAuth(ClusterSecret(b"not-this-cluster-secret")).seal(spoof)
        altered = RegistryAuth(TEST_SECRET).seal(node.info()).replace(b'"mixed-0"', b'"spoof-1"')
        stale = RegistryAuth(TEST_SECRET, clock=lambda: time.time() - 7200).seal(spoof)
        for body, code in [(unsigned, "unsigned"), (foreign, "bad_mac"), (altered, "bad_mac"),
                           (stale, "stale")]:
            response = httpx.post(r.url + HEARTBEAT_PATH, content=body, timeout=5)
            assert response.status_code == 401, (code, response.text)
            assert response.json()["error"]["code"] == "unauthenticated"
        assert httpx.get(r.url + "/internal/v1/nodes").json()["nodes"] == []
        assert httpx.post(r.url + HEARTBEAT_PATH, content=b"{}", timeout=5).status_code == 400
        metrics = httpx.get(r.url + "/metrics").text
        for reason, count in [("unsigned", 1), ("bad_mac", 2), ("stale", 1), ("malformed", 1)]:
            assert f'pdserve_router_registry_rejections_total{{reason="{reason}"}} {count}.0' in metrics
        register_with_router(r.url, node.info())
        assert httpx.delete(r.url + NODES_PATH + "/mixed-0", timeout=5).status_code == 401
        forged = RegistryAuth(ClusterSecret(b"not-this-cluster-secret")).removal_token("mixed-0")
        removal = r.url + NODES_PATH + "/mixed-0"
        assert httpx.delete(removal, headers={REMOVAL_HEADER: forged}).status_code == 401
        assert [n["node_id"] for n in httpx.get(r.url + "/internal/v1/nodes").json()["nodes"]] == ["mixed-0"]
        token = RegistryAuth(TEST_SECRET).removal_token("mixed-0")
        assert httpx.delete(removal, headers={REMOVAL_HEADER: token}).status_code == 200
        assert httpx.get(r.url + "/internal/v1/nodes").json()["nodes"] == []
