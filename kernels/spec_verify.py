"""Speculative-decoding verification as pure functions: accept drafts, pick the new token, and gather
logprobs for exactly the emitted rows.

Row layout: request ``i`` owns ``1 + d_i`` consecutive rows of the logits, starting at ``row_starts[i]``.
Row ``j`` holds the target's prediction *after* the request's tokens plus drafts ``0 .. j-1``; so row
``j`` verifies draft ``j`` and the last row (``j = d_i``) gives the bonus token when every draft
is accepted. A request without drafts is the plain one-row sampling case.

Acceptance rule (Leviathan et al. 2023; Chen et al. 2023), per request, for j = 0, 1, ...:

    accept draft x_j  with probability  min(1, p_j(x_j) / q_j(x_j))
    at the first rejection emit  x ~ normalize(max(0, p_j - q_j))  and stop
    if all d drafts are accepted emit the bonus  x ~ p_d

where p_j is the target's filtered sampling distribution at row j and q_j the proposer's. Our
proposers draft deterministically (MTP argmax, n-gram copy), so q_j is one-hot at x_j: accept with
probability p_j(x_j), and the residual is p_j with x_j removed. Greedy rows have a one-hot p_j,
which turns the rule into "accept exactly the target's argmax chain". The emitted tokens are then
distributed exactly as non-speculative sampling from the target.

The engine applies this rule in its coupled form (``_coupled_sample``): each row draws the token
plain sampling would draw there, y_j ~ p_j with the request's sampling uniform at the row's
generation index, and draft x_j is accepted iff y_j == x_j; the first y_j that differs (or the
bonus y_d) is the new token. With a one-hot q this is the rule above — accepted with probability
p_j(x_j), and on rejection y_j is distributed as p_j without x_j, the residual — and the tokens are
exactly those of non-speculative sampling with the same seed: drafts change speed, never tokens, so
a seeded request continued on another node (a migration) or a node with another speculative config
draws what it would have drawn. ``rejection_accept`` and ``residual_probs`` state the general rule
(any q) for reference and tests.

Uniforms come from the request's own key (``request_uniforms``) at the row's generation index:
results never depend on the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import paddle

from pdserve.kernels.logprobs import TokenLogprobs, host_token_logprobs, on_host, top_logprobs
from pdserve.kernels.rows import take_rows
from pdserve.kernels.sampling import (
    RngStream,
    SamplingBatch,
    batch_uniforms,
    greedy_token_ids,
    process_logits,
    sample_from_probs,
    sampling_probs,
)


class VerifiedTokens(NamedTuple):
    token_ids: list[tuple[int, ...]]  # per request: accepted drafts, then one new token
    num_accepted_drafts: list[int]  # per request
    # Logprobs of the emitted tokens of requests with a k (None: none asked), one row per emitted
    # token, in request order; never computed for rejected or padding rows.
    logprobs: TokenLogprobs | None


def row_starts(num_drafts: Sequence[int]) -> list[int]:
    """First logits row of each request when request i owns 1 + num_drafts[i] rows.

    Plain Python: a step has a handful of requests, and NumPy's calls for this cost ~25 us of a
    hybrid step (py-spy), with cold caches after the forward pass."""
    starts, row = [], 0
    for n in num_drafts:
        starts.append(row)
        row += n + 1
    return starts


def greedy_accept(target_ids: Sequence[int], drafts: Sequence[Sequence[int]]) -> list[int]:
    """Drafts accepted per request: the longest prefix equal to the target's argmax at each row."""
    starts = row_starts([len(d) for d in drafts])
    accepted = []
    for start, draft in zip(starts, drafts, strict=True):
        n = 0
        while n < len(draft) and draft[n] == target_ids[start + n]:
            n += 1
        accepted.append(n)
    return accepted


def rejection_accept(
    target_probs: np.ndarray,
    drafts: Sequence[Sequence[int]],
    accept_uniforms: np.ndarray,
    draft_probs: np.ndarray | None = None,
) -> list[int]:
    """Drafts accepted per request under the rule in the module docstring.

    target_probs: ``[R, V]`` rows summing to 1; accept_uniforms: ``[R]``; draft_probs: ``[R, V]``
    (the proposer's q per row; None means one-hot at the draft token, q(x) = 1).
    """
    starts = row_starts([len(d) for d in drafts])
    accepted = []
    for start, draft in zip(starts, drafts, strict=True):
        n = 0
        while n < len(draft):
            row, token = start + n, draft[n]
            q = 1.0 if draft_probs is None else float(draft_probs[row, token])
            p = float(target_probs[row, token])
            # u < min(1, p / q), written without dividing so q = 0 (never proposed) rejects cleanly.
            if not accept_uniforms[row] * q < p:
                break
            n += 1
        accepted.append(n)
    return accepted


