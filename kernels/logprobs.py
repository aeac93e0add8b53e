"""Logprobs of chosen tokens and the top-k alternatives, from RAW logits (FastDeploy's default:
before penalties, temperature and filters).

Rules, chosen so that a prefill node, a decode node and a mixed node report the same numbers:
- ``token_rank`` is 1 + the number of vocab entries whose raw logit is strictly greater than the
  chosen token's (tied tokens share a rank; the argmax has rank 1);
- the top-k list is ordered by logit descending, and among equal logits by lower token id first —
  also at the k boundary, where the lowest ids among the tied tokens are the ones included.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import paddle

from pdserve.common.sampling_params import MAX_TOP_LOGPROBS
from pdserve.kernels import cpu_ops


class TokenLogprobs(NamedTuple):
    """Paddle tensors, or NumPy arrays when computed on the host (`host_token_logprobs`)."""

    token_logprob: paddle.Tensor | np.ndarray  # [N] float32, log p(chosen token)
    token_rank: paddle.Tensor | np.ndarray  # [N] int64, 1-based
    topk_ids: paddle.Tensor | np.ndarray  # [N, k] int64
    topk_logprobs: paddle.Tensor | np.ndarray  # [N, k] float32


# Up to this many rows without top-k, a chosen token's logprob and rank are computed by NumPy on the
# logits in place. A prefill node needs exactly that for every request's first token (the FirstToken
# carries it even when the request asked for no logprobs): through Paddle's ops, about ten
# dispatches over the vocabulary plus the tensors around them cost ~0.3 ms on a 2-core host, in
# NumPy ~35 us.
HOST_MAX_ROWS = 64


def on_host(raw_logits: paddle.Tensor, num_rows: int, k_max: int) -> bool:
    """Whether `host_token_logprobs` serves these rows: no top-k, few rows, float32 CPU logits."""
    return k_max == 0 and num_rows <= HOST_MAX_ROWS and cpu_ops.takes(raw_logits)


def host_token_logprobs(raw_logits: np.ndarray, token_ids: np.ndarray) -> TokenLogprobs:
    """``top_logprobs`` with k 0 on the host, as NumPy arrays: the same rules and the same float32
    steps as ``log_softmax`` (max-shifted, then the log of the summed exponentials)."""
    rows = np.arange(len(token_ids))
    chosen = raw_logits[rows, token_ids]  # [N]
    row_max = raw_logits.max(axis=-1)
    log_sum = np.log(np.exp(raw_logits - row_max[:, None]).sum(axis=-1))
    token_logprob = ((chosen - row_max) - log_sum).astype(np.float32)
    token_rank = 1 + (raw_logits > chosen[:, None]).sum(axis=-1, dtype=np.int64)
    return TokenLogprobs(token_logprob, token_rank, np.zeros((len(rows), 0), dtype=np.int64),
                         np.zeros((len(rows), 0), dtype=np.float32))


def log_softmax(logits: paddle.Tensor) -> paddle.Tensor:
    """Row-wise log-softmax ``[N, V]`` float32 with a max-shifted logsumexp (no overflow).

    The max is subtracted first (exact for values near it) and the small log-sum second, so large
    logits such as 1e4 keep full precision instead of losing it to a large logsumexp.
    """
    shifted = logits - logits.max(axis=-1, keepdim=True)
    return shifted - paddle.log(paddle.exp(shifted).sum(axis=-1, keepdim=True))


def topk_lowest_id_first(values: paddle.Tensor, k: int) -> tuple[paddle.Tensor, paddle.Tensor]:
    """The k largest values per row and their ids ``([N, k], [N, k])``, ties broken by lower id.

    ``paddle.topk`` orders ties arbitrarily, so it only supplies the k-th value; the ids are then
    chosen by rule: every id above it, plus the lowest ids equal to it until k are taken. Values
    must not be NaN.
    """
    rows = values.shape[0]
    kth = paddle.topk(values, k, axis=-1)[0][:, k - 1:]
    above = values > kth
    tied = values == kth
    needed_ties = k - above.astype("int64").sum(axis=-1, keepdim=True)
    tie_order = paddle.cumsum(tied.astype("int64"), axis=-1)  # 1-based position among the ties
    chosen = paddle.logical_or(above, paddle.logical_and(tied, tie_order <= needed_ties))
    ids = paddle.nonzero(chosen)[:, 1].reshape([rows, k])  # exactly k per row, in id order
    chosen_values = paddle.take_along_axis(values, ids, axis=1)
    # A stable descending sort keeps equal values in id order.
    order = paddle.argsort(chosen_values, axis=-1, descending=True, stable=True)
    return paddle.take_along_axis(chosen_values, order, axis=1), paddle.take_along_axis(ids, order, axis=1)


def top_logprobs(raw_logits: paddle.Tensor, token_ids: paddle.Tensor, k_max: int) -> TokenLogprobs:
    """Logprob and rank of ``token_ids`` ``[N]`` plus the top ``k_max`` (id, logprob) per row.

    ``k_max`` is the batch's largest requested k (0 gives empty ``[N, 0]`` top-k tensors); callers
    cut each row to its own k.
    """
    rows, vocab_size = raw_logits.shape
    if not 0 <= k_max <= min(MAX_TOP_LOGPROBS, vocab_size):
        raise ValueError(f"k_max must be in [0, {min(MAX_TOP_LOGPROBS, vocab_size)}] (got {k_max})")
    if list(token_ids.shape) != [rows]:
        raise ValueError(f"token_ids shape {list(token_ids.shape)} does not match {rows} logits rows")
    logprobs = log_softmax(raw_logits)
    token_ids = token_ids.astype("int64").reshape([rows, 1])
    token_logprob = paddle.take_along_axis(logprobs, token_ids, axis=1)
    # Ranks compare raw logits: subtracting the logsumexp could merge two nearly equal logits.
    token_logit = paddle.take_along_axis(raw_logits, token_ids, axis=1)
    token_rank = 1 + (raw_logits > token_logit).astype("int64").sum(axis=-1)
    if k_max == 0:
        topk_ids = paddle.zeros([rows, 0], dtype="int64")
        topk_logprobs = paddle.zeros([rows, 0], dtype=logprobs.dtype)
    else:
        _, topk_ids = topk_lowest_id_first(raw_logits, k_max)
        topk_logprobs = paddle.take_along_axis(logprobs, topk_ids, axis=1)
    return TokenLogprobs(token_logprob.reshape([rows]), token_rank, topk_ids, topk_logprobs)


def prompt_logprobs(raw_logits: paddle.Tensor, next_token_ids: paddle.Tensor, k: int,
                    chunk_rows: int = 512) -> TokenLogprobs:
    """``top_logprobs`` for prompt positions: row i's logits scored against prompt token i + 1.

    Long prompts are processed ``chunk_rows`` rows at a time so the float32 log-softmax temporary
    stays bounded by ``chunk_rows * V`` rather than the prompt length times the vocabulary.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1 (got {chunk_rows})")
    rows = raw_logits.shape[0]
    chunks = [top_logprobs(raw_logits[start:start + chunk_rows], next_token_ids[start:start + chunk_rows], k)
              for start in range(0, rows, chunk_rows)]
    if not chunks:
        return top_logprobs(raw_logits, next_token_ids, k)
    return TokenLogprobs(*(paddle.concat(list(parts), axis=0) for parts in zip(*chunks, strict=True)))
