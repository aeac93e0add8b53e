"""Draft proposers: after each step, propose the tokens the next decode step verifies.

One small interface (`DraftProposer`), three implementations chosen by name from `make_proposer`:
`mtp` (the model's MTP layer), `ngram` (prompt lookup), `hybrid` (MTP drafts first, the n-gram
match extends them). Proposers only propose; the runner verifies (kernels/spec_verify.py) and the
scheduler feeds the drafts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import paddle

from pdserve.common.kv_cache import KVCachePool
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import ScheduledChunk
from pdserve.engine.spec_config import SpeculativeConfig
from pdserve.kernels.attention import AttentionMetadata
from pdserve.kernels.ngram import ngram_propose, split_draft_budget
from pdserve.kernels.rows import take_rows
from pdserve.kernels.sampling import greedy_token_ids
from pdserve.models.llama import LlamaForCausalLM, lm_head_of


@dataclass(frozen=True)
class ProposalInput:
    """What one finished step hands the proposer; requests already hold the step's new tokens."""

    # The step's chunks in batch order; chunk c's tokens are rows offset_c .. of `hidden`.
    chunks: tuple[ScheduledChunk, ...]
    # [T, hidden] target hidden states of the step (final-normed, the LM head's input).
    hidden: paddle.Tensor
    # Request id -> the most drafts it may get (room left, blocks held); requests not listed get none.
    max_drafts: Mapping[str, int]
    # [T] positions and the attention metadata of the step's target forward (same rows as `hidden`).
    positions: paddle.Tensor
    attn_meta: AttentionMetadata


class DraftProposer(ABC):
    """Proposes draft tokens for the next decode step.

    Invariants every implementation keeps:
    - `propose` runs once per step, after the scheduler applied it: a request's drafts continue its
      `all_token_ids` (whose last token has no KV yet);
    - it returns at most `max_drafts[id]` drafts per listed request, and nothing for others;
    - the drafts depend only on the request's own tokens and KV, never on the rest of the batch
      (except through the batch-wide draft budget, which serves requests in batch order);
    - it may write KV only in layers it owns (the MTP layer) and only at positions of the request's
      block table; it never changes request state.
    """

    @abstractmethod
    def propose(self, step: ProposalInput) -> dict[str, list[int]]:
        """Request id -> drafts (possibly empty) for each request in step.max_drafts."""


# A prefilled request (prefill node) gets drafts too: they travel with its first token.
DRAFTING_STATUSES = frozenset({RequestStatus.RUNNING, RequestStatus.FINISHED_PREFILLED})


def _sampling_requests(step: ProposalInput) -> list[Request]:
    """Requests that drafts are wanted for, in batch order."""
    return [
        c.request
        for c in step.chunks
        if c.request.request_id in step.max_drafts and c.request.status in DRAFTING_STATUSES
    ]


class NgramProposer(DraftProposer):
    def __init__(self, max_ngram_size: int, min_ngram_size: int, max_batch_draft_tokens: int) -> None:
        self.max_n = max_ngram_size
        self.min_n = min_ngram_size
        self.budget = max_batch_draft_tokens

    def propose(self, step: ProposalInput) -> dict[str, list[int]]:
        return self.extend({r.request_id: [] for r in _sampling_requests(step)}, step)

    def extend(self, drafts: Mapping[str, list[int]], step: ProposalInput) -> dict[str, list[int]]:
        """Extend each request's drafts (MTP's, or none) by an n-gram match up to its limit."""
        requests = [r for r in _sampling_requests(step) if r.request_id in drafts]
        wanted = [step.max_drafts[r.request_id] - len(drafts[r.request_id]) for r in requests]
        granted = split_draft_budget(wanted, self.budget - sum(len(d) for d in drafts.values()))
        result = dict(drafts)
        for request, n in zip(requests, granted, strict=True):
            if n <= 0:
                continue
            prior = drafts[request.request_id]
            result[request.request_id] = prior + ngram_propose(
                request.all_token_ids + prior, request.num_prompt_tokens, self.max_n, self.min_n, n
            )
        return result


