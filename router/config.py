"""Router configuration: one frozen dataclass per concern, validated on creation (errors name the field)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pdserve.models
from pdserve.common.secret import ClusterSecret, require_secret_or_insecure
from pdserve.router.tool_calls import TOOL_CALL_PARSERS
from pdserve.rpc.keepalive import MIN_PING_INTERVAL_S
from pdserve.rpc.registry import RegistryAuth

POLICY_NAMES = ("round_robin", "random", "power_of_two", "prefix_aware")
ROUTED_ROLES = ("prefill", "decode")  # the decode policy also picks among mixed nodes


class RouterConfigError(ValueError):
    """A router setting is out of range; the message names the field."""


def _check(checks: list[tuple[str, bool, str]], owner: object) -> None:
    for name, ok, why in checks:
        if not ok:
            raise RouterConfigError(f"{name} {why} (got {getattr(owner, name)!r})")


def default_model_dir() -> Path:
    # the bundled demo; computed here rather than imported from models.loader, which imports paddle
    return Path(pdserve.models.__file__).resolve().parent / "demo"


@dataclass(frozen=True)
class AdmissionConfig:
    """Static ceilings; the cluster's reported capacity lowers them (router/admission.py)."""

    max_inflight_requests: int = 256  # node requests (one per choice) in flight
    max_queued_requests: int = 512  # waiting for a slot; beyond this (or queue_per_slot): 429 at once
    queue_per_slot: float = 1.0  # the queue holds at most this many requests per cluster slot
    max_inflight_tokens: int = 1 << 20  # sum of prompt + max_tokens over inflight requests
    queue_timeout_s: float = 30.0  # a queued request that waits longer gets a 429
    retry_after_s: int = 1  # the Retry-After header of 429 / 503 answers
    keepalive_s: float = 2.0  # a stream waiting for admission or its first token gets ": keepalive"
    kv_overcommit: float = 1.0  # admitted prompt + max_tokens may reach this many times the nodes' KV

    def __post_init__(self) -> None:
        _check([
            ("max_inflight_requests", self.max_inflight_requests >= 1, "must be >= 1"),
            ("max_queued_requests", self.max_queued_requests >= 0, "must be >= 0"),
            ("queue_per_slot", self.queue_per_slot >= 0, "must be >= 0"),
            ("keepalive_s", 0 < self.keepalive_s <= 5, "must be in (0, 5]"),
            ("kv_overcommit", self.kv_overcommit > 0, "must be > 0"),
            ("max_inflight_tokens", self.max_inflight_tokens >= 1, "must be >= 1"),
            ("queue_timeout_s", self.queue_timeout_s > 0, "must be > 0"),
            ("retry_after_s", self.retry_after_s >= 0, "must be >= 0"),
        ], self)


@dataclass(frozen=True)
class RetryConfig:
    """Retries happen only before the first token reached the client."""

    attempts: int = 3  # total tries, the first included
    backoff_s: float = 0.05  # doubled after each failed try
    max_backoff_s: float = 1.0
    first_chunk_timeout_s: float = 120.0  # no first chunk by then: the try failed
    chunk_timeout_s: float = 60.0  # silence between two chunks after the first: the stream fails
    # a stream that fails after its first token for a cause not its own continues on another pair,
    # at most this many times (0: such a stream fails)
    migrations: int = 3

    def __post_init__(self) -> None:
        _check([
            ("attempts", self.attempts >= 1, "must be >= 1"),
            ("backoff_s", self.backoff_s >= 0, "must be >= 0"),
            ("max_backoff_s", self.max_backoff_s >= self.backoff_s, "must be >= backoff_s"),
            ("first_chunk_timeout_s", self.first_chunk_timeout_s > 0, "must be > 0"),
            ("chunk_timeout_s", self.chunk_timeout_s > 0, "must be > 0"),
            ("migrations", self.migrations >= 0, "must be >= 0"),
        ], self)


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 2.0  # between grpc.health.v1 checks of each node
    timeout_s: float = 1.0
    eject_after: int = 2  # consecutive failed checks before a node gets no traffic
    # HTTP/2 pings on each node connection while it has calls (rpc/keepalive.py): a node that leaves
    # one unanswered for ping_timeout_s fails its streams at once, and they migrate
    ping_interval_s: float = 0.25
    ping_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        _check([
            ("interval_s", self.interval_s > 0, "must be > 0"),
            ("timeout_s", self.timeout_s > 0, "must be > 0"),
            ("eject_after", self.eject_after >= 1, "must be >= 1"),
            ("ping_interval_s", self.ping_interval_s >= MIN_PING_INTERVAL_S,
             f"must be >= {MIN_PING_INTERVAL_S} (what nodes accept)"),
            ("ping_timeout_s", self.ping_timeout_s > 0, "must be > 0"),
        ], self)


