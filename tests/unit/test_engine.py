"""`LLMEngine` in process on the bundled demo model: batch invariance, HF parity, preemption,
raw logprobs against a float64 recomputation, seeded sampling, stop rules, abort, prompt logprobs.

The references are independent of the engine: HF transformers' fp32 model on the same weights
(it ignores the MTP layer), a float64 log-softmax of its logits, and the engine's own output when
run alone with a big pool (for the batching and preemption properties).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from pdserve.common.kv_cache import KVCachePool
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine, kv_spec_for
from pdserve.engine.request import RequestStatus
from pdserve.engine.scheduler import AdmissionError
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.loader import default_model_dir
from pdserve.models.tokenizer import Tokenizer
from pdserve.tests.support.token_views import TokenInfo, token_infos

LOGPROB_TOL = 1e-4
MAX_STEPS = 2000  # far above any test's need: a scheduler that stops making progress fails, not hangs
PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):",
    "for i in range(",
    "x = [",
    "def main():\n    parser = argparse.ArgumentParser(description=__doc__)\n    parser.add_argument(",
    "return self.",
    "# compute the",
]
BIG_POOL = CacheConfig(num_blocks=512, block_size=16)


@dataclass
class Generated:
    """Everything the engine emitted for one request."""

    token_ids: list[int] = field(default_factory=list)
    infos: list[TokenInfo] = field(default_factory=list)
    prompt_infos: list[TokenInfo] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir())


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer: Tokenizer) -> list[list[int]]:
    return [tokenizer.encode(p) for p in PROMPTS]


def make_engine(model: LlamaForCausalLM, cache: CacheConfig = BIG_POOL,
                scheduler: SchedulerConfig | None = None, eos: Sequence[int] = (0,)) -> LLMEngine:
    config = EngineConfig(cache=cache, scheduler=scheduler or SchedulerConfig())
    return LLMEngine(model, config, KVCachePool.allocate(kv_spec_for(model, config)), eos)


def run_to_completion(engine: LLMEngine) -> dict[str, Generated]:
    results: dict[str, Generated] = {}
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished():
            return results
        for out in engine.step():
            got = results.setdefault(out.request_id, Generated())
            got.token_ids.extend(out.tokens.token_ids)
            got.infos.extend(token_infos(out.tokens))
            got.prompt_infos.extend(token_infos(out.prompt_logprobs))
            got.status = out.status
            got.num_preemptions += out.status is RequestStatus.PREEMPTED
    raise AssertionError(f"engine still busy after {MAX_STEPS} steps")


def generate(model: LlamaForCausalLM, requests: Sequence[tuple[Sequence[int], SamplingParams]],
             cache: CacheConfig = BIG_POOL, scheduler: SchedulerConfig | None = None,
             eos: Sequence[int] = (0,)) -> list[Generated]:
    engine = make_engine(model, cache, scheduler, eos)
    for i, (ids, params) in enumerate(requests):
        engine.add_request(f"r{i}", ids, params)
    results = run_to_completion(engine)
    assert engine.block_manager.num_free_blocks == cache.num_blocks, "blocks leaked"
    return [results[f"r{i}"] for i in range(len(requests))]


def greedy(max_tokens: int, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


# Chunked prefill of 24 tokens a step: long prompts span several steps and share them with decodes.
MIXED_STEPS = SchedulerConfig(max_num_batched_tokens=24, max_num_seqs=8, max_model_len=512)


def float64_log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def hf_logits(hf_model: torch.nn.Module, token_ids: Sequence[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([list(token_ids)])).logits[0].numpy()  # [len, vocab] fp32


# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def solo_greedy(model: LlamaForCausalLM, prompt_ids: list[list[int]]) -> list[list[int]]:
    """Each prompt run alone in its own engine: the reference for every batching property."""
    return [generate(model, [(ids, greedy(12))])[0].token_ids for ids in prompt_ids]


def test_greedy_batch_of_8_with_chunked_prefill_equals_each_run_alone(
        model: LlamaForCausalLM, prompt_ids: list[list[int]], solo_greedy: list[list[int]]) -> None:
    assert max(map(len, prompt_ids)) > MIXED_STEPS.max_num_batched_tokens, "no prompt gets chunked"
    batched = generate(model, [(ids, greedy(12)) for ids in prompt_ids], scheduler=MIXED_STEPS)
    assert [g.token_ids for g in batched] == solo_greedy
    assert all(g.status is RequestStatus.FINISHED_LENGTH for g in batched)


def test_greedy_equals_hf_transformers_generate(hf_model: torch.nn.Module, prompt_ids: list[list[int]],
                                                solo_greedy: list[list[int]]) -> None:
    for ids, ours in zip(prompt_ids, solo_greedy, strict=True):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                    eos_token_id=0, pad_token_id=0)
        assert out[0, len(ids):].tolist() == ours


def assert_token_info_matches(info: TokenInfo, token_id: int, ref_logprobs: np.ndarray, k: int) -> None:
    """One emitted token's raw logprob facts against float64 logprobs of the HF fp32 logits."""
    assert abs(info.logprob - ref_logprobs[token_id]) < LOGPROB_TOL
    # Rank is exact unless another token lies within the tolerance of the chosen one (a near-tie,
    # where the two fp32 models may order them differently): then it must sit inside the tie.
    strictly_above = int((ref_logprobs > ref_logprobs[token_id] + LOGPROB_TOL).sum())
    above_or_tied = int((ref_logprobs > ref_logprobs[token_id] - LOGPROB_TOL).sum())
    assert strictly_above + 1 <= info.rank <= max(above_or_tied, 1)
    if strictly_above + 1 == above_or_tied:  # no near-tie: the rank is exact
        assert info.rank == 1 + int((ref_logprobs > ref_logprobs[token_id]).sum())
    assert len(info.top_ids) == len(info.top_logprobs) == k
    np.testing.assert_allclose(info.top_logprobs, ref_logprobs[list(info.top_ids)], atol=LOGPROB_TOL, rtol=0)
    if k:
        ref_kth = np.sort(ref_logprobs)[::-1][k - 1]
        assert list(info.top_logprobs) == sorted(info.top_logprobs, reverse=True)
        assert min(ref_logprobs[list(info.top_ids)]) >= ref_kth - LOGPROB_TOL  # the true top-k, up to ties
        assert len(set(info.top_ids)) == k


