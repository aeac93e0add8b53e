"""A Generate stream's chunks answered whole: what a node's ``Complete`` returns.

A non-streaming HTTP request needs only the final text, and a gRPC server stream costs the router
about twice a unary call's CPU (two asyncio tasks and a completion per message, each handed from
gRPC's threads to the event loop), so ``Complete`` runs the same chunks and answers them merged into
one. vLLM's ``RequestOutputKind.FINAL_ONLY`` is the same idea between its engine and its API server.

The caller sees nothing until the answer, so the node bounds the wait itself, as the router bounds a
stream's: no first token within ``first_token_timeout_s``, or no chunk for ``silence_timeout_s`` after
it, ends the request (its generator is closed, which aborts it in the engine) with a CAUSE_DEADLINE
error. A failure after the first token keeps the tokens made so far in the answer, next to the error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from pdserve.rpc import node_pb2 as pb


def merge_into(merged: pb.GenerateChunk, chunk: pb.GenerateChunk) -> None:
    """Append ``chunk`` to ``merged``: tokens, text and logprobs concatenate; finish_reason, usage,
    speculate_metrics and error are the later chunk's when it has them."""
    text = merged.text + chunk.text
    merged.MergeFrom(chunk)  # repeated fields append, set scalars and messages take the later value
    merged.text = text


async def whole_answer(chunks: AsyncIterator[pb.GenerateChunk], first_token_timeout_s: float = 0.0,
                       silence_timeout_s: float = 0.0) -> pb.GenerateChunk:
    """Every chunk of ``chunks`` merged into one; a timeout (0: none) closes ``chunks`` and answers
    what came so far with a CAUSE_DEADLINE error. ``timing.decode_s`` is set to the time from the
    first token to the answer, so the caller can tell its time to first token."""
    answer = pb.GenerateChunk()
    first_token_at: float | None = None
    try:
        while True:
            limit = first_token_timeout_s if first_token_at is None else silence_timeout_s
            try:
                async with asyncio.timeout(limit or None):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except TimeoutError:
                what = (f"no first token within {first_token_timeout_s} s" if first_token_at is None
                        else f"the engine sent nothing for {silence_timeout_s} s")
                answer.finish_reason, answer.cause, answer.error = "error", pb.CAUSE_DEADLINE, what
                break
            if first_token_at is None and chunk.tokens.token_ids:
                first_token_at = time.monotonic()
            merge_into(answer, chunk)
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]  # an async generator: aborts an unfinished request
    if first_token_at is not None:
        answer.timing.decode_s = time.monotonic() - first_token_at
    return answer
