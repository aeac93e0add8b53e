"""A Generate stream answered whole (rpc/chunks.py whole_answer): what a node's Complete returns."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from pdserve.rpc import node_pb2 as pb
from pdserve.rpc.chunks import whole_answer
from pdserve.rpc.convert import tokens_from_proto


def _chunk(i: int, finish: str = "") -> pb.GenerateChunk:
    tokens = pb.SampledTokens(token_ids=[i], logprobs=[-0.1 * i], ranks=[1], top_k=1, top_ids=[i + 7],
                              top_logprobs=[-0.2 * i])
    return pb.GenerateChunk(tokens=tokens, text=f"t{i}", finish_reason=finish)


class _Source:
    """Chunks with a delay before each (``delays[i]`` before chunk i); records whether it was closed
    before its end, as a node's relay aborts the engine request then."""

    def __init__(self, chunks: list[pb.GenerateChunk], delays: list[float] | None = None) -> None:
        self.chunks = chunks
        self.delays = delays or [0.0] * len(chunks)
        self.closed_early = False

    async def run(self) -> AsyncIterator[pb.GenerateChunk]:
        done = False
        try:
            for chunk, delay in zip(self.chunks, self.delays, strict=True):
                await asyncio.sleep(delay)
                yield chunk
            done = True
        finally:
            self.closed_early = not done


def test_every_chunk_merges_into_one_answer() -> None:
    first = _chunk(0)
    first.timing.CopyFrom(pb.TimingInfo(queue_s=0.5, prefill_s=0.25))
    last = _chunk(3, "length")
    last.usage.CopyFrom(pb.Usage(prompt_tokens=4, completion_tokens=4))
    source = _Source([first, _chunk(1), _chunk(2), last], [0.0, 0.02, 0.02, 0.02])
    answer = asyncio.run(whole_answer(source.run()))
    assert list(answer.tokens.token_ids) == [0, 1, 2, 3] and answer.text == "t0t1t2t3"
    assert answer.finish_reason == "length" and answer.usage.completion_tokens == 4
    # The columns concatenate token by token: the answer is one valid SampledTokens.
    merged = tokens_from_proto(answer.tokens)
    assert merged.logprobs == pytest.approx([0.0, -0.1, -0.2, -0.3]) and merged.ranks == [1, 1, 1, 1]
    assert merged.top(2) == [(9, pytest.approx(-0.4))]
    # the first chunk's timing stays, and decode_s says how long the rest took
    assert answer.timing.queue_s == 0.5 and answer.timing.prefill_s == 0.25
    assert 0.05 <= answer.timing.decode_s < 1.0
    assert not source.closed_early


def test_a_late_first_token_is_a_deadline_error_and_closes_the_request() -> None:
    source = _Source([_chunk(0, "stop")], [5.0])
    answer = asyncio.run(whole_answer(source.run(), first_token_timeout_s=0.1, silence_timeout_s=10))
    assert answer.finish_reason == "error" and answer.cause == pb.CAUSE_DEADLINE
    assert "no first token within 0.1 s" in answer.error and not answer.tokens.token_ids
    assert source.closed_early


def test_silence_after_the_first_token_keeps_the_tokens_made_so_far() -> None:
    source = _Source([_chunk(0), _chunk(1), _chunk(2, "stop")], [0.0, 0.0, 5.0])
    answer = asyncio.run(whole_answer(source.run(), first_token_timeout_s=10, silence_timeout_s=0.1))
    assert answer.finish_reason == "error" and answer.cause == pb.CAUSE_DEADLINE
    assert "sent nothing for 0.1 s" in answer.error
    assert list(answer.tokens.token_ids) == [0, 1] and answer.text == "t0t1"
    assert source.closed_early


def test_an_error_chunk_after_tokens_keeps_them_next_to_the_error() -> None:
    error = pb.GenerateChunk(finish_reason="error", error="engine died", cause=pb.CAUSE_DECODE_NODE_FAILED)
    answer = asyncio.run(whole_answer(_Source([_chunk(0), _chunk(1), error]).run()))
    assert list(answer.tokens.token_ids) == [0, 1]
    assert answer.finish_reason == "error" and answer.cause == pb.CAUSE_DECODE_NODE_FAILED
    assert answer.error == "engine died"


def test_no_limits_wait_as_long_as_the_stream_takes() -> None:
    source = _Source([_chunk(0), _chunk(1, "stop")], [0.15, 0.15])
    answer = asyncio.run(whole_answer(source.run()))
    assert answer.finish_reason == "stop" and list(answer.tokens.token_ids) == [0, 1]
