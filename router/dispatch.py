"""Send one prepared request to a node pair and relay its chunks, with retries before the first chunk.

Before the first chunk reaches the caller, a failed try (gRPC error, a node-reported error, silence
past ``first_chunk_timeout_s``) is retried on another pair, up to ``attempts`` tries with exponential
backoff; an unreachable node is ejected. After the first chunk a failure raises ``StreamFailed`` (the
response layer turns it into an error event): tokens already sent cannot be taken back. Closing the
iterator (client disconnect) cancels the gRPC call, which aborts the request on the nodes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from pdserve.router.config import RetryConfig
from pdserve.router.errors import APIError
from pdserve.router.metrics import RouterMetrics
from pdserve.router.nodes import NodePool, NoRoute, Route
from pdserve.router.prepare import Prepared
from pdserve.rpc import node_pb2

log = logging.getLogger(__name__)

# the node cannot be reached (or serves no Node API): out of rotation until a health check passes again.
# INTERNAL/UNKNOWN come from a live node that failed one request; they fail the try, not the node.
_EJECT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED})


class StreamFailed(RuntimeError):
    """The request failed after its first chunk was relayed."""


class _TryFailed(RuntimeError):
    """One try failed before its first chunk; ``nodes`` are the ones to avoid on the next try."""

    def __init__(self, message: str, nodes: tuple[str, ...]) -> None:
        super().__init__(message)
        self.nodes = nodes


def _request_for(prepared: Prepared, route: Route) -> node_pb2.GenerateRequest:
    request = prepared.to_proto()
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

    def _pick(self, prepared: Prepared, avoid: set[str]) -> Route:
        try:
            return self._pool.pick(prepared.prompt_token_ids, avoid)
        except NoRoute:
            if not avoid:
                raise
        # every other node is avoided too: in a small cluster, try the same (still healthy) pair again
        avoid.clear()
        return self._pool.pick(prepared.prompt_token_ids, avoid)

    async def generate(self, prepared: Prepared) -> AsyncIterator[node_pb2.GenerateChunk]:
        """Chunks of one request; raises APIError (before any chunk) or StreamFailed (after one)."""
        avoid: set[str] = set()
        failures: list[str] = []
        for attempt in range(self._retry.attempts):
            if attempt:
                self._metrics.retries.inc()
                backoff = self._retry.backoff_s * 2 ** (attempt - 1)
                await asyncio.sleep(min(backoff, self._retry.max_backoff_s))
            try:
                route = self._pick(prepared, avoid)
            except NoRoute as e:
                if attempt == 0:  # nothing can serve it now: answer at once rather than back off
                    raise APIError(503, f"no node can serve the request: {e}", None, "no_capacity",
                                   self._retry_after_s) from e
                failures.append(str(e))
                continue
            call = self._pool.stub(route.decode).Generate(_request_for(prepared, route))
            self._pool.begin(route)
            try:
                try:
                    first = await self._first_chunk(call, route)
                except _TryFailed as e:
                    log.info("request %s: try %d on %s failed: %s", prepared.request_id, attempt + 1,
                             [n.node_id for n in route.nodes], e)
                    failures.append(str(e))
                    avoid.update(e.nodes)
                    continue
                yield first
                if not first.finish_reason:
                    async for chunk in self._rest(call, route):
                        yield chunk
                return
            finally:
                call.cancel()  # a no-op after a clean end; otherwise it aborts the request on the nodes
                self._pool.end(route)
        raise APIError(503, f"no node could serve the request after {self._retry.attempts} tries: "
                            f"{'; '.join(failures[-3:])}", None, "no_capacity", self._retry_after_s)

    async def _read(self, call: grpc.aio.UnaryStreamCall, timeout_s: float) -> node_pb2.GenerateChunk | None:
        async with asyncio.timeout(timeout_s):  # no extra task per chunk, unlike wait_for on 3.11
            chunk = await call.read()
        return None if chunk is grpc.aio.EOF else chunk

    def _on_rpc_error(self, e: grpc.aio.AioRpcError, route: Route) -> str:
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise APIError(400, f"the node rejected the request: {e.details()}", None, "invalid_value") from e
        if e.code() in _EJECT_CODES:
            self._pool.eject(route.decode.node_id, f"Generate failed: {e.code().name}")
        return f"{route.decode.node_id}: {e.code().name}: {e.details()}"

    async def _first_chunk(self, call: grpc.aio.UnaryStreamCall, route: Route) -> node_pb2.GenerateChunk:
        ids = tuple(n.node_id for n in route.nodes)
        try:
            chunk = await self._read(call, self._retry.first_chunk_timeout_s)
        except TimeoutError:
            raise _TryFailed(f"no first chunk within {self._retry.first_chunk_timeout_s} s", ids) from None
        except grpc.aio.AioRpcError as e:
            raise _TryFailed(self._on_rpc_error(e, route), ids) from e
        if chunk is None:
            raise _TryFailed("the stream ended before the first chunk", ids)
        if chunk.finish_reason in ("error", "abort"):
            raise _TryFailed(f"{route.decode.node_id}: {chunk.finish_reason}: {chunk.error}", ids)
        return chunk

    async def _rest(self, call: grpc.aio.UnaryStreamCall,
                    route: Route) -> AsyncIterator[node_pb2.GenerateChunk]:
        while True:
            try:
                chunk = await self._read(call, self._retry.chunk_timeout_s)
            except TimeoutError:
                raise StreamFailed(f"the node sent nothing for {self._retry.chunk_timeout_s} s") from None
            except grpc.aio.AioRpcError as e:
                raise StreamFailed(self._on_rpc_error(e, route)) from e
            if chunk is None:
                raise StreamFailed("the node ended the stream without a finish reason")
            if chunk.finish_reason in ("error", "abort"):
                raise StreamFailed(f"{route.decode.node_id}: {chunk.finish_reason}: {chunk.error}")
            yield chunk
            if chunk.finish_reason:
                return
