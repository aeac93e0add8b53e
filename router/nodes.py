"""The nodes the router can send to: health state, inflight counts, gRPC channels, route choice."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Gauge

from pdserve.router.config import HealthConfig
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policies import Policy, RouteContext
from pdserve.router.registry import Registry
from pdserve.rpc import node_pb2, node_pb2_grpc
from pdserve.rpc.keepalive import client_options
from pdserve.rpc.registry import NodeInfo

log = logging.getLogger(__name__)

# How long a pair whose decode node could not reach its prefill node stays out of routes after that
# failure. The nodes' own reports (NodeStats.unreachable_peer_addresses, polled with each health
# check) keep it out for as long as either cannot reach the other; this covers the time until those
# reports arrive, and is short so a healed pair serves again within seconds.
BROKEN_PAIR_HOLD_S = 2.0
MAX_ANSWER_BYTES = 256 << 20


def node_channel_options(health: HealthConfig) -> list[tuple[str, int]]:
    """The router's channel to a node: no proxy (node addresses are internal, and an env proxy would
    add a hop to every token), no 4 MiB cap on a message (a non-streaming answer is one, and a long
    output or an echoed long prompt with top-20 logprobs carries ~170 bytes per token), and HTTP/2
    keepalive pings (rpc/keepalive.py)."""
    return [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", MAX_ANSWER_BYTES),
            *client_options(health.ping_interval_s, health.ping_timeout_s)]


class NoRoute(RuntimeError):
    """No usable decode/mixed node (or no prefill node for a decode node) right now."""


@dataclass(frozen=True)
class Route:
    decode: NodeInfo  # where Generate is called: a decode node or a mixed node
    prefill: NodeInfo | None  # None for a mixed node

    @property
    def nodes(self) -> tuple[NodeInfo, ...]:
        return (self.decode,) if self.prefill is None else (self.decode, self.prefill)


@dataclass
class _NodeState:
    failures: int = 0  # consecutive failed health checks
    ejected: bool = False
    inflight: int = 0  # requests this router has on the node
    # running + waiting from the node's Stats RPC and when (unix time), polled with each health check:
    # with a shared (Redis) registry, heartbeats may be older than what the node says now.
    stats_load: float | None = None
    stats_at: float = 0.0
    stats_inflight: int = 0  # this router's requests on the node when its Stats answered
    total_blocks: int = 0  # KV blocks, from Stats (0: not reported)
    # the data addresses of the peers the node reported unreachable in its last Stats
    unreachable_peers: frozenset[str] = frozenset()


class NodeClient:
    """A node's Generate, Complete and Stats calls, each carrying the cluster credential
    (rpc.auth.call_metadata)."""

    def __init__(self, stub: node_pb2_grpc.NodeStub, metadata: tuple[tuple[str, str], ...]) -> None:
        self._stub = stub
        # built once: grpc.aio turns a tuple into its Metadata on every call, after a slow
        # isinstance check against typing.Sequence
        self._metadata = grpc.aio.Metadata(*metadata) if metadata else None

    def Generate(self, request: node_pb2.GenerateRequest) -> grpc.aio.UnaryStreamCall:  # noqa: N802 - the RPC's name
        return self._stub.Generate(request, metadata=self._metadata)

    def Complete(self, request: node_pb2.GenerateRequest) -> grpc.aio.UnaryUnaryCall:  # noqa: N802
        return self._stub.Complete(request, metadata=self._metadata)

    def Stats(self, request: node_pb2.StatsRequest, timeout: float) -> grpc.aio.UnaryUnaryCall:  # noqa: N802
        return self._stub.Stats(request, timeout=timeout, metadata=self._metadata)


@dataclass
class _Channel:
    channel: grpc.aio.Channel
    node: NodeClient
    health: health_pb2_grpc.HealthStub


class NodePool:
    def __init__(self, registry: Registry, model_name: str, health: HealthConfig,
                 prefill_policy: Policy, decode_policy: Policy, metrics: RouterMetrics,
                 call_metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._registry = registry
        self._call_metadata = call_metadata  # the cluster credential on every call (rpc.auth)
        self._model_name = model_name
        self._health = health
        self._prefill_policy = prefill_policy
        self._decode_policy = decode_policy
        self._metrics = metrics
        self._states: dict[str, _NodeState] = {}
        self._channels: dict[str, _Channel] = {}
        self._task: asyncio.Task[None] | None = None
        self._broken_pairs: dict[tuple[str, str], float] = {}  # (decode, prefill) -> avoided until, monotonic
        self._suspect_checks: set[asyncio.Task[None]] = set()
        self._inflight_gauges: dict[tuple[str, str], Gauge] = {}

    # ---- views
    def _state(self, node_id: str) -> _NodeState:
        state = self._states.get(node_id)  # not setdefault: that builds a state on every call
        if state is None:
            state = self._states[node_id] = _NodeState()
        return state

    def usable(self, role: str) -> list[NodeInfo]:
        return [n for n in self._registry.snapshot()
                if n.role == role and n.model == self._model_name and not n.draining
                and not self._state(n.node_id).ejected]

    def ready(self) -> bool:
        """At least one mixed node, or one prefill and one decode node, can take a request."""
        return bool(self.usable("mixed")) or (bool(self.usable("prefill")) and bool(self.usable("decode")))

    def reported_load(self, node: NodeInfo) -> float:
        """Running + waiting on the node: the newer of its heartbeat's and its Stats' count."""
        state = self._state(node.node_id)
        if state.stats_load is not None and state.stats_at >= node.last_seen:
            return state.stats_load
        return node.load

    def load(self, node: NodeInfo) -> float:
        """Requests on the node per unit of capacity: what it reported plus what this router has sent
        it since."""
        return (self.reported_load(node) + self._state(node.node_id).inflight) / node.capacity

    def foreign_load(self, node: NodeInfo) -> float:
        """Requests on the node that are not this router's (other routers sharing the registry): its
        reported count less this router's requests on it at that time (now, for a heartbeat's)."""
        state = self._state(node.node_id)
        if state.stats_load is not None and state.stats_at >= node.last_seen:
            return max(0.0, state.stats_load - state.stats_inflight)
        return max(0.0, node.load - state.inflight)

    def total_blocks(self, node_id: str) -> int:
        """The node's KV blocks as its Stats reported them; 0 before the first report."""
        return self._state(node_id).total_blocks

    def is_ejected(self, node_id: str) -> bool:
        return self._state(node_id).ejected

    def inflight(self, node_id: str) -> int:
        return self._state(node_id).inflight

    def unreachable_peers(self, node_id: str) -> list[str]:
        """The data addresses of the peers the node last reported it cannot reach."""
        return sorted(self._state(node_id).unreachable_peers)

    def pair_usable(self, decode: NodeInfo, prefill: NodeInfo) -> bool:
        """False while either node reports it cannot reach the other, or shortly after a failure said so."""
        if prefill.data_address in self._state(decode.node_id).unreachable_peers or \
                decode.data_address in self._state(prefill.node_id).unreachable_peers:
            return False
        key = (decode.node_id, prefill.node_id)
        until = self._broken_pairs.get(key)
        if until is None:
            return True
        if time.monotonic() >= until:
            del self._broken_pairs[key]
            return True
        return False

    def mark_pair_broken(self, decode_id: str, prefill_id: str) -> None:
        """The decode node could not reach the prefill node: routes avoid the pair for a while."""
        if (decode_id, prefill_id) not in self._broken_pairs:
            log.warning("pair %s <- %s avoided: the decode node cannot reach the prefill node",
                        decode_id, prefill_id)
        self._broken_pairs[(decode_id, prefill_id)] = time.monotonic() + BROKEN_PAIR_HOLD_S

    # ---- routing
    def pick(self, prompt_token_ids: Sequence[int], exclude: Iterable[str] = (),
             decode_id: str | None = None) -> Route:
        """A route avoiding `exclude` and broken pairs; with `decode_id`, that decode node when it is
        still usable and some other prefill node can feed it (a retry after its peer failed)."""
        excluded = set(exclude)
        ctx = RouteContext(prompt_token_ids, self.load)
        prefills = [n for n in self.usable("prefill") if n.node_id not in excluded]

        def feeders(decode: NodeInfo) -> list[NodeInfo]:
            return [p for p in prefills if self.pair_usable(decode, p)]

        if decode_id is not None:
            for decode in self.usable("decode"):
                if decode.node_id == decode_id and (candidates := feeders(decode)):
                    return Route(decode, self._prefill_policy.choose(candidates, ctx))
        # a decode node is only a candidate while some prefill node can feed it
        heads = [n for n in self.usable("mixed") if n.node_id not in excluded]
        heads += [n for n in self.usable("decode") if n.node_id not in excluded and feeders(n)]
        if not heads:
            raise NoRoute("no usable mixed node or prefill/decode pair")
        decode = self._decode_policy.choose(sorted(heads, key=lambda n: n.node_id), ctx)
        prefill = self._prefill_policy.choose(feeders(decode), ctx) if decode.role == "decode" else None
        return Route(decode, prefill)

    def begin(self, route: Route) -> None:
        for node in route.nodes:
            self._state(node.node_id).inflight += 1
            self._inflight_gauge(node).inc()

    def end(self, route: Route) -> None:
        for node in route.nodes:
            self._state(node.node_id).inflight -= 1
            self._inflight_gauge(node).dec()

    def _inflight_gauge(self, node: NodeInfo) -> Gauge:
        # the labelled child, kept: labels() takes a lock and builds its key on every call
        key = (node.node_id, node.role)
        gauge = self._inflight_gauges.get(key)
        if gauge is None:
            gauge = self._inflight_gauges[key] = self._metrics.node_inflight.labels(*key)
        return gauge

    def eject(self, node_id: str, why: str) -> None:
        """Out of rotation now (the request path saw it fail); the next passing health check re-admits."""
        state = self._state(node_id)
        if not state.ejected:
            log.warning("node %s ejected: %s", node_id, why)
            self._metrics.ejections.inc()
        state.ejected = True
        state.failures = max(state.failures, self._health.eject_after)

    def suspect(self, node_id: str) -> None:
        """A request saw the node fail: check its health now rather than at the next pass, so a dead
        node leaves rotation at once and a live one (the failure was the request's) stays."""
        node = next((n for n in self._registry.snapshot() if n.node_id == node_id), None)
        if node is None:
            return
        task = asyncio.get_running_loop().create_task(self._check(node, at_once=True))
        self._suspect_checks.add(task)
        task.add_done_callback(self._suspect_checks.discard)

    # ---- gRPC
    def _channel(self, address: str) -> _Channel:
        entry = self._channels.get(address)
        if entry is None:
            channel = grpc.aio.insecure_channel(address, options=node_channel_options(self._health))
            entry = _Channel(channel, NodeClient(node_pb2_grpc.NodeStub(channel), self._call_metadata),
                             health_pb2_grpc.HealthStub(channel))
            self._channels[address] = entry
        return entry

    def stub(self, node: NodeInfo) -> NodeClient:
        return self._channel(node.grpc_address).node

    # ---- health checks
    async def start(self) -> None:
        self._task = asyncio.create_task(self._health_loop(), name="node-health")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._suspect_checks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for entry in self._channels.values():
            await entry.channel.close()
        self._channels.clear()

    async def check_all(self) -> None:
        nodes = self._registry.snapshot()
        await asyncio.gather(*(self._check(n) for n in nodes))
        await self._forget_absent({n.node_id for n in nodes}, {n.grpc_address for n in nodes})

    async def _check(self, node: NodeInfo, at_once: bool = False) -> None:
        """One health check; `at_once` (a suspect) ejects on the first failed check."""
        state = self._state(node.node_id)
        try:
            reply = await self._channel(node.grpc_address).health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self._health.timeout_s)
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            ok = False
        if ok:
            if state.ejected:
                log.info("node %s re-admitted", node.node_id)
            state.failures, state.ejected = 0, False
            await self._refresh_load(node, state)
            return
        state.failures += 1
        if (at_once or state.failures >= self._health.eject_after) and not state.ejected:
            self.eject(node.node_id, f"{state.failures} failed health checks")

    async def _refresh_load(self, node: NodeInfo, state: _NodeState) -> None:
        inflight = state.inflight
        try:
            stats = await self._channel(node.grpc_address).node.Stats(node_pb2.StatsRequest(),
                                                                      timeout=self._health.timeout_s)
        except grpc.aio.AioRpcError as e:  # a node without Stats (or a slow one): the registry's load serves
            log.debug("Stats of node %s failed: %s", node.node_id, e.code().name)
            state.stats_load = None
            return
        state.stats_load, state.stats_at = float(stats.running + stats.waiting), time.time()
        # the larger count of ours: a request sent while the call ran must not look like another router's
        state.stats_inflight = max(inflight, state.inflight)
        state.total_blocks = stats.total_blocks
        unreachable = frozenset(stats.unreachable_peer_addresses)
        if unreachable != state.unreachable_peers:
            log.info("node %s reports unreachable peers: %s", node.node_id,
                     sorted(unreachable) or "none")
        state.unreachable_peers = unreachable

    async def _forget_absent(self, live_ids: set[str], live_addresses: set[str]) -> None:
        for node_id in [i for i, s in self._states.items() if i not in live_ids and s.inflight == 0]:
            del self._states[node_id]
        for key in [k for k in self._inflight_gauges if k[0] not in self._states]:
            del self._inflight_gauges[key]
        for address in [a for a in self._channels if a not in live_addresses]:
            # in-flight calls to a node that left the registry keep their channel until the next pass
            if not any(s.inflight for s in self._states.values()):
                await self._channels.pop(address).channel.close()

    async def _health_loop(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self._health.interval_s)
