"""Merging a Generate stream's chunks for a caller that reads the answer whole.

A non-streaming HTTP request needs only the final text, but a node emits a chunk per engine step, and
each gRPC message costs the router about as much CPU as the rest of the request. With
``GenerateRequest.merge_chunks`` the node sends the first chunk at once (it still marks the first
token for the router's retry and timeout rules), then merges the following ones and sends them when
the last one arrives, or when ``max_delay_s`` has passed since its last message, so a long generation
keeps sending (the router's silence timeout still holds). vLLM's ``RequestOutputKind.FINAL_ONLY`` is
the same idea between its engine and its API server.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from pdserve.rpc import node_pb2 as pb

MAX_DELAY_S = 1.0


def merge_into(merged: pb.GenerateChunk, chunk: pb.GenerateChunk) -> None:
    """Append ``chunk`` to ``merged``: tokens, text and logprobs concatenate; finish_reason, usage,
    speculate_metrics and error are the later chunk's when it has them."""
    text = merged.text + chunk.text
    merged.MergeFrom(chunk)  # repeated fields append, set scalars and messages take the later value
    merged.text = text


async def merged_chunks(chunks: AsyncIterator[pb.GenerateChunk],
                        max_delay_s: float = MAX_DELAY_S) -> AsyncIterator[pb.GenerateChunk]:
    pending: pb.GenerateChunk | None = None
    last_sent = 0.0
    first = True
    async for chunk in chunks:
        if first or chunk.finish_reason and pending is None:
            first = False
            last_sent = time.monotonic()
            yield chunk
            continue
        if pending is None:
            pending = pb.GenerateChunk()
        merge_into(pending, chunk)
        if chunk.finish_reason or time.monotonic() - last_sent >= max_delay_s:
            last_sent = time.monotonic()
            yield pending
            pending = None
    if pending is not None:
        yield pending
