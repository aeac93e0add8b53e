"""Logits processors that run before temperature: repetition/presence/frequency penalties and the
min_tokens suppression of stop tokens.

All functions are pure: they take float32 logits ``[B, V]`` and return a new tensor. Per-row token
histories arrive as int64 NumPy arrays (the engine keeps them on the host); the dense ``[B, V]``
count matrices are built here, once per step, only for rows that need them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import paddle


def token_counts(token_ids: Sequence[np.ndarray], vocab_size: int) -> np.ndarray:
    """Occurrences of each vocab id per row: ``[B, V]`` float32."""
    counts = np.zeros((len(token_ids), vocab_size), dtype=np.float32)
    for row, ids in enumerate(token_ids):
        if len(ids):
            counts[row] = np.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts


def apply_penalties(
    logits: paddle.Tensor,
    prompt_token_ids: Sequence[np.ndarray],
    output_token_ids: Sequence[np.ndarray],
    repetition_penalty: np.ndarray,
    presence_penalty: np.ndarray,
    frequency_penalty: np.ndarray,
) -> paddle.Tensor:
    """Penalise tokens already seen, as vLLM and HF do, in this order:

    - repetition (HF/CTRL): for every token in prompt + output, a positive logit is divided by the
      penalty and a negative one multiplied, so the penalty always lowers the token's probability;
    - frequency (OpenAI): ``logit -= frequency_penalty * count_in_output``;
    - presence (OpenAI): ``logit -= presence_penalty * (count_in_output > 0)``.

    Rows whose penalties are neutral are left bit-identical.
    """
    batch, vocab_size = logits.shape
    active = (repetition_penalty != 1.0) | (presence_penalty != 0.0) | (frequency_penalty != 0.0)
    if not active.any():
        return logits
    # Neutral rows get empty histories so their counts stay zero and their logits unchanged.
    empty = np.zeros(0, dtype=np.int64)
    output_counts = token_counts(
        [ids if on else empty for ids, on in zip(output_token_ids, active, strict=True)], vocab_size)
    prompt_counts = token_counts(
        [ids if on else empty for ids, on in zip(prompt_token_ids, active, strict=True)], vocab_size)
    seen = paddle.to_tensor((output_counts + prompt_counts) > 0)
    counts = paddle.to_tensor(output_counts)

    repetition = paddle.to_tensor(repetition_penalty.astype(np.float32).reshape(batch, 1))
    repeated = paddle.where(logits > 0, logits / repetition, logits * repetition)
    logits = paddle.where(seen, repeated, logits)

    frequency = paddle.to_tensor(frequency_penalty.astype(np.float32).reshape(batch, 1))
    presence = paddle.to_tensor(presence_penalty.astype(np.float32).reshape(batch, 1))
    return logits - frequency * counts - presence * (counts > 0).astype(logits.dtype)


def suppress_tokens(logits: paddle.Tensor, suppressed_token_ids: Sequence[Sequence[int]]) -> paddle.Tensor:
    """Set the listed ids of each row to -inf (min_tokens: eos and stop ids may not be sampled yet)."""
    if not any(suppressed_token_ids):
        return logits
    batch, vocab_size = logits.shape
    mask = np.zeros((batch, vocab_size), dtype=bool)
    for row, ids in enumerate(suppressed_token_ids):
        mask[row, list(ids)] = True
    return paddle.where(paddle.to_tensor(mask), paddle.full_like(logits, float("-inf")), logits)
