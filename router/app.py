"""The router's HTTP app: OpenAI endpoints, health, metrics, and the embedded registry's node API.

    app = create_app(config, registry)        # registry = build_registry(config.registry)

The app owns everything it starts (registry sync, health checks, gRPC channels) through its lifespan.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.models.tokenizer import Tokenizer
from pdserve.router.admission import Admission, Overloaded, TooLarge
from pdserve.router.config import RouterConfig
from pdserve.router.dispatch import Dispatcher
from pdserve.router.errors import (
    APIError,
    api_error_handler,
    error_body,
    http_error_handler,
    validation_error_handler,
)
from pdserve.router.http_util import ClientGone, GateMiddleware, SSEResponse, unless_disconnected
from pdserve.router.metrics import RouterMetrics
from pdserve.router.nodes import NodePool
from pdserve.router.policies import build_policy
from pdserve.router.prepare import Prepared, Preparer, model_max_len
from pdserve.router.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.router.registry import Registry
from pdserve.router.responses import RequestTimer, ResponseBuilder
from pdserve.rpc import node_pb2
from pdserve.rpc.registry import HEARTBEAT_PATH, NODES_PATH, NodeInfoError, decode_node

CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; nobody receives it


@dataclass
class RouterState:
    config: RouterConfig
    registry: Registry
    pool: NodePool
    preparer: Preparer
    admission: Admission
    dispatcher: Dispatcher
    metrics: RouterMetrics


def build_state(config: RouterConfig, registry: Registry, tokenizer: Tokenizer | None = None,
                policy_seed: int | None = None) -> RouterState:
    tokenizer = tokenizer or Tokenizer.from_dir(config.model_dir)
    max_len = config.max_model_len or model_max_len(config.model_dir)
    metrics = RouterMetrics()
    pool = NodePool(registry, config.model_name, config.health,
                    build_policy(config.policy.prefill, config.policy, policy_seed),
                    build_policy(config.policy.decode, config.policy, policy_seed), metrics)
    return RouterState(config, registry, pool, Preparer(tokenizer, config.model_name, max_len),
                       Admission(config.admission), Dispatcher(pool, config.retry, metrics,
                                                               config.admission.retry_after_s), metrics)


async def _prepend(first: node_pb2.GenerateChunk, rest: AsyncIterator[node_pb2.GenerateChunk]
                   ) -> AsyncIterator[node_pb2.GenerateChunk]:
    async with aclosing(rest):
        yield first
        async for chunk in rest:
            yield chunk


async def _serve(state: RouterState, prepared: Prepared, chat: bool, request: Request) -> Response:
    retry_after = state.config.admission.retry_after_s
    if not state.pool.ready():
        raise APIError(503, "no usable node: the cluster has no mixed node or prefill/decode pair ready",
                       None, "no_capacity", retry_after)
    try:
        await state.admission.acquire(prepared.token_budget)
    except TooLarge as e:
        raise APIError(413, str(e), "max_tokens", "too_many_tokens") from e
    except Overloaded as e:
        raise APIError(429, f"the router is at capacity: {e}", None, "overloaded", retry_after) from e
    release_once = _ReleaseOnce(state.admission, prepared.token_budget)
    builder = ResponseBuilder(prepared, chat, state.config.model_name, state.preparer.tokenizer,
                              RequestTimer(state.metrics))
    chunks = state.dispatcher.generate(prepared)
    streaming_started = False
    try:
        if not prepared.stream:
            return JSONResponse(await unless_disconnected(request.receive, builder.collect(chunks)))
        # the first chunk before any byte is sent: failures up to here are proper HTTP errors
        first = await unless_disconnected(request.receive, anext(chunks))
        streaming_started = True
        return SSEResponse(builder.events(_prepend(first, chunks)), on_close=release_once)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        if not streaming_started:
            await chunks.aclose()
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


def create_app(config: RouterConfig, registry: Registry, tokenizer: Tokenizer | None = None,
               policy_seed: int | None = None) -> FastAPI:
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

    app = FastAPI(title="pdserve router", version="0.1.0", lifespan=lifespan)
    app.state.router = state
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_middleware(GateMiddleware, api_keys=config.api_keys, max_body_bytes=config.max_body_bytes,
                       metrics=state.metrics)
    _add_openai_routes(app, state)
    _add_ops_routes(app, state)
    _add_registry_routes(app, state)
    return app


def _add_openai_routes(app: FastAPI, state: RouterState) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _serve(state, state.preparer.completion(body), False, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _serve(state, state.preparer.chat(body), True, request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": state.config.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "pdserve", "max_model_len": state.preparer.max_model_len}]}


def _add_ops_routes(app: FastAPI, state: RouterState) -> None:
    @app.get("/health")
    async def health() -> Response:
        counts = {role: len(state.pool.usable(role)) for role in ("prefill", "decode", "mixed")}
        if state.pool.ready():
            return JSONResponse({"status": "ready", "usable_nodes": counts})
        body = error_body(503, f"not ready: usable nodes {counts}", None, "no_capacity")
        return JSONResponse(body, status_code=503,
                            headers={"Retry-After": str(state.config.admission.retry_after_s)})

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
