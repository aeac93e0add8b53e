"""End to end: `pdserve up` (router + prefill + decode nodes, real processes) driven by the official
`openai` client, compared with the offline mixed engine (`pdserve generate`) on the same model.

Each cluster shape runs the same checks: 1P1D with MTP, 2P2D with n-gram drafts, 1P1D with the hybrid
(MTP + n-gram). PD with speculative decoding must give the mixed engine's greedy tokens and logprobs
(no speculation there) exactly; usage, speculate_metrics, streaming and chat must be what the OpenAI
API promises; completions' echo + logprobs must return the prompt's logprobs, checked against a
float64 log-softmax of HF transformers' logits on the same weights.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from openai import OpenAI

from pdserve.models.loader import default_model_dir
from pdserve.models.tokenizer import Tokenizer
from pdserve.tests.support.cluster import offline_reference, pdserve_up

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n\ndef main(argv):", "class Stack:"]
MAX_TOKENS = 16
LOGPROB_TOL = 1e-4


@dataclass(frozen=True)
class Shape:
    prefill: int
    decode: int
    speculative_config: str

    @property
    def method(self) -> str:
        spec = json.loads(self.speculative_config)
        return "hybrid" if spec.get("mtp_strategy") == "with_ngram" else spec["method"]


SHAPES = {
    "1p1d-mtp": Shape(1, 1, '{"method": "mtp", "num_speculative_tokens": 1, "num_model_steps": 1}'),
    "2p2d-ngram": Shape(2, 2, '{"method": "ngram", "num_speculative_tokens": 3, "max_ngram_size": 3, '
                              '"min_ngram_size": 1}'),
    "1p1d-hybrid": Shape(1, 1, '{"method": "mtp", "num_speculative_tokens": 3, "num_model_steps": 1, '
                               '"mtp_strategy": "with_ngram", "max_ngram_size": 3, "min_ngram_size": 1}'),
}


@dataclass(frozen=True)
class Cluster:
    url: str  # the router's base URL
    shape: Shape

    @property
    def client(self) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module", params=list(SHAPES), ids=list(SHAPES))
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    shape = SHAPES[request.param]
    flags = ("--prefill", str(shape.prefill), "--decode", str(shape.decode), "--speculative-config",
             shape.speculative_config, "--num-blocks", "256")
    with pdserve_up(*flags) as (_proc, url):
        yield Cluster(url, shape)
    port = url.rsplit(":", 1)[1]
    leftover = subprocess.run(["pgrep", "-f", f"--registry http://127.0.0.1:{port}"], capture_output=True)
    assert leftover.stdout == b"", "pdserve up left node processes behind"


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    """The mixed (single-engine) greedy output, without speculation."""
    return offline_reference(PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()


def _speculate_metrics(response: object, choice: object) -> dict | None:
    return response.model_extra.get("speculate_metrics") or choice.model_extra.get("speculate_metrics")


def test_the_cluster_has_the_asked_nodes(cluster: Cluster) -> None:
    with urllib.request.urlopen(cluster.url + "/internal/v1/nodes", timeout=10) as reply:
        roles = [n["role"] for n in json.load(reply)["nodes"]]
    assert sorted(roles) == sorted(["prefill"] * cluster.shape.prefill + ["decode"] * cluster.shape.decode)


def test_pd_completions_equal_the_mixed_engine(cluster: Cluster, reference: dict[str, dict],
                                               tokenizer: Tokenizer) -> None:
    client = cluster.client
    drafted = 0
    for prompt in PROMPTS:
        response = client.completions.create(model="pdserve-demo", prompt=prompt, max_tokens=MAX_TOKENS,
                                             temperature=0, logprobs=2)
        choice = response.choices[0]
        expected = reference[prompt]
        assert choice.text == expected["text"]
        assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))
        assert response.usage.completion_tokens == len(expected["token_ids"])
        assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
        assert choice.finish_reason == expected["finish_reason"]
        assert choice.logprobs.token_logprobs == pytest.approx(expected["logprobs"], abs=LOGPROB_TOL)
        top = [lp for d in choice.logprobs.top_logprobs for lp in sorted(d.values(), reverse=True)]
        expected_top = [lp for row in expected["top_logprobs"] for _, lp in row]
        assert top == pytest.approx(expected_top, abs=LOGPROB_TOL)
        metrics = _speculate_metrics(response, choice)
        assert metrics is not None, f"{cluster.shape.method}: no speculate_metrics"
        assert set(metrics) >= {"accepted_tokens", "rejected_tokens", "accept_ratio", "average_accept_length",
                                "accepted_tokens_per_head", "accept_ratio_per_head"}
        drafted += metrics["accepted_tokens"] + metrics["rejected_tokens"]
    assert drafted > 0, f"{cluster.shape.method}: no draft was verified over {len(PROMPTS)} prompts"


def test_pd_streaming_and_chat(cluster: Cluster, reference: dict[str, dict]) -> None:
    client = cluster.client
    prompt = PROMPTS[0]
    stream = client.completions.create(model="pdserve-demo", prompt=prompt, max_tokens=MAX_TOKENS,
                                       temperature=0, stream=True, stream_options={"include_usage": True},
                                       logprobs=1)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference[prompt]["text"]
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs
                for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(reference[prompt]["logprobs"], abs=LOGPROB_TOL)
    assert chunks[-1].usage.completion_tokens == len(reference[prompt]["token_ids"])
    assert any(c.choices and c.choices[0].model_extra.get("speculate_metrics") for c in chunks)

    chat = client.chat.completions.create(model="pdserve-demo", max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "def add(a, b):"}],
                                          logprobs=True, top_logprobs=3)
    assert chat.choices[0].message.role == "assistant"
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 for t in chat.choices[0].logprobs.content)
    assert _speculate_metrics(chat, chat.choices[0]) is not None

    streamed_chat = list(client.chat.completions.create(
        model="pdserve-demo", max_tokens=8, temperature=0, stream=True,
        messages=[{"role": "user", "content": "def add(a, b):"}], stream_options={"include_usage": True}))
    assert streamed_chat[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in streamed_chat if c.choices)
    assert text == chat.choices[0].message.content
    assert streamed_chat[-1].usage.completion_tokens == chat.usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_echo_returns_prompt_logprobs_equal_to_a_float64_recomputation(
        cluster: Cluster, tokenizer: Tokenizer, hf_model: torch.nn.Module, stream: bool) -> None:
    prompt, k = PROMPTS[1], 3
    ids = tokenizer.encode(prompt)
    response = cluster.client.completions.create(model="pdserve-demo", prompt=prompt, max_tokens=2,
                                                 temperature=0, logprobs=k, echo=True, stream=stream)
    # streamed, the echo event (the prompt and its logprobs) comes first
    logprobs = next(iter(response)).choices[0].logprobs if stream else response.choices[0].logprobs
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].numpy().astype(np.float64)  # [len, vocab]
    ref = logits - logits.max(axis=-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(axis=-1, keepdims=True))
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert "".join(logprobs.tokens[: len(ids)]) == prompt
    for position in range(1, len(ids)):
        row = ref[position - 1]  # the distribution that predicted prompt token `position`
        assert logprobs.token_logprobs[position] == pytest.approx(row[ids[position]], abs=LOGPROB_TOL)
        top = sorted(logprobs.top_logprobs[position].values(), reverse=True)[:k]
        assert top == pytest.approx(np.sort(row)[::-1][:k], abs=LOGPROB_TOL)
