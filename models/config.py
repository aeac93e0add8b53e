"""Model configuration read from a Hugging Face ``config.json`` (Llama / Qwen2 family)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
ROPE_TYPES = ("linear", "llama3", "yarn")


class ConfigError(ValueError):
    """config.json describes a model pdserve cannot run; the message names the field."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, applied to ``inv_freq`` once when the cos/sin cache is built.

    ``dynamic`` NTK scaling is not supported: it changes the frequencies with the running sequence
    length, so the same token would get different K in the cache depending on when it was computed.
    """

    rope_type: str
    factor: float
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # llama3 and yarn: the context length the model was pre-trained with
    original_max_position_embeddings: int = 0
    # yarn only
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: derived from factor / mscale (see kernels.rope)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling: rope_type {self.rope_type!r} is not one of {ROPE_TYPES}")
        if not self.factor > 0:
            raise ConfigError(f"rope_scaling: factor must be > 0, got {self.factor}")
        if self.rope_type in ("llama3", "yarn") and self.original_max_position_embeddings <= 0:
            raise ConfigError(f"rope_scaling: {self.rope_type} needs original_max_position_embeddings > 0")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError("rope_scaling: llama3 needs high_freq_factor > low_freq_factor")

    @classmethod
    def from_dict(cls, d: dict[str, Any], max_position_embeddings: int) -> RopeScaling:
        rope_type = d.get("rope_type", d.get("type"))
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling: unsupported rope_type {rope_type!r} (supported: {ROPE_TYPES})")
        original = d.get("original_max_position_embeddings") or 0
        factor = d.get("factor")
        if factor is None and rope_type == "yarn" and original:
            factor = max_position_embeddings / original  # DeepSeek-style yarn leaves factor implicit
        if factor is None:
            raise ConfigError("rope_scaling: missing required field 'factor'")
        optional = {
            k: d[k]
            for k in (
                "low_freq_factor",
                "high_freq_factor",
                "attention_factor",
                "mscale",
                "mscale_all_dim",
                "truncate",
            )
            if d.get(k) is not None
        }
        # HF treats beta_fast/beta_slow of 0 or None as "use the default" (``or 32``)
        optional.update({k: float(d[k]) for k in ("beta_fast", "beta_slow") if d.get(k)})
        return cls(
            rope_type=rope_type,
            factor=float(factor),
            original_max_position_embeddings=int(original),
            **optional,
        )


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    qkv_bias: bool  # bias on q/k/v projections (always on for Qwen2)
    tie_word_embeddings: bool
    max_position_embeddings: int
    num_nextn_predict_layers: int = 0  # DeepSeek-V3 MTP layers stored after the decoder layers
    eos_token_id: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architectures: {self.architecture!r} is not supported ({SUPPORTED_ARCHITECTURES} are)"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.num_nextn_predict_layers not in (0, 1):
            raise ConfigError(f"num_nextn_predict_layers must be 0 or 1, got {self.num_nextn_predict_layers}")
        for token_id in self.eos_token_id:
            if not 0 <= token_id < self.vocab_size:
                raise ConfigError(f"eos_token_id {token_id} is outside the vocabulary [0, {self.vocab_size})")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config.json not found in {model_dir}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        architecture = _architecture(d)
        hidden_size = _required_int(d, "hidden_size")
        num_heads = _required_int(d, "num_attention_heads")
        if d.get("head_dim") is None and (num_heads <= 0 or hidden_size % num_heads):
            raise ConfigError(
                f"num_attention_heads ({num_heads}) must divide hidden_size ({hidden_size}) "
                "when head_dim is not given"
            )
        _reject_unsupported_features(d)
        max_positions = _required_int(d, "max_position_embeddings")
        return cls(
            architecture=architecture,
            vocab_size=_required_int(d, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_required_int(d, "intermediate_size"),
            num_hidden_layers=_required_int(d, "num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(d),
            rope_scaling=_rope_scaling(d, max_positions),
            qkv_bias=architecture == "Qwen2ForCausalLM" or bool(d.get("attention_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=max_positions,
            num_nextn_predict_layers=int(d.get("num_nextn_predict_layers") or 0),
            eos_token_id=_token_ids(d.get("eos_token_id"), "eos_token_id"),
            bos_token_id=_optional_int(d.get("bos_token_id"), "bos_token_id"),
        )


def _architecture(d: dict[str, Any]) -> str:
    archs = d.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        raise ConfigError(f"architectures must be a list with one name, got {archs!r}")
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"architectures: {archs[0]!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})"
        )
    return archs[0]


def _required_int(d: dict[str, Any], name: str) -> int:
    if name not in d or d[name] is None:
        raise ConfigError(f"missing required field {name!r}")
    value = d[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return value


def _optional_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer or null, got {value!r}")
    return value


def _token_ids(value: Any, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    ids: list[int] = []
    for v in value if isinstance(value, list) else [value]:
        token_id = _optional_int(v, name)
        if token_id is not None:
            ids.append(token_id)
    return tuple(ids)


def _rope_params(d: dict[str, Any]) -> dict[str, Any] | None:
    # transformers 5 writes "rope_parameters" (with rope_theta inside); older configs "rope_scaling"
    params = d.get("rope_parameters") or d.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"rope_scaling must be an object or null, got {params!r}")
    return params


def _rope_theta(d: dict[str, Any]) -> float:
    params = _rope_params(d) or {}
    return float(d.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(d: dict[str, Any], max_position_embeddings: int) -> RopeScaling | None:
    params = _rope_params(d)
    if params is None or params.get("rope_type", params.get("type")) in (None, "default"):
        return None
    return RopeScaling.from_dict(params, max_position_embeddings)


def _reject_unsupported_features(d: dict[str, Any]) -> None:
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
    if d.get("mlp_bias"):
        raise ConfigError("mlp_bias: bias on MLP projections is not supported")
    if d.get("use_sliding_window"):
        raise ConfigError("use_sliding_window: sliding-window attention is not supported")
    if d.get("pretraining_tp", 1) != 1:
        raise ConfigError("pretraining_tp: only 1 is supported")
    partial = (_rope_params(d) or {}).get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(f"partial_rotary_factor {partial} is not supported (only 1.0)")
