"""Per request `speculate_metrics` (FastDeploy's definitions), computed where a request's tokens are
counted: the engine (its log line) and the node server (the last chunk and the node's counters).

FastDeploy counts, per request, `accepted_tokens_per_head[i]` = decode steps that emitted more than
i tokens (head 0 is the target's own token, so it counts every decode step). From that list:

    accepted_tokens       = sum(accepted_tokens_per_head)            # tokens emitted by decode steps
    rejected_tokens       = steps * (k + 1) - accepted_tokens        # slots of the steps not filled
    accept_ratio          = 1 - steps / accepted_tokens              # share of emitted tokens from drafts
    average_accept_length = accepted_tokens / steps                  # tokens per decode step
    accept_ratio_per_head[i] = per_head[i + 1] / per_head[i]        # P(draft i+1 accepted | draft i was)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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

    def on_slot(self, preempted: bool, num_tokens: int) -> None:
        """One engine output of this request: tokens, or a preemption."""
        if preempted:
            self.on_preempted()
        else:
            self.on_tokens(num_tokens)

    def on_preempted(self) -> None:
        # The recompute prefill after a preemption emits one token that is not a decode step either.
        self._seen_first_token = False

    def metrics(self) -> SpeculateMetrics:
        return SpeculateMetrics.from_step_lengths(self.emitted_per_step, self.num_speculative_tokens)
