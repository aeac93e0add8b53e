"""The Redis registry backend on a real redis-server started here on a free port: registration through
the node-side client and heartbeater, expiry, two routers sharing one view, and Redis killed and
restarted while requests keep succeeding."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
import redis

from pdserve.common.secret import ClusterSecret
from pdserve.node.registry_client import Heartbeater, RedisRegistryClient, registry_client_for
from pdserve.router.config import HealthConfig, RegistryConfig, RouterConfig
from pdserve.router.server import BackgroundRouter
from pdserve.rpc.registry import REDIS_KEY_PREFIX, NodeInfo, RegistryAuth, encode_node
from pdserve.tests.support.cluster import free_port
from pdserve.tests.support.secret import TEST_SECRET
from pdserve.tests.support.stub_node import StubNodeServer

MODEL = "pdserve-demo"
BODY = {"model": MODEL, "prompt": "x", "max_tokens": 2}
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
pytestmark = pytest.mark.skipif(not Path(REDIS_SERVER).exists(), reason="redis-server is not installed")


class RedisProcess:
    def __init__(self, port: int, workdir: Path, password: str | None = None) -> None:
        self.port = port
        self._workdir = workdir
        self._password = password
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        user = f"default:{self._password}@" if self._password else ""
        return f"redis://{user}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        auth = ["--requirepass", self._password] if self._password else []
        self._proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self._workdir), *auth],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline and self._proc.poll() is None, "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(free_port(), tmp_path)
    server.start()
    yield server
    server.kill()


class NodeBeats:
    """A Heartbeater in its own event loop thread (what a node server runs in its asyncio loop)."""

    def __init__(self, target: str, info: NodeInfo, ttl_s: float, interval_s: float) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.beater = self._run(self._make(target, info, ttl_s, interval_s))

    async def _make(self, target: str, info: NodeInfo, ttl_s: float, interval_s: float) -> Heartbeater:
        client = registry_client_for(target, RegistryAuth(TEST_SECRET), ttl_s=ttl_s)
        beater = Heartbeater(client, lambda: info, interval_s)
        await beater.start()
        return beater

    def _run(self, coro: object) -> Heartbeater:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    def stop(self, deregister: bool = True) -> None:
        self._run(self.beater.stop(deregister))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _config(redis_url: str, ttl_s: float = 1.0) -> RouterConfig:
    health = HealthConfig(interval_s=0.2, timeout_s=2.0, eject_after=20)  # no ejection on a stalled machine
    return RouterConfig(port=0, model_name=MODEL, health=health, cluster_secret=TEST_SECRET,
                        registry=RegistryConfig(backend=redis_url, heartbeat_ttl_s=ttl_s, sync_interval_s=0.1,
                                                redis_timeout_s=0.2))


def _wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _ready(r: BackgroundRouter) -> bool:
    return httpx.get(r.url + "/health").status_code == 200


def test_two_routers_share_nodes_and_entries_expire(redis_server: RedisProcess) -> None:
    with StubNodeServer("n0") as node, BackgroundRouter(_config(redis_server.url)) as r1, \
            BackgroundRouter(_config(redis_server.url)) as r2:
        assert not _ready(r1) and not _ready(r2)
        beats = NodeBeats(redis_server.url, node.info(), ttl_s=1.0, interval_s=0.2)
        try:
            _wait_until(lambda: _ready(r1) and _ready(r2))
            for r in (r1, r2):
                assert httpx.post(r.url + "/v1/completions", json=BODY, timeout=10).status_code == 200
            # The stub counts a completion when gRPC resumes its generator after the last chunk, which
            # can be just after the router has already answered: wait for it rather than race it.
            _wait_until(lambda: node.counters.completed == 2, timeout_s=2)
        finally:
            beats.stop(deregister=False)  # a crashed node: no goodbye, the TTL must remove it
        t_stop = time.monotonic()
        _wait_until(lambda: not _ready(r1) and not _ready(r2), timeout_s=5)
        assert time.monotonic() - t_stop > 0.5  # it lived out (most of) its TTL first


def test_deregister_removes_the_entry_at_once(redis_server: RedisProcess) -> None:
    with StubNodeServer("n0") as node, BackgroundRouter(_config(redis_server.url, ttl_s=30)) as r:
        beats = NodeBeats(redis_server.url, node.info(), ttl_s=30, interval_s=0.2)
        _wait_until(lambda: _ready(r))
        beats.stop(deregister=True)
        _wait_until(lambda: not _ready(r), timeout_s=2)


def test_redis_outage_keeps_serving_from_the_last_view_and_resyncs(redis_server: RedisProcess) -> None:
    with StubNodeServer("n0") as n0, StubNodeServer("n1") as n1, \
            BackgroundRouter(_config(redis_server.url)) as r:
        beats0 = NodeBeats(redis_server.url, n0.info(), ttl_s=1.0, interval_s=0.2)
        try:
            _wait_until(lambda: _ready(r))
            redis_server.kill()
            registry = r.state.registry
            _wait_until(lambda: not registry.connected)  # type: ignore[attr-defined]
            # well past the TTL: the last view still serves
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                assert httpx.post(r.url + "/v1/completions", json=BODY, timeout=10).status_code == 200
                time.sleep(0.1)
            redis_server.start()  # empty: it kept nothing (--save '')
            beats1 = NodeBeats(redis_server.url, n1.info(), ttl_s=1.0, interval_s=0.2)
            _wait_until(lambda: registry.connected)  # type: ignore[attr-defined]
            ids = lambda: {n["node_id"] for n in httpx.get(r.url + "/internal/v1/nodes").json()["nodes"]}  # noqa: E731
            _wait_until(lambda: ids() == {"n0", "n1"})  # n0's heartbeater re-registered on its own
            assert httpx.post(r.url + "/v1/completions", json=BODY, timeout=10).status_code == 200
            beats1.stop()
        finally:
            beats0.stop()


def test_redis_client_reports_an_unreachable_store() -> None:
    from pdserve.node.registry_client import RegistryUnavailable

    async def scenario() -> None:
        client = RedisRegistryClient(f"redis://127.0.0.1:{free_port()}/0", RegistryAuth(TEST_SECRET),
                                     timeout_s=0.2)
        info = NodeInfo(node_id="x", role="mixed", model=MODEL, grpc_address="127.0.0.1:1")
        with pytest.raises(RegistryUnavailable, match="redis heartbeat"):
            await client.heartbeat(info)
        beater = Heartbeater(client, lambda: info, 0.05)
        assert await beater.beat_once() is False  # logged and retried later, never raised
        await beater.stop(deregister=True)

    asyncio.run(scenario())


def test_forged_and_unsigned_redis_entries_are_ignored_and_counted(tmp_path: Path) -> None:
    """Whoever can write Redis (here: past its password) still cannot add a node without the secret."""
    server = RedisProcess(free_port(), tmp_path, password="redis-pass-for-this-test")
    server.start()
    try:
        with StubNodeServer("n0") as node, BackgroundRouter(_config(server.url)) as r:
            info = node.info()
            client = redis.Redis.from_url(server.url)
            unsigned = encode_node(msgspec.structs.replace(info, node_id="spoof-1"))
            client.set(REDIS_KEY_PREFIX + "spoof-1", unsigned, px=30_000)
            forged = RegistryAuth(ClusterSecret(b"an-attacker-guessed-this-one")).seal(
                msgspec.structs.replace(info, node_id="spoof-2"))
            client.set(REDIS_KEY_PREFIX + "spoof-2", forged, px=30_000)
            client.close()
            time.sleep(0.5)  # several syncs
            assert not _ready(r)
            assert httpx.get(r.url + "/internal/v1/nodes").json()["nodes"] == []
            metrics = httpx.get(r.url + "/metrics").text
            assert 'pdserve_router_registry_rejections_total{reason="malformed"}' in metrics
            assert 'pdserve_router_registry_rejections_total{reason="bad_mac"}' in metrics
            beats = NodeBeats(server.url, info, ttl_s=5.0, interval_s=0.2)  # the genuine node, same password
            try:
                _wait_until(lambda: _ready(r))
                ids = {n["node_id"] for n in httpx.get(r.url + "/internal/v1/nodes").json()["nodes"]}
                assert ids == {"n0"}
            finally:
                beats.stop()
    finally:
        server.kill()
