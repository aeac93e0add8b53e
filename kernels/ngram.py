"""N-gram (prompt-lookup) drafting as pure functions on token lists.

For n from ``max_n`` down to ``min_n``: take the last n tokens of the context, find them earlier in
the sequence, and propose the tokens that followed that occurrence. The prompt is searched first
(its first occurrence: code completion usually continues text the prompt already holds), then the
generated tokens (the most recent occurrence: the freshest context predicts best).

Plain Python on the request's token list, not NumPy: a decode step's context is a few hundred
tokens, so NumPy's per-call cost would dominate. This search takes 1.6 us in a hot loop and ~8 us
inside an engine step (the forward pass evicts its code and data from the caches between calls),
where a NumPy search takes 3.5 us hot and ~50 us in a step (the demo model, code prompts, 96
tokens).
"""

from __future__ import annotations

from collections.abc import Sequence


def ngram_propose(context: list[int], num_prompt: int, max_n: int, min_n: int, num_drafts: int) -> list[int]:
    """Up to ``num_drafts`` draft tokens continuing ``context`` (prompt + outputs [+ earlier drafts]).

    ``context[:num_prompt]`` is the prompt. A match must be followed by at least one known token,
    and the suffix itself never counts as its own match.

    One pass instead of one search per n: every earlier occurrence of the last token is a candidate
    match end, and the longest n any candidate matches is the n the max-to-min loop would stop at.
    """
    length = len(context)
    if num_drafts <= 0 or length < 2 or min_n > max_n:
        return []
    last = context[-1]
    limit = min(max_n, length - 1)
    best = 0  # the longest match so far
    prompt_end = latest_end = -1  # among matches of that length: the first in the prompt, the latest
    end = -1
    while True:
        try:  # the next earlier occurrence of the last token (C speed); never the suffix itself
            end = context.index(last, end + 1, length - 1)
        except ValueError:
            break
        n = 1
        while n < limit and n <= end and context[end - n] == context[length - 1 - n]:
            n += 1
        if n > best:
            best, prompt_end = n, -1
        if n == best:
            latest_end = end
            if prompt_end < 0 and end < num_prompt:  # its continuation starts inside the prompt
                prompt_end = end
    if best < max(min_n, 1):
        return []
    begin = (prompt_end if prompt_end >= 0 else latest_end) + 1
    return context[begin : begin + num_drafts]


def split_draft_budget(wanted: Sequence[int], budget: int) -> list[int]:
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
