"""HTTP/2 keepalive on the router's channels to the nodes: how a stream notices that its node stopped.

A node that is stopped (SIGSTOP, a hung host) or cut off by the network sends nothing, and nothing
tells the router: TCP stays up, and a token stream may be legitimately silent for seconds (a long
prefill ahead of it). The router therefore pings every node connection while it has calls on it; a
ping that gets no answer within the timeout closes the connection, which fails every call on it with
UNAVAILABLE (the decode node unreachable: router/blame.py) at once, and the router continues those
streams elsewhere (router/dispatch.py, migration). A live but busy node answers pings from gRPC's core
without its Python code, so load does not look like death.

gRPC servers refuse frequent pings by default (a GOAWAY "too_many_pings" after two that arrive less
than five minutes apart while the server sends no data, which would kill the very streams that are
waiting on a long prefill), so the node server accepts them: both ends are pdserve.
"""

from __future__ import annotations

# the shortest interval between pings a node server accepts; the router's may not go below it
MIN_PING_INTERVAL_S = 0.1

# A node pings its clients too, more slowly: when the router is cut off, the node's streams to it are
# cancelled (their requests aborted, their KV freed) instead of generating into a dead connection.
SERVER_PING_INTERVAL_S = 2.0
SERVER_PING_TIMEOUT_S = 2.0

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.http2.min_ping_interval_without_data_ms", int(MIN_PING_INTERVAL_S * 1000)),
    ("grpc.http2.max_ping_strikes", 0),  # 0: never GOAWAY a client for its ping rate
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.keepalive_time_ms", int(SERVER_PING_INTERVAL_S * 1000)),
    ("grpc.keepalive_timeout_ms", int(SERVER_PING_TIMEOUT_S * 1000)),
    ("grpc.http2.ping_timeout_ms", int(SERVER_PING_TIMEOUT_S * 1000)),
    ("grpc.http2.max_pings_without_data", 0),
)


def client_options(interval_s: float, timeout_s: float) -> tuple[tuple[str, int], ...]:
    """Channel options that ping every ``interval_s`` while calls are open and close the connection
    when a ping is unanswered for ``timeout_s``."""
    if interval_s < MIN_PING_INTERVAL_S:
        raise ValueError(f"ping interval {interval_s} s is below the {MIN_PING_INTERVAL_S} s nodes accept")
    return (
        ("grpc.keepalive_time_ms", int(interval_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
        # gRPC's own ping deadline (60 s by default) would otherwise outlast the keepalive timeout
        ("grpc.http2.ping_timeout_ms", int(timeout_s * 1000)),
        # a server stream's client sends no data after its request: without this, pinging stops
        # after two pings, exactly while a stream waits on a silent node
        ("grpc.http2.max_pings_without_data", 0),
    )
