"""The router's HTTP app: OpenAI endpoints, health, metrics, and the embedded registry's node API.

    app = create_asgi(config, registry)        # registry = build_registry(config.registry)

The app owns everything it starts (registry sync, health checks, gRPC channels) through its lifespan.
``create_asgi`` puts the gate (API keys, body size, status counts) in front of ``HotPaths``, which
serves POST /v1/completions and /v1/chat/completions straight from the ASGI scope, and hands every
other request to the FastAPI app (which declares those two as well, for the OpenAPI schema). FastAPI's
per-request machinery (its middleware stack, dependency solving, a second JSON pass) cost about as
much CPU as the rest of a request; the two endpoints that carry the load skip it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from pdserve.models.tokenizer import Tokenizer
from pdserve.router.admission import Admission, Demand, Overloaded, TooLarge, cluster_capacity
from pdserve.router.config import RouterConfig
from pdserve.router.dispatch import Dispatcher
from pdserve.router.errors import (
    APIError,
    api_error_handler,
    error_body,
    http_error_handler,
    validation_error,
    validation_error_handler,
)
from pdserve.router.http_util import (
    ClientGone,
    GateMiddleware,
    SSEResponse,
    content_length,
    read_body,
    unless_disconnected,
)
from pdserve.router.json_response import JSONBytes
from pdserve.router.metrics import RouterMetrics
from pdserve.router.nodes import NodePool
from pdserve.router.policies import build_policy
from pdserve.router.prepare import PreparedBatch, Preparer, model_max_len
from pdserve.router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from pdserve.router.registry import Registry
from pdserve.router.responses import DONE_EVENT, ResponseBuilder, gather_or_cancel, sse
from pdserve.router.tool_calls import make_tool_call_parser
from pdserve.rpc import node_pb2
from pdserve.rpc.auth import call_metadata
from pdserve.rpc.registry import HEARTBEAT_PATH, NODES_PATH, REMOVAL_HEADER, RegistryAuthError

CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; nobody receives it
VERSION = "0.1.0"


@dataclass
class RouterState:
    config: RouterConfig
    registry: Registry
    pool: NodePool
    preparer: Preparer
    admission: Admission
    dispatcher: Dispatcher
    metrics: RouterMetrics
    prepare_pool: ThreadPoolExecutor  # validation + tokenization of large bodies, off the event loop
    draining: bool = False  # shutting down: new requests get 503, in-flight ones finish
    preparing: int = 0  # large bodies on (or waiting for) the prepare pool
    preparing_huge: int = 0  # of which over HUGE_BODY_BYTES


def build_state(config: RouterConfig, registry: Registry, tokenizer: Tokenizer | None = None,
                policy_seed: int | None = None) -> RouterState:
    tokenizer = tokenizer or Tokenizer.from_dir(config.model_dir)
    max_len = config.max_model_len or model_max_len(config.model_dir)
    metrics = RouterMetrics()
    shared = config.registry.is_redis or config.workers > 1  # other routers send to the same nodes
    registry.auth.on_reject = lambda reason: metrics.registry_rejections.labels(reason=reason).inc()
    pool = NodePool(registry, config.model_name, config.health,
                    build_policy(config.policy.prefill, config.policy, policy_seed),
                    build_policy(config.policy.decode, config.policy, policy_seed), metrics,
                    call_metadata(config.cluster_secret))
    admission = Admission(config.admission, lambda: cluster_capacity(
        pool, config.policy.block_size, shared, config.admission.kv_overcommit))
    preparer = Preparer(tokenizer, config.model_name, max_len, make_tool_call_parser(config.tool_call_parser))
    return RouterState(config, registry, pool, preparer, admission,
                       Dispatcher(pool, config.retry, metrics, config.admission.retry_after_s), metrics,
                       ThreadPoolExecutor(max_workers=PREPARE_WORKERS, thread_name_prefix="prepare"))


async def _prepend(first: node_pb2.GenerateChunk, rest: AsyncIterator[node_pb2.GenerateChunk]
                   ) -> AsyncIterator[node_pb2.GenerateChunk]:
    async with aclosing(rest):
        yield first
        async for chunk in rest:
            yield chunk


def demand_of(batch: PreparedBatch) -> Demand:
    """What admission charges a request: a slot per choice, and its token budget (prompt + max_tokens
    per choice) both against the static ceiling and as the KV it may come to hold on its node."""
    return Demand(slots=len(batch.choices), tokens=batch.token_budget, kv_tokens=batch.token_budget)


class _Held:
    """What one request holds until its response takes over: its admission slot and node streams."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.demand: Demand | None = None
        self.streams: list[AsyncIterator[node_pb2.GenerateChunk]] = []

    async def admit(self, state: RouterState, batch: PreparedBatch) -> None:
        demand = demand_of(batch)
        try:
            await state.admission.acquire(demand)
        except TooLarge as e:
            raise APIError(413, str(e), e.param, "too_many_tokens") from e
        except Overloaded as e:
            raise APIError(429, f"the cluster is at capacity: {e}", None, "overloaded",
                           state.config.admission.retry_after_s) from e
        self.demand = demand

    def release(self) -> None:
        if self.demand is not None:
            self._admission.release(self.demand)
            self.demand = None

    async def close(self) -> None:
        for stream in self.streams:
            await stream.aclose()  # type: ignore[attr-defined]
        self.release()


