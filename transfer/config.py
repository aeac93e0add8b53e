"""Configuration of the PD data plane (one frozen dataclass, validated on creation)."""

from __future__ import annotations

from dataclasses import dataclass, field

import zmq
from zmq.utils import z85

from pdserve.common.secret import ClusterSecret

TRANSPORT_CHOICES = ("auto", "shm", "zmq")


class TransferConfigError(ValueError):
    """A transfer setting is invalid; the message names the field."""


@dataclass(frozen=True)
class CurveKeys:
    """The cluster's CURVE key pair (Z85 text), derived from the cluster secret: every node uses it as
    server and as client, and a server lets in only clients presenting this same public key, so
    holding the secret is what admits a peer. No key files need distributing."""

    public: bytes  # 40 bytes of Z85
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _require(len(self.public) == 40 and len(self.secret) == 40, "curve", "keys must be 40-byte Z85 text")

    @classmethod
    def from_cluster_secret(cls, cluster_secret: ClusterSecret) -> CurveKeys:
        # a Curve25519 secret key is any 32 bytes (the curve clamps them); the public key follows
        secret = z85.encode(cluster_secret.derive("zmq-curve"))
        return cls(public=zmq.curve_public(secret), secret=secret)


@dataclass(frozen=True)
class TransferConfig:
    transport: str = "auto"  # auto: shm when the peer shares this host and pool, else zmq
    bind_host: str = "127.0.0.1"  # the interface the inbox binds; loopback unless peers are remote
    port: int = 0  # 0: pick a free port (the inbox reports the one it got)
    advertise_host: str | None = None  # the host peers dial (None: bind_host; set it when binding 0.0.0.0)
    send_timeout_s: float = 2.0  # a send to a peer not (yet) connected, or stalled, fails after this
    # Liveness of each connection (ZMTP heartbeats): a PING every heartbeat_interval_s; no traffic
    # from the peer for heartbeat_timeout_s closes the connection (the peer is reported down), and a
    # connect attempt that gets no answer is given up and retried after the same time.
    heartbeat_interval_s: float = 0.25
    heartbeat_timeout_s: float = 1.25
    send_hwm: int = 1000  # messages queued per peer before sends block (backpressure)
    curve: CurveKeys | None = None  # None: plain TCP, any peer may connect (--insecure only)
    tune_malloc: bool = True  # reuse freed message buffers (channel.keep_message_buffers; process-wide)
    malloc_retain_bytes: int = 1 << 30  # freed heap memory glibc keeps before trimming

    def __post_init__(self) -> None:
        _require(self.transport in TRANSPORT_CHOICES, "transport", f"must be one of {TRANSPORT_CHOICES}")
        _require(bool(self.bind_host) and "/" not in self.bind_host, "bind_host", "must be a host or address")
        _require(self.advertise_host is None or bool(self.advertise_host), "advertise_host",
                 "must not be empty")
        _require(0 <= self.port <= 65535, "port", "must be in [0, 65535]")
        _require(0 < self.send_timeout_s <= 3600, "send_timeout_s", "must be in (0, 3600]")
        _require(self.send_hwm >= 1, "send_hwm", "must be >= 1")
        _require(0 < self.heartbeat_interval_s <= 60, "heartbeat_interval_s", "must be in (0, 60]")
        _require(self.heartbeat_interval_s < self.heartbeat_timeout_s <= 600, "heartbeat_timeout_s",
                 "must be in (heartbeat_interval_s, 600]")
        _require(0 < self.malloc_retain_bytes < 2**31, "malloc_retain_bytes", "must be in (0, 2**31)")


def _require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise TransferConfigError(f"transfer.{name} {why}")
