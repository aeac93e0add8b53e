"""The cluster registry as the router sees it: which nodes exist, their roles, addresses and load.

Nodes register and renew with heartbeats; an entry not renewed within the TTL is gone. Two backends
behind one ABC:

- ``EmbeddedRegistry``: a dict in the router process (nodes heartbeat over the router's HTTP API).
- ``RedisRegistry``: one key per node with a TTL in Redis, so several routers share one view. Each
  router re-reads the keys periodically; when Redis is unreachable it keeps serving from its last view
  (entries do not expire while the store is gone) and re-syncs when Redis returns.
- ``SharedDirRegistry``: one file per node in a directory (on /dev/shm) that the worker processes of
  one router (``--workers``) share: a heartbeat lands on whichever worker the kernel picked, and every
  worker re-reads the directory, so all of them route over the same nodes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from abc import ABC, abstractmethod
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pdserve.router.config import RegistryConfig
from pdserve.rpc.registry import (
    REDIS_KEY_PREFIX,
    NodeInfo,
    NodeInfoError,
    RegistryAuth,
    RegistryAuthError,
    decode_node,
    encode_node,
    redis_put,
)

log = logging.getLogger(__name__)

class Registry(ABC):
    """The router's view of the cluster.

    Invariants: ``snapshot`` is cheap and never blocks (the request path calls it per request) and
    returns only entries renewed within the TTL (or, for a shared store that is unreachable, the last
    view read from it); ``upsert`` replaces the whole entry for ``node.node_id``. ``auth`` opens what
    nodes send (the HTTP heartbeat route) and, for a shared store, what is read from it.
    """

    auth: RegistryAuth

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
    def __init__(self, ttl_s: float, auth: RegistryAuth) -> None:
        self.auth = auth
        self._ttl_s = ttl_s
        self._nodes: dict[str, NodeInfo] = {}
        # the sorted view, rebuilt only after a change or when its oldest entry may have expired:
        # the request path reads it several times per request
        self._view: list[NodeInfo] | None = None
        self._oldest_seen = 0.0

    async def upsert(self, node: NodeInfo) -> None:
        self._nodes[node.node_id] = node.seen_now()  # the router's clock, not the node's
        self._view = None

    async def remove(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)
        self._view = None

    def snapshot(self) -> list[NodeInfo]:
        deadline = time.time() - self._ttl_s
        if self._view is None or self._oldest_seen < deadline:
            expired = [nid for nid, n in self._nodes.items() if n.last_seen < deadline]
            for node_id in expired:
                del self._nodes[node_id]
            self._view = sorted(self._nodes.values(), key=lambda n: n.node_id)
            self._oldest_seen = min((n.last_seen for n in self._view), default=float("inf"))
        return list(self._view)


class RedisRegistry(Registry):
    def __init__(self, url: str, ttl_s: float, sync_interval_s: float, timeout_s: float,
                 auth: RegistryAuth) -> None:
        self.auth = auth
        self._ttl_s = ttl_s
        self._sync_interval_s = sync_interval_s
        self._client = aioredis.Redis.from_url(url, socket_timeout=timeout_s,
                                               socket_connect_timeout=timeout_s)
        self._view: list[NodeInfo] = []
        self._connected = False
        self._grace_until = 0.0  # until then, a re-synced view keeps the last one's fresh nodes
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
        await redis_put(self._client, self.auth, node.seen_now(), self._ttl_s)

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
        if not self._connected and self._view:
            log.info("registry: Redis reachable again; view re-synced")
            # A Redis that restarted empty holds none of the live nodes until their next heartbeats:
            # for one heartbeat TTL, nodes of the last view that are not yet stale stay in it.
            self._grace_until = time.time() + self._ttl_s
        self._connected = True
        view = self._decode_all(values)
        now = time.time()
        if now < self._grace_until:
            present = {n.node_id for n in view}
            view += [n for n in self._view if n.node_id not in present and now - n.last_seen < self._ttl_s]
        self._view = sorted(view, key=lambda n: n.node_id)

    def _decode_all(self, values: list[bytes | None]) -> list[NodeInfo]:
        nodes = []
        for value in values:
            if value is None:  # expired between SCAN and MGET
                continue
            try:
                nodes.append(self.auth.open(value))
            except RegistryAuthError as e:  # one bad writer must not hide every other node
                log.warning("registry: skipping a Redis entry: %s", e)
        return nodes

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sync_interval_s)
            await self.sync()


class SharedDirRegistry(Registry):
    """Entries are files named by the node id's hex, written whole (a rename) on every heartbeat; a
    worker's view is what it last read, refreshed every ``sync_interval_s`` and at once on its own
    writes. Expired entries are deleted by whichever worker reads them first."""

    def __init__(self, directory: Path, ttl_s: float, sync_interval_s: float, auth: RegistryAuth) -> None:
        self.auth = auth  # for heartbeats; the files are the router workers' own, written unsigned
        self._dir = directory
        self._ttl_s = ttl_s
        self._sync_interval_s = sync_interval_s
        self._view: dict[str, NodeInfo] = {}
        self._task: asyncio.Task[None] | None = None

    def _path(self, node_id: str) -> Path:
        return self._dir / (node_id.encode().hex() + ".json")

    async def start(self) -> None:
        self.sync()
        self._task = asyncio.create_task(self._sync_loop(), name="shared-dir-registry-sync")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def upsert(self, node: NodeInfo) -> None:
        node = node.seen_now()
        path = self._path(node.node_id)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(encode_node(node))
        os.replace(tmp, path)  # readers see the old entry or the new one, never half of one
        self._view[node.node_id] = node

    async def remove(self, node_id: str) -> None:
        self._path(node_id).unlink(missing_ok=True)
        self._view.pop(node_id, None)

    def snapshot(self) -> list[NodeInfo]:
        deadline = time.time() - self._ttl_s
        return sorted((n for n in self._view.values() if n.last_seen >= deadline), key=lambda n: n.node_id)

    def sync(self) -> None:
        deadline = time.time() - self._ttl_s
        view: dict[str, NodeInfo] = {}
        for path in self._dir.glob("*.json"):
            try:
                node = decode_node(path.read_bytes())
            except FileNotFoundError:  # removed or expired between listing and reading
                continue
            except NodeInfoError as e:
                log.warning("registry: skipping a malformed entry %s: %s", path.name, e)
                continue
            if node.last_seen < deadline:
                path.unlink(missing_ok=True)
                continue
            view[node.node_id] = node
        self._view = view

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sync_interval_s)
            self.sync()


def build_registry(config: RegistryConfig, auth: RegistryAuth) -> Registry:
    if config.is_redis:
        return RedisRegistry(config.backend, config.heartbeat_ttl_s, config.sync_interval_s,
                             config.redis_timeout_s, auth)
    return EmbeddedRegistry(config.heartbeat_ttl_s, auth)
