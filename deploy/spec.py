"""The cluster spec: one YAML file that says which host runs which pdserve processes.

    name: demo                       # the cluster's name: node ids and systemd units carry it
    model: null                      # HF model directory, the same path on every host (null: bundled demo)
    model_name: pdserve-demo         # the model id clients ask for
    speculative_config: {method: mtp, num_speculative_tokens: 1}   # FastDeploy's JSON, every node
    registry: embedded               # the router's own registry, or redis://ADDRESS:PORT/DB
    secret: {file: /etc/pdserve/secret}   # or {env: VARIABLE}; required unless `insecure: true`
    drain_timeout_s: 30              # after SIGTERM, how long in-flight requests may take to finish
    engine_stall_timeout_s: 30       # a node kills its engine when it sends nothing this long
    hosts:
      r1: {address: 10.0.0.1, router: {port: 8000}}
      p1:
        address: 10.0.0.2
        nodes:
          - {role: prefill, port: 7001, data_port: 7002, threads: 2, cpus: "0-1", transport: zmq}
      d1:
        address: 10.0.0.3
        nodes:
          - {role: decode, port: 7001, data_port: 7002, metrics_port: 9100, threads: 2}

The secret is the cluster secret every router and node holds (it authenticates the KV data plane,
prefill tasks, registry entries and node RPCs); the router also takes it as its API key (clients and
node registration alike). Children get the file's path or the variable's name, never the value. A
spec without a secret must say `insecure: true`: the cluster then runs unauthenticated.

Every field is checked when the file is read; an error names the field (``hosts.p1.nodes[0].role``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pdserve.engine.protocol import STATS_MAX_INTERVAL_S

ROLES = ("prefill", "decode", "mixed")
TRANSPORTS = ("auto", "shm", "zmq")
_CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SpecError(ValueError):
    """The spec file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class SecretSource:
    """Where the cluster secret comes from: a file (its content, stripped) or an environment variable."""

    file: str | None = None
    env: str | None = None

    def read(self) -> str:
        if self.file is not None:
            try:
                value = Path(self.file).read_text().strip()
            except OSError as exc:
                raise SpecError(f"secret.file: cannot read {self.file}: {exc.strerror}") from exc
            where = f"file {self.file}"
        else:
            value = os.environ.get(self.env or "", "").strip()
            where = f"environment variable {self.env}"
        if not value:
            raise SpecError(f"secret: {where} is empty or unset")
        return value


@dataclass(frozen=True)
class RouterSpec:
    port: int = 8000


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    role: str
    port: int  # gRPC; fixed so `status`, probes and firewalls know it
    data_port: int = 0  # KV data plane (0: any free port, announced through the registry)
    metrics_port: int | None = None
    threads: int = 1  # OMP threads of the engine process
    cpus: str | None = None  # taskset CPU list for the node's processes, e.g. "0-3"
    devices: tuple[int, ...] = ()  # CUDA_VISIBLE_DEVICES (no GPU path has run: docs/gpu.md)
    transport: str = "auto"  # how a prefill node sends KV: auto (shm on the same host) | shm | zmq
    num_blocks: int = 1024
    max_num_seqs: int = 64


@dataclass(frozen=True)
class HostSpec:
    name: str
    address: str  # every process of the host binds here
    router: RouterSpec | None = None
    nodes: tuple[NodeSpec, ...] = ()


@dataclass(frozen=True)
class ClusterFile:
    """A parsed, checked cluster spec."""

    path: Path
    name: str
    hosts: tuple[HostSpec, ...]
    model: str | None = None
    model_name: str = "pdserve-demo"
    speculative_config: str | None = None  # JSON text, as the node flag takes it
    registry: str = "embedded"
    secret: SecretSource | None = field(default=None, repr=False)
    insecure: bool = False  # no secret: every process runs with --insecure
    drain_timeout_s: float = 30.0
    engine_stall_timeout_s: float = 30.0
    startup_timeout_s: float = 180.0
    log_level: str = "WARNING"

    def host(self, name: str) -> HostSpec:
        for host in self.hosts:
            if host.name == name:
                return host
        known = ", ".join(h.name for h in self.hosts)
        raise SpecError(f"{self.path}: no host {name!r} in hosts (hosts: {known})")

    @property
    def routers(self) -> list[tuple[HostSpec, RouterSpec]]:
        return [(h, h.router) for h in self.hosts if h.router is not None]

    @property
    def router_url(self) -> str:
        """The first router's base URL (the one an embedded registry lives in)."""
        host, router = self.routers[0]
        return f"http://{host.address}:{router.port}"

    @property
    def registry_target(self) -> str:
        """What nodes register with: the router's URL for an embedded registry, else Redis."""
        return self.router_url if self.registry == "embedded" else self.registry

    def read_secret(self) -> str | None:
        return self.secret.read() if self.secret is not None else None


def load_spec(path: str | Path) -> ClusterFile:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    return parse_spec(data, path)


