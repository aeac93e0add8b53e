"""The cluster registry as the router sees it: which nodes exist, their roles, addresses and load.

Nodes register and renew with heartbeats; an entry not renewed within the TTL is gone. Two backends
behind one ABC:

- ``EmbeddedRegistry``: a dict in the router process (nodes heartbeat over the router's HTTP API).
- ``RedisRegistry``: one key per node with a TTL in Redis, so several routers share one view. Each
  router re-reads the keys periodically; when Redis is unreachable it keeps serving from its last view
  (entries do not expire while the store is gone) and re-syncs when Redis returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pdserve.router.config import RegistryConfig
from pdserve.rpc.registry import (
    REDIS_KEY_PREFIX,
    NodeInfo,
    NodeInfoError,
    decode_node,
    redis_put,
)

log = logging.getLogger(__name__)

class Registry(ABC):
    """The router's view of the cluster.

    Invariants: ``snapshot`` is cheap and never blocks (the request path calls it per request) and
    returns only entries renewed within the TTL (or, for a shared store that is unreachable, the last
    view read from it); ``upsert`` replaces the whole entry for ``node.node_id``.
    """

    async def start(self) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Begin background work (sync loops)."""

    async def close(self) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Stop background work and release connections."""

    @abstractmethod
    async def upsert(self, node: NodeInfo) -> None:
        """Register or renew ``node`` (a heartbeat)."""

    @abstractmethod
    async def remove(self, node_id: str) -> None:
        """Forget a node at once (a clean shutdown)."""

    @abstractmethod
    def snapshot(self) -> list[NodeInfo]:
        """Live nodes, in a stable order (by node_id)."""


class EmbeddedRegistry(Registry):
    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._nodes: dict[str, NodeInfo] = {}

    async def upsert(self, node: NodeInfo) -> None:
        self._nodes[node.node_id] = node.seen_now()  # the router's clock, not the node's

    async def remove(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    def snapshot(self) -> list[NodeInfo]:
        deadline = time.time() - self._ttl_s
        expired = [nid for nid, n in self._nodes.items() if n.last_seen < deadline]
        for node_id in expired:
            del self._nodes[node_id]
        return sorted(self._nodes.values(), key=lambda n: n.node_id)


class RedisRegistry(Registry):
    def __init__(self, url: str, ttl_s: float, sync_interval_s: float, timeout_s: float) -> None:
        self._ttl_s = ttl_s
        self._sync_interval_s = sync_interval_s
        self._client = aioredis.Redis.from_url(url, socket_timeout=timeout_s,
                                               socket_connect_timeout=timeout_s)
        self._view: list[NodeInfo] = []
        self._connected = False
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        """Whether the last sync reached Redis (False: serving from the last view)."""
        return self._connected

    async def start(self) -> None:
        await self.sync()
        self._task = asyncio.create_task(self._sync_loop(), name="redis-registry-sync")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._client.aclose()

    async def upsert(self, node: NodeInfo) -> None:
        await redis_put(self._client, node.seen_now(), self._ttl_s)

    async def remove(self, node_id: str) -> None:
        await self._client.delete(REDIS_KEY_PREFIX + node_id)

    def snapshot(self) -> list[NodeInfo]:
        return list(self._view)

    async def sync(self) -> None:
        """Re-read every node key; on a Redis error keep the last view."""
        try:
            keys = [k async for k in self._client.scan_iter(match=REDIS_KEY_PREFIX + "*", count=500)]
            values = await self._client.mget(keys) if keys else []
        except (RedisError, OSError) as e:
            if self._connected:
                log.warning("registry: Redis unreachable (%s); serving from the last view", e)
            self._connected = False
            return
        if not self._connected:
            log.info("registry: Redis reachable; view re-synced")
        self._connected = True
        self._view = sorted(self._decode_all(values), key=lambda n: n.node_id)

    @staticmethod
    def _decode_all(values: list[bytes | None]) -> list[NodeInfo]:
        nodes = []
        for value in values:
            if value is None:  # expired between SCAN and MGET
                continue
            try:
                nodes.append(decode_node(value))
            except NodeInfoError as e:  # one bad writer must not hide every other node
                log.warning("registry: skipping a malformed Redis entry: %s", e)
        return nodes

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sync_interval_s)
            await self.sync()


def build_registry(config: RegistryConfig) -> Registry:
    if config.is_redis:
        return RedisRegistry(config.backend, config.heartbeat_ttl_s, config.sync_interval_s,
                             config.redis_timeout_s)
    return EmbeddedRegistry(config.heartbeat_ttl_s)
