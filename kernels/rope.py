"""Rotary position embedding (HF ``rotate_half`` convention) with Llama-3 / linear / YaRN scaling.

The cos/sin cache is built once for every position up to ``max_position_embeddings``; each step
gathers the rows of its tokens' positions, so batching tokens of different sequences (and any
position, as in chunked prefill or decode) costs one gather.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import paddle
from paddle import _C_ops


class RopeScaling(Protocol):
    """The scaling fields these functions read (models.config.RopeScaling provides them; kernels do
    not import models)."""

    rope_type: str  # "linear" | "llama3" | "yarn"
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    attention_factor: float | None
    mscale: float | None
    mscale_all_dim: float | None
    truncate: bool


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``[head_dim // 2]`` (float32, as HF computes them) and the attention
    factor that scales cos/sin (1.0 except for YaRN)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / np.float32(theta) ** exponents).astype(np.float32)
    if scaling is None:
        return inv_freq, 1.0
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32), 1.0
    if scaling.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    return _yarn_inv_freq(head_dim, theta, scaling)


def _llama3_inv_freq(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    old_context = s.original_max_position_embeddings
    low_freq_wavelen = old_context / s.low_freq_factor
    high_freq_wavelen = old_context / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(head_dim: int, theta: float, s: RopeScaling) -> tuple[np.ndarray, float]:
    # YaRN (Peng et al. 2023): interpolate the low-frequency dims, extrapolate the high ones, with a
    # linear ramp between the dims that rotate beta_slow and beta_fast times over the old context.
    if s.attention_factor is not None:
        attention_factor = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention_factor = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(s.factor)

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(s.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = np.float32(theta) ** (np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim))
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (np.float32(s.factor) * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin_cache(
    head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None
) -> tuple[np.ndarray, np.ndarray]:
    """``cos``, ``sin``: ``[max_positions, head_dim]`` float32, the attention factor folded in."""
    inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling)
    freqs = np.outer(np.arange(max_positions, dtype=np.float32), inv_freq)  # [P, head_dim // 2]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [P, head_dim], rotate_half layout
    cos = (np.cos(emb) * attention_factor).astype(np.float32)
    sin = (np.sin(emb) * attention_factor).astype(np.float32)
    return cos, sin


def apply_rope(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    """x: ``[T, heads, head_dim]``; cos/sin: ``[T, head_dim]`` (rows for each token's position)."""
    half = x.shape[-1] // 2
    rotated = paddle.concat([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def split_qkv_rope_cpu(
    qkv: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, num_heads: int, num_kv_heads: int
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """A fused projection's ``[T, (Hq + 2 Hkv) * D]`` float32 output on CPU -> q ``[T, Hq, D]`` and
    k ``[T, Hkv, D]`` with RoPE applied, and v ``[T, Hkv, D]``: the split, the reshapes and both
    ``apply_rope`` calls as one call of pdserve's op (kernels/csrc/layer_ops.cc)."""
    q, k, v = _C_ops._run_custom_op(
        "pdserve_rope_qkv", qkv.contiguous(), cos, sin, int(num_heads), int(num_kv_heads)
    )
    return q, k, v
