"""The router's JSON answers as a lean ASGI response."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class JSONBytes(Response):
    """A JSON body sent in two ASGI messages. Starlette's JSONResponse encodes with the json module and
    builds its headers through a MutableHeaders pass; on the paths every request takes (an answer, a
    refusal at the door) that is a measurable share of the router's CPU per request. A Response
    subclass, so FastAPI's routes and handlers return it as they would any response."""

    media_type = "application/json"

    def __init__(self, content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> None:
        # no super().__init__: its header pass is what this class avoids
        self.body = content if isinstance(content, bytes) else msgspec.json.encode(content)
        self.status_code = status_code
        self.background: BackgroundTask | None = None
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        self.raw_headers = [(b"content-type", b"application/json"),
                            (b"content-length", str(len(self.body)).encode("latin-1")), *extra]

    async def send_to(self, send: Send) -> None:
        """The response's two ASGI messages (what a middleware that answers itself needs)."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.send_to(send)
        if self.background is not None:
            await self.background()