def test_raw_logprobs_ranks_and_top_k_match_float64_log_softmax(
        model: LlamaForCausalLM, hf_model: torch.nn.Module, prompt_ids: list[list[int]]) -> None:
    # Sampled rows (temperature, filters, penalties) emit tokens of rank > 1; logprobs stay raw, so
    # the penalties and temperature must not show in them. Each request keeps its own k.
    params = [
        greedy(8, logprobs=20),
        SamplingParams(max_tokens=8, temperature=1.5, seed=11, logprobs=5),
        SamplingParams(max_tokens=8, temperature=1.2, top_k=40, seed=12, logprobs=0,
                       repetition_penalty=1.3),
        SamplingParams(max_tokens=8, temperature=2.0, top_p=0.95, seed=13, logprobs=1,
                       presence_penalty=1.0, frequency_penalty=0.5),
        greedy(8, logprobs=20, repetition_penalty=2.0),
        SamplingParams(max_tokens=8, temperature=1.0, min_p=0.01, seed=14, logprobs=20),
    ]
    results = generate(model, list(zip(prompt_ids, params, strict=False)), scheduler=MIXED_STEPS)
    ranks = []
    for ids, p, got in zip(prompt_ids, params, results, strict=False):
        assert len(got.infos) == len(got.token_ids) > 0
        ref = float64_log_softmax(hf_logits(hf_model, ids + got.token_ids))
        for i, (token_id, info) in enumerate(zip(got.token_ids, got.infos, strict=True)):
            assert_token_info_matches(info, token_id, ref[len(ids) - 1 + i], p.logprobs)
            ranks.append(info.rank)
    assert max(ranks) > 1, "only argmax tokens were emitted: the ranks were not exercised"


def test_requests_without_logprobs_get_no_infos(model: LlamaForCausalLM, prompt_ids: list[list[int]]) -> None:
    plain, wanted = generate(model, [(prompt_ids[0], greedy(4)), (prompt_ids[1], greedy(4, logprobs=3))])
    assert plain.infos == [] and len(wanted.infos) == 4


