"""N-gram (prompt-lookup) drafting as pure functions on token arrays.

For n from ``max_n`` down to ``min_n``: take the last n tokens of the context, find them earlier in
the sequence, and propose the tokens that followed that occurrence. The prompt is searched first
(its first occurrence: code completion usually continues text the prompt already holds), then the
generated tokens (the most recent occurrence: the freshest context predicts best).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _match_starts(haystack: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Start indices where ``pattern`` occurs in ``haystack`` (ascending)."""
    n = len(pattern)
    if len(haystack) < n:
        return np.zeros(0, dtype=np.int64)
    windows = sliding_window_view(haystack, n)  # [len - n + 1, n], a view: no copy
    return np.flatnonzero((windows == pattern).all(axis=1))


def ngram_propose(context: np.ndarray, num_prompt: int, max_n: int, min_n: int, num_drafts: int) -> list[int]:
    """Up to ``num_drafts`` draft tokens continuing ``context`` (prompt + outputs [+ earlier drafts]).

    ``context[:num_prompt]`` is the prompt. A match must be followed by at least one known token,
    and the suffix itself never counts as its own match.
    """
    if num_drafts <= 0:
        return []
    length = len(context)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = context[length - n :]
        # Searching context[:-1] keeps only matches followed by a known token (so never the suffix).
        starts = _match_starts(context[: length - 1], pattern)
        if not len(starts):
            continue
        in_prompt = starts[starts + n <= num_prompt]
        begin = int(in_prompt[0] if len(in_prompt) else starts[-1]) + n
        return context[begin : begin + num_drafts].tolist()
    return []


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
