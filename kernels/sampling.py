"""Batched token sampling with per-request, batch-independent randomness.

Processing order (vLLM's; logprobs are taken from the RAW logits by the caller, FastDeploy's default):

    raw logits -> penalties -> logit bias -> grammar mask -> min_tokens suppression
                                                                    = processed logits (greedy: argmax)
               -> temperature -> top-k -> top-p -> min-p     = the filtered distribution
               -> inverse-CDF draw with the row's own uniform

Randomness never comes from a global generator: each row's uniform is drawn from a counter-based
RNG (Philox) keyed by (seed, stream) at counter (generation index), and the draw walks the filtered
probabilities in token-id order in float64. So a row's token depends only on its own logits, seed
and generation index — not on which other requests share the batch or where the row sits in it —
and a prefill node and a decode node produce the same tokens for the same request. A migrated
continuation (``SamplingParams.resumed_output_tokens``) counts the outputs it resumes from in the
generation index, so it draws what the undisturbed run would have drawn at the same position.

Tie rules (deterministic, independent of sort stability):
- greedy picks the lowest token id among equal maxima;
- top-k keeps every token whose probability is >= the k-th largest (ties at the boundary all stay);
- top-p keeps the smallest descending prefix whose mass reaches p, plus every token tied with the
  last token of that prefix;
- min-p keeps tokens whose probability is >= min_p * the largest probability.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import paddle

from pdserve.common.sampling_params import SamplingParams
from pdserve.kernels import cpu_ops
from pdserve.kernels.penalties import apply_penalties, suppress_tokens

_MAX_SEED = 2**63


class RngStream(IntEnum):
    """Independent random streams of one request; a new consumer of uniforms takes a new id."""

    SAMPLE = 0  # the token draw of sample()
    # rejection sampling's general form (kernels/spec_verify.py): the accept test and the residual draw;
    # the engine's coupled form uses SAMPLE alone
    SPEC_ACCEPT = 1
    SPEC_RESAMPLE = 2


def request_uniforms(seed: int, index: int, stream: int, n: int = 1) -> np.ndarray:
    """``n`` uniforms in [0, 1) (float64) for one request at one generation index and stream.

    The same (seed, index, stream) always gives the same values, and a longer draw extends a shorter
    one. The generation index sits in the counter's second word, so the up to 2**66 values one draw
    may consume never reach the counter of the next index.
    """
    if not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63) (got {seed})")
    if not 0 <= index < 2**64 or not 0 <= stream < 2**64 or n < 0:
        raise ValueError(f"bad uniform request: index={index}, stream={stream}, n={n}")
    bit_generator = np.random.Philox(key=seed | (int(stream) << 64), counter=[0, index, 0, 0])
    return np.random.Generator(bit_generator).random(n)


@dataclass(frozen=True)
class SamplingRow:
    """What sampling needs to know about one request at this step.

    ``seed`` is the resolved seed (``params.seed`` or the one the engine drew at admission);
    ``eos_token_ids`` are the model's end-of-sequence ids, suppressed with the stop ids until
    ``min_tokens`` outputs exist (unless ``ignore_eos``); ``allowed_tokens`` (``[vocab]`` bool, from
    the request's grammar; None: every token) masks the rest to -inf before temperature, top-k and top-p.
    """

    params: SamplingParams
    seed: int
    prompt_token_ids: np.ndarray  # [prompt_len] int64
    output_token_ids: np.ndarray  # [num_output_tokens] int64; its length is the generation index
    eos_token_ids: tuple[int, ...] = ()
    allowed_tokens: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.seed < _MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63) (got {self.seed})")
        for name in ("prompt_token_ids", "output_token_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype != np.int64:
                raise ValueError(f"{name} must be a 1-D int64 numpy array")

    @property
    def generation_index(self) -> int:
        """The position of the token this row decides among the request's outputs, counting the outputs
        a migrated continuation resumes from (they lead ``output_token_ids``): it keys the uniforms."""
        return len(self.output_token_ids)

    def suppressed_token_ids(self) -> tuple[int, ...]:
        """Ids that may not be sampled yet because fewer than ``min_tokens`` outputs exist (a
        continuation's min_tokens counts its own outputs). None when a grammar allows nothing else (its
        output is complete): the grammar wins over min_tokens."""
        if self.generation_index - self.params.resumed_output_tokens >= self.params.min_tokens:
            return ()
        eos = () if self.params.ignore_eos else self.eos_token_ids
        suppressed = tuple(sorted(set(self.params.stop_token_ids) | set(eos)))
        if self.allowed_tokens is not None and suppressed:
            others = self.allowed_tokens.copy()
            others[[t for t in suppressed if t < len(others)]] = False
            if not others.any():
                return ()
        return suppressed


def _array(values: Sequence[float | int], dtype: type) -> np.ndarray:
    return np.asarray(values, dtype=dtype)


@dataclass(frozen=True, eq=False)
class SamplingBatch:
    """Per-row sampling inputs of one step, as arrays ordered like the logits' rows."""

    vocab_size: int
    temperature: np.ndarray  # [B] float64, 0 = greedy
    top_k: np.ndarray  # [B] int64, 0 = off
    top_p: np.ndarray  # [B] float64, 1 = off
    min_p: np.ndarray  # [B] float64, 0 = off
    repetition_penalty: np.ndarray  # [B] float64
    presence_penalty: np.ndarray  # [B] float64
    frequency_penalty: np.ndarray  # [B] float64
    seeds: tuple[int, ...]
    generation_indices: tuple[int, ...]
    prompt_token_ids: tuple[np.ndarray, ...] = field(repr=False)
    output_token_ids: tuple[np.ndarray, ...] = field(repr=False)
    suppressed_token_ids: tuple[tuple[int, ...], ...] = ()
    logit_bias: tuple[tuple[tuple[int, float], ...], ...] = ()  # per row: (token id, bias) pairs
    # [B, V] bool, False = masked to -inf (the rows' grammars; rows without one allow every token);
    # None when no row has a grammar
    allowed_tokens: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        batch = len(self.seeds)
        sized = [self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                 self.presence_penalty, self.frequency_penalty, self.generation_indices,
                 self.prompt_token_ids, self.output_token_ids, self.suppressed_token_ids]
        if self.logit_bias:
            sized.append(self.logit_bias)
        if self.allowed_tokens is not None:
            sized.append(self.allowed_tokens)
        if any(len(values) != batch for values in sized):
            raise ValueError("every per-row field of SamplingBatch must have one entry per row")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1 (got {self.vocab_size})")

    @classmethod
    def from_rows(cls, rows: Sequence[SamplingRow], vocab_size: int) -> SamplingBatch:
        for i, row in enumerate(rows):
            for ids in (row.prompt_token_ids, row.output_token_ids):
                if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
                    raise ValueError(f"row {i}: token id outside the vocabulary [0, {vocab_size})")
        params = [row.params for row in rows]
        return cls(
            vocab_size=vocab_size,
            temperature=_array([p.temperature for p in params], np.float64),
            top_k=_array([p.top_k for p in params], np.int64),
            top_p=_array([p.top_p for p in params], np.float64),
            min_p=_array([p.min_p for p in params], np.float64),
            repetition_penalty=_array([p.repetition_penalty for p in params], np.float64),
            presence_penalty=_array([p.presence_penalty for p in params], np.float64),
            frequency_penalty=_array([p.frequency_penalty for p in params], np.float64),
            seeds=tuple(row.seed for row in rows),
            generation_indices=tuple(row.generation_index for row in rows),
            prompt_token_ids=tuple(row.prompt_token_ids for row in rows),
            output_token_ids=tuple(row.output_token_ids for row in rows),
            # Ids past the vocabulary can never be sampled, so there is nothing to suppress.
            suppressed_token_ids=tuple(tuple(t for t in row.suppressed_token_ids() if t < vocab_size)
                                       for row in rows),
            # () when no row has a bias, the common case: process_logits then skips the step
            logit_bias=(tuple(tuple((t, b) for t, b in p.logit_bias if t < vocab_size) for p in params)
                        if any(p.logit_bias for p in params) else ()),
            allowed_tokens=_allowed_tokens(rows, vocab_size),
        )

    @property
    def batch_size(self) -> int:
        return len(self.seeds)

    @property
    def greedy(self) -> np.ndarray:
        return self.temperature == 0.0


def _allowed_tokens(rows: Sequence[SamplingRow], vocab_size: int) -> np.ndarray | None:
    if all(row.allowed_tokens is None for row in rows):
        return None
    allowed = np.ones((len(rows), vocab_size), dtype=bool)
    for i, row in enumerate(rows):
        if row.allowed_tokens is not None:
            if row.allowed_tokens.shape != (vocab_size,) or row.allowed_tokens.dtype != np.bool_:
                raise ValueError(f"row {i}: allowed_tokens must be a [{vocab_size}] bool array")
            allowed[i] = row.allowed_tokens
    return allowed


def is_plain_greedy(params: SamplingParams, generation_index: int, eos_token_ids: Collection[int]) -> bool:
    """Whether the token at ``generation_index`` is simply the argmax of the raw logits.

    True for a greedy request without penalties whose row suppresses nothing (min_tokens reached, or
    no stop/eos id to suppress): ``process_logits`` would return its logits unchanged, so callers may
    skip building a ``SamplingBatch``. Never for a request with a grammar (its mask changes the
    argmax). A later index of the same request is then plain greedy too.
    """
    if not params.greedy or params.has_penalties or params.grammar is not None:
        return False
    if generation_index >= params.min_tokens:
        return True
    return not params.stop_token_ids and (params.ignore_eos or not eos_token_ids)


def batch_uniforms(batch: SamplingBatch, stream: int = RngStream.SAMPLE) -> np.ndarray:
    """One uniform per row ``[B]`` float64, each from its own request's key."""
    keys = zip(batch.seeds, batch.generation_indices, strict=True)
    return np.array([request_uniforms(seed, index, stream)[0] for seed, index in keys], dtype=np.float64)


def process_logits(logits: paddle.Tensor, batch: SamplingBatch) -> paddle.Tensor:
    """Penalties, the logit bias, the grammar mask, then min_tokens suppression: the logits greedy rows
    take the argmax of."""
    _check_logits(logits, batch)
    logits = apply_penalties(logits, batch.prompt_token_ids, batch.output_token_ids,
                             batch.repetition_penalty, batch.presence_penalty, batch.frequency_penalty)
    if batch.logit_bias:
        logits = add_logit_bias(logits, batch.logit_bias)
    if batch.allowed_tokens is not None:
        logits = mask_tokens(logits, batch.allowed_tokens)
    return suppress_tokens(logits, batch.suppressed_token_ids)


def mask_tokens(logits: paddle.Tensor, allowed: np.ndarray) -> paddle.Tensor:
    """``logits`` with every token ``allowed`` ([B, V] bool) does not hold set to -inf; a new tensor."""
    return paddle.where(paddle.to_tensor(allowed), logits, paddle.full_like(logits, float("-inf")))


def add_logit_bias(logits: paddle.Tensor, logit_bias: Sequence[Sequence[tuple[int, float]]]) -> paddle.Tensor:
    """``logits[row, token] + bias`` for every (token, bias) of each row; a new tensor."""
    bias = np.zeros(list(logits.shape), dtype=np.float32)
    for row, pairs in enumerate(logit_bias):
        for token, value in pairs:
            bias[row, token] = value
    return logits + paddle.to_tensor(bias).astype(logits.dtype)


def sampling_probs(processed_logits: paddle.Tensor, batch: SamplingBatch) -> paddle.Tensor:
    """The distribution each row samples from, ``[B, V]`` float64, rows summing to 1.

    Temperature, top-k, top-p and min-p are applied to sampled rows; greedy rows are one-hot at
    their argmax, so rejection sampling and inverse-CDF draws treat them like any other row.
    """
    _check_logits(processed_logits, batch)
    temperature = np.where(batch.greedy, 1.0, batch.temperature).reshape(-1, 1)
    probs = _softmax(processed_logits.astype("float64") / paddle.to_tensor(temperature))
    keep = _top_k_keep(probs, batch.top_k)
    probs = _renormalize(probs * keep.astype(probs.dtype))
    keep = _top_p_keep(probs, batch.top_p)
    probs = _renormalize(probs * keep.astype(probs.dtype))
    probs = _renormalize(probs * _min_p_keep(probs, batch.min_p).astype(probs.dtype))
    if not batch.greedy.any():
        return probs
    one_hot = paddle.nn.functional.one_hot(greedy_tokens(processed_logits), batch.vocab_size)
    greedy = paddle.to_tensor(batch.greedy.reshape(-1, 1))
    return paddle.where(greedy, one_hot.astype(probs.dtype), probs)


def greedy_tokens(processed_logits: paddle.Tensor) -> paddle.Tensor:
    """Argmax per row ``[B]`` int64; paddle's argmax returns the lowest id among equal maxima."""
    return paddle.argmax(processed_logits, axis=-1).astype("int64")


def greedy_token_ids(processed_logits: paddle.Tensor) -> np.ndarray:
    """``greedy_tokens`` on the host, for callers that read the ids in Python: float32 CPU logits are
    read in place (NumPy's argmax also returns the lowest id among equal maxima), which saves two
    Paddle calls and a copy per step (through Paddle, the argmax chain is a quarter of a hybrid
    step's sampling in a py-spy profile). Readable in place when it is what pdserve's CPU ops take
    (2-D float32 on CPU)."""
    if cpu_ops.takes(processed_logits):
        return np.from_dlpack(processed_logits).argmax(axis=-1)
    return greedy_tokens(processed_logits).numpy()


def sample_from_probs(probs: paddle.Tensor, uniforms: np.ndarray) -> paddle.Tensor:
    """Inverse-CDF draw ``[B]`` int64: the first token id whose cumulative probability exceeds u * total.

    Walking the cumulative sum in token-id order makes the result a function of the row alone.
    A token whose probability is 0 is never returned: the cumulative sum only rises at tokens with
    mass, and the final clamp keeps a u that rounds up to the total on the last token with mass.
    """
    cdf = paddle.cumsum(probs.astype("float64"), axis=-1)
    target = paddle.to_tensor(uniforms.reshape(-1, 1).astype(np.float64)) * cdf[:, -1:]
    first_above = (cdf <= target).astype("int64").sum(axis=-1)
    vocab_size = probs.shape[-1]
    has_mass_reversed = paddle.flip((probs > 0).astype("int32"), axis=[-1])
    last_with_mass = vocab_size - 1 - paddle.argmax(has_mass_reversed, axis=-1).astype("int64")
    return paddle.minimum(first_above, last_with_mass)


def sample(logits: paddle.Tensor, batch: SamplingBatch) -> paddle.Tensor:
    """Next token per row ``[B]`` int64 from raw float32 logits ``[B, V]``."""
    processed = process_logits(logits, batch)
    if batch.greedy.all():
        return greedy_tokens(processed)
    return sample_from_probs(sampling_probs(processed, batch), batch_uniforms(batch))


def _check_logits(logits: paddle.Tensor, batch: SamplingBatch) -> None:
    if list(logits.shape) != [batch.batch_size, batch.vocab_size]:
        raise ValueError(f"logits shape {list(logits.shape)} does not match the batch "
                         f"[{batch.batch_size}, {batch.vocab_size}]")


def _softmax(logits: paddle.Tensor) -> paddle.Tensor:
    # Subtracting the row max keeps exp() finite; -inf entries become exactly 0.
    shifted = paddle.exp(logits - logits.max(axis=-1, keepdim=True))
    return shifted / shifted.sum(axis=-1, keepdim=True)


def _renormalize(probs: paddle.Tensor) -> paddle.Tensor:
    return probs / probs.sum(axis=-1, keepdim=True)


def _per_row(values: np.ndarray, dtype: str) -> paddle.Tensor:
    return paddle.to_tensor(values.reshape(-1, 1)).astype(dtype)


def _top_k_keep(probs: paddle.Tensor, top_k: np.ndarray) -> paddle.Tensor:
    vocab_size = probs.shape[-1]
    active = (top_k > 0) & (top_k < vocab_size)
    if not active.any():
        return paddle.ones_like(probs, dtype="bool")
    k_max = int(top_k[active].max())
    largest = paddle.topk(probs, k_max, axis=-1)[0]  # [B, k_max], descending
    kth = paddle.take_along_axis(largest, _per_row(np.clip(top_k - 1, 0, k_max - 1), "int64"), axis=1)
    threshold = paddle.where(_per_row(active, "bool"), kth, paddle.zeros_like(kth))
    return probs >= threshold


def _top_p_keep(probs: paddle.Tensor, top_p: np.ndarray) -> paddle.Tensor:
    active = top_p < 1.0
    if not active.any():
        return paddle.ones_like(probs, dtype="bool")
    descending = paddle.sort(probs, axis=-1, descending=True)
    # Mass strictly before each sorted position; the kept prefix is where it is still below p.
    cumulative = paddle.cumsum(descending, axis=-1)
    mass_before = paddle.concat([paddle.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], axis=-1)
    prefix_len = (mass_before < _per_row(top_p, "float64")).astype("int64").sum(axis=-1, keepdim=True)
    last_kept = paddle.take_along_axis(descending, prefix_len - 1, axis=1)
    threshold = paddle.where(_per_row(active, "bool"), last_kept, paddle.zeros_like(last_kept))
    return probs >= threshold


def _min_p_keep(probs: paddle.Tensor, min_p: np.ndarray) -> paddle.Tensor:
    if not (min_p > 0.0).any():
        return paddle.ones_like(probs, dtype="bool")
    return probs >= _per_row(min_p, "float64") * probs.max(axis=-1, keepdim=True)
