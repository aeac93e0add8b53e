"""Merging a Generate stream's chunks for a non-streaming caller (rpc/chunks.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from pdserve.rpc import node_pb2 as pb
from pdserve.rpc.chunks import merged_chunks
from pdserve.rpc.convert import tokens_from_proto


def _chunk(i: int, finish: str = "") -> pb.GenerateChunk:
    tokens = pb.SampledTokens(token_ids=[i], logprobs=[-0.1 * i], ranks=[1], top_k=1, top_ids=[i + 7],
                              top_logprobs=[-0.2 * i])
    return pb.GenerateChunk(tokens=tokens, text=f"t{i}", finish_reason=finish)


async def _source(chunks: list[pb.GenerateChunk], delay_s: float = 0.0) -> AsyncIterator[pb.GenerateChunk]:
    for chunk in chunks:
        await asyncio.sleep(delay_s)
        yield chunk


async def _collect(source: AsyncIterator[pb.GenerateChunk], max_delay_s: float) -> list[pb.GenerateChunk]:
    return [c async for c in merged_chunks(source, max_delay_s)]


def test_first_chunk_alone_then_the_rest_merged() -> None:
    last = _chunk(3, "length")
    last.usage.CopyFrom(pb.Usage(prompt_tokens=4, completion_tokens=4))
    out = asyncio.run(_collect(_source([_chunk(0), _chunk(1), _chunk(2), last]), max_delay_s=60))
    assert [list(c.tokens.token_ids) for c in out] == [[0], [1, 2, 3]]
    assert out[1].text == "t1t2t3" and out[1].finish_reason == "length"
    # The columns concatenate token by token: the merged chunk is one valid SampledTokens.
    merged = tokens_from_proto(out[1].tokens)
    assert merged.logprobs == pytest.approx([-0.1, -0.2, -0.3]) and merged.ranks == [1, 1, 1]
    assert merged.top(2) == [(10, pytest.approx(-0.6))] and out[1].usage.completion_tokens == 4


def test_a_long_generation_still_sends_every_max_delay() -> None:
    chunks = [_chunk(i) for i in range(6)] + [_chunk(6, "stop")]
    out = asyncio.run(_collect(_source(chunks, delay_s=0.02), max_delay_s=0.05))
    assert 2 < len(out) < 7
    assert [t for c in out for t in c.tokens.token_ids] == list(range(7)) and out[-1].finish_reason == "stop"


def test_an_unfinished_stream_flushes_what_it_has() -> None:
    out = asyncio.run(_collect(_source([_chunk(0), _chunk(1), _chunk(2)]), max_delay_s=60))
    assert [list(c.tokens.token_ids) for c in out] == [[0], [1, 2]]