def test_a_prefill_nodes_first_token_carries_the_logprobs_asked_for_and_no_more(
        model: LlamaForCausalLM, prompt_ids: list[list[int]]) -> None:
    """A prefill-only request's first token is what a mixed node's would be: no logprob when none was
    asked for (P computes no log-softmax for it), the top-k when it was; the same token either way."""
    cases = {"plain": greedy(4), "rank-only": greedy(4, logprobs=0), "top-3": greedy(4, logprobs=3)}
    engine = make_engine(model)
    for name, params in cases.items():
        engine.add_prefill_request(name, prompt_ids[0], params)
    firsts = {}
    for _ in range(MAX_STEPS):
        for out in engine.step():
            assert out.status is RequestStatus.FINISHED_PREFILLED, out
            firsts[out.request_id] = out.tokens
        if len(firsts) == len(cases):
            break
    assert firsts["plain"].logprobs == [] and firsts["plain"].top_k == 0
    assert len(firsts["rank-only"].logprobs) == 1 and firsts["rank-only"].top_k == 0
    assert firsts["rank-only"].ranks == [1]  # greedy: the argmax
    assert firsts["top-3"].top_k == 3 and firsts["top-3"].top_ids[0] == firsts["top-3"].token_ids[0]
    assert len({tuple(t.token_ids) for t in firsts.values()}) == 1
    mixed = generate(model, [(prompt_ids[0], greedy(1, logprobs=3))])[0]
    assert mixed.token_ids == firsts["top-3"].token_ids
    assert mixed.infos == token_infos(firsts["top-3"])


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded-sampling"])
def test_preemption_in_a_tiny_pool_gives_the_same_outputs_as_a_big_pool(
        model: LlamaForCausalLM, prompt_ids: list[list[int]], sampled: bool) -> None:
    def params(i: int) -> SamplingParams:
        if sampled:
            return SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=100 + i, logprobs=2,
                                  prompt_logprobs=1)
        return greedy(16, logprobs=2, prompt_logprobs=1)

    requests = [(ids[:20], params(i)) for i, ids in enumerate(prompt_ids)]  # <= 36 tokens: 9 blocks of 4
    big = generate(model, requests, cache=CacheConfig(num_blocks=256, block_size=4), scheduler=MIXED_STEPS)
    tiny = generate(model, requests, cache=CacheConfig(num_blocks=12, block_size=4), scheduler=MIXED_STEPS)
    assert sum(g.num_preemptions for g in tiny) >= 2, "the tiny pool did not force preemption"
    assert sum(g.num_preemptions for g in big) == 0
    for (ids, _), b, t in zip(requests, big, tiny, strict=True):
        assert t.token_ids == b.token_ids
        assert t.status == b.status
        np.testing.assert_allclose([i.logprob for i in t.infos], [i.logprob for i in b.infos],
                                   atol=LOGPROB_TOL, rtol=0)
        # A prompt recomputed after preemption reports its prompt logprobs once, not twice.
        assert len(t.prompt_infos) == len(b.prompt_infos) == len(ids) - 1
        np.testing.assert_allclose([i.logprob for i in t.prompt_infos], [i.logprob for i in b.prompt_infos],
                                   atol=LOGPROB_TOL, rtol=0)


def test_seeded_sampling_is_reproducible_across_batch_compositions(
        model: LlamaForCausalLM, prompt_ids: list[list[int]], solo_greedy: list[list[int]]) -> None:
    target = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=1234)
    alone = generate(model, [(prompt_ids[0], target)])[0].token_ids
    # The same request last in a mixed batch of greedy and other seeded rows, under chunked prefill.
    others = [(ids, greedy(12) if i % 2 else SamplingParams(max_tokens=12, temperature=0.7, seed=i))
              for i, ids in enumerate(prompt_ids[1:])]
    in_batch = generate(model, [*others, (prompt_ids[0], target)], scheduler=MIXED_STEPS)[-1].token_ids
    assert in_batch == alone
    other_seed = generate(model, [(prompt_ids[0], SamplingParams(max_tokens=12, temperature=1.0, top_k=50,
                                                                  top_p=0.9, seed=4321))])[0].token_ids
    assert other_seed != alone and alone != solo_greedy[0], "sampling did not depend on the seed"


# -- stop rules: the engine's eos ids are a parameter, so "eos" is a token greedy really produces ---


def test_max_tokens_finishes_with_length(model: LlamaForCausalLM, prompt_ids: list[list[int]],
                                         solo_greedy: list[list[int]]) -> None:
    got = generate(model, [(prompt_ids[2], greedy(5))])[0]
    assert got.token_ids == solo_greedy[2][:5] and got.status is RequestStatus.FINISHED_LENGTH


def first_new_token(tokens: list[int]) -> tuple[int, int]:
    """(index, token) of the first output token at index >= 2 that did not occur before it."""
    for i, t in enumerate(tokens):
        if i >= 2 and t not in tokens[:i]:
            return i, t
    raise AssertionError(f"no usable stop token in {tokens}")


def test_stop_token_ids_end_the_request_on_the_stop_token(
        model: LlamaForCausalLM, prompt_ids: list[list[int]], solo_greedy: list[list[int]]) -> None:
    index, stop = first_new_token(solo_greedy[3])
    got = generate(model, [(prompt_ids[3], greedy(12, stop_token_ids=(stop,)))])[0]
    assert got.token_ids == solo_greedy[3][: index + 1]
    assert got.status is RequestStatus.FINISHED_STOPPED


