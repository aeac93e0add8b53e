"""What every node server has, whatever its role: the engine bridge, the gRPC server with the Node
service and the standard health service, Stats and Drain, Prometheus metrics, and the ready line.

A node server prints one line ``PDSERVE_READY {json}`` on stdout when it serves: the addresses it
bound (ports chosen by the OS when configured as 0). Launchers and tests read it.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field

import grpc
import msgspec
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from pdserve.common.kv_cache import KVCacheSpec
from pdserve.common.leftovers import remove_leftovers
from pdserve.common.secret import ClusterSecret, require_secret_or_insecure, warn_insecure
from pdserve.common.spec_metrics import SpeculateMetrics
from pdserve.engine.config import EngineConfig
from pdserve.engine.protocol import EngineStats
from pdserve.models.config import ModelConfig
from pdserve.node.engine_bridge import EngineBridge
from pdserve.node.engine_client import EngineClient, EngineClientConfig, EngineError
from pdserve.node.registry_client import Heartbeater, registry_client_for
from pdserve.rpc import keepalive, node_pb2_grpc
from pdserve.rpc import node_pb2 as pb
from pdserve.rpc.auth import RequireToken
from pdserve.rpc.registry import NodeInfo, RegistryAuth, Role
from pdserve.transfer.config import CurveKeys, TransferConfig

log = logging.getLogger("pdserve.node")

READY_PREFIX = "PDSERVE_READY "
DRAIN_POLL_S = 0.05


@dataclass(frozen=True)
class NodeConfig:
    role: Role
    node_id: str
    model_dir: str
    engine: EngineConfig
    model_name: str = "pdserve-demo"
    host: str = "127.0.0.1"  # every socket of the node binds here
    grpc_port: int = 0
    data_port: int = 0  # KV data plane: decode nodes receive KV here, prefill nodes take tasks here
    metrics_port: int | None = None  # Prometheus; None = no metrics endpoint, 0 = a port the OS picks
    omp_num_threads: int = 1  # per engine rank
    tensor_parallel_size: int = 1  # engine rank processes
    dtype: str = "float32"  # the model's dtype in the engine (an engine that cannot run it refuses to start)
    eos_token_ids: tuple[int, ...] = ()
    registry_url: str | None = None  # the router (http://...) or redis://...; None = not registered
    registry_api_key: str | None = field(default=None, repr=False)  # never in a log line
    transport: str = "auto"  # KV transport a prefill node uses: auto (shm on the same host) | shm | zmq
    prefill_timeout_s: float = 120.0  # decode node: no FirstToken by then -> the request fails
    kv_lease_s: float = 10.0  # reservation lease, renewed while the peer works
    prefill_fallback: str = "fail"  # decode node when its prefill peer fails: "fail" | "local"
    heartbeat_interval_s: float = 1.0
    drain_timeout_s: float = 30.0  # SIGTERM: in-flight requests get this long to finish
    # After the drain, the longest the orderly stop may take; the default is more than the sum of its
    # own bounded steps (registry 5 s, gRPC grace 2 s, data-plane linger, engine shutdown 12 s, reader
    # join 5 s). A node still alive past drain_timeout_s plus this is stuck: it writes every thread's
    # stack to its log and exits with status 1 (its engine follows when its stdin closes), so whoever
    # supervises it sees a failure with its cause rather than a hang.
    stop_timeout_s: float = 30.0
    engine_stall_timeout_s: float = 30.0  # an engine silent this long is killed (EngineClientConfig)
    log_level: str = "WARNING"
    # authenticates the data plane (CURVE), signed tasks, registry entries and node RPCs
    cluster_secret: ClusterSecret | None = field(default=None, repr=False)
    insecure: bool = False  # run without a cluster secret (explicit, logged loudly)

    def __post_init__(self) -> None:
        if self.role not in set(Role):
            raise ValueError(f"role must be one of {[r.value for r in Role]} (got {self.role!r})")
        object.__setattr__(self, "role", Role(self.role))  # a plain string names the same role
        if not self.node_id:
            raise ValueError("node_id must not be empty")
        for name in ("grpc_port", "data_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in [0, 65535] (got {getattr(self, name)})")
        if self.transport not in ("auto", "shm", "zmq"):
            raise ValueError(f"transport must be auto, shm or zmq (got {self.transport!r})")
        if self.prefill_fallback not in ("fail", "local"):
            raise ValueError(f"prefill_fallback must be 'fail' or 'local' (got {self.prefill_fallback!r})")
        if self.prefill_timeout_s <= 0 or self.kv_lease_s <= 0:
            raise ValueError("prefill_timeout_s and kv_lease_s must be > 0")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0 (got {self.drain_timeout_s})")
        if self.stop_timeout_s <= 0:
            raise ValueError(f"stop_timeout_s must be > 0 (got {self.stop_timeout_s})")
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s must be > 0 (got {self.heartbeat_interval_s})")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1 (got {self.tensor_parallel_size})")
        require_secret_or_insecure(self.cluster_secret, self.insecure, f"node {self.node_id}")
        self.engine_client_config()  # its own checks (dtype, stall timeout) fail here, not at start

    def transfer_config(self) -> TransferConfig:
        """The KV data plane binds the node's interface, on data_port."""
        curve = CurveKeys.from_cluster_secret(self.cluster_secret) if self.cluster_secret else None
        return TransferConfig(transport=self.transport, bind_host=self.host, port=self.data_port, curve=curve)

    def engine_client_config(self) -> EngineClientConfig:
        return EngineClientConfig(
            model_dir=self.model_dir, engine=self.engine, eos_token_ids=self.eos_token_ids, dtype=self.dtype,
            shared_kv_pool=self.role is not Role.MIXED, omp_num_threads=self.omp_num_threads,
            log_level=self.log_level, tensor_parallel_size=self.tensor_parallel_size,
            stall_timeout_s=self.engine_stall_timeout_s,
        )


