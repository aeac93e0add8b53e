"""N-gram (prompt-lookup) drafting as pure functions on token arrays.

For n from ``max_n`` down to ``min_n``: take the last n tokens of the context, find them earlier in
the sequence, and propose the tokens that followed that occurrence. The prompt is searched first
(its first occurrence: code completion usually continues text the prompt already holds), then the
generated tokens (the most recent occurrence: the freshest context predicts best).
"""

from __future__ import annotations

import numpy as np


def _match_lengths(context: np.ndarray, ends: np.ndarray, max_n: int) -> np.ndarray:
    """For each candidate end index e (context[e] == the last token, e < len - 1): how many tokens,
    up to ``max_n``, of the suffix ending at e equal the context's own suffix."""
    length = len(context)
    matched = np.ones(len(ends), dtype=np.int64)
    still = np.ones(len(ends), dtype=bool)
    for back in range(1, max_n):
        # Only candidates that matched `back` tokens so far and have a token further back can grow.
        still &= ends >= back
        still[still] = context[ends[still] - back] == context[length - 1 - back]
        if not still.any():
            break
        matched += still
    return matched


def ngram_propose(context: np.ndarray, num_prompt: int, max_n: int, min_n: int, num_drafts: int) -> list[int]:
    """Up to ``num_drafts`` draft tokens continuing ``context`` (prompt + outputs [+ earlier drafts]).

    ``context[:num_prompt]`` is the prompt. A match must be followed by at least one known token,
    and the suffix itself never counts as its own match.

    One pass instead of one search per n: every earlier occurrence of the last token is a candidate
    match end, and the longest n any candidate matches is the n the max-to-min loop would stop at.
    """
    length = len(context)
    if num_drafts <= 0 or length < 2 or min_n > max_n:
        return []
    # Ends before length - 1 only: a match must be followed by a known token (never the suffix).
    ends = np.flatnonzero(context[: length - 1] == context[length - 1])
    if not len(ends):
        return []
    lengths = _match_lengths(context, ends, min(max_n, length - 1))
    n = int(lengths.max())
    if n < max(min_n, 1):
        return []
    ends = ends[lengths >= n]  # ascending, so starts (ends - n + 1) are too
    in_prompt = ends[ends + 1 <= num_prompt]
    begin = int(in_prompt[0] if len(in_prompt) else ends[-1]) + 1
    return context[begin : begin + num_drafts].tolist()


def split_draft_budget(wanted: list[int], budget: int) -> list[int]:
    """Drafts each request may take when the batch may verify at most ``budget`` in total.

    Requests are served in batch order, each taking what it wants while the budget lasts, so a
    request's drafts never depend on requests after it.
    """
    granted = []
    for want in wanted:
        take = max(0, min(want, budget))
        granted.append(take)
        budget -= take
    return granted
