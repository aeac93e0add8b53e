"""The router's loop-only histogram exposes what prometheus_client's Histogram would for the same
observations (bucket edges included), so dashboards and alerts read it unchanged."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from pdserve.router.metrics import ITL_BUCKETS, LATENCY_BUCKETS, LoopHistogram


def _exposition(registry: CollectorRegistry) -> list[str]:
    # prometheus_client's own histogram adds a _created sample (its creation time); ours has none
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_the_loop_histogram_renders_as_prometheus_clients_histogram() -> None:
    rng = random.Random(7)
    for buckets in (ITL_BUCKETS, LATENCY_BUCKETS):
        reference, ours = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
        expected = Histogram("pdserve_test_seconds", "a test histogram", buckets=buckets, registry=reference)
        actual = LoopHistogram("pdserve_test_seconds", "a test histogram", buckets, ours)
        # values on the edges (a bucket is "<= le"), zero, past the last edge, and in between
        values = [*buckets, 0.0, buckets[-1] * 2, *(rng.expovariate(1 / buckets[3]) for _ in range(500))]
        for value in values:
            expected.observe(value)
            actual.observe(value)
        assert _exposition(ours) == _exposition(reference)
        assert f'pdserve_test_seconds_bucket{{le="+Inf"}} {float(len(values))}' in _exposition(ours)