def test_eos_stops_unless_ignore_eos(model: LlamaForCausalLM, prompt_ids: list[list[int]],
                                     solo_greedy: list[list[int]]) -> None:
    index, eos = first_new_token(solo_greedy[3])
    stopped = generate(model, [(prompt_ids[3], greedy(12))], eos=(eos,))[0]
    assert stopped.token_ids == solo_greedy[3][: index + 1]
    assert stopped.status is RequestStatus.FINISHED_STOPPED
    ignored = generate(model, [(prompt_ids[3], greedy(12, ignore_eos=True))], eos=(eos,))[0]
    assert ignored.token_ids == solo_greedy[3] and ignored.status is RequestStatus.FINISHED_LENGTH


def test_min_tokens_suppresses_stop_tokens_and_eos_until_reached(
        model: LlamaForCausalLM, prompt_ids: list[list[int]], solo_greedy: list[list[int]]) -> None:
    index, stop = first_new_token(solo_greedy[3])
    min_tokens = index + 3
    for kwargs, eos in (({"stop_token_ids": (stop,)}, (0,)), ({}, (stop,))):
        got = generate(model, [(prompt_ids[3], greedy(12, min_tokens=min_tokens, **kwargs))], eos=eos)[0]
        assert len(got.token_ids) >= min_tokens
        assert stop not in got.token_ids[:min_tokens]
        # Up to the first suppressed step the request follows plain greedy, then it must deviate.
        assert got.token_ids[:index] == solo_greedy[3][:index] and got.token_ids[index] != stop


# -- abort, rejection, prompt logprobs ----------------------------------------------------------------


def test_abort_of_running_and_waiting_requests_frees_every_block(
        model: LlamaForCausalLM, prompt_ids: list[list[int]], solo_greedy: list[list[int]]) -> None:
    engine = make_engine(model, CacheConfig(num_blocks=64, block_size=4),
                         SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=2, max_model_len=256))
    for i in range(3):
        engine.add_request(f"r{i}", prompt_ids[i], greedy(40))
    for _ in range(4):
        engine.step()
    assert engine.block_manager.num_free_blocks < 64
    assert [r.request_id for r in engine.scheduler.waiting] == ["r2"]  # max_num_seqs keeps it waiting
    assert engine.abort("r2") and engine.abort("r0") and engine.abort("r1")
    assert not engine.abort("r1") and not engine.abort("never-added")
    assert engine.block_manager.num_free_blocks == 64 and not engine.has_unfinished()
    assert engine.step() == []
    # Freed blocks hold stale KV; a new request on them must not see it.
    engine.add_request("again", prompt_ids[4], greedy(12))
    assert run_to_completion(engine)["again"].token_ids == solo_greedy[4]
    assert engine.block_manager.num_free_blocks == 64


def test_a_prompt_longer_than_max_model_len_is_rejected_and_others_continue(
        model: LlamaForCausalLM, prompt_ids: list[list[int]], solo_greedy: list[list[int]]) -> None:
    engine = make_engine(model, scheduler=SchedulerConfig(max_model_len=32))
    engine.add_request("ok", prompt_ids[0], greedy(12))
    with pytest.raises(AdmissionError, match="max_model_len"):
        engine.add_request("long", list(range(1, 40)), greedy(4))
    assert run_to_completion(engine)["ok"].token_ids == solo_greedy[0]


@pytest.mark.parametrize("bad_id", [-1, 8192, 10**6])
def test_a_prompt_token_outside_the_vocabulary_is_rejected_at_admission(
        model: LlamaForCausalLM, prompt_ids: list[list[int]], solo_greedy: list[list[int]],
        bad_id: int) -> None:
    assert model.config.vocab_size == 8192
    engine = make_engine(model)
    engine.add_request("ok", prompt_ids[0], greedy(12))
    # Admitted, it would fail the embedding lookup mid-step and take the whole batch down with it.
    with pytest.raises(AdmissionError, match=r"\[0, 8192\)"):
        engine.add_request("bad", [5, bad_id, 6], greedy(4))
    assert run_to_completion(engine)["ok"].token_ids == solo_greedy[0]


def test_prompt_logprobs_match_float64_log_softmax_across_prefill_chunks(
        model: LlamaForCausalLM, hf_model: torch.nn.Module, prompt_ids: list[list[int]]) -> None:
    ids = prompt_ids[2] + prompt_ids[5]
    small_chunks = SchedulerConfig(max_num_batched_tokens=8, max_model_len=512)
    assert len(ids) > 3 * small_chunks.max_num_batched_tokens  # several chunks each contribute
    got = generate(model, [(ids, greedy(2, prompt_logprobs=5)), (prompt_ids[0], greedy(2))],
                   scheduler=small_chunks)
    ref = float64_log_softmax(hf_logits(hf_model, ids))
    assert len(got[0].prompt_infos) == len(ids) - 1  # every prompt token but the first
    for position, info in enumerate(got[0].prompt_infos, start=1):
        assert_token_info_matches(info, ids[position], ref[position - 1], 5)
    assert got[1].prompt_infos == []
