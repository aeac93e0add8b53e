"""Runs one scheduled step on the model: builds the flattened batch, runs the forward pass over the
paged KV cache, then samples and gathers logprobs for the rows that produce tokens.

A sampling chunk with d speculative drafts produces logits for its last 1 + d rows; verification
(kernels/spec_verify.py) accepts a prefix of the drafts and emits one new token, and logprobs are
gathered for the emitted rows only. Without drafts this is plain sampling of the last row.

The runner never decides anything: it consumes a `SchedulerOutput` and returns what the tensors
said, per request. Logprobs are computed from the raw logits (before penalties and temperature,
FastDeploy's default) and only for requests that asked for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import paddle

from pdserve.common.kv_cache import KVCachePool
from pdserve.common.tokens import SampledTokens
from pdserve.engine.request import Request
from pdserve.engine.scheduler import ScheduledChunk, SchedulerOutput
from pdserve.kernels.attention import AttentionMetadata
from pdserve.kernels.logprobs import TokenLogprobs, prompt_logprobs
from pdserve.kernels.rows import take_rows
from pdserve.kernels.sampling import SamplingBatch, SamplingRow, is_plain_greedy
from pdserve.kernels.spec_verify import greedy_verify, verify_drafts
from pdserve.models.llama import LlamaForCausalLM, lm_head_of


@dataclass(frozen=True)
class StepResult:
    # By request id, for chunks with sample=True: the accepted drafts, then one new token (with their
    # logprobs when the request asked).
    sampled: dict[str, SampledTokens]
    # Prompt logprobs computed this step: request id -> (first prompt position covered, its tokens).
    prompt_logprobs: dict[str, tuple[int, SampledTokens]]
    # [T, hidden] final-normed hidden states of the step, kept for the MTP draft proposer.
    hidden: paddle.Tensor
    # The step's token positions [T] and attention metadata (with the plans its layers built): the MTP
    # layer runs over the same rows and slots, so it reuses them instead of planning again.
    positions: paddle.Tensor
    attn_meta: AttentionMetadata


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_pool: KVCachePool) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.block_size = kv_pool.spec.block_size
        self.vocab_size = model.config.vocab_size
        # Every logits row of a step (plain, verified, prompt logprobs) comes from this one head, so
        # speculative and plain decoding score tokens identically.
        self.lm_head = lm_head_of(model)

    @paddle.no_grad()
    def execute(self, output: SchedulerOutput) -> StepResult:
        chunks = output.chunks
        input_ids, positions, meta = self._prepare(chunks)
        hidden = self.model(input_ids, positions, self.kv_pool.caches, meta)  # [T, hidden]
        sample_rows, prompt_rows = _logit_rows(chunks)
        sampled = self._sample(chunks, hidden, sample_rows)
        prompts = self._prompt_logprobs(chunks, hidden, prompt_rows)
        return StepResult(sampled, prompts, hidden, positions, meta)

    def _prepare(self, chunks: Sequence[ScheduledChunk]
                 ) -> tuple[paddle.Tensor, paddle.Tensor, AttentionMetadata]:
        ids = np.fromiter((t for c in chunks for t in c.token_ids), dtype=np.int64)
        pos = np.concatenate([np.arange(c.start_position, c.context_len, dtype=np.int64) for c in chunks])
        meta = AttentionMetadata.build(
            block_tables=[c.block_table for c in chunks],
            query_lens=[len(c.token_ids) for c in chunks],
            context_lens=[c.context_len for c in chunks],
            block_size=self.block_size,
        )
        return paddle.to_tensor(ids), paddle.to_tensor(pos), meta

    def _sample(self, chunks: Sequence[ScheduledChunk], hidden: paddle.Tensor,
                rows: list[int]) -> dict[str, SampledTokens]:
        sampling_chunks = [c for c in chunks if c.sample]
        if not sampling_chunks:
            return {}
        drafts = [_drafts_of(c) for c in sampling_chunks]
        ks = [c.request.sampling_params.logprobs for c in sampling_chunks]
        sampling_hidden = take_rows(hidden, rows)  # [R, hidden]
        if all(_is_plain_greedy(c.request) for c in sampling_chunks):
            # No per-row sampling state: the argmax of the raw logits, scored only for emitted rows.
            verified = greedy_verify(sampling_hidden, self.lm_head, drafts, ks, self.lm_head.flat_rows)
        else:
            logits = self.lm_head(sampling_hidden)  # [R, vocab]
            batch_rows = [r for c, d in zip(sampling_chunks, drafts, strict=True)
                          for r in _sampling_rows(c.request, d)]
            verified = verify_drafts(logits, SamplingBatch.from_rows(batch_rows, self.vocab_size), drafts, ks)
        # verified.logprobs has one row per emitted token of the requests that asked, in batch order.
        columns = _LogprobColumns(verified.logprobs) if verified.logprobs else None
        sampled = {}
        for chunk, k, ids in zip(sampling_chunks, ks, verified.token_ids, strict=True):
            ids = list(ids)
            sampled[chunk.request.request_id] = (SampledTokens(ids) if k is None
                                                 else columns.take(ids, len(ids), k))
        return sampled

    def _prompt_logprobs(self, chunks: Sequence[ScheduledChunk], hidden: paddle.Tensor,
                         prompt_rows: PromptRows) -> dict[str, tuple[int, SampledTokens]]:
        result: dict[str, tuple[int, SampledTokens]] = {}
        requests = {c.request.request_id: c.request for c in chunks}
        for request_id, (first_position, rows, next_ids) in prompt_rows.items():
            k = requests[request_id].sampling_params.prompt_logprobs
            logits = self.lm_head(take_rows(hidden, rows))
            facts = prompt_logprobs(logits, paddle.to_tensor(np.asarray(next_ids, dtype=np.int64)), k)
            result[request_id] = (first_position, _LogprobColumns(facts).take(next_ids, len(rows), k))
        return result


PromptRows = dict[str, tuple[int, list[int], list[int]]]  # request id -> (first position, rows, next ids)


def _logit_rows(chunks: Sequence[ScheduledChunk]) -> tuple[list[int], PromptRows]:
    """Rows of the flattened batch whose logits are needed: the last row of every sampling chunk, and
    for requests that asked for prompt logprobs, every row whose next token is a known prompt token."""
    sample_rows: list[int] = []
    prompt_rows: PromptRows = {}
    offset = 0
    for chunk in chunks:
        n = len(chunk.token_ids)
        if chunk.sample:
            # The last real token's row, then one row per draft (row j verifies draft j).
            sample_rows.extend(range(offset + n - 1 - chunk.num_draft_tokens, offset + n))
        request = chunk.request
        wants_prompt_logprobs = request.sampling_params.prompt_logprobs is not None
        if wants_prompt_logprobs and chunk.start_position < request.num_prompt_tokens:
            # Row for position p predicts token p + 1; prompt logprobs cover tokens 1 .. prompt_len-1.
            last = min(chunk.context_len, request.num_prompt_tokens - 1)
            positions = list(range(chunk.start_position, last))
            if positions:
                prompt_rows[request.request_id] = (
                    chunk.start_position + 1,
                    [offset + p - chunk.start_position for p in positions],
                    [request.prompt_token_ids[p + 1] for p in positions],
                )
        offset += n
    return sample_rows, prompt_rows


def _is_plain_greedy(request: Request) -> bool:
    """Its token is the raw logits' argmax at this step's first row (so at its draft rows too)."""
    return is_plain_greedy(request.sampling_params, request.num_output_tokens, request.eos_token_ids)


def _drafts_of(chunk: ScheduledChunk) -> tuple[int, ...]:
    return chunk.token_ids[len(chunk.token_ids) - chunk.num_draft_tokens:]


def _sampling_rows(request: Request, drafts: Sequence[int]) -> list[SamplingRow]:
    """One row per logits row of the request: row j sees the outputs plus drafts 0 .. j-1, so its
    penalties, min_tokens, generation index and grammar mask are those of the token it decides."""
    params = request.sampling_params
    if params.seed is None:
        raise ValueError(f"request {request.request_id!r} reached the runner without a resolved seed")
    # A migrated continuation's prompt ends with outputs of the earlier run: for penalties, min_tokens
    # and the generation index they are outputs, as they were in the undisturbed run.
    prompt_len = len(request.prompt_token_ids) - params.resumed_output_tokens
    if prompt_len < 1:
        raise ValueError(f"request {request.request_id!r} resumes {params.resumed_output_tokens} outputs "
                         f"of a {len(request.prompt_token_ids)}-token prompt")
    prompt = np.asarray(request.prompt_token_ids[:prompt_len], dtype=np.int64)
    outputs = np.asarray([*request.prompt_token_ids[prompt_len:], *request.output_token_ids, *drafts],
                         dtype=np.int64)
    num_outputs = params.resumed_output_tokens + request.num_output_tokens
    eos = tuple(sorted(request.eos_token_ids))
    # Row j's grammar mask is the state after the outputs and drafts 0 .. j-1: verification is then
    # lossless with respect to the masked distribution.
    allowed = None if request.grammar is None else request.grammar.allowed_tokens(drafts)
    return [SamplingRow(params=params, seed=params.seed, prompt_token_ids=prompt,
                        output_token_ids=outputs[:num_outputs + j], eos_token_ids=eos,
                        allowed_tokens=None if allowed is None else allowed[j])
            for j in range(len(drafts) + 1)]


class _LogprobColumns:
    """The rows of a TokenLogprobs, read once from the device, handed out request by request."""

    def __init__(self, facts: TokenLogprobs) -> None:
        self._logprob = _on_host(facts.token_logprob).tolist()
        self._rank = _on_host(facts.token_rank).tolist()
        self._top_ids = _on_host(facts.topk_ids)
        self._top_lps = _on_host(facts.topk_logprobs)
        self._next = 0

    def take(self, token_ids: list[int], count: int, k: int) -> SampledTokens:
        """The next `count` rows as the given tokens, with the top `k` of each row."""
        start, end = self._next, self._next + count
        self._next = end
        return SampledTokens(token_ids, self._logprob[start:end], self._rank[start:end], k,
                             self._top_ids[start:end, :k].ravel().tolist(),
                             self._top_lps[start:end, :k].ravel().tolist())


def _on_host(values: paddle.Tensor | np.ndarray) -> np.ndarray:
    return values if isinstance(values, np.ndarray) else values.numpy()
