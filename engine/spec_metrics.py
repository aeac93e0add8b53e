"""Prometheus counters of speculative decoding, per engine, and the per-request log line."""


from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from pdserve.common.spec_metrics import SpeculateMetrics

log = logging.getLogger("pdserve.engine.spec")


class SpecDecodeCounters:
    """Prometheus counters of one engine, registered in the registry the caller passes.

    The step counts into plain integers, which a collector reads when the registry is scraped: a
    prometheus_client Counter takes a lock on every ``inc``, and a step would make 3 + (accepted
    drafts) of them per request (1.4 us a request in a hot loop against 0.25 for plain integers;
    several times that in a step, with cold caches). The engine thread is the only writer.
    """

    def __init__(self, registry: CollectorRegistry, num_speculative_tokens: int) -> None:
        self.num_drafts = 0  # decode steps that verified at least one draft
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_position = [0] * num_speculative_tokens
        registry.register(_SpecDecodeCollector(self))

    def on_verified(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        per_position = self.accepted_per_position
        for position in range(num_accepted):
            per_position[position] += 1


class _SpecDecodeCollector(Collector):
    def __init__(self, counters: SpecDecodeCounters) -> None:
        self.counters = counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        c = self.counters
        yield CounterMetricFamily("pdserve_spec_decode_num_draft_tokens", "Draft tokens verified",
                                  value=c.num_draft_tokens)
        yield CounterMetricFamily("pdserve_spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                  value=c.num_accepted_tokens)
        yield CounterMetricFamily("pdserve_spec_decode_num_drafts",
                                  "Decode steps that verified at least one draft", value=c.num_drafts)
        per_position = CounterMetricFamily("pdserve_spec_decode_num_accepted_tokens_per_pos",
                                           "Draft tokens accepted, by draft position", labels=["position"])
        for position, count in enumerate(list(c.accepted_per_position)):
            per_position.add_metric([str(position)], count)
        yield per_position


def log_finished(request_id: str, metrics: SpeculateMetrics) -> None:
    log.debug(
        "spec decode request=%s accepted=%d rejected=%d accept_ratio=%.3f avg_accept_len=%.3f per_head=%s",
        request_id,
        metrics.accepted_tokens,
        metrics.rejected_tokens,
        metrics.accept_ratio,
        metrics.average_accept_length,
        list(metrics.accepted_tokens_per_head),
    )
