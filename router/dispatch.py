"""Send one prepared request to a node pair and relay its chunks, with retries before the first chunk.

Before the first chunk reaches the caller, a failed try (a gRPC error, an error chunk with its cause,
silence past ``first_chunk_timeout_s``) is handed to the decision table (router/blame.py): a bad
request is answered 400 at once; otherwise the next try goes where the table says (the same decode
node with another prefill node after a prefill peer failed; another node after a capacity failure),
up to ``attempts`` tries with exponential backoff, each with a fresh request id on the nodes
(``<id>/retry-<n>``: the first try's id may still be held by an abort in flight), while logs and
metrics keep the client's id. When every try failed, the last failure's status answers (429 with
Retry-After for capacity, else 503). Closing the iterator (client disconnect) cancels the gRPC call,
which aborts the request on the nodes.

After the first chunk, tokens already sent cannot be taken back, so a failure that is not the
request's own (the decision table would retry it: node died or unreachable, engine died, drain,
silence past ``chunk_timeout_s``) migrates the stream: a continuation goes to another pair (prefilled
by a prefill node like any request) with the original prompt plus every token sent as its prompt,
``resumed_output_tokens`` saying how many of those are output (the engine keys its random stream by
output position, so a greedy or seeded continuation draws what the undisturbed run would have, and
advances a grammar request's matcher over them, so the continuation obeys the grammar from there), the
characters of their text the client already has (the node sends the rest: a character split at the
seam or a held-back stop string start arrives once), the remaining max_tokens and min_tokens, and a
fresh node request id ``<id>/migrate-<n>``. Its usage is rewritten to the original prompt and every
completion token. At most ``migrations`` times; then, or for the request's own failure (a bad
request), ``StreamFailed`` (the response
layer turns it into an error event). A sampled request without a seed gets one here, so that its
continuation draws the same numbers too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

import grpc

from pdserve.router.blame import Decision, Failure, decide, failure_of_chunk, failure_of_status
from pdserve.router.config import RetryConfig
from pdserve.router.errors import APIError
from pdserve.router.metrics import RouterMetrics
from pdserve.router.nodes import NodePool, NoRoute, Route
from pdserve.router.prepare import Prepared, draw_seed
from pdserve.rpc import node_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

PAIR_CHECK_S = 0.25  # how often a try waiting for its first chunk checks that its pair can still talk
MIGRATION_ROUTE_WAIT_S = 3.0  # a health pass (2 s) and a check's timeout (1 s), the router's defaults
ROUTE_POLL_S = 0.1


class StreamFailed(RuntimeError):
    """The request failed after its first chunk was relayed."""


class _StreamBroke(RuntimeError):
    """A try failed after its first chunk; ``decision`` says whether another pair may continue it."""

    def __init__(self, failure: Failure, decision: Decision | None) -> None:
        super().__init__(str(failure))
        self.failure = failure
        self.decision = decision


class _Relayed:
    """What the client has of one request: the tokens and characters every chunk relayed so far. The
    chunks' token columns are kept as they came and joined only when a migration needs them: copying
    them out of each message would cost every stream for the few that fail."""

    def __init__(self) -> None:
        self._pieces: list[Sequence[int]] = []
        self.chars = 0

    def add(self, chunk: node_pb2.GenerateChunk) -> None:
        self._pieces.append(chunk.tokens.token_ids)
        self.chars += len(chunk.text)

    @property
    def token_ids(self) -> list[int]:
        return [token for piece in self._pieces for token in piece]


def continuation(prepared: Prepared, relayed: _Relayed) -> Prepared | None:
    """The request that continues ``prepared`` after the client got ``relayed``; None when nothing
    is left to generate (the budget is spent)."""
    sent = len(relayed.token_ids)
    params = prepared.sampling
    remaining = params.max_tokens - sent
    if remaining <= 0:
        return None
    sampling = dataclasses.replace(params, max_tokens=remaining, min_tokens=max(0, params.min_tokens - sent),
                                   resumed_output_tokens=sent, prompt_logprobs=None)
    return dataclasses.replace(prepared, prompt_token_ids=[*prepared.prompt_token_ids, *relayed.token_ids],
                               sampling=sampling, resumed_output_chars=relayed.chars)


def _with_seed(prepared: Prepared) -> Prepared:
    """A sampled request keeps one seed across migrations: without the client's, the router draws it."""
    if prepared.sampling.greedy or prepared.sampling.seed is not None:
        return prepared
    return dataclasses.replace(prepared, sampling=dataclasses.replace(prepared.sampling,
                                                                      seed=draw_seed()))


