"""The decode node's check of a peer's first token against the logprobs its request asks for.

A prefill node computes the first token's logprob, rank and top-k only when the request asked for
them; a token that differs from what the decode node's own copy of the request asks for fails the
request (the router then tries another pair) instead of being streamed without its logprobs or with
a top-k the decode engine's tokens do not share."""

from __future__ import annotations

import pytest

from pdserve.common.tokens import SampledTokens
from pdserve.decode_node.remote_prefill import missing_logprobs
from pdserve.transfer.messages import FirstToken

BARE = SampledTokens([7])
RANKED = SampledTokens([7], [-0.1], [1])
TOP_2 = SampledTokens([7], [-0.1], [1], 2, [7, 9], [-0.1, -2.5])


@pytest.mark.parametrize(("token", "logprobs", "missing"), [
    (BARE, None, ""),
    (RANKED, None, ""),  # more than asked: the stream drops it
    (TOP_2, None, ""),
    (RANKED, 0, ""),
    (TOP_2, 2, ""),
    (TOP_2, 1, "with 2 top logprobs where the request asks for 1"),
    (BARE, 0, "without its logprob"),
    (BARE, 5, "without its logprob"),
    (RANKED, 2, "with 0 top logprobs where the request asks for 2"),
    (TOP_2, 3, "with 2 top logprobs where the request asks for 3"),
])
def test_a_first_token_must_carry_the_logprobs_its_request_asks_for(
        token: SampledTokens, logprobs: int | None, missing: str) -> None:
    assert missing_logprobs(FirstToken("r", token=token), logprobs) == missing
