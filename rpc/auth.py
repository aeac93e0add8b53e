"""Router -> node gRPC calls carry a credential derived from the cluster secret; nodes refuse others.

The credential is a bearer token in call metadata (`x-pdserve-auth`), derived one-way from the
secret, so seeing it on the wire reveals neither the secret nor the data-plane and registry keys.
The standard health service stays open: it says only SERVING or not, and load balancers and
probes (Kubernetes gRPC probes, grpc_health_probe) cannot send a credential. Everything else of
the Node service (Generate, Stats, Drain) needs the token.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc

from pdserve.common.secret import ClusterSecret

AUTH_METADATA_KEY = "x-pdserve-auth"
OPEN_SERVICE_PREFIX = "/grpc.health.v1.Health/"


def rpc_token(secret: ClusterSecret) -> str:
    return secret.derive("node-rpc").hex()


def auth_metadata(secret: ClusterSecret) -> tuple[tuple[str, str], ...]:
    return ((AUTH_METADATA_KEY, rpc_token(secret)),)


class RequireToken(grpc.aio.ServerInterceptor):
    """Node side: a call without the cluster's token ends UNAUTHENTICATED before any handler runs."""

    def __init__(self, secret: ClusterSecret, on_reject: Callable[[str], None]) -> None:
        self._token = rpc_token(secret).encode()
        self._on_reject = on_reject

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_SERVICE_PREFIX):
            return await continuation(details)
        presented = dict(details.invocation_metadata or ()).get(AUTH_METADATA_KEY)
        if presented is not None and hmac.compare_digest(str(presented).encode(), self._token):
            return await continuation(details)
        reason = "missing_token" if presented is None else "bad_token"
        self._on_reject(reason)
        return _refusal(details.method, reason)


def _refusal(method: str, reason: str) -> grpc.RpcMethodHandler:
    message = f"{method} needs the cluster's credential ({reason.replace('_', ' ')})"

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext):  # noqa: ANN202
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as a server-streaming handler must be

    if method.endswith("/Generate"):
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    return grpc.unary_unary_rpc_method_handler(refuse)


def call_metadata(secret: ClusterSecret | None) -> tuple[tuple[str, str], ...]:
    """What a router's calls to nodes carry (nothing in an insecure cluster). The router passes it on
    each call rather than through a channel interceptor: grpc.aio runs every intercepted call through
    an extra task and a wrapping reader, which cost the router CPU on each request."""
    return () if secret is None else auth_metadata(secret)