@dataclass(frozen=True)
class RegistryConfig:
    backend: str = "embedded"  # "embedded" or a redis:// URL
    heartbeat_ttl_s: float = 10.0  # an entry not renewed within this is gone
    sync_interval_s: float = 1.0  # how often a Redis-backed router re-reads the shared view
    redis_timeout_s: float = 0.5

    def __post_init__(self) -> None:
        _check([
            ("backend", self.backend == "embedded" or self.backend.startswith(("redis://", "rediss://")),
             "must be 'embedded' or a redis:// URL"),
            ("heartbeat_ttl_s", self.heartbeat_ttl_s > 0, "must be > 0"),
            ("sync_interval_s", self.sync_interval_s > 0, "must be > 0"),
            ("redis_timeout_s", self.redis_timeout_s > 0, "must be > 0"),
        ], self)

    @property
    def is_redis(self) -> bool:
        return self.backend != "embedded"


@dataclass(frozen=True)
class PolicyConfig:
    prefill: str = "prefix_aware"
    decode: str = "power_of_two"
    prefix_tokens: int = 256  # prefix_aware hashes the first this many tokens, block-aligned
    block_size: int = 16

    def __post_init__(self) -> None:
        _check([
            ("prefill", self.prefill in POLICY_NAMES, f"must be one of {POLICY_NAMES}"),
            ("decode", self.decode in POLICY_NAMES, f"must be one of {POLICY_NAMES}"),
            ("prefix_tokens", self.prefix_tokens >= 1, "must be >= 1"),
            ("block_size", self.block_size >= 1, "must be >= 1"),
        ], self)


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the bound one is printed / exposed)
    model_name: str = "pdserve-demo"
    model_dir: Path = field(default_factory=default_model_dir)  # tokenizer, chat template, max length
    max_model_len: int | None = None  # None: config.json's max_position_embeddings
    # repr=False: keys must never reach a log line through a printed config
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_body_bytes: int = 4 << 20  # larger request bodies get a 413
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    log_level: str = "warning"
    # how tool calls are written in this model's output (router/tool_calls.py); None: tools are refused
    tool_call_parser: str | None = None
    # processes serving the port (SO_REUSEPORT), each with its own event loop, node channels and
    # admission limits; with the embedded registry they share one view through files on /dev/shm
    workers: int = 1
    # SIGTERM: new requests get 503 while in-flight ones finish, for at most this long
    drain_timeout_s: float = 30.0
    # signs node RPC calls and authenticates registry entries; None only with insecure=True
    cluster_secret: ClusterSecret | None = field(default=None, repr=False)
    insecure: bool = False

    def __post_init__(self) -> None:
        _check([
            ("drain_timeout_s", self.drain_timeout_s >= 0, "must be >= 0"),
            ("port", 0 <= self.port <= 65535, "must be in [0, 65535]"),
            ("workers", 1 <= self.workers <= 64, "must be in [1, 64]"),
            ("model_name", bool(self.model_name), "must be non-empty"),
            ("model_dir", Path(self.model_dir).is_dir(), "must be an existing directory"),
            ("max_model_len", self.max_model_len is None or self.max_model_len >= 2, "must be >= 2"),
            ("max_body_bytes", self.max_body_bytes >= 1024, "must be >= 1024"),
            ("tool_call_parser", self.tool_call_parser is None or self.tool_call_parser in TOOL_CALL_PARSERS,
             f"must be one of {', '.join(sorted(TOOL_CALL_PARSERS))}"),
        ], self)
        if not all(isinstance(k, str) and k for k in self.api_keys):
            raise RouterConfigError("api_keys must be non-empty strings")  # never echo a key
        require_secret_or_insecure(self.cluster_secret, self.insecure, "the router")

    def registry_auth(self) -> RegistryAuth:
        """A fresh one per registry (it carries that registry's rejection counter)."""
        return RegistryAuth(self.cluster_secret, max_age_s=self.registry.heartbeat_ttl_s)
