"""The greedy fast path of verification, the one-pass n-gram search and the LM head's CPU fast path,
each checked against the general code path it replaces (which the other spec tests pin to
hand-computed values) or against float64 arithmetic."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.common.sampling_params import SamplingParams
from pdserve.kernels.lm_head import LMHead
from pdserve.kernels.ngram import ngram_propose
from pdserve.kernels.sampling import (
    SamplingBatch,
    SamplingRow,
    greedy_token_ids,
    greedy_tokens,
    is_plain_greedy,
)
from pdserve.kernels.spec_verify import greedy_verify, verify_drafts

VOCAB, HIDDEN = 50, 8


def _reference_ngram(context: list[int], num_prompt: int, max_n: int, min_n: int, k: int) -> list[int]:
    """The rule as the module docstring states it: one search per n, longest first, every start tried."""
    if k <= 0:
        return []
    length = len(context)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = context[length - n:]
        starts = [s for s in range(length - n) if context[s:s + n] == pattern]
        if starts:
            in_prompt = [s for s in starts if s + n <= num_prompt]
            begin = (in_prompt[0] if in_prompt else starts[-1]) + n
            return context[begin:begin + k]
    return []


@settings(max_examples=400, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 3), max_size=30),
    prompt_fraction=st.floats(0, 1),
    max_n=st.integers(1, 6),
    min_n=st.integers(1, 6),
    k=st.integers(0, 5),
)
def test_ngram_one_pass_equals_the_search_per_n(
    tokens: list[int], prompt_fraction: float, max_n: int, min_n: int, k: int
) -> None:
    num_prompt = int(prompt_fraction * len(tokens))
    assert ngram_propose(tokens, num_prompt, max_n, min_n, k) == _reference_ngram(
        tokens, num_prompt, max_n, min_n, k)


def test_plain_greedy_needs_greedy_no_penalties_and_nothing_to_suppress() -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    assert is_plain_greedy(greedy, 0, eos_token_ids={2})
    assert not is_plain_greedy(SamplingParams(temperature=0.7), 0, eos_token_ids=())
    assert not is_plain_greedy(SamplingParams(temperature=0.0, repetition_penalty=1.1), 5, eos_token_ids=())
    assert not is_plain_greedy(SamplingParams(temperature=0.0, presence_penalty=0.5), 5, eos_token_ids=())
    # min_tokens suppresses eos and stop ids until it is reached.
    min_tokens = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3)
    assert not is_plain_greedy(min_tokens, 2, eos_token_ids={2})
    assert is_plain_greedy(min_tokens, 3, eos_token_ids={2})
    assert is_plain_greedy(min_tokens, 0, eos_token_ids=())
    ignore = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3, ignore_eos=True)
    assert is_plain_greedy(ignore, 0, eos_token_ids={2})
    stops = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3, ignore_eos=True, stop_token_ids=(4,))
    assert not is_plain_greedy(stops, 0, eos_token_ids={2})


class _CountingHead:
    """A random LM head that records how many rows it scored."""

    def __init__(self, seed: int) -> None:
        weight = np.random.default_rng(seed).normal(size=(HIDDEN, VOCAB)).astype(np.float32)
        self.weight = paddle.to_tensor(weight)
        self.rows_scored = 0

    def __call__(self, hidden: paddle.Tensor) -> paddle.Tensor:
        self.rows_scored += hidden.shape[0]
        return paddle.matmul(hidden, self.weight)


def _greedy_batch(drafts: list[list[int]], vocab_size: int) -> SamplingBatch:
    params = SamplingParams(temperature=0.0, max_tokens=16, seed=0)
    empty = np.zeros(0, dtype=np.int64)
    rows = [SamplingRow(params, 0, empty, np.zeros(j, dtype=np.int64))
            for d in drafts for j in range(len(d) + 1)]
    return SamplingBatch.from_rows(rows, vocab_size)


@pytest.mark.parametrize("at_once", [1, 64], ids=["rounds", "one-call"])
@pytest.mark.parametrize("seed", range(6))
def test_greedy_verify_equals_the_general_path_and_scores_only_emitted_rows(seed: int, at_once: int) -> None:
    rng = np.random.default_rng(seed)
    head = _CountingHead(seed)
    num_drafts = [int(n) for n in rng.integers(0, 5, size=5)]
    hidden = paddle.to_tensor(rng.normal(size=(sum(num_drafts) + len(num_drafts), HIDDEN)).astype(np.float32))
    # Drafts that follow the target's argmax chain for a random prefix, then go wrong: every accept
    # length from 0 to all drafts occurs across the seeds.
    targets = paddle.argmax(paddle.matmul(hidden, head.weight), axis=-1).numpy().tolist()
    drafts, row = [], 0
    for n in num_drafts:
        keep = int(rng.integers(0, n + 1))
        drafts.append([targets[row + j] if j < keep else (targets[row + j] + 1) % VOCAB for j in range(n)])
        row += n + 1
    ks = [None, 0, 3, None, 5]
    fast = greedy_verify(hidden, head, drafts, ks, max_rows_at_once=at_once)
    general = verify_drafts(paddle.matmul(hidden, head.weight), _greedy_batch(drafts, VOCAB), drafts, ks)
    assert fast.token_ids == general.token_ids
    assert fast.num_accepted_drafts == general.num_accepted_drafts
    # Rounds score only the emitted rows; one call scores every row (logprobs still only for emitted).
    one_call = hidden.shape[0] <= at_once
    assert head.rows_scored == (hidden.shape[0] if one_call else sum(len(ids) for ids in fast.token_ids))
    for got, want in zip(fast.logprobs, general.logprobs, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-5)


def test_host_argmax_equals_paddles_with_ties_and_infinities() -> None:
    rng = np.random.default_rng(5)
    logits = rng.integers(-3, 4, size=(7, 40)).astype(np.float32)  # small integers: many ties
    logits[2, :] = -np.inf
    logits[3, 5:] = -np.inf
    logits[4, 9] = np.inf
    x = paddle.to_tensor(logits)
    assert greedy_token_ids(x).tolist() == greedy_tokens(x).numpy().tolist()
    assert greedy_token_ids(x).tolist() == [int(np.flatnonzero(r == r.max())[0]) for r in logits]


def test_greedy_verify_takes_the_argmax_chain_by_hand() -> None:
    # One-hot hidden rows and an identity head: row r's argmax is the hot index.
    hot = [3, 4, 1, 2]  # request 0: rows 0-2 (drafts 3, 9), request 1: row 3 (no drafts)
    hidden = paddle.to_tensor(np.eye(HIDDEN, dtype=np.float32)[hot])
    verified = greedy_verify(hidden, lambda h: h, [[3, 9], []], [None, None])
    assert verified.token_ids == [(3, 4), (2,)]
    assert verified.num_accepted_drafts == [1, 0]
    assert verified.logprobs is None


def test_greedy_verify_rejects_a_row_count_that_does_not_match_the_drafts() -> None:
    with pytest.raises(ValueError, match="3 hidden rows for 1 requests with 1 drafts"):
        greedy_verify(paddle.zeros([3, HIDDEN]), lambda h: h, [[1]], [None])


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("rows", [1, 7, 8, 16])
def test_lm_head_fast_path_equals_the_paddle_matmul(transposed: bool, rows: int) -> None:
    rng = np.random.default_rng(rows)
    shape = (VOCAB, HIDDEN) if transposed else (HIDDEN, VOCAB)
    weight = paddle.to_tensor(rng.normal(size=shape).astype(np.float32))
    reference_calls: list[int] = []

    def reference(hidden: paddle.Tensor) -> paddle.Tensor:
        reference_calls.append(hidden.shape[0])
        return paddle.matmul(hidden.astype(weight.dtype), weight, transpose_y=transposed)

    head = LMHead(weight, transposed, reference)
    hidden = paddle.to_tensor(rng.normal(size=(rows, HIDDEN)).astype(np.float32))
    logits = head(hidden)
    assert logits.dtype == paddle.float32 and list(logits.shape) == [rows, VOCAB]
    weight_hv = weight.numpy().T if transposed else weight.numpy()
    expected = hidden.numpy().astype(np.float64) @ weight_hv.astype(np.float64)
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert reference_calls == []  # float32 on CPU: the fast path ran
    # Any other dtype goes to the reference op.
    head(hidden.astype("float64"))
    assert reference_calls == [rows]


def test_rotary_rows_are_reused_only_for_the_same_positions_tensor() -> None:
    from pdserve.models.config import ModelConfig
    from pdserve.models.llama import RotaryEmbedding
    from pdserve.models.loader import default_model_dir

    rotary = RotaryEmbedding(ModelConfig.from_dir(default_model_dir()))
    step_positions = paddle.to_tensor(np.asarray([5, 6, 7], dtype=np.int64))
    cos, sin = rotary(step_positions)
    # The MTP layer passes the target's own positions tensor: the same rows, no new gather.
    assert rotary(step_positions)[0] is cos
    # Another tensor, even with equal values, is gathered afresh, and its rows are its own.
    other = paddle.to_tensor(np.asarray([0, 6], dtype=np.int64))
    other_cos, other_sin = rotary(other)
    assert other_cos is not cos
    np.testing.assert_array_equal(other_cos.numpy(), rotary.cos_cache.numpy()[[0, 6]])
    np.testing.assert_array_equal(other_sin.numpy(), rotary.sin_cache.numpy()[[0, 6]])
    np.testing.assert_array_equal(cos.numpy(), rotary.cos_cache.numpy()[[5, 6, 7]])


@pytest.mark.parametrize("rows", [[0], [3], [2, 3, 4], [0, 1, 2, 3, 4, 5], [1, 3], [4, 3], [2, 2], [5, 0, 1]])
def test_take_rows_equals_indexing_whether_it_slices_or_gathers(rows: list[int]) -> None:
    from pdserve.kernels.rows import take_rows

    x = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    np.testing.assert_array_equal(take_rows(paddle.to_tensor(x), rows).numpy(), x[rows])
