"""Send one prepared request to a node pair and relay its chunks, with retries before the first chunk.

Before the first chunk reaches the caller, a failed try (a gRPC error, an error chunk with its cause,
silence past ``first_chunk_timeout_s``) is handed to the decision table (router/blame.py): a bad
request is answered 400 at once; otherwise the next try goes where the table says (the same decode
node with another prefill node after a prefill peer failed; another node after a capacity failure),
up to ``attempts`` tries with exponential backoff, each with a fresh request id on the nodes
(``<id>/retry-<n>``: the first try's id may still be held by an abort in flight), while logs and
metrics keep the client's id. When every try failed, the last failure's status answers (429 with
Retry-After for capacity, else 503). After the first chunk a failure raises ``StreamFailed`` (the
response layer turns it into an error event): tokens already sent cannot be taken back. Closing the
iterator (client disconnect) cancels the gRPC call, which aborts the request on the nodes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from pdserve.router.blame import Decision, Failure, decide, failure_of_chunk, failure_of_status
from pdserve.router.config import RetryConfig
from pdserve.router.errors import APIError
from pdserve.router.metrics import RouterMetrics
from pdserve.router.nodes import NodePool, NoRoute, Route
from pdserve.router.prepare import Prepared
from pdserve.rpc import node_pb2

log = logging.getLogger(__name__)

PAIR_CHECK_S = 0.25  # how often a try waiting for its first chunk checks that its pair can still talk


class StreamFailed(RuntimeError):
    """The request failed after its first chunk was relayed."""


class _TryFailed(RuntimeError):
    """One try failed before its first chunk."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(str(failure))
        self.failure = failure


def node_request_id(request_id: str, attempt: int) -> str:
    """The id a try uses on the nodes: the client's for the first, a fresh one for each retry."""
    return request_id if attempt == 0 else f"{request_id}/retry-{attempt}"


def _request_for(prepared: Prepared, route: Route, attempt: int) -> node_pb2.GenerateRequest:
    request = prepared.to_proto()
    request.request_id = node_request_id(prepared.request_id, attempt)
    if route.prefill is not None:
        p = route.prefill
        request.prefill.CopyFrom(node_pb2.PrefillTarget(node_id=p.node_id, grpc_address=p.grpc_address,
                                                        data_address=p.data_address))
    return request


