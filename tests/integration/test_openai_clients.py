"""Clients nobody here wrote, against `pdserve up` (1 prefill + 1 decode node with the hybrid MTP +
n-gram speculative method, real processes): the official `openai` client on n > 1, batched prompts,
logit_bias, refused fields and the tokenizer endpoints, and lm-evaluation-harness's
`local-completions` model with `--batch_size 4` and its `remote` tokenizer backend.

Expected values come from independent requests to the same cluster (a batch must equal its prompts
sent one by one) or from the demo tokenizer, never from the code under test alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from pdserve.tests.support.cluster import pdserve_up

MODEL = "pdserve-demo"
HYBRID = ('{"method": "mtp", "num_speculative_tokens": 3, "num_model_steps": 1, '
          '"mtp_strategy": "with_ngram", "max_ngram_size": 3, "min_ngram_size": 1}')
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:"]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with pdserve_up("--prefill", "1", "--decode", "1", "--speculative-config", HYBRID, "--num-blocks", "256",
                    "--threads-per-node", "1") as (_proc, router_url):
        yield router_url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _tokenize(url: str, text: str) -> list[int]:
    reply = httpx.post(url + "/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30)
    return reply.json()["tokens"]


def test_n3_seeded_choices_are_distinct_and_reproducible(client: openai.OpenAI) -> None:
    def ask() -> list[str]:
        out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, n=3, seed=1234,
                                        temperature=1.0)
        assert [c.index for c in out.choices] == [0, 1, 2]
        return [c.text for c in out.choices]

    first = ask()
    assert len(set(first)) == 3, first
    assert ask() == first
    single = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, seed=1234,
                                       temperature=1.0)
    assert single.choices[0].text == first[0]  # choice 0 keeps the request's seed


def test_batched_completion_returns_the_prompts_in_order(client: openai.OpenAI) -> None:
    batch = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=10, temperature=0)
    one_by_one = [client.completions.create(model=MODEL, prompt=p, max_tokens=10,
                                            temperature=0).choices[0].text for p in PROMPTS]
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == one_by_one
    assert len(set(one_by_one)) == 3


def test_best_of_returns_the_candidates_with_the_highest_total_logprob(client: openai.OpenAI) -> None:
    ask = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 8, "seed": 77, "temperature": 1.0}
    best = client.completions.create(**ask, best_of=3, n=2)
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    # the same three candidates (the same per-choice seeds), scored here
    candidates = client.completions.create(**ask, n=3, logprobs=0).choices
    ranked = sorted(candidates, key=lambda c: -sum(c.logprobs.token_logprobs))
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert best.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in candidates)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_logit_bias_minus_100_on_the_greedy_token_changes_it(client: openai.OpenAI, url: str,
                                                             stream: bool) -> None:
    def first_token(**kw: object) -> tuple[str, int]:
        out = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=1, temperature=0,
                                        logprobs=0, **kw)
        text = out.choices[0].text
        return text, _tokenize(url, text)[0]

    text, greedy = first_token()
    banned_text, _ = first_token(logit_bias={str(greedy): -100})
    assert banned_text != text
    # the same through a streamed chat request: the banned id never shows up
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[2]}],
                                          max_tokens=1, temperature=0, stream=stream)
    content = "".join(c.choices[0].delta.content or "" for c in chat if c.choices) if stream else \
        chat.choices[0].message.content
    banned = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=1, temperature=0,
        logit_bias={str(_tokenize(url, content)[0]): -100})
    assert banned.choices[0].message.content != content


@pytest.mark.parametrize(("endpoint", "field", "value"), [
    ("completions", "suffix", "}"),
    ("completions", "prompt_logprobs", 1),
    # this cluster's router has no --tool-call-parser: tools are refused, naming the field
    ("chat", "tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("chat", "guided_decoding_backend", "xgrammar"),
    ("chat", "guided_whitespace_pattern", " "),
    ("chat", "audio", {"voice": "alloy", "format": "wav"}),
])
def test_each_unsupported_field_is_a_400_naming_it(client: openai.OpenAI, endpoint: str, field: str,
                                                    value: object) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "completions":
            client.completions.create(model=MODEL, prompt="x", max_tokens=1, extra_body={field: value})
        else:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                           max_tokens=1, extra_body={field: value})
    assert info.value.body["param"] == field and field in info.value.body["message"]


def test_tokenize_then_detokenize_round_trips(url: str) -> None:
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)<|endoftext|>"
    tokens = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": text, "add_special_tokens": False})
    assert tokens.status_code == 200 and tokens.json()["count"] == len(tokens.json()["tokens"])
    back = httpx.post(url + "/detokenize", json={"model": MODEL, "tokens": tokens.json()["tokens"]})
    assert back.json()["prompt"] == text


TINY_MC = [
    {"question": "def add(a, b):\n    return a", "choices": ["+ b", "* zebra"], "answer": 0},
    {"question": "import os\nimport", "choices": ["sys", "+++"], "answer": 0},
    {"question": "for i in range(", "choices": ["10):", "]]]"], "answer": 0},
    {"question": "class Stack:\n    def __init__(self", "choices": ["):", "==="], "answer": 0},
    {"question": "x = [1, 2, 3]\nprint(len(", "choices": ["x))", "(((("], "answer": 0},
]


@pytest.mark.slow
def test_lm_eval_local_completions_batched_with_the_remote_tokenizer(url: str, client: openai.OpenAI,
                                                                      tmp_path: Path) -> None:
    lm_eval = shutil.which("lm_eval", path=str(Path(sys.executable).parent))
    assert lm_eval is not None, "lm-eval is a test extra (pyproject.toml)"
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TINY_MC))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: pdserve_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    (tmp_path / "tiny_gen.yaml").write_text(
        "task: pdserve_tiny_gen\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: '{{choices[0]}}'\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        [lm_eval, "--model", "local-completions", "--model_args",
         f"model={MODEL},base_url={url}/v1/completions,tokenizer_backend=remote,tokenized_requests=True,"
         "num_concurrent=1,max_retries=1",
         "--tasks", "pdserve_tiny_mc,pdserve_tiny_gen", "--include_path", str(tmp_path), "--batch_size", "4",
         "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert "acc,none" in results["pdserve_tiny_mc"] and "exact_match,none" in results["pdserve_tiny_gen"]
    # every loglikelihood lm-eval computed from batched requests equals the prompt's own echo logprobs
    samples = [json.loads(line) for path in out.rglob("samples_pdserve_tiny_mc_*.jsonl")
               for line in path.read_text().splitlines()]
    assert len(samples) == len(TINY_MC)
    for sample in samples:
        requests = [sample["arguments"][f"gen_args_{i}"] for i in range(len(sample["resps"]))]
        for request, resp in zip(requests, sample["resps"], strict=True):
            expected = _continuation_logprob(client, url, request["arg_0"], request["arg_1"])
            assert float(resp[0][0]) == pytest.approx(expected, abs=1e-4)


def _continuation_logprob(client: openai.OpenAI, url: str, context: str, continuation: str) -> float:
    """Sum of the continuation tokens' logprobs from one unbatched echo request (max_tokens=0), with
    context and continuation tokenized apart as lm-eval does."""
    context_ids = _tokenize(url, context)
    prompt = context_ids + _tokenize(url, continuation)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                    temperature=0)
    return sum(out.choices[0].logprobs.token_logprobs[len(context_ids):])