class MTPProposer(DraftProposer):
    """The model's MTP layer, run for `num_model_steps` substeps.

    Substep 1 runs the layer over every row of the step's target forward (entry i pairs h_i with
    t_{i+1}, RoPE position i, docs/architecture.md), with the target's positions and attention
    metadata: the MTP KV cache has the target's geometry, so the slots and the attention plan are
    the same and nothing is planned twice. That (re)writes the MTP KV of every position the target
    computed; past attention the layer computes only the drafting rows. Rows past a request's last
    emitted token (rejected drafts) pair with token 0: their KV entries lie beyond the request's
    computed tokens, where the next step's substep 1 writes each position before any query can
    read it (queries are causal, and a step writes its KV before attending) — as it does for
    entries that substeps j > 1 write for drafts that are then rejected. The last emitted row of a
    request drafts t_{n+1} after its new token t_n. Substep j > 1 feeds the previous draft at
    position n + j - 2, with the previous substep's MTP state standing in for the (unknown) target
    hidden state there, as in DeepSeek-V3 / FastDeploy.
    """

    def __init__(self, model: LlamaForCausalLM, kv_pool: KVCachePool, num_model_steps: int) -> None:
        if model.mtp is None:
            raise ValueError(
                "speculative_config.method 'mtp' needs a model with an MTP layer "
                "(num_nextn_predict_layers >= 1 in config.json)"
            )
        self.model = model
        self.lm_head = lm_head_of(model)
        self.mtp = model.mtp
        self.kv_cache = kv_pool.caches[-1]
        self.block_size = kv_pool.spec.block_size
        self.num_model_steps = num_model_steps

    @paddle.no_grad()
    def propose(self, step: ProposalInput) -> dict[str, list[int]]:
        if not step.chunks:
            return {}
        next_ids, last_rows = _mtp_rows(step.chunks)
        wanted = [
            (request, row)
            for request, row in last_rows
            if step.max_drafts.get(request.request_id, 0) > 0
        ]
        # The layer writes the MTP K/V of every row, and past attention computes the drafting rows
        # only (every row when none drafts: the K/V is needed all the same).
        rows = [row for _, row in wanted] or None
        state = self.mtp(next_ids, step.positions, step.hidden, self.kv_cache, step.attn_meta, rows)
        drafts: dict[str, list[int]] = {request.request_id: [] for request, _ in wanted}
        if not wanted:
            return drafts
        tokens = self._draft(state)  # state: [len(wanted), hidden]
        for substep in range(self.num_model_steps):
            for (request, _), token in zip(wanted, tokens, strict=True):
                if len(drafts[request.request_id]) < step.max_drafts[request.request_id]:
                    drafts[request.request_id].append(token)
            if substep + 1 == self.num_model_steps:
                break
            active = [
                i
                for i, (request, _) in enumerate(wanted)
                if len(drafts[request.request_id]) < step.max_drafts[request.request_id]
            ]
            if not active:
                break
            wanted = [wanted[i] for i in active]
            state = take_rows(state, active)
            state = self._substep([r for r, _ in wanted], [tokens[i] for i in active], state, substep)
            tokens = self._draft(state)
        return drafts

    def _draft(self, state: paddle.Tensor) -> list[int]:
        return greedy_token_ids(self.lm_head(state)).tolist()

    def _substep(
        self,
        requests: Sequence[Request],
        tokens: Sequence[int],
        state: paddle.Tensor,
        substep: int,
    ) -> paddle.Tensor:
        # Substep j = substep + 2 (1-based) writes the entry at position n + j - 2, n = num_computed_tokens.
        positions = [r.num_computed_tokens + substep for r in requests]
        meta = AttentionMetadata.build(
            block_tables=[r.block_table for r in requests],
            query_lens=[1] * len(requests),
            context_lens=[p + 1 for p in positions],
            block_size=self.block_size,
        )
        return self.mtp(
            np.asarray(tokens, dtype=np.int64),
            paddle.to_tensor(np.asarray(positions, dtype=np.int64)),
            state,
            self.kv_cache,
            meta,
        )


def _mtp_rows(chunks: Sequence[ScheduledChunk]) -> tuple[np.ndarray, list[tuple[Request, int]]]:
    """Substep 1's inputs over the step's rows: t_{i+1} for the row at position i ([T] int64; 0 past a
    request's computed tokens), and each drafting request's last emitted row (the one that drafts)."""
    next_ids = np.zeros(sum(len(c.token_ids) for c in chunks), dtype=np.int64)
    last_rows: list[tuple[Request, int]] = []
    offset = 0
    for chunk in chunks:
        request = chunk.request
        num_valid = min(request.num_computed_tokens - chunk.start_position, len(chunk.token_ids))
        if num_valid > 0:
            known = request.token_ids_between(chunk.start_position + 1, chunk.start_position + 1 + num_valid)
            next_ids[offset:offset + len(known)] = known
            if request.status in DRAFTING_STATUSES:
                last_rows.append((request, offset + num_valid - 1))
        offset += len(chunk.token_ids)
    return next_ids, last_rows


class HybridProposer(DraftProposer):
    """MTP drafts `num_model_steps` tokens, then the n-gram match over prompt + all tokens + those
    drafts extends each request up to `num_speculative_tokens`."""

    def __init__(self, mtp: MTPProposer, ngram: NgramProposer) -> None:
        self.mtp = mtp
        self.ngram = ngram

    def propose(self, step: ProposalInput) -> dict[str, list[int]]:
        drafts = self.mtp.propose(step)
        return self.ngram.extend(drafts, step)


ProposerFactory = Callable[[SpeculativeConfig, LlamaForCausalLM, KVCachePool], DraftProposer]


def _ngram(config: SpeculativeConfig, model: LlamaForCausalLM, kv_pool: KVCachePool) -> DraftProposer:
    return NgramProposer(config.max_ngram_size, config.min_ngram_size, config.max_batch_draft_tokens)


def _mtp(config: SpeculativeConfig, model: LlamaForCausalLM, kv_pool: KVCachePool) -> DraftProposer:
    return MTPProposer(model, kv_pool, config.num_model_steps)


def _hybrid(config: SpeculativeConfig, model: LlamaForCausalLM, kv_pool: KVCachePool) -> DraftProposer:
    ngram = NgramProposer(config.max_ngram_size, config.min_ngram_size, config.max_batch_draft_tokens)
    return HybridProposer(MTPProposer(model, kv_pool, config.num_model_steps), ngram)


PROPOSERS: Mapping[str, ProposerFactory] = {"ngram": _ngram, "mtp": _mtp, "hybrid": _hybrid}


def make_proposer(config: SpeculativeConfig, model: LlamaForCausalLM, kv_pool: KVCachePool) -> DraftProposer:
    return PROPOSERS[config.proposer_name](config, model, kv_pool)