class NodeMetrics:
    """One node's Prometheus metrics, on a registry of its own (never the process-global one)."""

    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"role": role}
        self.requests = Counter("pdserve_node_requests", "requests by outcome", ["role", "outcome"],
                                registry=self.registry)
        self.running = Gauge("pdserve_node_running", "requests running in the engine", ["role"],
                             registry=self.registry).labels(**labels)
        self.waiting = Gauge("pdserve_node_waiting", "requests waiting in the engine", ["role"],
                             registry=self.registry).labels(**labels)
        self.free_blocks = Gauge("pdserve_node_free_blocks", "free KV blocks", ["role"],
                                 registry=self.registry).labels(**labels)
        self.ttft = Histogram("pdserve_node_ttft_seconds", "time to first token at the node, by part",
                              ["part"], registry=self.registry,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.kv_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes moved", ["direction", "transport"],
                                registry=self.registry)
        self.kv_seconds = Counter("pdserve_kv_transfer_seconds", "time spent moving KV",
                                  ["direction", "transport"], registry=self.registry)
        self.kv_failures = Counter("pdserve_kv_transfer_failures", "failed or rejected KV transfers",
                                   ["reason"], registry=self.registry)
        self.auth_rejections = Counter("pdserve_auth_rejections",
                                       "internal messages and calls refused as unauthenticated",
                                       ["channel", "reason"], registry=self.registry)
        self.spec_accepted = Counter("pdserve_spec_accepted_tokens",
                                     "draft tokens accepted (finished requests)", registry=self.registry)
        self.spec_rejected = Counter("pdserve_spec_rejected_tokens",
                                     "draft tokens rejected (finished requests)", registry=self.registry)
        self.spec_accepted_per_head = Counter(
            "pdserve_spec_accepted_tokens_per_head",
            "accepted tokens by draft position (FastDeploy's per-head count)", ["head"],
            registry=self.registry)
        self.role = role

    def outcome(self, outcome: str) -> None:
        self.requests.labels(role=self.role, outcome=outcome).inc()

    def speculation(self, metrics: SpeculateMetrics) -> None:
        """Add one finished request's speculative decoding counts."""
        self.spec_accepted.inc(metrics.accepted_tokens)
        self.spec_rejected.inc(metrics.rejected_tokens)
        for head, count in enumerate(metrics.accepted_tokens_per_head):
            self.spec_accepted_per_head.labels(head=str(head)).inc(count)


