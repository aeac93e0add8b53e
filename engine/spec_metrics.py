"""Speculative-decoding metrics: per request `speculate_metrics` (FastDeploy's definitions) and
Prometheus counters per engine.

FastDeploy counts, per request, `accepted_tokens_per_head[i]` = decode steps that emitted more than
i tokens (head 0 is the target's own token, so it counts every decode step). From that list:

    accepted_tokens       = sum(accepted_tokens_per_head)            # tokens emitted by decode steps
    rejected_tokens       = steps * (k + 1) - accepted_tokens        # slots of the steps not filled
    accept_ratio          = 1 - steps / accepted_tokens              # share of emitted tokens from drafts
    average_accept_length = accepted_tokens / steps                  # tokens per decode step
    accept_ratio_per_head[i] = per_head[i + 1] / per_head[i]        # P(draft i+1 accepted | draft i was)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from pdserve.engine.output_codec import SlotEvent, SlotOutput

log = logging.getLogger("pdserve.engine.spec")


@dataclass(frozen=True)
class SpeculateMetrics:
    accepted_tokens: int
    rejected_tokens: int
    accept_ratio: float
    average_accept_length: float
    accepted_tokens_per_head: tuple[int, ...]  # k + 1 entries
    accept_ratio_per_head: tuple[float, ...]  # k entries

    @classmethod
    def from_step_lengths(
        cls, emitted_per_step: Sequence[int], num_speculative_tokens: int
    ) -> SpeculateMetrics:
        """From the number of tokens each decode step of one request emitted (1 .. k + 1)."""
        k = num_speculative_tokens
        for n in emitted_per_step:
            if not 1 <= n <= k + 1:
                raise ValueError(f"a decode step emits 1 .. {k + 1} tokens, got {n}")
        per_head = [sum(1 for n in emitted_per_step if n > i) for i in range(k + 1)]
        steps, accepted = per_head[0], sum(per_head)
        return cls(
            accepted_tokens=accepted,
            rejected_tokens=steps * (k + 1) - accepted,
            accept_ratio=1 - steps / accepted if accepted else 0.0,
            average_accept_length=accepted / steps if steps else 0.0,
            accepted_tokens_per_head=tuple(per_head),
            accept_ratio_per_head=tuple(
                per_head[i + 1] / per_head[i] if per_head[i] else 0.0 for i in range(k)
            ),
        )

    def to_json(self) -> dict[str, object]:
        return {
            "accepted_tokens": self.accepted_tokens,
            "rejected_tokens": self.rejected_tokens,
            "accept_ratio": self.accept_ratio,
            "average_accept_length": self.average_accept_length,
            "accepted_tokens_per_head": list(self.accepted_tokens_per_head),
            "accept_ratio_per_head": list(self.accept_ratio_per_head),
        }


class RequestSpecStats:
    """Accumulates one request's decode steps; the first output (its prefill) is not a decode step."""

    def __init__(self, num_speculative_tokens: int) -> None:
        self.num_speculative_tokens = num_speculative_tokens
        self.emitted_per_step: list[int] = []
        self._seen_first_token = False

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens == 0:
            return
        if not self._seen_first_token:
            # The prefill emits the first token; anything beyond it came from verified drafts.
            self._seen_first_token = True
            if num_tokens == 1:
                return
            num_tokens -= 1
        self.emitted_per_step.append(num_tokens)

    def on_slot(self, slot: SlotOutput) -> None:
        """Node-server side: one engine output slot of this request."""
        if slot.event is SlotEvent.PREEMPTED:
            self.on_preempted()
        else:
            self.on_tokens(slot.num_tokens)

    def on_preempted(self) -> None:
        # The recompute prefill after a preemption emits one token that is not a decode step either.
        self._seen_first_token = False

    def metrics(self) -> SpeculateMetrics:
        return SpeculateMetrics.from_step_lengths(self.emitted_per_step, self.num_speculative_tokens)


class SpecDecodeCounters:
    """Prometheus counters of one engine, registered in the registry the caller passes.

    The step counts into plain integers, which a collector reads when the registry is scraped: a
    prometheus_client Counter takes a lock on every ``inc``, and a step made 3 + (accepted drafts)
    of them per request (1.4 us a request in a hot loop, 0.25 now; several times that in a step,
    with cold caches). The engine thread is the only writer.
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
