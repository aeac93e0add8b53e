"""Engine configuration: small frozen dataclasses, validated on creation.

Each component gets only the part it uses: the `BlockManager` takes `CacheConfig.num_blocks` and
`CacheConfig.block_size`, the `Scheduler` takes a `SchedulerConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.spec_config import SpeculativeConfig


class EngineConfigError(ValueError):
    """An engine configuration field is out of range; the message names the field."""


def _check(checks: list[tuple[str, bool, str]], owner: object) -> None:
    for name, ok, why in checks:
        if not ok:
            raise EngineConfigError(f"{type(owner).__name__}.{name} {why} (got {getattr(owner, name)!r})")


@dataclass(frozen=True)
class CacheConfig:
    """Shape of the paged KV pool (the number of blocks, not bytes: the runner sizes the tensors)."""

    num_blocks: int
    block_size: int = 16

    def __post_init__(self) -> None:
        _check([
            ("num_blocks", self.num_blocks >= 1, "must be >= 1"),
            ("block_size", self.block_size >= 1, "must be >= 1"),
        ], self)



@dataclass(frozen=True)
class SchedulerConfig:
    """What the scheduler may put into one step.

    `max_num_batched_tokens` is the per-step token budget shared by decodes (1 + drafts each) and
    prefill chunks; `max_num_seqs` caps the running batch.
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int = 4096  # prompt + output tokens of one request
    # Split prompts longer than the remaining budget across steps. Off: a prompt is scheduled only
    # when it fits whole, so max_num_batched_tokens must cover max_model_len.
    enable_chunked_prefill: bool = True
    # Cap on one prefill chunk (0 = no cap), so several prompts can share a step's budget.
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        _check([
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 1, "must be >= 1"),
            ("max_num_seqs", self.max_num_seqs >= 1, "must be >= 1"),
            ("max_model_len", self.max_model_len >= 2, "must be >= 2 (one prompt token, one output)"),
            ("long_prefill_token_threshold", self.long_prefill_token_threshold >= 0, "must be >= 0"),
            ("max_num_batched_tokens",
             self.enable_chunked_prefill or self.max_num_batched_tokens >= self.max_model_len,
             "must be >= max_model_len when chunked prefill is off"),
        ], self)


@dataclass(frozen=True)
class EngineConfig:
    """One engine's configuration: the KV pool, the scheduler and (optionally) speculative decoding."""

    cache: CacheConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        # A decode step feeds 1 + drafts tokens and must fit the step's budget on its own.
        if self.num_speculative_tokens >= self.scheduler.max_num_batched_tokens:
            raise EngineConfigError(
                f"speculative_config.num_speculative_tokens must be < SchedulerConfig.max_num_batched_tokens "
                f"({self.scheduler.max_num_batched_tokens}) (got {self.num_speculative_tokens})")

    @property
    def num_speculative_tokens(self) -> int:
        """Drafts a decode step may verify: the speculative config's k (0 without speculation). The
        scheduler feeds them and the proposer makes them, so both take it from here."""
        return self.speculative.num_speculative_tokens if self.speculative else 0
