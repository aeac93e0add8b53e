"""Linear layers with a CPU fast path: the weight packed once, multiplied by pdserve's own op.

Paddle 3.3's CPU matmul is slow for a decoder's shapes and packs its weight operand on every call
once there are 2 or more rows, so one extra row costs about as much as the first. The demo model's
``[M, 256] x [256, 1536]`` gate/up projection (1 thread, 20th percentile of 100 calls):

    M          1      2      6      16     512
    Paddle    40     51    127    372    11471 us
    packed    12     27     32     72     4147 us

(one row takes eight strips per pass: with one strip it would be a single multiply-add chain, bound
by its latency, at 26 us)

``kernels/csrc/packed_linear.cc`` keeps the weight in 16-column strips (``[N / 16, K, 16]``, packed
when the model is loaded) and streams each strip once per group of 4 or 8 rows. A speculative step
that verifies 1 + k rows, or a small batch, then costs about what one row does.

The fast path is batch-invariant: every output element is summed in the same order whatever the
number of rows, so a row's result is bit-for-bit the same alone or in any batch. It differs from
Paddle's matmul only by float rounding (~1e-5 relative on the demo model).

It runs for float32 weights and inputs on CPU, output widths that are multiples of 16, and only
once ``pack`` was called (the loader does, after the weights are final: a packed layer must not
have its weight replaced afterwards). Everything else runs Paddle's own op.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle
from paddle import _C_ops, nn

from pdserve.kernels import cpu_ops

STRIP = 16  # columns per strip; the op's layout constant


def pack_weight(weight_kn: np.ndarray) -> paddle.Tensor | None:
    """``[K, N]`` float32 -> the op's layout ``[N / 16, K, 16]``, or None when N is not a multiple
    of 16 or the ops are unavailable.

    Stored as bfloat16 when every value is one (a bf16 checkpoint loaded as float32): half the
    bytes to stream, and the op widens them exactly, so the results are the same bits.
    """
    k, n = weight_kn.shape
    if n % STRIP or weight_kn.dtype != np.float32 or not cpu_ops.load():
        return None
    strips = np.ascontiguousarray(weight_kn.reshape(k, n // STRIP, STRIP).transpose(1, 0, 2))
    bits = strips.view(np.uint32)
    if not np.any(bits & 0xFFFF):
        return paddle.to_tensor((bits >> 16).astype(np.uint16))  # numpy uint16 is Paddle's bfloat16
    return paddle.to_tensor(strips)


def packed_matmul(x: paddle.Tensor, packed: paddle.Tensor) -> paddle.Tensor:
    """``x [M, K]`` float32 on CPU times the packed ``[K, N]`` weight -> ``[M, N]`` float32."""
    if not x.is_contiguous():
        x = x.contiguous()
    return _C_ops._run_custom_op("pdserve_packed_linear", x, packed)[0]


def mtp_input_cpu(hidden: paddle.Tensor, hnorm_weight: paddle.Tensor, packed: paddle.Tensor,
                  token_rows: paddle.Tensor, next_token_ids: list[int], eps: float) -> paddle.Tensor:
    """The MTP layer's folded input, ``rms_norm(hidden) @ W + token_rows[next_token_ids]``, in one call
    of pdserve's op (kernels/csrc/layer_ops.cc): the same bits as the norm op, ``packed_matmul`` and
    a float32 add of the rows."""
    if not hidden.is_contiguous():
        hidden = hidden.contiguous()
    return _C_ops._run_custom_op(
        "pdserve_mtp_input", hidden, hnorm_weight, packed, token_rows, next_token_ids, float(eps)
    )[0]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same names) that uses the packed op after ``pack()``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A plain attribute, not a buffer: derived from the weight, never saved or loaded.
        object.__setattr__(self, "_packed", None)

    def pack(self) -> bool:
        """Pack the current weight for the CPU fast path; False when it does not apply."""
        weight = self.weight
        packed = None
        if weight.place.is_cpu_place() and weight.dtype == paddle.float32:
            packed = pack_weight(weight.numpy())
        object.__setattr__(self, "_packed", packed)
        return packed is not None

    def unpack(self) -> None:
        """Free the packed copy (the layer runs Paddle's op again): for a layer no longer called."""
        object.__setattr__(self, "_packed", None)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self._packed is None or not cpu_ops.takes(x):
            return super().forward(x)
        out = packed_matmul(x, self._packed)
        return out if self.bias is None else out + self.bias


def is_packed(model: nn.Layer) -> bool:
    """Whether ``pack_linears`` put any of the model's projections on the fast path."""
    return any(
        layer._packed is not None for layer in model.sublayers(include_self=True) if isinstance(layer, Linear)
    )


def pack_linears(model: nn.Layer) -> int:
    """Pack every ``Linear`` of the model; returns how many took the fast path."""
    return sum(layer.pack() for layer in model.sublayers(include_self=True) if isinstance(layer, Linear))
