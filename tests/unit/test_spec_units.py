"""Speculative decoding's pure parts: config validation, n-gram drafting, metrics arithmetic, and the
rejection sampler's distribution (chi-square against the exact target distribution)."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
import torch
from prometheus_client import CollectorRegistry

from pdserve.common.sampling_params import SamplingParams
from pdserve.common.spec_metrics import RequestSpecStats, SpeculateMetrics
from pdserve.engine.config import CacheConfig, EngineConfig, EngineConfigError, SchedulerConfig
from pdserve.engine.spec_config import SpeculativeConfig, SpeculativeConfigError
from pdserve.engine.spec_metrics import SpecDecodeCounters
from pdserve.kernels.ngram import ngram_propose, split_draft_budget
from pdserve.kernels.sampling import SamplingBatch, SamplingRow
from pdserve.kernels.spec_verify import greedy_accept, rejection_accept, residual_probs, verify_drafts

# -- config ------------------------------------------------------------------------------------------


def test_config_parses_fastdeploy_json() -> None:
    hybrid = SpeculativeConfig.from_json(
        '{"method": "mtp", "num_speculative_tokens": 5, "num_model_steps": 1, '
        '"mtp_strategy": "with_ngram", "max_ngram_size": 4, "min_ngram_size": 1}'
    )
    assert (hybrid.proposer_name, hybrid.num_speculative_tokens, hybrid.max_ngram_size) == ("hybrid", 5, 4)
    plain = SpeculativeConfig.from_json('{"method": "mtp", "num_speculative_tokens": 3}')
    assert (plain.proposer_name, plain.num_model_steps) == ("mtp", 3)
    assert (
        SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 2}').proposer_name
        == "ngram"
    )


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"method": "eagle", "num_speculative_tokens": 1}', "method"),
        ('{"method": "mtp", "num_speculative_tokens": 0}', "num_speculative_tokens"),
        ('{"method": "mtp", "num_speculative_tokens": 6}', "num_speculative_tokens"),
        ('{"method": "mtp", "num_speculative_tokens": true}', "num_speculative_tokens"),
        (
            '{"method": "mtp", "num_speculative_tokens": 2, "num_model_steps": 3, '
            '"mtp_strategy": "with_ngram"}',
            "num_model_steps",
        ),
        ('{"method": "mtp", "num_speculative_tokens": 3, "num_model_steps": 1}', "num_speculative_tokens"),
        ('{"method": "mtp", "num_speculative_tokens": 1, "mtp_strategy": "fancy"}', "mtp_strategy"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "mtp_strategy": "with_ngram"}', "mtp_strategy"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "num_model_steps": 2}', "num_model_steps"),
        (
            '{"method": "ngram", "num_speculative_tokens": 2, "max_ngram_size": 1, "min_ngram_size": 2}',
            "max_ngram_size",
        ),
        ('{"method": "ngram", "num_speculative_tokens": 2, "min_ngram_size": 0}', "min_ngram_size"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "typo": 1}', "typo"),
        ('{"method": "ngram"}', "num_speculative_tokens"),
        ("[1, 2]", "JSON object"),
        ('{"method": ', "not valid JSON"),
    ],
)
def test_config_rejects_bad_fields_by_name(text: str, field: str) -> None:
    with pytest.raises(SpeculativeConfigError, match=field):
        SpeculativeConfig.from_json(text)


def test_the_engine_takes_its_draft_count_from_the_speculative_config() -> None:
    spec = SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 3}')
    assert EngineConfig(CacheConfig(8), SchedulerConfig(), spec).num_speculative_tokens == 3
    assert EngineConfig(CacheConfig(8), SchedulerConfig()).num_speculative_tokens == 0
    # A decode step feeds 1 + k tokens: k must leave room in the step's budget.
    with pytest.raises(EngineConfigError, match="num_speculative_tokens"):
        EngineConfig(CacheConfig(8), SchedulerConfig(max_num_batched_tokens=3), spec)


# -- n-gram --------------------------------------------------------------------------------------------


def ids(*values: int) -> list[int]:
    return list(values)


def test_ngram_prefers_the_longest_match_and_copies_its_continuation() -> None:
    # The 3-gram (1, 2, 3) occurs at 0 (followed by 9) and the 2-gram (2, 3) also at 5 (followed by 7).
    context = ids(1, 2, 3, 9, 8, 2, 3, 7, 1, 2, 3)
    assert ngram_propose(context, num_prompt=8, max_n=3, min_n=2, num_drafts=3) == [9, 8, 2]
    assert ngram_propose(context, num_prompt=8, max_n=2, min_n=2, num_drafts=2) == [9, 8]


def test_ngram_searches_the_prompt_first_then_the_latest_generated_match() -> None:
    # (5, 6) occurs at 3 and 7 before the suffix. With a 2-token prompt neither match lies in the
    # prompt, so the latest generated match (7, followed by 2 8) wins.
    context = ids(0, 3, 4, 5, 6, 1, 7, 5, 6, 2, 8, 5, 6)
    assert ngram_propose(context, num_prompt=2, max_n=2, min_n=2, num_drafts=2) == [2, 8]
    # With the whole first part as prompt, its first occurrence wins.
    assert ngram_propose(context, num_prompt=9, max_n=2, min_n=2, num_drafts=2) == [1, 7]


def test_ngram_never_matches_the_suffix_itself_and_respects_limits() -> None:
    assert ngram_propose(ids(1, 2, 3), num_prompt=3, max_n=3, min_n=1, num_drafts=4) == []
    assert ngram_propose(ids(4, 4, 4), num_prompt=1, max_n=2, min_n=1, num_drafts=4) == [4]
    assert ngram_propose(ids(1, 2, 1, 2), num_prompt=4, max_n=2, min_n=2, num_drafts=0) == []
    assert (
        ngram_propose(ids(1, 2, 5, 1), num_prompt=4, max_n=2, min_n=2, num_drafts=3) == []
    )  # min_n too long
    assert ngram_propose(ids(1, 2, 5, 1), num_prompt=4, max_n=2, min_n=1, num_drafts=3) == [2, 5, 1]


def test_draft_budget_serves_requests_in_batch_order() -> None:
    assert split_draft_budget([5, 5, 5], 8) == [5, 3, 0]
    assert split_draft_budget([2, 0, 4], 100) == [2, 0, 4]


# -- metrics --------------------------------------------------------------------------------------------


def test_metrics_match_fastdeploys_published_example() -> None:
    # FastDeploy's MTP CI baseline (k = 3): accepted_tokens_per_head [79, 51, 23, 9].
    trace = [4] * 9 + [3] * (23 - 9) + [2] * (51 - 23) + [1] * (79 - 51)
    m = SpeculateMetrics.from_step_lengths(trace, 3)
    assert m.accepted_tokens_per_head == (79, 51, 23, 9)
    assert (m.accepted_tokens, m.rejected_tokens) == (162, 154)
    assert m.accept_ratio == pytest.approx(0.5123456790123457)
    assert m.average_accept_length == pytest.approx(2.050632911392405)
    assert m.accept_ratio_per_head == pytest.approx(
        (0.6455696202531646, 0.45098039215686275, 0.391304347826087)
    )


def test_request_stats_skip_prefill_tokens_and_reject_impossible_steps() -> None:
    stats = RequestSpecStats(2)
    for n in (1, 3, 1, 2):  # the first token comes from the prefill
        stats.on_tokens(n)
    stats.on_preempted()
    stats.on_tokens(1)  # recompute prefill after preemption
    stats.on_tokens(3)
    m = stats.metrics()
    assert m.accepted_tokens_per_head == (4, 3, 2)
    assert (m.accepted_tokens, m.rejected_tokens, m.average_accept_length) == (9, 3, 2.25)
    assert SpeculateMetrics.from_step_lengths([], 2).accept_ratio == 0.0
    with pytest.raises(ValueError, match="emits"):
        SpeculateMetrics.from_step_lengths([4], 2)


def test_prometheus_counters_count_drafts_and_positions() -> None:
    registry = CollectorRegistry()
    counters = SpecDecodeCounters(registry, 3)
    counters.on_verified(3, 2)
    counters.on_verified(3, 0)
    counters.on_verified(0, 0)  # a step without drafts is no draft
    value = registry.get_sample_value
    assert value("pdserve_spec_decode_num_drafts_total") == 2
    assert value("pdserve_spec_decode_num_draft_tokens_total") == 6
    assert value("pdserve_spec_decode_num_accepted_tokens_total") == 2
    assert [
        value("pdserve_spec_decode_num_accepted_tokens_per_pos_total", {"position": str(i)}) for i in range(3)
    ] == [1, 1, 0]


# -- verification ---------------------------------------------------------------------------------------


def test_greedy_accept_takes_the_argmax_chain() -> None:
    targets = np.asarray([5, 6, 9, 1, 2, 3])  # request 0: rows 0-2 (2 drafts), request 1: rows 3-5
    assert greedy_accept(targets, [[5, 7], [1, 2]]) == [1, 2]
    assert greedy_accept(np.asarray([4]), [[]]) == [0]


def test_rejection_accept_and_residual_follow_the_rule() -> None:
    p = np.asarray([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    # Draft token 1 at row 0: accepted iff u < p(1) = 0.5 (q one-hot); token 2 then has p = 0.5 at row 1.
    assert rejection_accept(p, [[1]], np.asarray([0.49, 0.0])) == [1]
    assert rejection_accept(p, [[1]], np.asarray([0.51, 0.0])) == [0]
    q = np.asarray([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert rejection_accept(p, [[2]], np.asarray([0.0, 0.0]), q * 0 + 0.25) == [0]  # p(2) = 0 never accepted
    np.testing.assert_allclose(residual_probs(p, None, np.asarray([0]), np.asarray([1])), [[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(residual_probs(p, q, np.asarray([1]), np.asarray([2])), [[0.4, 0.6, 0.0]])


VOCAB = 6


def _markov(seed: int, scale: float) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(VOCAB, VOCAB)) * scale  # logits of t_{i+1} given t_i


def _spec_sample_two_tokens(
    target: np.ndarray, drafter: np.ndarray, num_seqs: int, params: SamplingParams, k: int
) -> np.ndarray:
    """Generate 2 tokens per sequence (start token 0) with speculative steps; returns [num_seqs, 2]."""
    outputs: list[list[int]] = [[] for _ in range(num_seqs)]
    while any(len(o) < 2 for o in outputs):
        active = [i for i in range(num_seqs) if len(outputs[i]) < 2]
        drafts, rows, logits = [], [], []
        for i in active:
            last = outputs[i][-1] if outputs[i] else 0
            chain = [last]
            for _ in range(k):
                chain.append(int(np.argmax(drafter[chain[-1]])))  # deterministic drafter: q is one-hot
            draft = chain[1:]
            drafts.append(draft)
            for j in range(k + 1):
                logits.append(target[chain[j]])
                rows.append(
                    SamplingRow(
                        params,
                        seed=1000 + i,
                        prompt_token_ids=np.zeros(1, dtype=np.int64),
                        output_token_ids=np.asarray(outputs[i] + draft[:j], dtype=np.int64),
                    )
                )
        batch = SamplingBatch.from_rows(rows, VOCAB)
        verified = verify_drafts(
            paddle.to_tensor(np.asarray(logits, dtype=np.float32)), batch, drafts, [None] * len(active)
        )
        for i, tokens in zip(active, verified.token_ids, strict=True):
            outputs[i].extend(tokens)
    return np.asarray([o[:2] for o in outputs])


def _chi_square_p_value(observed: np.ndarray, expected: np.ndarray) -> float:
    stat = float(((observed - expected) ** 2 / expected).sum())
    dof = observed.size - 1
    return float(
        torch.special.gammaincc(
            torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)
        )
    )


def test_rejection_sampling_preserves_the_target_distribution() -> None:
    target, drafter = _markov(1, 1.0), _markov(2, 1.0)
    # The drafter agrees with the target's argmax sometimes, not always: both accept and reject paths run.
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=4, seed=0)
    n = 6000
    tokens = _spec_sample_two_tokens(target, drafter, n, params, k=2)

    # The exact target distribution of (t1, t2), with temperature and top-p, computed independently.
    def probs(row: np.ndarray) -> np.ndarray:
        p = np.exp(row / 0.8 - (row / 0.8).max())
        p /= p.sum()
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < 0.95
        out = np.zeros_like(p)
        out[order[keep]] = p[order[keep]]
        return out / out.sum()

    joint = np.outer(probs(target[0]), np.ones(VOCAB)) * np.stack([probs(target[t]) for t in range(VOCAB)])
    observed = np.zeros((VOCAB, VOCAB))
    np.add.at(observed, (tokens[:, 0], tokens[:, 1]), 1)
    mask = joint > 0
    assert observed[~mask].sum() == 0  # nothing outside the top-p support
    assert _chi_square_p_value(observed[mask], n * joint[mask]) > 1e-3
    # The test has power: the drafts alone (accept everything) are far from the target.
    drafted = np.zeros_like(observed)
    first = int(np.argmax(drafter[0]))
    drafted[first, int(np.argmax(drafter[first]))] = n
    assert _chi_square_p_value(drafted[mask] + 1e-9, n * joint[mask]) < 1e-6