class NodeServer(node_pb2_grpc.NodeServicer):
    """The runtime every role shares: the engine bridge, the gRPC server with Stats, Drain and health,
    heartbeats, metrics. Each role is a subclass that adds its own RPCs and data plane; an RPC a role
    does not serve keeps the generated base's answer, UNIMPLEMENTED (a prefill node and Generate)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.metrics = NodeMetrics(config.role)
        self.bridge = EngineBridge(EngineClient(config.engine_client_config()))
        self.bridge.on_stats = self._on_stats
        self.draining = False
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.grpc_address = ""
        self.data_address = ""  # set by roles with a KV data plane
        self.metrics_address = ""  # host:port of the Prometheus endpoint, when it has one
        self._heartbeater = None
        self._stop = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        self._signalled_at: float | None = None

    # -- the shared RPCs -------------------------------------------------------------------------------

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.NodeStats:
        return self.node_stats()

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        await self.stop_admitting()
        return pb.DrainResponse(draining=True, inflight=self.inflight)

    @property
    def inflight(self) -> int:
        """Requests this node still works on; a drain waits for them."""
        return self.bridge.num_live

    async def stop_admitting(self) -> None:
        """Draining: health NOT_SERVING and the registry entry marked at once, so routers stop sending
        before new requests would be refused; requests already here go on."""
        if self.draining:
            return
        self.draining = True
        await self._set_health(serving=False)
        if self._heartbeater is not None:
            await self._heartbeater.beat_once()

    async def drain(self) -> None:
        """Stop admitting, then wait until in-flight requests finish (or drain_timeout_s passes)."""
        await self.stop_admitting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout_s
        log.warning("node %s draining: %d requests in flight", self.config.node_id, self.inflight)
        while self.inflight and loop.time() < deadline and not self.bridge.lost.is_set():
            await asyncio.sleep(DRAIN_POLL_S)
        if self.inflight:
            log.warning("node %s: drain timeout (%.1f s) with %d requests in flight; they are cut",
                        self.config.node_id, self.config.drain_timeout_s, self.inflight)

    def node_stats(self) -> pb.NodeStats:
        stats = self.bridge.stats
        total = stats.total_blocks if stats else self.config.engine.cache.num_blocks
        free = stats.free_blocks if stats else total
        return pb.NodeStats(
            node_id=self.config.node_id, role=self.config.role, model=self.config.model_name,
            running=stats.running if stats else 0, waiting=stats.waiting if stats else 0,
            free_blocks=free, total_blocks=total, kv_usage=1.0 - free / total if total else 0.0,
            draining=self.draining,
        )

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.config.cluster_secret is None:
            warn_insecure(f"node {self.config.node_id}")
        removed = remove_leftovers()  # what killed nodes on this host left: dead owners only
        if removed.pools or removed.queues:
            log.warning("removed KV pools %s and record queues %s of dead nodes", list(removed.pools),
                        list(removed.queues))
        await self.bridge.start()
        self._server = grpc.aio.server(interceptors=self._rpc_interceptors(),
                                       options=keepalive.SERVER_OPTIONS)
        node_pb2_grpc.add_NodeServicer_to_server(self, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        port = self._server.add_insecure_port(f"{self.config.host}:{self.config.grpc_port}")
        if port == 0:
            raise OSError(f"could not bind gRPC to {self.config.host}:{self.config.grpc_port}")
        self.grpc_address = f"{self.config.host}:{port}"
        await self.start_data_plane()
        await self._server.start()
        await self._set_health(serving=True)
        if self.config.metrics_port is not None:
            http_server, _ = start_http_server(self.config.metrics_port, addr=self.config.host,
                                               registry=self.metrics.registry)
            self.metrics_address = f"{self.config.host}:{http_server.server_port}"
        asyncio.get_running_loop().create_task(self._watch_engine())
        if self.config.registry_url:
            await self._start_heartbeats()

    def _rpc_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        secret = self.config.cluster_secret
        if secret is None:
            return []
        rejections = self.metrics.auth_rejections
        return [RequireToken(secret, lambda reason: rejections.labels(channel="grpc", reason=reason).inc())]

    async def _start_heartbeats(self) -> None:
        client = registry_client_for(self.config.registry_url, RegistryAuth(self.config.cluster_secret),
                                     api_key=self.config.registry_api_key)
        self._heartbeater = Heartbeater(client, self.node_info, self.config.heartbeat_interval_s)
        await self._heartbeater.start()

    def node_info(self) -> NodeInfo:
        """This node's registry entry, current load included."""
        stats = self.bridge.stats
        return NodeInfo(
            node_id=self.config.node_id, role=self.config.role, model=self.config.model_name,
            grpc_address=self.grpc_address, data_address=self.data_address,
            capacity=self.config.engine.scheduler.max_num_seqs,
            load=float(stats.running + stats.waiting) if stats else 0.0, draining=self.draining,
        )

    async def start_data_plane(self) -> None:
        """Roles with a KV data plane bind it here, before the node reports ready."""

    def engine_kv_pools(self) -> tuple[KVCacheSpec, list[str]]:
        """The engine's KV as the data plane sees it: the geometry with all KV heads, and every
        rank's shared pool, rank 0 first (one pool without tensor parallelism)."""
        ready = self.bridge.ready
        heads = ModelConfig.from_dir(self.config.model_dir).num_key_value_heads
        names = [ready.kv_pool_name, *ready.rank_kv_pool_names]
        return msgspec.structs.replace(ready.kv_spec, num_kv_heads=heads), names

    def ready_info(self) -> dict:
        return {"node_id": self.config.node_id, "role": self.config.role, "grpc": self.grpc_address,
                "data": self.data_address, "metrics": self.metrics_address, "pid": self.bridge.client.pid}

    async def _set_health(self, serving: bool) -> None:
        states = health_pb2.HealthCheckResponse
        status = states.SERVING if serving else states.NOT_SERVING
        for service in ("", "pdserve.node.v1.Node"):
            await self.health.set(service, status)

    async def _watch_engine(self) -> None:
        """An engine that dies takes the node's health with it, so routers stop sending requests."""
        await self.bridge.lost.wait()
        log.error("engine process is gone; node %s stops serving", self.config.node_id)
        await self._set_health(serving=False)
        self._stop.set()

    def _on_stats(self, stats: EngineStats) -> None:
        self.metrics.running.set(stats.running)
        self.metrics.waiting.set(stats.waiting)
        self.metrics.free_blocks.set(stats.free_blocks)

    async def stop(self, grace_s: float = 2.0) -> None:
        self._stop.set()
        if self._heartbeater is not None:
            await self._heartbeater.stop(deregister=True)
        if self._server is not None:
            await self._server.stop(grace_s)
        await self.stop_data_plane()
        await asyncio.get_running_loop().run_in_executor(None, self.bridge.close)

    async def stop_data_plane(self) -> None:
        """Roles with a KV data plane close it here."""

    def _on_signal(self) -> None:
        """The first SIGTERM/SIGINT drains, then stops; a second one stops at once."""
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_stop())
        else:
            self._stop.set()

    def _signal_received(self, loop: asyncio.AbstractEventLoop) -> None:
        """A plain signal handler, run on the main thread as soon as the signal comes, whatever the loop
        is doing: the first signal arms the exit watchdog here, so it holds even when the loop is
        blocked and never gets to drain; the drain itself runs on the loop."""
        if self._signalled_at is None:
            self._signalled_at = time.monotonic()
            faulthandler.dump_traceback_later(self.config.drain_timeout_s + self.config.stop_timeout_s,
                                              exit=True)
        loop.call_soon_threadsafe(self._on_signal)

    async def _drain_then_stop(self) -> None:
        await self.drain()
        self._stop.set()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda _signum, _frame: self._signal_received(loop))
        await self.start()
        print(READY_PREFIX + json.dumps(self.ready_info()), flush=True)
        await self._stop.wait()
        if self._drain_task is not None and not self._drain_task.done():
            self._drain_task.cancel()
        stopping_at = time.monotonic()
        await self.stop()
        if self._signalled_at is not None:
            log.warning("node %s stopped %.1f s after the signal (drain %.1f s, stop %.1f s)",
                        self.config.node_id, time.monotonic() - self._signalled_at,
                        stopping_at - self._signalled_at, time.monotonic() - stopping_at)


def run_node(server: NodeServer) -> int:
    logging.basicConfig(level=server.config.log_level, stream=sys.stderr,
                        format=f"%(asctime)s {server.config.node_id} %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(server.serve_forever())
    except (OSError, EngineError) as exc:  # could not bind, or the engine could not start
        print(f"pdserve: node {server.config.node_id} failed: {exc}", file=sys.stderr)
        return 1
    return 0 if server.bridge.failure is None else 1
