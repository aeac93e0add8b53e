"""ASGI pieces the router needs beyond FastAPI: the auth/size/status gate, a disconnect-aware SSE
response, and racing work against a client disconnect."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TypeVar

from prometheus_client import Counter
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.router.errors import error_body
from pdserve.router.json_response import JSONBytes
from pdserve.router.metrics import RouterMetrics

T = TypeVar("T")
OPEN_PATHS = frozenset({"/health", "/ping", "/version"})  # probes, as vLLM leaves them open


class ClientGone(Exception):
    """The client closed the connection before the response was ready."""


class _BodyTooLarge(Exception):
    pass


def keys_match(presented: str, keys: tuple[str, ...]) -> bool:
    """Constant time in the presented key's content: every configured key is compared."""
    result = False
    for key in keys:
        result |= hmac.compare_digest(presented.encode(), key.encode())
    return result


def _bearer(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


def content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _send_error(send: Send, status: int, message: str, code: str,
                      headers: dict[str, str] | None = None) -> None:
    await JSONBytes(error_body(status, message, None, code), status, headers).send_to(send)


class GateMiddleware:
    """API keys on every route but /health, a body size limit, and requests counted by status."""

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...], max_body_bytes: int,
                 metrics: RouterMetrics) -> None:
        self.app = app  # the wrapped ASGI app
        self._api_keys = api_keys
        self._max_body_bytes = max_body_bytes
        self._metrics = metrics
        self._requests_by_status: dict[int, Counter] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self._api_keys and path not in OPEN_PATHS and not keys_match(_bearer(scope), self._api_keys):
            await _send_error(send, 401, "a valid API key is required (Authorization: Bearer <key>)",
                              "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            return
        length = content_length(scope)
        if length is not None and length > self._max_body_bytes:
            await _send_error(send, 413, f"the request body is larger than {self._max_body_bytes} bytes",
                              "body_too_large")
            return
        status: list[int] = []
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self._max_body_bytes:  # a chunked body without Content-Length
                raise _BodyTooLarge
            return message

        async def status_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            # with a Content-Length (checked above) the server delivers no more than it declares
            await self.app(scope, receive if length is not None else counting_receive, status_send)
        except _BodyTooLarge:
            if not status:
                await _send_error(send, 413, f"the request body is larger than {self._max_body_bytes} bytes",
                                  "body_too_large")
                status.append(413)
        finally:
            if path.startswith("/v1/") and scope["method"] == "POST":
                self._count(status[0] if status else 499)

    def _count(self, status: int) -> None:
        # the labelled child, kept: labels() takes a lock and builds its key on every call
        counter = self._requests_by_status.get(status)
        if counter is None:
            counter = self._requests_by_status[status] = self._metrics.requests.labels(str(status))
        counter.inc()


class SSEResponse(Response):
    """Streams server-sent events and stops (closing the event source, which cancels the node call)
    as soon as the client disconnects, not only at the next write."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        # no super().__init__: Response would declare Content-Length 0 for the empty initial body
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        self._events = events
        self._on_close = on_close

    async def _stream(self, send: Send) -> None:
        async with aclosing(self._events) as events:  # type: ignore[type-var]
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for event in events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await unless_disconnected(receive, self._stream(send))
        except (ClientGone, OSError):  # gone before the end, noticed by the watcher or mid-write
            pass
        finally:
            self._on_close()


async def read_body(receive: Receive) -> bytes:
    """The request's whole body, or ClientGone when the client disconnects before sending it all.
    What starlette's ``Request.body`` does, without its async-generator stream (registered with the
    loop and closed per request) on the path every request takes."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


WATCH_AFTER_S = 0.25  # work that ends sooner never starts a disconnect watcher


async def unless_disconnected(receive: Receive, work: Awaitable[T],
                              watch_after_s: float = WATCH_AFTER_S) -> T:
    """``work``'s result, or ClientGone (with ``work`` cancelled) if the client disconnects first.

    ``work`` runs in the calling task. A watcher task, started only once the work has run for
    ``watch_after_s``, cancels that task when the client goes: most requests end sooner and never pay
    for one (a task, its wait on the server's receive, and its cancellation cost about a tenth of a
    short request's CPU), and a client that left is noticed at most ``watch_after_s`` late (the server
    remembers a disconnect, so a watcher started after it returns at once)."""
    current = asyncio.current_task()
    assert current is not None
    watching = True
    gone = False
    watch: asyncio.Task[None] | None = None

    def on_disconnect(watch: asyncio.Task[None]) -> None:
        nonlocal gone
        # a late callback (the watcher finished as work did) must not cancel whatever runs next
        if watching and not watch.cancelled() and watch.exception() is None:
            gone = True
            current.cancel()

    def start_watching() -> None:
        nonlocal watch
        watch = asyncio.create_task(wait_disconnect(receive))
        watch.add_done_callback(on_disconnect)

    timer = asyncio.get_running_loop().call_later(watch_after_s, start_watching)
    try:
        result = await work
    except asyncio.CancelledError:
        if gone and current.uncancel() == 0:  # our cancellation alone, not the server's too
            raise ClientGone from None
        raise
    finally:
        watching = False
        timer.cancel()
        if watch is not None:
            watch.cancel()
    if gone:  # work finished despite the cancellation: take it back
        current.uncancel()
    return result
