"""Speculative decoding of SAMPLED requests keeps the target distribution through the whole engine.

tests/unit/test_spec_units.py checks the rejection sampler as a kernel; here the same property goes
through everything around it: the scheduler feeding drafts, the real proposers (MTP layer, n-gram
lookup, the hybrid of both), the runner's verification and each request's own Philox streams.

Many requests with one prompt and different seeds run through a plain engine and through a
speculative engine per method; the tokens at the output positions that decode steps decide (1 ..
MAX_TOKENS - 1; position 0 comes from the prefill) must be distributed alike, by a chi-square
two-sample test per position and one over whole output sequences (which also covers each token's
dependence on the ones before it). The plain reference uses seeds disjoint from the speculative
runs: with equal seeds a step without drafts draws the very uniform plain decoding draws, so the two
samples would be correlated and the test would lose its power. Every seed is fixed, so the outcome
is deterministic; a negative control shows that the statistic rejects a clearly different
distribution at this sample size.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.engine import LLMEngine, RequestOutput
from pdserve.engine.request import RequestStatus
from pdserve.engine.spec_config import SpeculativeConfig
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.loader import default_model_dir
from pdserve.models.tokenizer import Tokenizer
from pdserve.tests.unit.spec_fixtures import make_spec_engine

# Short and repetitive: the n-gram lookup finds matches in it (" 1" -> "\n" -> "b" -> " ="), MTP
# drafts are accepted about half the time, and top-k 6 keeps the support small enough for power.
PROMPT = "a = 1\nb = 2\na = "
TEMPERATURE = 0.8
TOP_K = 6
MAX_TOKENS = 4  # after the prefill's token, room for 2 drafts and a bonus in one decode step
NUM_REQUESTS = 800
MAX_NUM_SEQS = 64
PLAIN_SEED_BASE = 1_000_000  # the reference's seeds; the speculative runs use 0 .. NUM_REQUESTS - 1
# 16 comparisons (4 methods x 4 statistics): a correct engine fails one with probability ~0.2% if a
# library change reshuffles its random numbers; the bugs this guards against give p far below this.
MIN_P_VALUE = 1e-4

METHODS = {
    "mtp_k1": '{"method": "mtp", "num_speculative_tokens": 1}',
    "mtp_k2": '{"method": "mtp", "num_speculative_tokens": 2}',
    "ngram_k2": '{"method": "ngram", "num_speculative_tokens": 2, "max_ngram_size": 3, "min_ngram_size": 1}',
    "hybrid_k2": '{"method": "mtp", "num_speculative_tokens": 2, "num_model_steps": 1, '
    '"mtp_strategy": "with_ngram"}',
}


@pytest.fixture(scope="module")
def prompt_ids() -> list[int]:
    return Tokenizer.from_dir(default_model_dir()).encode(PROMPT)


def make_engine(
    model: LlamaForCausalLM, spec: SpeculativeConfig | None, registry: CollectorRegistry | None = None
) -> LLMEngine:
    # Two blocks per running request: prompt, outputs and drafts fit without any preemption.
    return make_spec_engine(model, spec, num_blocks=2 * MAX_NUM_SEQS + 32, max_num_seqs=MAX_NUM_SEQS,
                            max_num_batched_tokens=1024, registry=registry)


@dataclass
class Run:
    sequences: list[tuple[int, ...]]  # per request, in seed order: its MAX_TOKENS output tokens
    outputs: dict[str, list[RequestOutput]]


def run(
    engine: LLMEngine, prompt_ids: list[int], seeds: Sequence[int], temperature: float = TEMPERATURE
) -> Run:
    for i, seed in enumerate(seeds):
        params = SamplingParams(
            max_tokens=MAX_TOKENS, temperature=temperature, top_k=TOP_K, seed=seed, ignore_eos=True
        )
        engine.add_request(f"r{i}", prompt_ids, params)
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(len(seeds) * (MAX_TOKENS + 2)):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert not engine.has_unfinished()
    sequences = []
    for i in range(len(seeds)):
        outs = outputs[f"r{i}"]
        assert all(o.status is not RequestStatus.PREEMPTED for o in outs)  # the KV pool is big enough
        assert outs[-1].status is RequestStatus.FINISHED_LENGTH
        sequences.append(tuple(t for o in outs for t in o.tokens.token_ids))
        assert len(sequences[-1]) == MAX_TOKENS
    return Run(sequences, outputs)


def chi2_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X ~ chi-square with ``dof`` degrees of freedom (closed forms of the
    regularized upper incomplete gamma function at half-integer shape; scipy is not installed)."""
    if statistic <= 0:
        return 1.0
    h = statistic / 2
    if dof % 2 == 0:  # exp(-h) * sum_{i < dof/2} h^i / i!
        term = total = math.exp(-h)
        for i in range(1, dof // 2):
            term *= h / i
            total += term
    else:  # erfc(sqrt(h)) + exp(-h) * sum_{i = 1 .. (dof-1)/2} h^(i - 1/2) / Gamma(i + 1/2)
        total = math.erfc(math.sqrt(h))
        term = math.exp(-h) * math.sqrt(h) / math.gamma(1.5)
        for i in range(1, (dof + 1) // 2):
            total += term
            term *= h / (i + 0.5)
    return min(1.0, total)


def two_sample_p_value(a: Sequence[Hashable], b: Sequence[Hashable]) -> tuple[float, int]:
    """Chi-square test that samples ``a`` and ``b`` come from one distribution: (p-value, dof).

    Categories whose expected count is below 5 in either sample are pooled into one bin (merged
    into the rarest kept category if the pool itself stays below 5)."""
    count_a, count_b = Counter(a), Counter(b)
    n_a, n_b = len(a), len(b)

    def expected_min(row: tuple[float, float]) -> float:
        return sum(row) * min(n_a, n_b) / (n_a + n_b)

    kept: list[tuple[float, float]] = []
    pooled = (0.0, 0.0)
    for category in sorted(set(count_a) | set(count_b), key=lambda c: -(count_a[c] + count_b[c])):
        row = (float(count_a[category]), float(count_b[category]))
        if expected_min(row) >= 5:
            kept.append(row)
        else:
            pooled = (pooled[0] + row[0], pooled[1] + row[1])
    if sum(pooled) and (expected_min(pooled) >= 5 or not kept):
        kept.append(pooled)
    elif sum(pooled):
        kept[-1] = (kept[-1][0] + pooled[0], kept[-1][1] + pooled[1])
    if len(kept) < 2:
        return 1.0, 0
    observed = np.asarray(kept).T  # [2, categories]
    expected = observed.sum(axis=0, keepdims=True) * observed.sum(axis=1, keepdims=True) / observed.sum()
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = observed.shape[1] - 1
    return chi2_sf(statistic, dof), dof


def p_values(reference: Sequence[tuple[int, ...]], sample: Sequence[tuple[int, ...]]) -> dict[str, float]:
    """Per speculatively decided position, and over the whole output sequence."""
    result = {
        f"position {p}": two_sample_p_value([s[p] for s in reference], [s[p] for s in sample])[0]
        for p in range(1, MAX_TOKENS)
    }
    result["sequence"] = two_sample_p_value(reference, sample)[0]
    return result


@pytest.fixture(scope="module")
def reference(model: LlamaForCausalLM, prompt_ids: list[int]) -> list[tuple[int, ...]]:
    seeds = range(PLAIN_SEED_BASE, PLAIN_SEED_BASE + NUM_REQUESTS)
    return run(make_engine(model, None), prompt_ids, seeds).sequences


def test_chi2_sf_matches_known_critical_values() -> None:
    for statistic, dof in [(3.841, 1), (5.991, 2), (7.815, 3), (18.307, 10), (124.342, 100)]:
        assert chi2_sf(statistic, dof) == pytest.approx(0.05, abs=1e-4)
    assert chi2_sf(10.828, 1) == pytest.approx(0.001, abs=1e-5)


def test_negative_control_a_different_temperature_is_rejected(
    model: LlamaForCausalLM, prompt_ids: list[int], reference: list[tuple[int, ...]]
) -> None:
    # Plain sampling at a clearly different temperature, with fewer requests than the speculative
    # runs have: the statistic must reject it by a wide margin.
    hotter = run(make_engine(model, None), prompt_ids, range(NUM_REQUESTS // 4), temperature=1.6).sequences
    p = p_values(reference, hotter)
    assert p["sequence"] < 1e-8, p
    assert min(p.values()) < 1e-8, p


@pytest.mark.parametrize("method", list(METHODS))
def test_sampled_speculative_decoding_keeps_the_target_distribution(
    model: LlamaForCausalLM, prompt_ids: list[int], reference: list[tuple[int, ...]], method: str
) -> None:
    registry = CollectorRegistry()
    engine = make_engine(model, SpeculativeConfig.from_json(METHODS[method]), registry)
    result = run(engine, prompt_ids, range(NUM_REQUESTS))

    # Not vacuous: drafts were verified, many accepted (decode steps emitting several tokens) and
    # many rejected (the residual draw ran).
    def counter(name: str) -> float:
        value = registry.get_sample_value(f"pdserve_spec_decode_{name}_total")
        assert value is not None, name
        return value

    drafted, accepted = counter("num_draft_tokens"), counter("num_accepted_tokens")
    accepted_in_outputs = sum(o.num_accepted_drafts for outs in result.outputs.values() for o in outs)
    multi_token_steps = sum(len(o.tokens.token_ids) > 1 for outs in result.outputs.values() for o in outs[1:])
    assert accepted == accepted_in_outputs
    assert accepted >= NUM_REQUESTS // 2, (drafted, accepted)
    assert drafted - accepted >= NUM_REQUESTS // 8, (drafted, accepted)
    assert multi_token_steps >= NUM_REQUESTS // 2

    p = p_values(reference, result.sequences)
    assert min(p.values()) > MIN_P_VALUE, (method, p, drafted, accepted)
