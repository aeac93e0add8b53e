"""RMSNorm (Zhang & Sennrich 2019), computed in float32 whatever the activation dtype, as HF does."""

from __future__ import annotations

import paddle
from paddle import _C_ops


def rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    """x: ``[..., hidden]``; returns ``weight * x / sqrt(mean(x^2) + eps)`` in x's dtype."""
    x32 = x.astype("float32")
    normed = x32 * paddle.rsqrt(x32.pow(2).mean(axis=-1, keepdim=True) + eps)
    return weight * normed.astype(x.dtype)


def rms_norm_cpu(x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    """The same for float32 ``x [T, hidden]`` on CPU, in one call of pdserve's op
    (kernels/csrc/layer_ops.cc; the caller checked ``cpu_ops.load()``)."""
    return _C_ops._run_custom_op("pdserve_rms_norm", x.contiguous(), weight, float(eps))[0]