class _TryFailed(RuntimeError):
    """One try failed before its first chunk."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(str(failure))
        self.failure = failure


def _raise_if_failed(chunk: node_pb2.GenerateChunk, route: Route) -> None:
    """A first chunk (or a Complete answer without tokens) that reports a failure fails the try."""
    if chunk.finish_reason in ("error", "abort"):
        prefill_id = route.prefill.node_id if route.prefill is not None else None
        raise _TryFailed(failure_of_chunk(chunk, route.decode.node_id, prefill_id))


def _made_before(failed: node_pb2.GenerateChunk) -> node_pb2.GenerateChunk:
    """What a Complete answer that failed after its first token holds for the client: its tokens and
    text (and the first token's timing), without the failure."""
    made = node_pb2.GenerateChunk(tokens=failed.tokens, text=failed.text, timing=failed.timing)
    if failed.HasField("prompt_logprobs"):
        made.prompt_logprobs.CopyFrom(failed.prompt_logprobs)
    return made


def node_request_id(request_id: str, attempt: int, migration: int = 0) -> str:
    """The id a try uses on the nodes: the client's for the first, a fresh one for each retry and
    each migration."""
    base = request_id if migration == 0 else f"{request_id}/migrate-{migration}"
    return base if attempt == 0 else f"{base}/retry-{attempt}"


def _request_for(prepared: Prepared, route: Route, attempt: int, migration: int) -> node_pb2.GenerateRequest:
    request = prepared.to_proto()
    request.request_id = node_request_id(prepared.request_id, attempt, migration)
    if route.prefill is not None:
        p = route.prefill
        request.prefill.CopyFrom(node_pb2.PrefillTarget(node_id=p.node_id, grpc_address=p.grpc_address,
                                                        data_address=p.data_address))
    return request


class _SilenceWatch:
    """Reads of one node stream, each bounded by ``timeout_s`` (TimeoutError past it), with one timer
    for the whole stream rather than one armed and cancelled per chunk as ``asyncio.timeout`` does: a
    read only notes its start. The timer re-arms itself lazily: when it fires before the current
    read's deadline it moves to that deadline; when it fires between reads it stops, and the next read
    arms it again."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        # the task that reads: a stream's chunks are read by the one task that iterates it
        self._task = asyncio.current_task()
        self._timer: asyncio.TimerHandle | None = None
        self._started = 0.0
        self._reading = False
        self._fired = False

    async def read(self, call: grpc.aio.UnaryStreamCall) -> Any:
        """The call's next chunk, or grpc.aio.EOF."""
        self._started = self._loop.time()
        self._reading = True
        if self._timer is None:
            self._timer = self._loop.call_at(self._started + self._timeout_s, self._check)
        try:
            return await call.read()
        except BaseException as e:
            if self._fired:  # our cancellation: a timeout, unless someone else cancelled the task too
                self._fired = False
                assert self._task is not None
                if self._task.uncancel() == 0 and isinstance(e, asyncio.CancelledError):
                    raise TimeoutError from None
            raise
        finally:
            self._reading = False

    def _check(self) -> None:
        self._timer = None
        if not self._reading:
            return
        deadline = self._started + self._timeout_s
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._check)
        elif self._task is not None:
            self._fired = True
            self._task.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


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

    async def _route(self, prepared: Prepared, avoid: set[str], keep_decode: str | None,
                     migration: int) -> Route:
        """A route now; a migration (a client with part of its answer) waits up to
        MIGRATION_ROUTE_WAIT_S for one: right after the failure that started it, the one node that
        could take it may be briefly out of rotation (ejected by an at-once health check that timed
        out under load, back at the next pass)."""
        deadline = asyncio.get_running_loop().time() + MIGRATION_ROUTE_WAIT_S
        while True:
            try:
                return self._pick(prepared, avoid, keep_decode)
            except NoRoute:
                if migration == 0 or asyncio.get_running_loop().time() >= deadline:
                    raise
            await asyncio.sleep(ROUTE_POLL_S)

    async def generate(self, prepared: Prepared) -> AsyncIterator[node_pb2.GenerateChunk]:
        """Chunks of one request; raises APIError (before any chunk) or StreamFailed (after one)."""
        original = prepared = _with_seed(prepared)
        relayed = _Relayed()
        avoid: set[str] = set()
        migration = 0
        failed_at: float | None = None
        while True:
            try:
                async for chunk in self._tries(prepared, migration, avoid):
                    if failed_at is not None:
                        seam_s = time.perf_counter() - failed_at
                        self._metrics.migration_latency.observe(seam_s)
                        # the seam is mostly the continuation's prefill: the first chunk says its parts
                        t = chunk.timing
                        log.info("request %s: migration %d resumed %.3f s after the failure; %d tokens "
                                 "prefilled again: queue %.3f s, prefill %.3f s, KV transfer %.3f s",
                                 original.request_id, migration, seam_s, len(prepared.prompt_token_ids),
                                 t.queue_s, t.prefill_s, t.transfer_s)
                        failed_at = None
                    if migration and chunk.HasField("usage"):
                        # the node counts the resumed outputs as prompt; the client, once, as output
                        resumed = prepared.sampling.resumed_output_tokens
                        chunk.usage.prompt_tokens -= resumed
                        chunk.usage.completion_tokens += resumed
                    relayed.add(chunk)
                    yield chunk
                return
            except APIError as e:
                if migration == 0:
                    raise
                raise StreamFailed(f"migration {migration} found no node: {e.message}") from e
            except _StreamBroke as e:
                cause = e.failure.cause_name
                if e.decision is None or not e.decision.retry:
                    raise StreamFailed(str(e.failure)) from e
                if migration >= self._retry.migrations:
                    raise StreamFailed(f"{e.failure} (after {migration} migrations)") from e
                failed_at = time.perf_counter()
                migration += 1
                self._metrics.migrations.labels(cause=cause).inc()
                avoid = set(e.decision.avoid)
                if e.failure.node_id:
                    avoid.add(e.failure.node_id)
                log.warning("request %s: migration %d after %d tokens: %s", original.request_id, migration,
                            len(relayed.token_ids), e.failure)
                next_request = continuation(original, relayed)
                if next_request is None:  # every token was sent: only the finish was lost
                    yield node_pb2.GenerateChunk(finish_reason="length", usage=node_pb2.Usage(
                        prompt_tokens=len(original.prompt_token_ids),
                        completion_tokens=len(relayed.token_ids)))
                    return
                prepared = next_request

    async def _tries(self, prepared: Prepared, migration: int,
                     avoid: set[str]) -> AsyncIterator[node_pb2.GenerateChunk]:
        """Chunks of one (possibly migrated) request: tries until one sends its first chunk; raises
        APIError when none does, _StreamBroke when the one that did fails later. A non-streaming
        request is one Complete call per try: its answer is the one chunk, or, when it failed after
        its first token, the tokens made so far followed by _StreamBroke."""
        whole = not prepared.stream
        keep_decode: str | None = None
        failures: list[str] = []
        last: Decision | None = None
        for attempt in range(self._retry.attempts):
            if attempt:
                self._metrics.retries.inc()
                backoff = self._retry.backoff_s * 2 ** (attempt - 1)
                await asyncio.sleep(min(backoff, self._retry.max_backoff_s))
            try:
                route = await self._route(prepared, avoid, keep_decode, migration)
            except NoRoute as e:
                if attempt == 0:  # nothing can serve it now: answer at once rather than back off
                    raise APIError(503, f"no node can serve the request: {e}", None, "no_capacity",
                                   self._retry_after_s) from e
                failures.append(str(e))
                continue
            request = _request_for(prepared, route, attempt, migration)
            if whole:
                request.first_token_timeout_s = self._retry.first_chunk_timeout_s
                request.silence_timeout_s = self._retry.chunk_timeout_s
                call = self._pool.stub(route.decode).Complete(request)
            else:
                call = self._pool.stub(route.decode).Generate(request)
            self._pool.begin(route)
            finished = False
            try:
                try:
                    first = await (self._answer(call, route) if whole else self._first_chunk(call, route))
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
                if whole and first.finish_reason in ("error", "abort"):
                    failure = failure_of_chunk(first, route.decode.node_id, None)
                    yield _made_before(first)
                    raise _StreamBroke(failure, self._act(failure, route))
                yield first
                if not whole and not first.finish_reason:
                    async for chunk in self._rest(call, route):
                        yield chunk
                finished = True
                return
            finally:
                # A stream that ended with its finish reason is left to close on its own: its status
                # may still be on the way, and cancelling it then would abort a finished request on
                # the node. Any other way out (a failure, the client gone) aborts it on the nodes.
                if not finished:
                    call.cancel()
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

    async def _watched(self, call: grpc.aio.Call, pending: Awaitable[T], route: Route,
                       timeout_s: float | None) -> T:
        """What ``pending`` (the call's first read, or a Complete call's answer) gives; gives up
        (TimeoutError) after ``timeout_s`` (None: the node bounds it) and early (_TryFailed) when the
        route's pair is reported unable to reach each other: a prefill node that cannot reach its decode
        node is seen by the prefill node alone, and its report is the only sign of it."""
        if route.prefill is None:
            if timeout_s is None:  # a Complete call: the node bounds it
                return await pending
            async with asyncio.timeout(timeout_s):
                return await pending
        # a task of its own: cancelling a grpc.aio read would cancel the call
        task = asyncio.ensure_future(pending)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        try:
            while True:
                left = PAIR_CHECK_S if deadline is None else deadline - loop.time()
                done, _ = await asyncio.wait({task}, timeout=min(PAIR_CHECK_S, max(left, 0.0)))
                if done:
                    return task.result()
                if not self._pool.pair_usable(route.decode, route.prefill):
                    message = "the decode and prefill nodes report they cannot reach each other"
                    raise _TryFailed(Failure(node_pb2.CAUSE_PREFILL_PEER_UNREACHABLE, route.prefill.node_id,
                                             message))
                if left <= 0:
                    raise TimeoutError
        finally:
            if not task.done():
                call.cancel()  # ends the read; the caller's cleanup cancels it too
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _first_chunk(self, call: grpc.aio.UnaryStreamCall, route: Route) -> node_pb2.GenerateChunk:
        decode_id = route.decode.node_id
        try:
            chunk = await self._watched(call, call.read(), route, self._retry.first_chunk_timeout_s)
        except TimeoutError:
            message = f"no first chunk within {self._retry.first_chunk_timeout_s} s"
            raise _TryFailed(Failure(node_pb2.CAUSE_DEADLINE, decode_id, message)) from None
        except grpc.aio.AioRpcError as e:
            raise _TryFailed(failure_of_status(e, decode_id)) from e
        if chunk is grpc.aio.EOF:
            raise _TryFailed(Failure(node_pb2.CAUSE_UNSPECIFIED, decode_id,
                                     "the stream ended before the first chunk"))
        _raise_if_failed(chunk, route)
        return chunk

    async def _answer(self, call: grpc.aio.UnaryUnaryCall, route: Route) -> node_pb2.GenerateChunk:
        """A Complete call's answer; raises _TryFailed when it failed before its first token. The node
        bounds the wait (first_token_timeout_s, silence_timeout_s); HTTP/2 pings notice a dead one."""
        try:
            answer = await self._watched(call, call, route, None)
        except grpc.aio.AioRpcError as e:
            raise _TryFailed(failure_of_status(e, route.decode.node_id)) from e
        if not answer.tokens.token_ids:
            _raise_if_failed(answer, route)
        return answer

    async def _rest(self, call: grpc.aio.UnaryStreamCall,
                    route: Route) -> AsyncIterator[node_pb2.GenerateChunk]:
        decode_id = route.decode.node_id
        watch = _SilenceWatch(self._retry.chunk_timeout_s)
        try:
            while True:
                try:
                    chunk = await watch.read(call)
                except TimeoutError:
                    failure = Failure(node_pb2.CAUSE_DEADLINE, decode_id,
                                      f"the node sent nothing for {self._retry.chunk_timeout_s} s")
                    raise _StreamBroke(failure, self._act(failure, route)) from None
                except grpc.aio.AioRpcError as e:
                    failure = failure_of_status(e, decode_id)
                    raise _StreamBroke(failure, self._act(failure, route)) from e
                if chunk is grpc.aio.EOF:
                    failure = Failure(node_pb2.CAUSE_UNSPECIFIED, decode_id,
                                      "the node ended the stream without a finish reason")
                    raise _StreamBroke(failure, self._act(failure, route))
                if chunk.finish_reason in ("error", "abort"):
                    failure = failure_of_chunk(chunk, decode_id, None)
                    raise _StreamBroke(failure, self._act(failure, route))
                yield chunk
                if chunk.finish_reason:
                    return
        finally:
            watch.close()
