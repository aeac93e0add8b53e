"""The router's Prometheus metrics, on a registry owned by one app (no process-global collectors)."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LoopHistogram:
    """A histogram without labels that only the event loop's thread observes and reads: an observation
    is a bisect and two additions, where prometheus_client's takes a lock for the sum and another for
    the bucket. The router observes one per streamed token. The registry reads it as a collector."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last: above every bound (+Inf)
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1  # Prometheus buckets are "<= le"
        self._sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative = []
        total = 0
        for bound, count in zip((*self._bounds, math.inf), self._counts, strict=True):
            total += count
            cumulative.append((floatToGoString(bound), total))
        yield HistogramMetricFamily(self._name, self._documentation, buckets=cumulative, sum_value=self._sum)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = LoopHistogram("pdserve_router_time_to_first_token_seconds",
                                  "Request arrival to the first token leaving the router",
                                  LATENCY_BUCKETS, self.registry)
        self.itl = LoopHistogram("pdserve_router_inter_token_latency_seconds",
                                 "Time per output token after the first (TPOT/ITL), per chunk and token",
                                 ITL_BUCKETS, self.registry)
        self.e2e = LoopHistogram("pdserve_router_e2e_request_latency_seconds",
                                 "Request arrival to its last byte", LATENCY_BUCKETS, self.registry)
        self.requests = Counter("pdserve_router_requests", "Finished requests by HTTP status",
                                ["status"], registry=self.registry)
        self.node_inflight = Gauge("pdserve_router_node_inflight", "Requests the router has on a node",
                                   ["node_id", "role"], registry=self.registry)
        self.retries = Counter("pdserve_router_retries", "Tries that failed before the first token",
                               registry=self.registry)
        self.registry_rejections = Counter("pdserve_router_registry_rejections",
                                           "Registry heartbeats and entries refused, by reason",
                                           ["reason"], registry=self.registry)
        self.failures = Counter("pdserve_router_failures", "Failed tries and streams by cause",
                                ["cause"], registry=self.registry)
        self.migrations = Counter("pdserve_router_migrations",
                                  "Streams continued on another node pair after failing mid-way, by cause",
                                  ["cause"], registry=self.registry)
        self.migration_latency = Histogram("pdserve_router_migration_latency_seconds",
                                           "A mid-stream failure to the continuation's first chunk",
                                           buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ejections = Counter("pdserve_router_node_ejections", "Nodes taken out of rotation",
                                 registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