class Dispatcher:
    def __init__(self, pool: NodePool, retry: RetryConfig, metrics: RouterMetrics,
                 retry_after_s: int) -> None:
        self._pool = pool
        self._retry = retry
        self._metrics = metrics
        self._retry_after_s = retry_after_s

    def _pick(self, prepared: Prepared, avoid: set[str], keep_decode: str | None) -> Route:
        try:
            return self._pool.pick(prepared.prompt_token_ids, avoid, keep_decode)
        except NoRoute:
            if not avoid:
                raise
        # every other node is avoided too: in a small cluster, try the same (still healthy) nodes again
        avoid.clear()
        return self._pool.pick(prepared.prompt_token_ids, avoid, keep_decode)

    async def generate(self, prepared: Prepared) -> AsyncIterator[node_pb2.GenerateChunk]:
        """Chunks of one request; raises APIError (before any chunk) or StreamFailed (after one)."""
        avoid: set[str] = set()
        keep_decode: str | None = None
        failures: list[str] = []
        last: Decision | None = None
        for attempt in range(self._retry.attempts):
            if attempt:
                self._metrics.retries.inc()
                backoff = self._retry.backoff_s * 2 ** (attempt - 1)
                await asyncio.sleep(min(backoff, self._retry.max_backoff_s))
            try:
                route = self._pick(prepared, avoid, keep_decode)
            except NoRoute as e:
                if attempt == 0:  # nothing can serve it now: answer at once rather than back off
                    raise APIError(503, f"no node can serve the request: {e}", None, "no_capacity",
                                   self._retry_after_s) from e
                failures.append(str(e))
                continue
            call = self._pool.stub(route.decode).Generate(_request_for(prepared, route, attempt))
            self._pool.begin(route)
            try:
                try:
                    first = await self._first_chunk(call, route)
                except _TryFailed as e:
                    log.info("request %s: try %d on %s failed: %s", prepared.request_id, attempt + 1,
                             [n.node_id for n in route.nodes], e.failure)
                    last = self._act(e.failure, route)
                    failures.append(str(e.failure))
                    if not last.retry:
                        raise APIError(last.status, f"the node rejected the request: {e.failure.message}",
                                       None, last.code) from e
                    avoid.update(last.avoid)
                    keep_decode = last.keep_decode
                    continue
                yield first
                if not first.finish_reason:
                    async for chunk in self._rest(call, route):
                        yield chunk
                return
            finally:
                call.cancel()  # a no-op after a clean end; otherwise it aborts the request on the nodes
                self._pool.end(route)
        status, code = (last.status, last.code) if last is not None else (503, "no_capacity")
        raise APIError(status, f"no node could serve the request after {self._retry.attempts} tries: "
                               f"{'; '.join(failures[-3:])}", None, code, self._retry_after_s)

    def _act(self, failure: Failure, route: Route) -> Decision:
        """Apply the decision table's verdict on the nodes; returns it for the retry."""
        self._metrics.failures.labels(cause=failure.cause_name).inc()
        prefill_id = route.prefill.node_id if route.prefill is not None else None
        decision = decide(failure, route.decode.node_id, prefill_id)
        if decision.eject is not None:
            self._pool.eject(decision.eject, f"Generate failed: {failure.message}")
        if decision.suspect is not None:
            self._pool.suspect(decision.suspect)
        if decision.broken_pair is not None:
            self._pool.mark_pair_broken(*decision.broken_pair)
        return decision

    async def _read(self, call: grpc.aio.UnaryStreamCall, timeout_s: float) -> node_pb2.GenerateChunk | None:
        async with asyncio.timeout(timeout_s):  # no extra task per chunk, unlike wait_for on 3.11
            chunk = await call.read()
        return None if chunk is grpc.aio.EOF else chunk

    async def _first_read(self, call: grpc.aio.UnaryStreamCall,
                          route: Route) -> node_pb2.GenerateChunk | None:
        """The first chunk; gives up (TimeoutError) after first_chunk_timeout_s, and early (_TryFailed)
        when the route's pair is reported unable to reach each other: a prefill node that cannot reach
        its decode node is seen by the prefill node alone, and its report is the only sign of it."""
        if route.prefill is None:
            return await self._read(call, self._retry.first_chunk_timeout_s)
        # a task of its own: cancelling a grpc.aio read would cancel the call
        read = asyncio.ensure_future(call.read())
        deadline = asyncio.get_running_loop().time() + self._retry.first_chunk_timeout_s
        try:
            while True:
                left = deadline - asyncio.get_running_loop().time()
                done, _ = await asyncio.wait({read}, timeout=min(PAIR_CHECK_S, max(left, 0.0)))
                if done:
                    chunk = read.result()
                    return None if chunk is grpc.aio.EOF else chunk
                if not self._pool.pair_usable(route.decode, route.prefill):
                    message = "the decode and prefill nodes report they cannot reach each other"
                    raise _TryFailed(Failure(node_pb2.CAUSE_PREFILL_PEER_UNREACHABLE, route.prefill.node_id,
                                             message))
                if left <= 0:
                    raise TimeoutError
        finally:
            if not read.done():
                call.cancel()  # ends the read; the caller's cleanup cancels it too
                read.cancel()
                await asyncio.gather(read, return_exceptions=True)

    async def _first_chunk(self, call: grpc.aio.UnaryStreamCall, route: Route) -> node_pb2.GenerateChunk:
        decode_id = route.decode.node_id
        try:
            chunk = await self._first_read(call, route)
        except TimeoutError:
            message = f"no first chunk within {self._retry.first_chunk_timeout_s} s"
            raise _TryFailed(Failure(node_pb2.CAUSE_DEADLINE, decode_id, message)) from None
        except grpc.aio.AioRpcError as e:
            raise _TryFailed(failure_of_status(e, decode_id)) from e
        if chunk is None:
            raise _TryFailed(Failure(node_pb2.CAUSE_UNSPECIFIED, decode_id,
                                     "the stream ended before the first chunk"))
        if chunk.finish_reason in ("error", "abort"):
            prefill_id = route.prefill.node_id if route.prefill is not None else None
            raise _TryFailed(failure_of_chunk(chunk, decode_id, prefill_id))
        return chunk

    async def _rest(self, call: grpc.aio.UnaryStreamCall,
                    route: Route) -> AsyncIterator[node_pb2.GenerateChunk]:
        decode_id = route.decode.node_id
        while True:
            try:
                chunk = await self._read(call, self._retry.chunk_timeout_s)
            except TimeoutError:
                raise StreamFailed(f"the node sent nothing for {self._retry.chunk_timeout_s} s") from None
            except grpc.aio.AioRpcError as e:
                failure = failure_of_status(e, decode_id)
                self._act(failure, route)
                raise StreamFailed(str(failure)) from e
            if chunk is None:
                raise StreamFailed("the node ended the stream without a finish reason")
            if chunk.finish_reason in ("error", "abort"):
                failure = failure_of_chunk(chunk, decode_id, None)
                self._act(failure, route)
                raise StreamFailed(str(failure))
            yield chunk
            if chunk.finish_reason:
                return