async def _open(state: RouterState, batch: PreparedBatch, held: _Held
                ) -> list[AsyncIterator[node_pb2.GenerateChunk]]:
    """Admission, the node calls, and every choice's first chunk; the choices' chunk streams."""
    await held.admit(state, batch)
    held.streams = [state.dispatcher.generate(p) for p in batch.choices]
    firsts = await gather_or_cancel([anext(s) for s in held.streams])
    return [_prepend(f, s) for f, s in zip(firsts, held.streams, strict=True)]


async def _collect(state: RouterState, batch: PreparedBatch, builder: ResponseBuilder,
                   held: _Held) -> dict[str, Any]:
    await held.admit(state, batch)
    held.streams = [state.dispatcher.generate(p) for p in batch.choices]
    return await builder.collect(held.streams)


KEEPALIVE_EVENT = b": keepalive\n\n"  # an SSE comment: clients skip it, proxies and clients see a live stream


async def _late_events(opening: asyncio.Future[list[AsyncIterator[node_pb2.GenerateChunk]]],
                       builder: ResponseBuilder, held: _Held, keepalive_s: float) -> AsyncIterator[bytes]:
    """A stream whose first chunk was not there within ``keepalive_s``: keepalive comments until it is
    (admission wait and first token alike), then the events; a failure before it is an error event."""
    try:
        while not opening.done():
            yield KEEPALIVE_EVENT  # the first with the headers, keepalive_s after the request came
            await asyncio.wait({opening}, timeout=keepalive_s)
        try:
            sources = opening.result()
        except APIError as e:
            yield sse(e.body())
            yield DONE_EVENT
            return
        async for event in builder.events(sources):
            yield event
    finally:
        if not opening.done():
            opening.cancel()
        await asyncio.gather(opening, return_exceptions=True)
        await held.close()


def at_the_door(state: RouterState) -> APIError | None:
    """The refusal every new request would get now (draining, no node, cluster full), before its
    body is read: shedding costs no parsing or tokenizing."""
    retry_after = state.config.admission.retry_after_s
    if state.draining:
        return APIError(503, "the router is shutting down and takes no new requests", None, "draining",
                        retry_after)
    if not state.pool.ready():
        return APIError(503, "no usable node: the cluster has no mixed node or prefill/decode pair ready",
                        None, "no_capacity", retry_after)
    saturated = state.admission.saturated()
    if saturated is not None:
        return APIError(429, f"the cluster is at capacity: {saturated}", None, "overloaded", retry_after)
    return None


async def _serve(state: RouterState, batch: PreparedBatch, chat: bool, receive: Receive,
                 passed_door: bool = False) -> Response:
    """Admit and run one prepared request. A request that ``passed_door`` (the hot path checked it
    before reading its body) is not turned away by a drain that began since: it was in flight."""
    if not passed_door:
        refusal = at_the_door(state)
        if refusal is not None:
            raise refusal
    builder = ResponseBuilder(batch, chat, state.config.model_name, state.preparer.tokenizer, state.metrics)
    held = _Held(state.admission)
    handed_over = False  # the SSE response owns the slot and streams from then on
    try:
        if not batch.stream:
            body = await unless_disconnected(receive, _collect(state, batch, builder, held))
            return JSONBytes(body)
        opening = asyncio.ensure_future(_open(state, batch, held))
        keepalive_s = state.config.admission.keepalive_s
        try:
            await unless_disconnected(receive, asyncio.wait({opening}, timeout=keepalive_s))
        except ClientGone:
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
            raise
        if opening.done():
            # every first chunk before any byte is sent: failures up to here are proper HTTP errors
            sources = opening.result()
            handed_over = True
            return SSEResponse(builder.events(sources), on_close=held.release)
        handed_over = True
        return SSEResponse(_late_events(opening, builder, held, keepalive_s), on_close=held.release)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        if not handed_over:
            await held.close()


