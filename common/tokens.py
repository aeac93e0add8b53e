"""`SampledTokens`: the one record of tokens with their logprobs, from the model runner to the router.

The model runner builds it, the engine's output record carries it over the SysV stream, a prefill
node's `FirstToken` carries it to the decode node, whose engine emits it again as the request's first
output, and the gRPC chunk carries its columns (rpc/convert.py is the one conversion). Prompt
logprobs use it too (the prompt tokens at positions 1 .. n-1).

Columns, one entry per token, so a run of tokens costs a few lists, not an object per token:

    token_ids     [n]
    logprobs      [n]          raw logprob of each token (before sampling transforms); [] = not asked
    ranks         [n]          1-based rank of each token among the whole vocabulary
    top_ids       [n * top_k]  each token's top-k alternatives, most likely first, row-major
    top_logprobs  [n * top_k]
"""

from __future__ import annotations

import math

import msgspec

from pdserve.common.sampling_params import MAX_TOP_LOGPROBS


class SampledTokens(msgspec.Struct, frozen=True, array_like=True):
    token_ids: list[int]
    logprobs: list[float] = []
    ranks: list[int] = []
    top_k: int = 0
    top_ids: list[int] = []
    top_logprobs: list[float] = []

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if self.logprobs:
            if len(self.logprobs) != n or len(self.ranks) != n:
                raise ValueError(f"SampledTokens: {n} tokens need {n} logprobs and ranks "
                                 f"(got {len(self.logprobs)} and {len(self.ranks)})")
        elif self.ranks or self.top_k:
            raise ValueError("SampledTokens: ranks and top-k need logprobs")
        if not 0 <= self.top_k <= MAX_TOP_LOGPROBS:
            raise ValueError(f"SampledTokens.top_k must be in [0, {MAX_TOP_LOGPROBS}] (got {self.top_k})")
        if len(self.top_ids) != n * self.top_k or len(self.top_logprobs) != n * self.top_k:
            raise ValueError(f"SampledTokens: top-k columns need {n} x {self.top_k} entries")

    def __len__(self) -> int:
        return len(self.token_ids)

    def head(self, count: int) -> SampledTokens:
        """The first `count` tokens (all of them when count >= len)."""
        return self if count >= len(self.token_ids) else self.slice(0, count)

    def slice(self, start: int, end: int) -> SampledTokens:
        """Tokens start .. end - 1."""
        k = self.top_k
        return SampledTokens(self.token_ids[start:end], self.logprobs[start:end], self.ranks[start:end], k,
                             self.top_ids[start * k:end * k], self.top_logprobs[start * k:end * k])

    def top(self, index: int) -> list[tuple[int, float]]:
        """Token `index`'s top-k as (token id, logprob) pairs, most likely first."""
        k = self.top_k
        return list(zip(self.top_ids[index * k:(index + 1) * k],
                        self.top_logprobs[index * k:(index + 1) * k], strict=True))

    def valid_logprobs(self) -> bool:
        """Every logprob is a probability's log (<= 0, not NaN): what a peer's message must hold."""
        return all(x <= 0.0 and not math.isnan(x) for x in (*self.logprobs, *self.top_logprobs))

    @staticmethod
    def concat(parts: list[SampledTokens]) -> SampledTokens:
        """The parts' tokens in order; every part must have the same top_k and logprobs or none."""
        if len(parts) == 1:
            return parts[0]
        k = parts[0].top_k if parts else 0
        return SampledTokens([t for p in parts for t in p.token_ids], [x for p in parts for x in p.logprobs],
                             [r for p in parts for r in p.ranks], k, [t for p in parts for t in p.top_ids],
                             [x for p in parts for x in p.top_logprobs])


NO_TOKENS = SampledTokens([])
