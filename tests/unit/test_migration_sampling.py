"""A migrated continuation draws what the undisturbed run drew: a request's random stream, penalties and
min_tokens are keyed by output position, so the prompt + the first k outputs with
``resumed_output_tokens=k`` and the remaining budget produce exactly the remaining outputs — alone or in
a batch, for any k, greedy or seeded, with or without speculative decoding (whose coupled verification
emits exactly the tokens plain sampling would)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.engine import LLMEngine
from pdserve.engine.request import RequestStatus
from pdserve.engine.spec_config import SpeculativeConfig
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.loader import default_model_dir
from pdserve.models.tokenizer import Tokenizer
from pdserve.tests.unit.spec_fixtures import make_spec_engine

MAX_TOKENS = 24
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "for i in range(", "# compute the"]
SEEDED = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=77,
                        repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3)
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, repetition_penalty=1.1)
NGRAM = '{"method": "ngram", "num_speculative_tokens": 2, "max_ngram_size": 3, "min_ngram_size": 1}'
MTP = '{"method": "mtp", "num_speculative_tokens": 2}'


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tokenizer = Tokenizer.from_dir(default_model_dir())
    return [tokenizer.encode(p) for p in PROMPTS]


def _engine(model: LlamaForCausalLM, spec: str | None = None) -> LLMEngine:
    return make_spec_engine(model, None if spec is None else SpeculativeConfig.from_json(spec),
                            num_blocks=128, max_num_seqs=8, max_num_batched_tokens=24)


def _run(engine: LLMEngine, requests: Sequence[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    for i, (ids, params) in enumerate(requests):
        engine.add_request(f"r{i}", ids, params)
    outputs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(requests))}
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            assert out.status is not RequestStatus.FINISHED_ERROR, out.error
            outputs[out.request_id].extend(out.tokens.token_ids)
    assert not engine.has_unfinished()
    return [outputs[f"r{i}"] for i in range(len(requests))]


def continuation(prompt: list[int], sent: list[int],
                 params: SamplingParams) -> tuple[list[int], SamplingParams]:
    """What the router sends after ``sent`` reached the client (router/dispatch.py continuation)."""
    return prompt + sent, replace(params, max_tokens=params.max_tokens - len(sent),
                                  min_tokens=max(0, params.min_tokens - len(sent)),
                                  resumed_output_tokens=len(sent))


@pytest.mark.parametrize("params", [SEEDED, GREEDY], ids=["seeded", "greedy"])
def test_a_continuation_at_any_position_equals_the_undisturbed_run(
        model: LlamaForCausalLM, prompts: list[list[int]], params: SamplingParams) -> None:
    prompt = prompts[0]
    [alone] = _run(_engine(model), [(prompt, params)])
    assert len(alone) == MAX_TOKENS
    seams = [1, 2, 7, 19, 20, MAX_TOKENS - 1]
    # every continuation in one batch, next to unrelated requests (batch composition must not matter)
    others = [(ids, replace(SEEDED, seed=i)) for i, ids in enumerate(prompts[1:])]
    requests = [*others, *(continuation(prompt, alone[:k], params) for k in seams)]
    results = _run(_engine(model), requests)[len(others):]
    for k, rest in zip(seams, results, strict=True):
        assert alone[:k] + rest == alone, f"continuation after {k} tokens"


def test_a_seeded_continuation_differs_without_the_resumed_count(
        model: LlamaForCausalLM, prompts: list[list[int]]) -> None:
    """Negative control: the same prompt without resumed_output_tokens draws from generation index 0
    and without the outputs' penalties, and goes another way."""
    prompt = prompts[0]
    [alone] = _run(_engine(model), [(prompt, SEEDED)])
    ids, params = continuation(prompt, alone[:7], SEEDED)
    [naive] = _run(_engine(model), [(ids, replace(params, resumed_output_tokens=0))])
    assert alone[:7] + naive != alone


@pytest.mark.parametrize("spec", [NGRAM, MTP], ids=["ngram", "mtp"])
@pytest.mark.parametrize("params", [SEEDED, replace(GREEDY, repetition_penalty=1.0)],
                         ids=["seeded", "greedy"])
def test_speculative_decoding_changes_no_token_and_continues_exactly(
        model: LlamaForCausalLM, prompts: list[list[int]], spec: str, params: SamplingParams) -> None:
    """Drafts change speed, never tokens: a speculative run equals the plain one, and so does a
    speculative continuation of it at any seam."""
    prompt = prompts[1]
    [alone] = _run(_engine(model), [(prompt, params)])
    seams = [1, 5, 13]
    results = _run(_engine(model, spec), [(prompt, params), *(continuation(prompt, alone[:k], params)
                                                              for k in seams)])
    assert results[0] == alone
    for k, rest in zip(seams, results[1:], strict=True):
        assert alone[:k] + rest == alone, f"continuation after {k} tokens"
