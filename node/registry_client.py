"""The node side of the registry: announce this node and keep its entry alive.

A node server builds a ``RegistryClient`` for its cluster's backend and runs a ``Heartbeater``.
Every entry it writes is sealed with the cluster secret (``RegistryAuth``), so a router takes it as
this node's and nobody else's:

    client = registry_client_for("http://127.0.0.1:8000", RegistryAuth(secret))   # or "redis://host:6379/0"
    beater = Heartbeater(client, current_info, interval_s=2.0)
    await beater.start(); ...; await beater.stop()   # stop() deregisters
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable

import httpx
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pdserve.rpc.registry import (
    HEARTBEAT_PATH,
    NODES_PATH,
    REDIS_KEY_PREFIX,
    REMOVAL_HEADER,
    NodeInfo,
    RegistryAuth,
    redis_put,
)

log = logging.getLogger(__name__)

class RegistryUnavailable(ConnectionError):
    """The registry could not be reached or refused the entry."""


class RegistryClient(ABC):
    """Writes this node's entry. Invariant: ``heartbeat`` is idempotent (it replaces the entry)."""

    @abstractmethod
    async def heartbeat(self, node: NodeInfo) -> None:
        """Register or renew; raises RegistryUnavailable."""

    @abstractmethod
    async def deregister(self, node_id: str) -> None:
        """Remove the entry; raises RegistryUnavailable."""

    async def close(self) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Release connections."""


class HttpRegistryClient(RegistryClient):
    """Heartbeats to a router's embedded registry."""

    def __init__(self, router_url: str, auth: RegistryAuth, api_key: str | None = None,
                 timeout_s: float = 2.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._auth = auth
        self._http = httpx.AsyncClient(base_url=router_url.rstrip("/"), headers=headers, timeout=timeout_s)

    async def heartbeat(self, node: NodeInfo) -> None:
        await self._send("POST", HEARTBEAT_PATH, content=self._auth.seal(node))

    async def deregister(self, node_id: str) -> None:
        await self._send("DELETE", f"{NODES_PATH}/{node_id}",
                         headers={REMOVAL_HEADER: self._auth.removal_token(node_id)})

    async def _send(self, method: str, path: str, content: bytes | None = None,
                    headers: dict[str, str] | None = None) -> None:
        try:
            response = await self._http.request(
                method, path, content=content, headers={"Content-Type": "application/json", **(headers or {})}
            )
        except httpx.HTTPError as e:
            raise RegistryUnavailable(f"{method} {path}: {e!r}") from e
        if response.status_code >= 300:
            raise RegistryUnavailable(f"{method} {path}: HTTP {response.status_code}: {response.text[:200]}")

    async def close(self) -> None:
        await self._http.aclose()


class RedisRegistryClient(RegistryClient):
    """Writes the entry straight into the shared Redis store (key with a TTL)."""

    def __init__(self, url: str, auth: RegistryAuth, ttl_s: float = 10.0, timeout_s: float = 1.0) -> None:
        self._ttl_s = ttl_s
        self._auth = auth
        self._client = aioredis.Redis.from_url(url, socket_timeout=timeout_s,
                                               socket_connect_timeout=timeout_s)

    async def heartbeat(self, node: NodeInfo) -> None:
        try:
            await redis_put(self._client, self._auth, node.seen_now(), self._ttl_s)
        except (RedisError, OSError) as e:
            raise RegistryUnavailable(f"redis heartbeat: {e!r}") from e

    async def deregister(self, node_id: str) -> None:
        try:
            await self._client.delete(REDIS_KEY_PREFIX + node_id)
        except (RedisError, OSError) as e:
            raise RegistryUnavailable(f"redis deregister: {e!r}") from e

    async def close(self) -> None:
        await self._client.aclose()


def registry_client_for(target: str, auth: RegistryAuth, api_key: str | None = None,
                        ttl_s: float = 10.0) -> RegistryClient:
    """``redis://...`` -> Redis (user and password in the URL for an ACL); ``http(s)://...`` -> the
    router's embedded registry."""
    if target.startswith(("redis://", "rediss://")):
        return RedisRegistryClient(target, auth, ttl_s)
    if target.startswith(("http://", "https://")):
        return HttpRegistryClient(target, auth, api_key)
    raise ValueError(f"registry target must be an http(s):// router URL or a redis:// URL (got {target!r})")


STOP_TIMEOUT_S = 5.0  # past the clients' own request timeouts (1 s Redis, 2 s HTTP)


class Heartbeater:
    """An asyncio task that renews this node's entry every ``interval_s``.

    ``info`` is called for every beat so the entry carries current load and draining state. A failed
    beat is logged and retried at the next interval (the router may be starting or restarting).
    """

    def __init__(self, client: RegistryClient, info: Callable[[], NodeInfo], interval_s: float,
                 stop_timeout_s: float = STOP_TIMEOUT_S) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0 (got {interval_s!r})")
        if stop_timeout_s <= 0:
            raise ValueError(f"stop_timeout_s must be > 0 (got {stop_timeout_s!r})")
        self._client = client
        self._info = info
        self._interval_s = interval_s
        self._stop_timeout_s = stop_timeout_s
        self._task: asyncio.Task[None] | None = None
        self.beats = 0  # successful heartbeats, for status and tests
        self._warned = False

    async def start(self) -> None:
        await self.beat_once()
        self._task = asyncio.create_task(self._run(), name="registry-heartbeat")

    async def beat_once(self) -> bool:
        try:
            await self._client.heartbeat(self._info())
        except RegistryUnavailable as e:
            if not self._warned:  # one line per outage, not one per beat
                log.warning("registry heartbeat failed (will retry): %s", e)
            self._warned = True
            return False
        self._warned = False
        self.beats += 1
        return True

    async def stop(self, deregister: bool = True) -> None:
        """Stop beating, remove the entry (``deregister``) and close the client, in at most
        ``stop_timeout_s``: a node's shutdown does not wait on a slow or hung registry, whose entry
        for it expires on its own."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            async with asyncio.timeout(self._stop_timeout_s):
                if deregister:
                    try:
                        await self._client.deregister(self._info().node_id)
                    except RegistryUnavailable as e:
                        log.warning("registry deregister failed (the entry will expire): %s", e)
                await self._client.close()
        except TimeoutError:
            log.warning("registry deregister and close took over %.1f s: given up (the entry will expire)",
                        self._stop_timeout_s)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.beat_once()
