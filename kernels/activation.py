"""SwiGLU activation on the fused gate/up projection."""

from __future__ import annotations

import paddle
import paddle.nn.functional as F


def silu_and_mul(gate_up: paddle.Tensor) -> paddle.Tensor:
    """gate_up ``[T, 2 * intermediate]`` = [gate | up] -> ``silu(gate) * up``: ``[T, intermediate]``."""
    gate, up = paddle.chunk(gate_up, 2, axis=-1)
    return F.silu(gate) * up
