"""Per-token views of a `SampledTokens` record, for tests that check one token's logprob facts at a time."""

from __future__ import annotations

from typing import NamedTuple

from pdserve.common.tokens import SampledTokens


class TokenInfo(NamedTuple):
    logprob: float
    rank: int
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


def token_infos(tokens: SampledTokens | None) -> list[TokenInfo]:
    """One view per token; none when the record carries no logprobs."""
    if tokens is None or not tokens.logprobs:
        return []
    return [TokenInfo(tokens.logprobs[i], tokens.ranks[i], tuple(t for t, _ in tokens.top(i)),
                      tuple(lp for _, lp in tokens.top(i))) for i in range(len(tokens))]
