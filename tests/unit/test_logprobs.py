"""kernels/logprobs.py against float64 NumPy references written from the documented rules."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from pdserve.kernels.logprobs import (
    HOST_MAX_ROWS,
    host_token_logprobs,
    on_host,
    prompt_logprobs,
    top_logprobs,
)


def reference_log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def reference_topk_ids(logits: np.ndarray, k: int) -> np.ndarray:
    # lexsort's last key is primary: descending logit, then ascending id.
    ids = np.arange(logits.shape[1])
    return np.stack([np.lexsort((ids, -row))[:k] for row in logits.astype(np.float64)])


def reference_rank(logits: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    chosen = logits[np.arange(len(token_ids)), token_ids]
    return 1 + (logits > chosen[:, None]).sum(axis=-1)


def run(logits: np.ndarray, token_ids: np.ndarray, k: int):
    out = top_logprobs(paddle.to_tensor(logits), paddle.to_tensor(token_ids), k)
    return tuple(t.numpy() for t in out)


def check_against_reference(logits: np.ndarray, token_ids: np.ndarray, k: int) -> None:
    token_lp, rank, topk_ids, topk_lp = run(logits, token_ids, k)
    ref_lp = reference_log_softmax(logits)
    rows = np.arange(len(token_ids))
    np.testing.assert_allclose(token_lp, ref_lp[rows, token_ids], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(rank, reference_rank(logits, token_ids))
    ref_ids = reference_topk_ids(logits, k)
    np.testing.assert_array_equal(topk_ids, ref_ids)
    np.testing.assert_allclose(topk_lp, np.take_along_axis(ref_lp, ref_ids, axis=1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("vocab,k", [(64, 1), (257, 5), (1000, 20)])
def test_matches_float64_reference(vocab: int, k: int) -> None:
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal((6, vocab)) * 4).astype(np.float32)
    token_ids = rng.integers(0, vocab, size=6)
    check_against_reference(logits, token_ids, k)


def test_large_logits_stay_finite_and_exact() -> None:
    # exp(1e4) overflows float32 and float64: only a max-shifted logsumexp gets this right.
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((3, 300)) + 1e4).astype(np.float32)
    logits[1] -= 2e4
    token_ids = np.array([0, 5, 299])
    token_lp, *_ = run(logits, token_ids, 4)
    assert np.isfinite(token_lp).all()
    check_against_reference(logits, token_ids, 4)


def test_ties_rank_and_order_by_lowest_id() -> None:
    # Integer logits over a small range force many ties, also at the top-k boundary.
    rng = np.random.default_rng(7)
    logits = rng.integers(0, 4, size=(8, 200)).astype(np.float32)
    token_ids = rng.integers(0, 200, size=8)
    check_against_reference(logits, token_ids, 20)
    _, rank, topk_ids, _ = run(logits, token_ids, 20)
    # Tied tokens share a rank: every top-valued token has rank 1.
    top_token = np.argmax(logits, axis=-1)
    assert (run(logits, top_token, 1)[1] == 1).all()
    assert (rank >= 1).all() and (topk_ids[:, 0] == top_token).all()


def test_negative_infinity_logits() -> None:
    logits = np.array([[0.0, -np.inf, 1.0, -np.inf], [-np.inf, 2.0, 2.0, 0.5]], dtype=np.float32)
    token_lp, rank, topk_ids, topk_lp = run(logits, np.array([1, 3]), 4)
    assert token_lp[0] == -np.inf and rank[0] == 3
    assert rank[1] == 3
    np.testing.assert_array_equal(topk_ids, [[2, 0, 1, 3], [1, 2, 3, 0]])
    np.testing.assert_allclose(topk_lp[1, :3], reference_log_softmax(logits)[1, [1, 2, 3]], atol=1e-6)


def test_k_zero_gives_empty_topk() -> None:
    logits = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    token_lp, rank, topk_ids, topk_lp = run(logits, np.array([1, 2, 3]), 0)
    assert topk_ids.shape == (3, 0) and topk_lp.shape == (3, 0)
    assert token_lp.shape == (3,) and rank.shape == (3,)


def test_k_out_of_range_rejected() -> None:
    logits = paddle.zeros([2, 10])
    with pytest.raises(ValueError, match="k_max"):
        top_logprobs(logits, paddle.to_tensor([0, 1]), 21)
    with pytest.raises(ValueError, match="k_max"):
        top_logprobs(logits, paddle.to_tensor([0, 1]), 11)


def test_prompt_logprobs_chunked_equals_whole() -> None:
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, 128, size=38)
    logits = rng.standard_normal((37, 128)).astype(np.float32)  # position i predicts prompt[i + 1]
    next_ids = prompt[1:]
    chunked = prompt_logprobs(paddle.to_tensor(logits), paddle.to_tensor(next_ids), 5, chunk_rows=8)
    whole = top_logprobs(paddle.to_tensor(logits), paddle.to_tensor(next_ids), 5)
    for part, full in zip(chunked, whole, strict=True):
        np.testing.assert_array_equal(part.numpy(), full.numpy())
    check_against_reference(logits, next_ids, 5)


@pytest.mark.parametrize("case", ["random", "large", "ties", "neg_inf"])
def test_host_token_logprobs_follow_the_rules_and_agree_with_paddle(case: str) -> None:
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((5, 8192)) * 6).astype(np.float32)
    if case == "large":
        logits += 1e4
    elif case == "ties":
        logits = rng.integers(0, 4, size=(5, 300)).astype(np.float32)
    elif case == "neg_inf":
        logits[:, ::3] = -np.inf
    token_ids = np.array([int(np.argmax(logits[0])), 1, 2, 5, logits.shape[1] - 1])
    token_lp, rank, topk_ids, topk_lp = host_token_logprobs(logits, token_ids)
    rows = np.arange(len(token_ids))
    np.testing.assert_allclose(token_lp, reference_log_softmax(logits)[rows, token_ids], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(rank, reference_rank(logits, token_ids))
    assert token_lp.dtype == np.float32 and rank.dtype == np.int64 and rank[0] == 1
    assert topk_ids.shape == (5, 0) and topk_lp.shape == (5, 0)
    paddle_lp, paddle_rank, _, _ = run(logits, token_ids, 0)
    np.testing.assert_array_equal(rank, paddle_rank)
    np.testing.assert_allclose(token_lp, paddle_lp, atol=5e-5, rtol=0)


def test_on_host_only_without_topk_for_few_float32_cpu_rows() -> None:
    logits = paddle.zeros([2, 10], dtype="float32")
    assert on_host(logits, 2, 0)
    assert not on_host(logits, 2, 1)
    assert not on_host(logits, HOST_MAX_ROWS + 1, 0)
    assert not on_host(paddle.zeros([2, 10], dtype="float64"), 2, 0)
