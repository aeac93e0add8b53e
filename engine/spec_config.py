"""Speculative decoding configuration: FastDeploy's JSON, validated once at startup.

    {"method": "mtp" | "ngram", "num_speculative_tokens": k, "num_model_steps": s,
     "mtp_strategy": "default" | "with_ngram", "max_ngram_size": 5, "min_ngram_size": 2}

`mtp` with `with_ngram` is the hybrid: the MTP layer drafts `num_model_steps` tokens and the n-gram
match over prompt + output extends them to `num_speculative_tokens`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

METHODS = ("mtp", "ngram")
MTP_STRATEGIES = ("default", "with_ngram")
MAX_SPECULATIVE_TOKENS = 5
MAX_MODEL_STEPS = 5


class SpeculativeConfigError(ValueError):
    """A speculative-config field is missing, unknown or out of range; the message names it."""


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    num_model_steps: int = 1  # MTP substeps per decode step (mtp only)
    mtp_strategy: str = "default"
    max_ngram_size: int = 5
    min_ngram_size: int = 2
    # Drafts one step may verify over the whole batch (n-gram drafts are cheap to make, not to verify).
    max_batch_draft_tokens: int = 128

    def __post_init__(self) -> None:
        checks = [
            ("method", self.method in METHODS, f"must be one of {', '.join(METHODS)}"),
            (
                "num_speculative_tokens",
                _is_int(self.num_speculative_tokens)
                and 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS,
                f"must be an integer in [1, {MAX_SPECULATIVE_TOKENS}]",
            ),
            (
                "num_model_steps",
                _is_int(self.num_model_steps) and 1 <= self.num_model_steps <= MAX_MODEL_STEPS,
                f"must be an integer in [1, {MAX_MODEL_STEPS}]",
            ),
            (
                "mtp_strategy",
                self.mtp_strategy in MTP_STRATEGIES,
                f"must be one of {', '.join(MTP_STRATEGIES)}",
            ),
            ("min_ngram_size", _is_int(self.min_ngram_size) and self.min_ngram_size >= 1, "must be >= 1"),
            (
                "max_ngram_size",
                _is_int(self.max_ngram_size) and self.max_ngram_size >= self.min_ngram_size,
                "must be >= min_ngram_size",
            ),
            (
                "max_batch_draft_tokens",
                _is_int(self.max_batch_draft_tokens) and self.max_batch_draft_tokens >= 1,
                "must be >= 1",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise SpeculativeConfigError(f"speculative_config.{name} {why} (got {getattr(self, name)!r})")
        self._check_combination()

    def _check_combination(self) -> None:
        if self.method == "ngram" and (self.num_model_steps != 1 or self.mtp_strategy != "default"):
            field = "num_model_steps" if self.num_model_steps != 1 else "mtp_strategy"
            raise SpeculativeConfigError(f"speculative_config.{field} applies to method 'mtp' only")
        if self.method == "mtp" and self.num_model_steps > self.num_speculative_tokens:
            raise SpeculativeConfigError(
                f"speculative_config.num_model_steps ({self.num_model_steps}) must be <= "
                f"num_speculative_tokens ({self.num_speculative_tokens})"
            )
        if (
            self.method == "mtp"
            and self.mtp_strategy == "default"
            and self.num_model_steps != self.num_speculative_tokens
        ):
            # Without the n-gram extension, MTP makes exactly one draft per substep.
            raise SpeculativeConfigError(
                f"speculative_config.num_speculative_tokens ({self.num_speculative_tokens}) must equal "
                f"num_model_steps ({self.num_model_steps}) for mtp_strategy 'default'"
            )

    @property
    def uses_mtp(self) -> bool:
        return self.method == "mtp"

    @property
    def proposer_name(self) -> str:
        """The registry key of the draft proposer this config selects."""
        if self.method == "ngram":
            return "ngram"
        return "hybrid" if self.mtp_strategy == "with_ngram" else "mtp"

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> SpeculativeConfig:
        if not isinstance(values, dict):
            raise SpeculativeConfigError("speculative_config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SpeculativeConfigError(f"speculative_config.{unknown[0]} is not a known field")
        for name in ("method", "num_speculative_tokens"):
            if name not in values:
                raise SpeculativeConfigError(f"speculative_config.{name} is required")
        if (
            values.get("method") == "mtp"
            and values.get("mtp_strategy", "default") == "default"
            and "num_model_steps" not in values
        ):
            # Plain MTP drafts one token per substep, so k alone says how many substeps run.
            values = {**values, "num_model_steps": values["num_speculative_tokens"]}
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, text: str) -> SpeculativeConfig:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpeculativeConfigError(f"speculative_config is not valid JSON: {exc}") from exc
        return cls.from_dict(values)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
