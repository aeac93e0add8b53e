"""Admission: a bound on in-flight requests and tokens, with a bounded wait queue in front.

A request needs one in-flight slot and ``tokens`` (prompt + max_tokens) of the token budget. If both
are free it runs; else it waits in FIFO order while fewer than ``max_queued_requests`` wait; else it is
refused at once (429). A wait longer than ``queue_timeout_s`` is refused too. FIFO: a large request at
the head is not starved by small ones behind it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pdserve.router.config import AdmissionConfig


class Overloaded(RuntimeError):
    """Refused by admission: too many in-flight or queued requests (HTTP 429)."""


class TooLarge(ValueError):
    """One request alone needs more tokens than the whole in-flight budget (HTTP 413)."""


class Admission:
    def __init__(self, config: AdmissionConfig) -> None:
        self._config = config
        self._inflight = 0
        self._tokens = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _fits(self, tokens: int) -> bool:
        return (self._inflight < self._config.max_inflight_requests
                and self._tokens + tokens <= self._config.max_inflight_tokens)

    def _take(self, tokens: int) -> None:
        self._inflight += 1
        self._tokens += tokens

    @asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[None]:
        await self.acquire(tokens)
        try:
            yield
        finally:
            self.release(tokens)

    async def acquire(self, tokens: int) -> None:
        if tokens > self._config.max_inflight_tokens:
            raise TooLarge(f"the request needs {tokens} tokens (prompt + max_tokens); the router admits at "
                           f"most {self._config.max_inflight_tokens} in flight (max_inflight_tokens)")
        if not self._waiters and self._fits(tokens):
            self._take(tokens)
            return
        if len(self._waiters) >= self._config.max_queued_requests:
            raise Overloaded(f"{self._inflight} requests in flight and {len(self._waiters)} queued "
                             f"(max_queued_requests={self._config.max_queued_requests})")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (tokens, waiter)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self._config.queue_timeout_s)
        except (TimeoutError, asyncio.CancelledError) as e:
            if waiter.done() and not waiter.cancelled():
                self.release(tokens)  # granted in the same instant it gave up: hand the slot on
            else:
                waiter.cancel()
                self._waiters.remove(entry)
                self._wake()
            if isinstance(e, TimeoutError):
                raise Overloaded(f"waited {self._config.queue_timeout_s} s for an in-flight slot "
                                 f"(queue_timeout_s)") from None
            raise

    def release(self, tokens: int) -> None:
        self._inflight -= 1
        self._tokens -= tokens
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            tokens, waiter = self._waiters.popleft()
            self._take(tokens)
            waiter.set_result(None)
