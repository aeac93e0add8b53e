"""Selecting rows of a step's ``[T, ...]`` tensor (the sampled rows, the MTP's drafting rows)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import paddle


def take_rows(x: paddle.Tensor, rows: Sequence[int]) -> paddle.Tensor:
    """``x[rows]``. Rows that form one ascending run (a batch-1 step's sampled row, or its 1 + k
    verification rows) are a slice, which costs about a fifth of building an index and gathering;
    any other selection is a gather."""
    if len(rows) and list(rows) == list(range(rows[0], rows[0] + len(rows))):
        return x[rows[0] : rows[0] + len(rows)]
    return paddle.gather(x, paddle.to_tensor(np.asarray(rows, dtype=np.int64)))
