"""`pdserve status --spec FILE`: every router and node of a cluster spec, and its health.

A router is asked for `/health` (ready, or why not); each node for its gRPC health and Stats, at the
address and port the spec gives it; the first router's registry says which nodes it knows. The
command exits 0 only when every router is ready and every node serves and is registered.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.common.secret import ClusterSecret
from pdserve.deploy.spec import ClusterFile
from pdserve.rpc import node_pb2 as pb
from pdserve.rpc import node_pb2_grpc
from pdserve.rpc.auth import auth_metadata

TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Row:
    host: str
    name: str
    role: str
    address: str
    health: str  # router: ready / not ready / unreachable; node: SERVING / NOT_SERVING / unreachable
    registered: str = "-"
    load: str = "-"

    @property
    def ok(self) -> bool:
        return self.health in ("ready", "SERVING") and self.registered in ("-", "yes")


def collect(spec: ClusterFile) -> list[Row]:
    secret = spec.read_secret()
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    rows = [_router_row(host.name, f"{host.address}:{router.port}")
            for host, router in spec.routers]
    registered = _registered_ids(spec.router_url, headers)
    metadata = auth_metadata(ClusterSecret(secret.encode())) if secret else ()
    for host in spec.hosts:
        for node in host.nodes:
            health, load = _node_health(f"{host.address}:{node.port}", metadata)
            known = "?" if registered is None else ("yes" if node.node_id in registered else "no")
            rows.append(Row(host.name, node.node_id, node.role, f"{host.address}:{node.port}", health,
                            known, load))
    return rows


def _router_row(host: str, address: str) -> Row:
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=TIMEOUT_S) as reply:
            health = "ready" if reply.status == 200 else f"HTTP {reply.status}"
    except urllib.error.HTTPError as exc:
        health = "not ready" if exc.code == 503 else f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError):
        health = "unreachable"
    return Row(host, "router", "router", address, health)


def _registered_ids(router_url: str, headers: dict[str, str]) -> set[str] | None:
    request = urllib.request.Request(f"{router_url}/internal/v1/nodes", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
            return {n["node_id"] for n in json.load(reply)["nodes"]}
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


def _node_health(address: str, metadata: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=TIMEOUT_S)
            health = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            stats = node_pb2_grpc.NodeStub(channel).Stats(pb.StatsRequest(), timeout=TIMEOUT_S,
                                                           metadata=metadata)
        except grpc.RpcError:
            return "unreachable", "-"
    load = f"run {stats.running} wait {stats.waiting} kv {stats.kv_usage:.0%}"
    return health + (" draining" if stats.draining else ""), load


def format_rows(rows: list[Row]) -> str:
    table = [("HOST", "NAME", "ROLE", "ADDRESS", "HEALTH", "REGISTERED", "LOAD")]
    table += [(r.host, r.name, r.role, r.address, r.health, r.registered, r.load) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in table)


def run_status(spec: ClusterFile) -> int:
    rows = collect(spec)
    print(format_rows(rows))
    return 0 if all(r.ok for r in rows) else 1
