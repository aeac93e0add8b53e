"""Speculative decoding end to end inside one engine, on the bundled demo model: every method's greedy
output and logprobs equal non-speculative decoding at batch 1 and batch 16, drafts are actually
accepted, and a request split into a prefill phase and a decode phase (first token, top-k, rank and
drafts handed over, the KV copied block by block as a transfer would) equals the single-phase run."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.engine import LLMEngine
from pdserve.engine.protocol import RequestOutput
from pdserve.engine.request import RequestStatus
from pdserve.engine.spec_config import SpeculativeConfig
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.loader import default_model_dir
from pdserve.models.tokenizer import Tokenizer
from pdserve.tests.support.token_views import token_infos
from pdserve.tests.unit.spec_fixtures import make_spec_engine

PROMPTS = [
    "def f(",
    "import os\n\ndef main(",
    "class Stack:\n    def __init__(self",
    "for i in range(10):\n    ",
    "def read_file(path):\n    with open(",
    "import sys\nimport re\n\n",
    "    def __repr__(self):\n        return ",
    "if __name__ == '__main__':\n    ",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return ",
    "try:\n    import json\nexcept ImportError:\n    ",
    "class Error(Exception):\n    ",
    "def __eq__(self, other):\n        ",
    "The quick brown fox",
    "Hello, how are you",
    "# Copyright",
    "x = [i * i for i in ",
    "    raise ValueError(",
    "return self.",
    "while True:\n    ",
    '"""Return the ',
]
MAX_TOKENS = 24
METHODS = {
    "mtp_s1": '{"method": "mtp", "num_speculative_tokens": 1}',
    "mtp_s3": '{"method": "mtp", "num_speculative_tokens": 3}',
    "ngram": '{"method": "ngram", "num_speculative_tokens": 3, "max_ngram_size": 3, "min_ngram_size": 1}',
    "hybrid_s1_k5": '{"method": "mtp", "num_speculative_tokens": 5, "num_model_steps": 1, '
    '"mtp_strategy": "with_ngram"}',
}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tokenizer = Tokenizer.from_dir(default_model_dir())
    return [tokenizer.encode(p) for p in PROMPTS]


def make_engine(model: LlamaForCausalLM, spec: SpeculativeConfig | None, max_num_seqs: int) -> LLMEngine:
    return make_spec_engine(model, spec, num_blocks=160, max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=512)


PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=3, seed=7)


def run(engine: LLMEngine, prompts: list[list[int]]) -> tuple[dict[str, list[RequestOutput]], int]:
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, PARAMS)
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(len(prompts) * (MAX_TOKENS + 2)):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert not engine.has_unfinished()
    return outputs, sum(o.num_accepted_drafts for outs in outputs.values() for o in outs)


def tokens_and_logprobs(outs: list[RequestOutput]) -> tuple[list[int], np.ndarray, list[tuple[int, ...]]]:
    tokens = [t for o in outs for t in o.tokens.token_ids]
    infos = [i for o in outs for i in token_infos(o.tokens)]
    assert len(infos) == len(tokens)
    return tokens, np.asarray([i.logprob for i in infos]), [i.top_ids for i in infos]


@pytest.fixture(scope="module")
def baseline(model: LlamaForCausalLM, prompts: list[list[int]]) -> dict[str, list[RequestOutput]]:
    return run(make_engine(model, None, 16), prompts)[0]


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("method", list(METHODS))
def test_greedy_speculative_equals_plain_decoding(
    model: LlamaForCausalLM,
    prompts: list[list[int]],
    baseline: dict[str, list[RequestOutput]],
    method: str,
    batch: int,
) -> None:
    engine = make_engine(model, SpeculativeConfig.from_json(METHODS[method]), batch)
    outputs, accepted = run(engine, prompts)
    assert accepted > len(prompts)  # speculation really ran: on average more than one draft accepted each
    for request_id, expected in baseline.items():
        want_tokens, want_lps, want_top = tokens_and_logprobs(expected)
        got_tokens, got_lps, got_top = tokens_and_logprobs(outputs[request_id])
        assert got_tokens == want_tokens, request_id
        np.testing.assert_allclose(got_lps, want_lps, atol=1e-4, rtol=0)
        assert got_top == want_top
        assert outputs[request_id][-1].status == expected[-1].status


def test_prefill_and_decode_phases_equal_the_single_phase_run(
    model: LlamaForCausalLM, prompts: list[list[int]], baseline: dict[str, list[RequestOutput]]
) -> None:
    spec = SpeculativeConfig.from_json(METHODS["mtp_s3"])
    engine = make_engine(model, spec, 16)
    pool = engine.runner.kv_pool
    for i, ids in enumerate(prompts[:6]):
        # Prefill phase: the first token with its logprob facts and the MTP drafts for the decode side.
        engine.add_prefill_request(f"p{i}", ids, PARAMS)
        first = prefilled = None
        for _ in range(4):
            first = next((o for o in engine.step() if o.request_id == f"p{i}"), None)
            # The blocks a prefill node pushes are the ones its engine reports with each chunk.
            progressed = engine.take_prefill_progress()
            prefilled = next((r for r in progressed if r.request_id == f"p{i}"), prefilled)
            if first is not None:
                break
        assert first is not None and first.status is RequestStatus.FINISHED_PREFILLED
        assert len(first.draft_token_ids) == spec.num_speculative_tokens
        # Decode phase: reserve, receive the KV (every layer, the MTP layer's too), then the first token.
        decode = engine.reserve(f"r{i}", ids, PARAMS,
                                num_extra_tokens=1 + spec.num_speculative_tokens)
        num_blocks = -(-len(ids) // pool.spec.block_size)
        src, dst = prefilled.block_table[:num_blocks], decode.block_table[:num_blocks]
        pool.array[:, :, dst] = pool.array[:, :, src]
        engine.release(f"p{i}")
        start = engine.on_remote_kv(f"r{i}", first.tokens, first.draft_token_ids)
        outs = [start]  # the peer's first token, logprobs and all, is the decode side's first output
        for _ in range(MAX_TOKENS + 2):
            if not engine.has_unfinished():
                break
            outs.extend(o for o in engine.step() if o.request_id == f"r{i}")
        want_tokens, want_lps, _ = tokens_and_logprobs(baseline[f"r{i}"])
        got_tokens, got_lps, _ = tokens_and_logprobs(outs)
        assert got_tokens == want_tokens
        np.testing.assert_allclose(got_lps, want_lps, atol=1e-4, rtol=0)
        assert sum(o.num_accepted_drafts for o in outs) > 0