PREPARE_INLINE_BYTES = 16 << 10  # larger bodies are parsed, validated and tokenized on a worker thread
PREPARE_WORKERS = 2
MAX_PREPARING = 2 * PREPARE_WORKERS  # large bodies beyond this many in preparation get 429 at once
HUGE_BODY_BYTES = 1 << 20  # one such body is prepared at a time; the next gets 429 before it is read


def _parse_and_prepare(model: type[CompletionRequest | ChatCompletionRequest],
                       prepare: Callable[[Any], PreparedBatch], body: bytes) -> PreparedBatch:
    try:
        parsed = model.model_validate_json(body)
    except ValidationError as e:  # FastAPI's error locations start with "body"
        raise validation_error([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from e
    return prepare(parsed)


async def _prepare(state: RouterState, model: type[CompletionRequest | ChatCompletionRequest],
                   prepare: Callable[[Any], PreparedBatch], body: bytes) -> PreparedBatch:
    """Parse, validate and tokenize (and render the chat template) on the loop for small bodies, where
    a thread hop costs more than the work, and on the prepare pool for large ones, so a long prompt
    never stalls the streams the loop is relaying."""
    if len(body) <= PREPARE_INLINE_BYTES:
        return _parse_and_prepare(model, prepare, body)
    if state.preparing >= MAX_PREPARING:  # a flood of large bodies queues neither CPU nor memory
        raise APIError(429, f"{state.preparing} large requests are being prepared; retry later", None,
                       "overloaded", state.config.admission.retry_after_s)
    huge = len(body) > HUGE_BODY_BYTES
    state.preparing += 1
    state.preparing_huge += huge
    try:
        return await asyncio.get_running_loop().run_in_executor(state.prepare_pool, _parse_and_prepare,
                                                                model, prepare, body)
    finally:
        state.preparing -= 1
        state.preparing_huge -= huge


def _huge_body_refusal(state: RouterState, scope: Scope) -> APIError | None:
    """Parsing a body of megabytes holds the GIL for milliseconds: they go one at a time, and one
    that arrives meanwhile is refused from its Content-Length, unread."""
    length = content_length(scope)
    if length is not None and length > HUGE_BODY_BYTES and state.preparing_huge:
        return APIError(429, "another request of over 1 MiB is being prepared; retry later", None,
                        "overloaded", state.config.admission.retry_after_s)
    return None


class HotPaths:
    """POST /v1/completions and /v1/chat/completions from the ASGI scope; everything else to ``app``."""

    def __init__(self, app: FastAPI, state: RouterState) -> None:
        self.app = app
        self.state = state
        self._routes: dict[str, tuple[type[CompletionRequest | ChatCompletionRequest],
                                      Callable[[Any], PreparedBatch], bool]] = {
            "/v1/completions": (CompletionRequest, state.preparer.completion, False),
            "/v1/chat/completions": (ChatCompletionRequest, state.preparer.chat, True),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        model, prepare, chat = route
        refusal = at_the_door(self.state) or _huge_body_refusal(self.state, scope)
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        admission = self.state.admission
        try:
            admission.arriving += 1
            try:
                # One turn of the loop before any parsing: in a burst, every request that arrived
                # with this one meets the door (and the excess its 429) before the admitted ones'
                # bodies are parsed and tokenized.
                await asyncio.sleep(0)
                body = await read_body(receive)
                batch = await _prepare(self.state, model, prepare, body)
            finally:
                admission.arriving -= 1  # _serve reaches acquire without awaiting first
            response = await _serve(self.state, batch, chat, receive, passed_door=True)
        except APIError as e:
            response = e.response()
        except ClientGone:  # left before sending its whole body: nobody receives an answer
            response = Response(status_code=CLIENT_CLOSED)
        await response(scope, receive, send)


def create_asgi(config: RouterConfig, registry: Registry, tokenizer: Tokenizer | None = None,
                policy_seed: int | None = None) -> GateMiddleware:
    """What uvicorn runs: the gate, then ``HotPaths``, then the FastAPI app (``.app.app``)."""
    app = create_app(config, registry, tokenizer, policy_seed)
    state: RouterState = app.state.router
    return GateMiddleware(HotPaths(app, state), api_keys=config.api_keys,
                          max_body_bytes=config.max_body_bytes, metrics=state.metrics)


async def _wake_admission(state: RouterState) -> None:
    """Queued requests are admitted on releases, and here when the cluster grew (a node joined or
    reported more room) with nothing finishing."""
    while True:
        await asyncio.sleep(state.config.health.interval_s)
        state.admission.wake()


def create_app(config: RouterConfig, registry: Registry, tokenizer: Tokenizer | None = None,
               policy_seed: int | None = None) -> FastAPI:
    """The FastAPI app, without the gate (``create_asgi`` adds it)."""
    state = build_state(config, registry, tokenizer, policy_seed)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        await state.pool.start()
        waker = asyncio.create_task(_wake_admission(state), name="admission-wake")
        try:
            yield
        finally:
            waker.cancel()
            await asyncio.gather(waker, return_exceptions=True)
            await state.pool.close()
            await registry.close()
            state.prepare_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="pdserve router", version=VERSION, lifespan=lifespan)
    app.state.router = state
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(APIError, api_error_handler)
    _add_openai_routes(app, state)
    _add_ops_routes(app, state)
    _add_registry_routes(app, state)
    return app


def _add_openai_routes(app: FastAPI, state: RouterState) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        # served by HotPaths in front of this app; declared here for the OpenAPI schema
        return await _serve(state, state.preparer.completion(body), False, request.receive)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _serve(state, state.preparer.chat(body), True, request.receive)

    def model_card() -> dict[str, Any]:
        return {"id": state.config.model_name, "object": "model", "created": int(time.time()),
                "owned_by": "pdserve", "max_model_len": state.preparer.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != state.config.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves "
                                f"{state.config.model_name!r}", "model", "model_not_found")
        return model_card()

    # vLLM's tokenizer endpoints, at the root as vLLM serves them (lm-eval's remote tokenizer calls them)
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(state.prepare_pool, state.preparer.tokenize, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return state.preparer.detokenize(body)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return state.preparer.tokenizer_info()


def _add_ops_routes(app: FastAPI, state: RouterState) -> None:
    @app.get("/health")
    async def health() -> Response:
        counts = {role: len(state.pool.usable(role)) for role in ("prefill", "decode", "mixed")}
        if state.draining:
            body = error_body(503, "draining: the router is shutting down", None, "draining")
            return JSONResponse(body, status_code=503,
                                headers={"Retry-After": str(state.config.admission.retry_after_s)})
        if state.pool.ready():
            return JSONResponse({"status": "ready", "usable_nodes": counts})
        body = error_body(503, f"not ready: usable nodes {counts}", None, "no_capacity")
        return JSONResponse(body, status_code=503,
                            headers={"Retry-After": str(state.config.admission.retry_after_s)})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": VERSION}

    # liveness of the router process (SageMaker's and vLLM's /ping, GET and POST); readiness is /health
    @app.get("/ping")
    async def ping() -> Response:
        return Response(status_code=200)

    @app.post("/ping")
    async def ping_post() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


def _add_registry_routes(app: FastAPI, state: RouterState) -> None:
    @app.post(HEARTBEAT_PATH)
    async def heartbeat(request: Request) -> dict[str, Any]:
        try:
            node = state.registry.auth.open(await request.body())
        except RegistryAuthError as e:
            if e.reason == "malformed":
                raise APIError(400, f"invalid node registration: {e}", None, "invalid_value") from e
            raise APIError(401, f"registration refused: {e}", None, "unauthenticated") from e
        await state.registry.upsert(node)
        return {"ok": True, "ttl_s": state.config.registry.heartbeat_ttl_s}

    @app.delete(NODES_PATH + "/{node_id}")
    async def deregister(node_id: str, request: Request) -> dict[str, Any]:
        try:
            state.registry.auth.check_removal(node_id, request.headers.get(REMOVAL_HEADER, ""))
        except RegistryAuthError as e:
            raise APIError(401, f"deregistration refused: {e}", None, "unauthenticated") from e
        await state.registry.remove(node_id)
        return {"ok": True}

    @app.get(NODES_PATH)
    async def nodes() -> dict[str, Any]:
        return {"nodes": [{"node_id": n.node_id, "role": n.role, "model": n.model,
                           "grpc_address": n.grpc_address, "load": n.load, "capacity": n.capacity,
                           "draining": n.draining, "ejected": state.pool.is_ejected(n.node_id),
                           "router_inflight": state.pool.inflight(n.node_id),
                           "router_load": state.pool.load(n),
                           "total_blocks": state.pool.total_blocks(n.node_id),
                           "unreachable_peer_addresses": state.pool.unreachable_peers(n.node_id)}
                          for n in state.registry.snapshot()]}
