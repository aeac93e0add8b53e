"""The LM head (final hidden states -> float32 vocabulary logits) with a CPU fast path.

The reference op is the model's own ``compute_logits``: a Paddle matmul with the tied embedding
``[V, H]`` (transposed) or the untied head ``[H, V]``. On CPU, Paddle 3.3's matmul is slow for this
shape and falls off a cliff from 8 rows on. Measured on the demo model's ``[M, 256] x [256, 8192]``
(1 thread, min of 30): M = 1: 0.20 ms, 6: 1.0, 8: 3.1, 16: 3.3, 96: 13 ms, against 0.12, 0.85, 0.56,
0.94 and 4.3 ms for NumPy's BLAS on the same buffers, which DLPack shares without a copy. A
speculative step scores 1 + k rows per request, a batch of 16 scores 16 or more, so the head is
where verification spends its time.

When the model's projections run the packed CPU op (kernels/linear.py), the head does too: its
cost grows slowly with the rows (M = 1: 0.05 ms, 6: 0.15, 16: 0.36) and a row's logits are the same
bits whatever else is scored with it.

The fast path equals the reference up to float rounding (the summation order differs): a caller
that compares tokens across code paths must score all of them with one head, as the model runner
does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import paddle

from pdserve.kernels import cpu_ops
from pdserve.kernels.linear import pack_weight, packed_matmul

# The packed op multiplies up to 8 rows per pass over the weights (4 without AVX-512): 0.05 ms for
# 1 row and 0.18 ms for 8 on the demo head, so a verification's rows are scored in one call rather
# than round by round.
FLAT_ROWS = 8

class LMHead:
    """hidden ``[N, H]`` -> logits ``[N, V]`` float32, equal to ``reference(hidden)`` up to rounding.

    ``weight`` is the head's parameter, ``[V, H]`` when ``transposed`` (a tied embedding) else
    ``[H, V]``. The fast path views the parameter's buffer when the head is built, so the weights
    must not be replaced afterwards (the engine never changes them after loading); it is taken for
    float32 weights and activations on CPU, every other case runs ``reference``.
    """

    def __init__(self, weight: paddle.Tensor, transposed: bool,
                 reference: Callable[[paddle.Tensor], paddle.Tensor], packed: bool = False) -> None:
        self.reference = reference
        self._weight_hv: np.ndarray | None = None  # [H, V] view of the parameter
        self._packed: paddle.Tensor | None = None  # the packed op's layout of [H, V]
        if weight.place.is_cpu_place() and weight.dtype == paddle.float32:
            shared = np.from_dlpack(weight)
            self._weight_hv = shared.T if transposed else shared
            if packed:
                self._packed = pack_weight(self._weight_hv)

    @property
    def flat_rows(self) -> int:
        """Rows one call scores for about the cost of one (the packed op's group of rows)."""
        return FLAT_ROWS if self._packed is not None else 1

    def __call__(self, hidden: paddle.Tensor) -> paddle.Tensor:
        if self._weight_hv is None or not cpu_ops.takes(hidden):
            return self.reference(hidden)
        if self._packed is not None:
            return packed_matmul(hidden, self._packed)
        logits = np.matmul(np.from_dlpack(hidden), self._weight_hv)  # [N, V] float32
        return paddle.from_dlpack(logits)