def parse_spec(data: Any, path: Path) -> ClusterFile:
    c = _Checker(path)
    top = c.mapping(data, "", required={"name", "hosts"},
                    optional={"model", "model_name", "speculative_config", "registry", "secret",
                              "insecure", "drain_timeout_s", "engine_stall_timeout_s", "startup_timeout_s",
                              "log_level"})
    name = c.name(top["name"], "name")
    registry = c.string(top.get("registry", "embedded"), "registry")
    if not (registry == "embedded" or registry.startswith(("redis://", "rediss://"))):
        c.fail("registry", f"must be 'embedded' or a redis:// URL (got {registry!r})")
    hosts_data = c.mapping(top["hosts"], "hosts")
    if not hosts_data:
        c.fail("hosts", "must list at least one host")
    hosts = tuple(_parse_host(c, name, host_name, body) for host_name, body in hosts_data.items())
    spec = ClusterFile(
        path=path, name=name, hosts=hosts,
        model=c.optional_string(top.get("model"), "model"),
        model_name=c.string(top.get("model_name", "pdserve-demo"), "model_name"),
        speculative_config=_parse_speculative(c, top.get("speculative_config")),
        registry=registry,
        secret=_parse_secret(c, top.get("secret")),
        insecure=_parse_insecure(c, top.get("insecure", False), top.get("secret")),
        drain_timeout_s=c.positive(top.get("drain_timeout_s", 30.0), "drain_timeout_s"),
        engine_stall_timeout_s=_parse_stall_timeout(c, top.get("engine_stall_timeout_s", 30.0)),
        startup_timeout_s=c.positive(top.get("startup_timeout_s", 180.0), "startup_timeout_s"),
        log_level=c.choice(top.get("log_level", "WARNING"), "log_level",
                           ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
    )
    _check_cluster(c, spec)
    return spec


def _parse_stall_timeout(c: _Checker, value: Any) -> float:
    seconds = c.positive(value, "engine_stall_timeout_s")
    if not STATS_MAX_INTERVAL_S < seconds <= 3600:  # a running engine is never silent longer
        c.fail("engine_stall_timeout_s", f"must be in ({STATS_MAX_INTERVAL_S}, 3600] (got {seconds})")
    return seconds


def _parse_host(c: _Checker, cluster: str, name: Any, body: Any) -> HostSpec:
    where = f"hosts.{name}"
    c.name(name, where)
    host = c.mapping(body, where, required={"address"}, optional={"router", "nodes"})
    address = c.string(host["address"], f"{where}.address")
    if not _NAME.match(address.replace(":", "")):
        c.fail(f"{where}.address", f"must be an IP address or host name (got {address!r})")
    router = None
    if host.get("router") is not None:
        r = c.mapping(host["router"], f"{where}.router", optional={"port"})
        router = RouterSpec(port=c.port(r.get("port", 8000), f"{where}.router.port"))
    nodes_data = host.get("nodes") or []
    if not isinstance(nodes_data, list):
        c.fail(f"{where}.nodes", "must be a list of nodes")
    counts: dict[str, int] = {}
    nodes = []
    for i, node in enumerate(nodes_data):
        nodes.append(_parse_node(c, f"{where}.nodes[{i}]", cluster, name, node, counts))
    if router is None and not nodes:
        c.fail(where, "runs nothing: give it a router or nodes")
    return HostSpec(name=name, address=address, router=router, nodes=tuple(nodes))


def _parse_node(c: _Checker, where: str, cluster: str, host: str, body: Any,
                counts: dict[str, int]) -> NodeSpec:
    n = c.mapping(body, where, required={"role", "port"},
                  optional={"name", "data_port", "metrics_port", "threads", "cpus", "devices", "transport",
                            "num_blocks", "max_num_seqs"})
    role = c.choice(n["role"], f"{where}.role", ROLES)
    index = counts.get(role, 0)
    counts[role] = index + 1
    cpus = n.get("cpus")
    if cpus is not None:
        cpus = str(cpus)
        if not _CPU_LIST.match(cpus):
            c.fail(f"{where}.cpus", f"must be a CPU list like '0-3' or '0,2' (got {cpus!r})")
    devices = n.get("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in devices):
        c.fail(f"{where}.devices", f"must be a list of GPU indices (got {devices!r})")
    metrics_port = n.get("metrics_port")
    return NodeSpec(
        node_id=c.name(n.get("name", f"{cluster}-{host}-{role}-{index}"), f"{where}.name"),
        role=role,
        port=c.port(n["port"], f"{where}.port"),
        data_port=c.port(n.get("data_port", 0), f"{where}.data_port", allow_zero=True),
        metrics_port=None if metrics_port is None else c.port(metrics_port, f"{where}.metrics_port"),
        threads=c.positive_int(n.get("threads", 1), f"{where}.threads"),
        cpus=cpus,
        devices=tuple(devices),
        transport=c.choice(n.get("transport", "auto"), f"{where}.transport", TRANSPORTS),
        num_blocks=c.positive_int(n.get("num_blocks", 1024), f"{where}.num_blocks"),
        max_num_seqs=c.positive_int(n.get("max_num_seqs", 64), f"{where}.max_num_seqs"),
    )


def _parse_speculative(c: _Checker, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            c.fail("speculative_config", f"not valid JSON: {exc}")
    if not isinstance(value, dict):
        c.fail("speculative_config", "must be a mapping (FastDeploy's speculative config)")
    text = json.dumps(value)
    from pdserve.engine.spec_config import SpeculativeConfig

    try:
        SpeculativeConfig.from_json(text)
    except ValueError as exc:
        c.fail("speculative_config", str(exc))
    return text


def _parse_insecure(c: _Checker, value: Any, secret: Any) -> bool:
    if not isinstance(value, bool):
        c.fail("insecure", f"must be true or false (got {value!r})")
    if value and secret is not None:
        c.fail("insecure", "a cluster with a secret cannot be insecure: drop one of them")
    if not value and secret is None:
        c.fail("secret", "required: {file: PATH} or {env: VARIABLE} (or `insecure: true` to run the "
                         "cluster without authentication)")
    return value


def _parse_secret(c: _Checker, value: Any) -> SecretSource | None:
    if value is None:
        return None
    s = c.mapping(value, "secret", optional={"file", "env"})
    if len(s) != 1:
        c.fail("secret", "must name exactly one source: {file: PATH} or {env: VARIABLE}")
    if "file" in s:
        return SecretSource(file=c.string(s["file"], "secret.file"))
    return SecretSource(env=c.string(s["env"], "secret.env"))


def _check_cluster(c: _Checker, spec: ClusterFile) -> None:
    """Constraints across hosts: a router to register with, a usable P/D set, no clashing names or ports."""
    if not spec.routers:
        c.fail("hosts", "no host runs a router (add `router: {port: 8000}` to one)")
    if spec.registry == "embedded" and len(spec.routers) > 1:
        c.fail("registry", "an embedded registry lives in one router: several routers need redis://")
    roles = [n.role for h in spec.hosts for n in h.nodes]
    if roles.count("decode") + roles.count("mixed") == 0:
        c.fail("hosts", "the cluster needs at least one decode or mixed node")
    if "decode" in roles and "prefill" not in roles:
        c.fail("hosts", "decode nodes need at least one prefill node")
    seen_ids: dict[str, str] = {}
    bound: dict[tuple[str, int], str] = {}
    for host in spec.hosts:
        taken = [(f"hosts.{host.name}.router.port", host.router.port)] if host.router else []
        for i, node in enumerate(host.nodes):
            where = f"hosts.{host.name}.nodes[{i}]"
            if node.node_id in seen_ids:
                c.fail(f"{where}.name", f"node id {node.node_id!r} is also {seen_ids[node.node_id]}")
            seen_ids[node.node_id] = where
            taken += [(f"{where}.port", node.port), (f"{where}.data_port", node.data_port),
                      (f"{where}.metrics_port", node.metrics_port or 0)]
        for where, port in taken:
            if port == 0:
                continue
            key = (host.address, port)
            if key in bound:
                c.fail(where, f"port {port} on {host.address} is also {bound[key]}")
            bound[key] = where


class _Checker:
    """Field checks that raise SpecError naming the file and the field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, message: str) -> None:
        raise SpecError(f"{self.path}: {where or 'the file'}: {message}")

    def mapping(self, value: Any, where: str, required: set[str] = frozenset(),
                optional: set[str] | None = None) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"must be a mapping (got {type(value).__name__})")
        missing = sorted(required - set(value))
        if missing:
            self.fail(where, f"missing {', '.join(missing)}")
        if optional is not None:
            unknown = sorted(set(value) - required - optional)
            if unknown:
                self.fail(f"{where}.{unknown[0]}" if where else unknown[0],
                          f"unknown field (known: {', '.join(sorted(required | optional))})")
        return value

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(where, f"must be a non-empty string (got {value!r})")
        return value

    def optional_string(self, value: Any, where: str) -> str | None:
        return None if value is None else self.string(value, where)

    def name(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not _NAME.match(value):
            self.fail(where, f"must be a name of letters, digits, '.', '_' or '-' (got {value!r})")
        return value

    def choice(self, value: Any, where: str, options: tuple[str, ...]) -> str:
        if value not in options:
            self.fail(where, f"must be one of {', '.join(options)} (got {value!r})")
        return value

    def positive_int(self, value: Any, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            self.fail(where, f"must be an integer >= 1 (got {value!r})")
        return value

    def positive(self, value: Any, where: str) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            self.fail(where, f"must be a number > 0 (got {value!r})")
        return float(value)

    def port(self, value: Any, where: str, allow_zero: bool = False) -> int:
        low = 0 if allow_zero else 1
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 65535:
            self.fail(where, f"must be a port in [{low}, 65535] (got {value!r})")
        return value
