"""kernels/sampling.py and kernels/penalties.py against NumPy references written from the rules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import paddle
import pytest

from pdserve.common.sampling_params import SamplingParams
from pdserve.kernels.sampling import (
    RngStream,
    SamplingBatch,
    SamplingRow,
    process_logits,
    request_uniforms,
    sample,
    sampling_probs,
)


def make_row(params: SamplingParams | None = None, seed: int = 0, prompt: Sequence[int] = (),
             output: Sequence[int] = (), eos: tuple[int, ...] = ()) -> SamplingRow:
    return SamplingRow(params or SamplingParams(), seed, np.asarray(prompt, dtype=np.int64),
                       np.asarray(output, dtype=np.int64), eos)


def sample_rows(logits: np.ndarray, rows: Sequence[SamplingRow]) -> np.ndarray:
    batch = SamplingBatch.from_rows(rows, logits.shape[1])
    return sample(paddle.to_tensor(logits), batch).numpy()


# ---- NumPy references ------------------------------------------------------------------------------

def reference_penalties(logits: np.ndarray, row: SamplingRow) -> np.ndarray:
    out = logits.astype(np.float64).copy()
    p = row.params
    for token in set(row.prompt_token_ids.tolist()) | set(row.output_token_ids.tolist()):
        if out[token] > 0:
            out[token] /= p.repetition_penalty
        else:
            out[token] *= p.repetition_penalty
    for token in set(row.output_token_ids.tolist()):
        count = int((row.output_token_ids == token).sum())
        out[token] -= p.frequency_penalty * count + p.presence_penalty
    return out


def reference_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The filtered distribution of one row, from the rules in the sampling module's docstring."""
    x = logits.astype(np.float64)
    if params.greedy:
        return np.eye(len(x))[np.argmax(x)]
    x = x / params.temperature
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if 0 < params.top_k < len(x):
        kth = np.sort(probs)[::-1][params.top_k - 1]
        probs = np.where(probs >= kth, probs, 0.0) / probs[probs >= kth].sum()
    if params.top_p < 1.0:
        desc = np.sort(probs)[::-1]
        mass_before = np.concatenate([[0.0], np.cumsum(desc)[:-1]])
        last_kept = desc[(mass_before < params.top_p).sum() - 1]
        probs = np.where(probs >= last_kept, probs, 0.0)
        probs /= probs.sum()
    if params.min_p > 0.0:
        probs = np.where(probs >= params.min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    return probs


def chi_square_critical(dof: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.09 is the 0.999 normal quantile."""
    h = 2.0 / (9.0 * dof)
    return dof * (1.0 - h + z * math.sqrt(h)) ** 3


def chi_square(counts: np.ndarray, probs: np.ndarray, draws: int) -> tuple[float, int]:
    """Statistic and degrees of freedom, pooling cells with expected count < 5 into one."""
    expected = probs * draws
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return float(((observed - expected) ** 2 / expected).sum()), len(expected) - 1


# ---- RNG --------------------------------------------------------------------------------------------

def test_request_uniforms_are_deterministic_keyed_and_extendable() -> None:
    a = request_uniforms(123, 4, RngStream.SAMPLE, 8)
    assert a.dtype == np.float64 and ((a >= 0) & (a < 1)).all()
    np.testing.assert_array_equal(a, request_uniforms(123, 4, RngStream.SAMPLE, 8))
    np.testing.assert_array_equal(a[:3], request_uniforms(123, 4, RngStream.SAMPLE, 3))
    others = [request_uniforms(124, 4, 0, 8), request_uniforms(123, 5, 0, 8),
              request_uniforms(123, 4, RngStream.SPEC_ACCEPT, 8), request_uniforms(123, 3, 0, 8)]
    for other in others:
        assert not np.intersect1d(a, other).size
    # A long draw at one index never runs into the next index's values.
    assert not np.intersect1d(request_uniforms(9, 0, 0, 10_000), request_uniforms(9, 1, 0, 8)).size


def test_request_uniforms_rejects_bad_keys() -> None:
    with pytest.raises(ValueError):
        request_uniforms(-1, 0, 0)
    with pytest.raises(ValueError):
        request_uniforms(2**63, 0, 0)


# ---- greedy -----------------------------------------------------------------------------------------

def test_greedy_is_argmax_with_lowest_id_on_ties() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 300)).astype(np.float32)
    logits[3, [7, 100, 250]] = 50.0  # a three-way tie at the top
    rows = [make_row(SamplingParams(temperature=0.0), seed=i) for i in range(5)]
    tokens = sample_rows(logits, rows)
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))
    assert tokens[3] == 7


def test_greedy_rows_are_one_hot_in_sampling_probs() -> None:
    logits = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    rows = [make_row(SamplingParams(temperature=0.0)), make_row(SamplingParams(temperature=1.0))]
    batch = SamplingBatch.from_rows(rows, 64)
    probs = sampling_probs(process_logits(paddle.to_tensor(logits), batch), batch).numpy()
    np.testing.assert_array_equal(probs[0], np.eye(64)[np.argmax(logits[0])])
    np.testing.assert_allclose(probs[1], reference_probs(logits[1], rows[1].params), atol=1e-12)


# ---- filters ----------------------------------------------------------------------------------------

FILTER_CASES = [
    SamplingParams(temperature=1.5),
    SamplingParams(top_k=10),
    SamplingParams(top_p=0.8),
    SamplingParams(min_p=0.1),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05),
]


def test_filtered_distribution_matches_reference() -> None:
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((len(FILTER_CASES), 500)) * 2).astype(np.float32)
    rows = [make_row(p, seed=i) for i, p in enumerate(FILTER_CASES)]
    batch = SamplingBatch.from_rows(rows, 500)
    probs = sampling_probs(process_logits(paddle.to_tensor(logits), batch), batch).numpy()
    for i, params in enumerate(FILTER_CASES):
        expected = reference_probs(logits[i], params)
        np.testing.assert_array_equal(probs[i] > 0, expected > 0)
        np.testing.assert_allclose(probs[i], expected, atol=1e-12)


def test_filters_keep_ties_at_the_boundary() -> None:
    logits = np.array([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]], dtype=np.float32)
    for params, support in [(SamplingParams(top_k=2), [0, 1, 2, 3]),
                            (SamplingParams(top_p=0.5), [0, 1, 2, 3]),
                            (SamplingParams(top_k=1), [0])]:
        batch = SamplingBatch.from_rows([make_row(params)], 6)
        probs = sampling_probs(process_logits(paddle.to_tensor(logits), batch), batch).numpy()
        np.testing.assert_array_equal(np.flatnonzero(probs[0]), support)


@pytest.mark.parametrize("params", FILTER_CASES,
                         ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_sampled_frequencies_follow_filtered_distribution(params: SamplingParams) -> None:
    vocab, draws = 64, 3000
    logits = (np.random.default_rng(3).standard_normal(vocab) * 1.5).astype(np.float32)
    rows = [make_row(params, seed=seed) for seed in range(draws)]
    tokens = sample_rows(np.tile(logits, (draws, 1)), rows)
    expected = reference_probs(logits, params)
    assert (expected[tokens] > 0).all(), "a token outside the filter was sampled"
    statistic, dof = chi_square(np.bincount(tokens, minlength=vocab), expected, draws)
    assert statistic < chi_square_critical(dof), (statistic, dof)


# ---- seeded reproducibility ---------------------------------------------------------------------------

def mixed_rows(n: int) -> list[SamplingRow]:
    kinds = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_k=5, temperature=0.8),
             SamplingParams(top_p=0.7, repetition_penalty=1.3, frequency_penalty=0.5),
             SamplingParams(min_p=0.2, presence_penalty=1.0)]
    return [make_row(kinds[i % len(kinds)], seed=1000 + i, prompt=[i % 50, 3],
                     output=[(7 * i) % 50] * (i % 4)) for i in range(n)]


def test_token_depends_only_on_own_row_not_batch_composition() -> None:
    rng = np.random.default_rng(4)
    rows = mixed_rows(20)
    logits = rng.standard_normal((20, 50)).astype(np.float32)
    together = sample_rows(logits, rows)
    order = rng.permutation(20)
    permuted = sample_rows(logits[order], [rows[i] for i in order])
    np.testing.assert_array_equal(permuted, together[order])
    alone = [sample_rows(logits[i:i + 1], [rows[i]])[0] for i in range(20)]
    np.testing.assert_array_equal(alone, together)
    # With unrelated rows added around it, a row still gets its token.
    extra = mixed_rows(25)[20:]
    mixed = sample_rows(np.concatenate([logits[:3], rng.standard_normal((5, 50)).astype(np.float32)]),
                        rows[:3] + extra)
    np.testing.assert_array_equal(mixed[:3], together[:3])


def test_different_seeds_and_indices_give_different_tokens() -> None:
    vocab = 1000
    logits = np.zeros((50, vocab), dtype=np.float32)  # uniform: every token equally likely
    by_seed = sample_rows(logits, [make_row(seed=s) for s in range(50)])
    assert len(set(by_seed.tolist())) >= 40
    by_index = sample_rows(logits, [make_row(seed=5, output=[1] * i) for i in range(50)])
    assert len(set(by_index.tolist())) >= 40
    np.testing.assert_array_equal(by_seed, sample_rows(logits, [make_row(seed=s) for s in range(50)]))


# ---- penalties and min_tokens ---------------------------------------------------------------------------

def test_penalties_match_reference() -> None:
    rng = np.random.default_rng(5)
    vocab = 80
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams(repetition_penalty=0.7),
              SamplingParams(presence_penalty=1.2, frequency_penalty=0.4),
              SamplingParams(repetition_penalty=1.2, presence_penalty=-0.5, frequency_penalty=-1.0),
              SamplingParams()]
    rows = [make_row(p, prompt=rng.integers(0, vocab, 12), output=rng.integers(0, vocab, 20)) for p in params]
    logits = (rng.standard_normal((len(rows), vocab)) * 3).astype(np.float32)
    batch = SamplingBatch.from_rows(rows, vocab)
    processed = process_logits(paddle.to_tensor(logits), batch).numpy()
    for i, row in enumerate(rows):
        np.testing.assert_allclose(processed[i], reference_penalties(logits[i], row), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(processed[-1], logits[-1])  # neutral row untouched


def test_greedy_uses_penalised_logits() -> None:
    logits = np.array([[5.0, 4.0, 1.0, 0.0]], dtype=np.float32)
    row = make_row(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=[0])
    assert sample_rows(logits, [row])[0] == 1  # 5 / 2 < 4


def test_min_tokens_suppresses_eos_and_stop_ids() -> None:
    eos, stop, vocab = 5, 7, 64
    logits = np.random.default_rng(6).standard_normal(vocab).astype(np.float32)
    logits[[eos, stop]] = 30.0
    params = SamplingParams(min_tokens=3, stop_token_ids=(stop,))
    early = [make_row(params, seed=s, output=[1, 2], eos=(eos,)) for s in range(200)]
    tokens = sample_rows(np.tile(logits, (200, 1)), early)
    assert not np.isin(tokens, [eos, stop]).any()
    greedy = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(stop,))
    third_best = np.argsort(logits)[-3]  # eos and stop are the two best
    assert sample_rows(logits[None], [make_row(greedy, output=[1, 2], eos=(eos,))])[0] == third_best
    assert sample_rows(logits[None], [make_row(greedy, output=[1, 2, 3], eos=(eos,))])[0] == eos
    ignore = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(stop,), ignore_eos=True)
    assert sample_rows(logits[None], [make_row(ignore, output=[1], eos=(eos,))])[0] == eos


# ---- validation -----------------------------------------------------------------------------------------

def test_rejects_out_of_vocab_history_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        SamplingBatch.from_rows([make_row(output=[64])], 64)
    with pytest.raises(ValueError, match="int64"):
        SamplingRow(SamplingParams(), 0, np.zeros(2, dtype=np.int32), np.zeros(0, dtype=np.int64))
    batch = SamplingBatch.from_rows([make_row()], 64)
    with pytest.raises(ValueError, match="shape"):
        sample(paddle.zeros([2, 64]), batch)