def residual_probs(
    target_probs: np.ndarray, draft_probs: np.ndarray | None, rows: np.ndarray, rejected_tokens: np.ndarray
) -> np.ndarray:
    """``normalize(max(0, p - q))`` for the given rows ``[N, V]``; with q one-hot at the rejected token.

    If rounding leaves no mass (p == q to float precision, where a rejection is all but impossible),
    the row falls back to p itself.
    """
    p = target_probs[rows]
    if draft_probs is None:
        residual = p.copy()
        residual[np.arange(len(rows)), rejected_tokens] = 0.0
    else:
        residual = np.maximum(p - draft_probs[rows], 0.0)
    mass = residual.sum(axis=1, keepdims=True)
    return np.where(mass > 0, residual / np.where(mass > 0, mass, 1.0), p)


def verify_drafts(
    raw_logits: paddle.Tensor,
    batch: SamplingBatch,
    drafts: Sequence[Sequence[int]],
    logprobs_k: Sequence[int | None],
) -> VerifiedTokens:
    """Accept drafts and emit one new token per request, then gather logprobs of the emitted rows.

    raw_logits: ``[R, V]`` float32 with the row layout of the module docstring; ``batch`` has one row
    per logits row (row j of a request sees its outputs plus drafts 0 .. j-1, so penalties and the
    generation index are right); logprobs_k: the request's top-k (None: no logprobs).
    """
    if raw_logits.shape[0] != sum(len(d) + 1 for d in drafts):
        raise ValueError(
            f"{raw_logits.shape[0]} logits rows for {len(drafts)} requests with "
            f"{sum(len(d) for d in drafts)} drafts"
        )
    processed = process_logits(raw_logits, batch)
    starts = row_starts([len(d) for d in drafts])
    if batch.greedy.all():
        accepted, new_tokens = _argmax_chain(processed, drafts, starts)
    else:
        accepted, new_tokens = _coupled_sample(sampling_probs(processed, batch), batch, drafts, starts)
    return _emitted(raw_logits, drafts, starts, accepted, new_tokens, logprobs_k)


