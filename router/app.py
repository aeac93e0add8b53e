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

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from pdserve.models.tokenizer import Tokenizer
from pdserve.router.admission import Admission, Overloaded, TooLarge
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
from pdserve.router.http_util import ClientGone, GateMiddleware, SSEResponse, unless_disconnected
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
from pdserve.router.responses import ResponseBuilder, gather_or_cancel
from pdserve.router.tool_calls import make_tool_call_parser
from pdserve.rpc import node_pb2
from pdserve.rpc.registry import HEARTBEAT_PATH, NODES_PATH, NodeInfoError, decode_node

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


def build_state(config: RouterConfig, registry: Registry, tokenizer: Tokenizer | None = None,
                policy_seed: int | None = None) -> RouterState:
    tokenizer = tokenizer or Tokenizer.from_dir(config.model_dir)
    max_len = config.max_model_len or model_max_len(config.model_dir)
    metrics = RouterMetrics()
    pool = NodePool(registry, config.model_name, config.health,
                    build_policy(config.policy.prefill, config.policy, policy_seed),
                    build_policy(config.policy.decode, config.policy, policy_seed), metrics)
    return RouterState(config, registry, pool, Preparer(tokenizer, config.model_name, max_len,
                                                               make_tool_call_parser(config.tool_call_parser)),
                       Admission(config.admission), Dispatcher(pool, config.retry, metrics,
                                                               config.admission.retry_after_s), metrics,
                       ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare"))


async def _prepend(first: node_pb2.GenerateChunk, rest: AsyncIterator[node_pb2.GenerateChunk]
                   ) -> AsyncIterator[node_pb2.GenerateChunk]:
    async with aclosing(rest):
        yield first
        async for chunk in rest:
            yield chunk


async def _serve(state: RouterState, batch: PreparedBatch, chat: bool, request: Request) -> Response:
    retry_after = state.config.admission.retry_after_s
    if not state.pool.ready():
        raise APIError(503, "no usable node: the cluster has no mixed node or prefill/decode pair ready",
                       None, "no_capacity", retry_after)
    try:
        await state.admission.acquire(batch.token_budget)
    except TooLarge as e:
        raise APIError(413, str(e), "max_tokens", "too_many_tokens") from e
    except Overloaded as e:
        raise APIError(429, f"the router is at capacity: {e}", None, "overloaded", retry_after) from e
    release_once = _ReleaseOnce(state.admission, batch.token_budget)
    builder = ResponseBuilder(batch, chat, state.config.model_name, state.preparer.tokenizer, state.metrics)
    streams = [state.dispatcher.generate(p) for p in batch.choices]
    streaming_started = False
    try:
        if not batch.stream:
            body = await unless_disconnected(request.receive, builder.collect(streams))
            return Response(msgspec.json.encode(body), media_type="application/json")
        # every choice's first chunk before any byte is sent: failures up to here are proper HTTP errors
        firsts = await unless_disconnected(request.receive, gather_or_cancel([anext(s) for s in streams]))
        streaming_started = True
        return SSEResponse(builder.events([_prepend(f, s) for f, s in zip(firsts, streams, strict=True)]),
                           on_close=release_once)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        if not streaming_started:
            for stream in streams:
                await stream.aclose()
            release_once()


class _ReleaseOnce:
    def __init__(self, admission: Admission, tokens: int) -> None:
        self._admission = admission
        self._tokens = tokens
        self._done = False

    def __call__(self) -> None:
        if not self._done:
            self._done = True
            self._admission.release(self._tokens)


PREPARE_INLINE_BYTES = 16 << 10  # larger bodies are validated and tokenized on a worker thread


async def _prepare(state: RouterState, prepare: Callable[[Any], PreparedBatch], body: Any,
                   body_bytes: int) -> PreparedBatch:
    """Tokenize (and render the chat template) on the loop for small bodies, where a thread hop costs
    more than the work, and on the prepare pool for large ones, so a long prompt never stalls the
    streams the loop is relaying."""
    if body_bytes <= PREPARE_INLINE_BYTES:
        return prepare(body)
    return await asyncio.get_running_loop().run_in_executor(state.prepare_pool, prepare, body)


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
        request = Request(scope, receive)
        body = await request.body()
        try:
            try:
                parsed = model.model_validate_json(body)
            except ValidationError as e:  # FastAPI's error locations start with "body"
                raise validation_error([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from e
            batch = await _prepare(self.state, prepare, parsed, len(body))
            response = await _serve(self.state, batch, chat, request)
        except APIError as e:
            response = e.response()
        await response(scope, receive, send)


def create_asgi(config: RouterConfig, registry: Registry, tokenizer: Tokenizer | None = None,
                policy_seed: int | None = None) -> GateMiddleware:
    """What uvicorn runs: the gate, then ``HotPaths``, then the FastAPI app (``.app.app``)."""
    app = create_app(config, registry, tokenizer, policy_seed)
    state: RouterState = app.state.router
    return GateMiddleware(HotPaths(app, state), api_keys=config.api_keys,
                          max_body_bytes=config.max_body_bytes, metrics=state.metrics)


def create_app(config: RouterConfig, registry: Registry, tokenizer: Tokenizer | None = None,
               policy_seed: int | None = None) -> FastAPI:
    """The FastAPI app, without the gate (``create_asgi`` adds it)."""
    state = build_state(config, registry, tokenizer, policy_seed)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        await state.pool.start()
        try:
            yield
        finally:
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
        return await _serve(state, state.preparer.completion(body), False, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _serve(state, state.preparer.chat(body), True, request)

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
        return state.preparer.tokenize(body)

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
            node = decode_node(await request.body())
        except NodeInfoError as e:
            raise APIError(400, f"invalid node registration: {e}", None, "invalid_value") from e
        await state.registry.upsert(node)
        return {"ok": True, "ttl_s": state.config.registry.heartbeat_ttl_s}

    @app.delete(NODES_PATH + "/{node_id}")
    async def deregister(node_id: str) -> dict[str, Any]:
        await state.registry.remove(node_id)
        return {"ok": True}

    @app.get(NODES_PATH)
    async def nodes() -> dict[str, Any]:
        return {"nodes": [{"node_id": n.node_id, "role": n.role, "model": n.model,
                           "grpc_address": n.grpc_address, "load": n.load, "capacity": n.capacity,
                           "draining": n.draining, "ejected": state.pool.is_ejected(n.node_id),
                           "router_inflight": state.pool.inflight(n.node_id),
                           "router_load": state.pool.load(n)}
                          for n in state.registry.snapshot()]}
