"""SwiGLU activation on the fused gate/up projection."""

from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle import _C_ops


def silu_and_mul(gate_up: paddle.Tensor) -> paddle.Tensor:
    """gate_up ``[T, 2 * intermediate]`` = [gate | up] -> ``silu(gate) * up``: ``[T, intermediate]``."""
    gate, up = paddle.chunk(gate_up, 2, axis=-1)
    return F.silu(gate) * up


def silu_and_mul_cpu(gate_up: paddle.Tensor) -> paddle.Tensor:
    """The same for float32 ``gate_up [T, 2 * intermediate]`` on CPU, in one call of pdserve's op
    (kernels/csrc/layer_ops.cc; the caller checked ``cpu_ops.load()``)."""
    return _C_ops._run_custom_op("pdserve_silu_and_mul", gate_up.contiguous())[0]