def _argmax_chain(
    logits: paddle.Tensor, drafts: Sequence[Sequence[int]], starts: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Greedy acceptance over every row at once: (drafts accepted, the new token) per request."""
    targets = greedy_token_ids(logits).tolist()
    accepted = greedy_accept(targets, drafts)
    return accepted, [targets[start + n] for start, n in zip(starts, accepted, strict=True)]


def _emitted(
    raw_logits: paddle.Tensor,
    drafts: Sequence[Sequence[int]],
    starts: Sequence[int],
    accepted: list[int],
    new_tokens: list[int],
    logprobs_k: Sequence[int | None],
) -> VerifiedTokens:
    """The accepted drafts plus the new token of each request, with the emitted rows' logprobs."""
    token_ids = [tuple(d[:n]) + (t,) for d, n, t in zip(drafts, accepted, new_tokens, strict=True)]
    return VerifiedTokens(
        token_ids, accepted, gather_emitted_logprobs(raw_logits, starts, token_ids, logprobs_k)
    )


def greedy_verify(
    hidden: paddle.Tensor,
    compute_logits: Callable[[paddle.Tensor], paddle.Tensor],
    drafts: Sequence[Sequence[int]],
    logprobs_k: Sequence[int | None],
    max_rows_at_once: int = 1,
) -> VerifiedTokens:
    """``verify_drafts`` for requests whose token is the argmax of the raw logits (every request
    ``is_plain_greedy``), computing logits only for the rows that emit a token.

    hidden: ``[R, hidden]`` with the row layout of the module docstring; compute_logits maps hidden
    rows to raw logits. Row j of a request matters only if drafts 0 .. j-1 were all accepted, so
    the LM head runs in rounds: round j scores row j of every request still accepting, and a request
    leaves at its first draft that differs from the argmax (that argmax is its new token) or after
    its last draft (the bonus). Every scored row is an emitted row, so the logprobs of the emitted
    tokens come from logits already computed, and rows after a rejection are never scored: on CPU
    the LM head is the largest GEMM of a step, and a batch of k-draft requests would otherwise
    score (1 + k) rows each for ~2-3 emitted tokens.

    A head whose cost is flat up to ``max_rows_at_once`` rows (the packed CPU op: 8) scores a step
    with that many rows or fewer in one call instead: the emitted rows' logits are the same bits
    either way, and one call costs less than the rounds' calls. Logprobs still come from the emitted
    rows only.
    """
    if hidden.shape[0] != sum(len(d) + 1 for d in drafts):
        num_drafts = sum(len(d) for d in drafts)
        raise ValueError(f"{hidden.shape[0]} hidden rows for {len(drafts)} requests with {num_drafts} drafts")
    starts = row_starts([len(d) for d in drafts])
    if hidden.shape[0] <= max_rows_at_once:
        logits = compute_logits(hidden)  # [R, V]
        return _emitted(logits, drafts, starts, *_argmax_chain(logits, drafts, starts), logprobs_k)
    token_ids: list[list[int]] = [[] for _ in drafts]
    rounds: list[paddle.Tensor] = []  # logits of round j: one row per request in `active` at round j
    row_of: dict[tuple[int, int], int] = {}  # (request, its row j) -> row of the rounds' concatenation
    active = list(range(len(drafts)))
    j = num_scored = 0
    while active:
        logits = compute_logits(take_rows(hidden, [starts[i] + j for i in active]))  # [len(active), V]
        targets = greedy_token_ids(logits).tolist()
        rounds.append(logits)
        still_accepting = []
        for i, target in zip(active, targets, strict=True):
            token_ids[i].append(target)
            row_of[i, j] = num_scored
            num_scored += 1
            if j < len(drafts[i]) and drafts[i][j] == target:
                still_accepting.append(i)
        active, j = still_accepting, j + 1
    emitted = [tuple(ids) for ids in token_ids]
    return VerifiedTokens(emitted, [len(ids) - 1 for ids in emitted],
                          _scored_logprobs(rounds, row_of, emitted, logprobs_k))


def _scored_logprobs(
    rounds: Sequence[paddle.Tensor],
    row_of: dict[tuple[int, int], int],
    token_ids: Sequence[tuple[int, ...]],
    logprobs_k: Sequence[int | None],
) -> TokenLogprobs | None:
    """``gather_emitted_logprobs`` over logits scored round by round (``greedy_verify``)."""
    wanted = [i for i, k in enumerate(logprobs_k) if k is not None]
    if not wanted:
        return None
    rows = np.asarray([row_of[i, j] for i in wanted for j in range(len(token_ids[i]))], dtype=np.int64)
    ids = np.asarray([t for i in wanted for t in token_ids[i]], dtype=np.int64)
    scored = rounds[0] if len(rounds) == 1 else paddle.concat(list(rounds), axis=0)
    k_max = max(k for k in logprobs_k if k is not None)
    if on_host(scored, len(rows), k_max):
        return host_token_logprobs(np.from_dlpack(scored)[rows], ids)
    gathered = scored if np.array_equal(rows, np.arange(scored.shape[0])) else paddle.gather(
        scored, paddle.to_tensor(rows))
    return top_logprobs(gathered, paddle.to_tensor(ids), k_max)


def _coupled_sample(
    probs: paddle.Tensor, batch: SamplingBatch, drafts: Sequence[Sequence[int]], starts: Sequence[int]
) -> tuple[list[int], list[int]]:
    """The module docstring's rule in its coupled form: every row draws what plain sampling draws at its
    generation index; drafts are accepted while they equal those draws."""
    drawn = sample_from_probs(probs, batch_uniforms(batch, RngStream.SAMPLE)).numpy().tolist()
    accepted = greedy_accept(drawn, drafts)
    return accepted, [drawn[start + n] for start, n in zip(starts, accepted, strict=True)]


def gather_emitted_logprobs(
    raw_logits: paddle.Tensor,
    starts: Sequence[int],
    token_ids: Sequence[tuple[int, ...]],
    logprobs_k: Sequence[int | None],
) -> TokenLogprobs | None:
    """Logprobs, ranks and top-k of the emitted tokens only: request i's first len(token_ids[i]) rows.

    Emitted token j of a request is scored on row j, whose prefix is exactly the emitted tokens
    before it. Rows of rejected drafts and of requests without logprobs are never touched.
    """
    wanted = [i for i, k in enumerate(logprobs_k) if k is not None]
    if not wanted:
        return None
    rows = [row for i in wanted for row in range(starts[i], starts[i] + len(token_ids[i]))]
    ids = np.concatenate([np.asarray(token_ids[i], dtype=np.int64) for i in wanted])
    k_max = max(k for k in logprobs_k if k is not None)
    if on_host(raw_logits, len(rows), k_max):
        return host_token_logprobs(np.from_dlpack(raw_logits)[rows], ids)
    return top_logprobs(take_rows(raw_logits, rows), paddle.to_tensor(ids), k_max)
