"""The draft side of speculative decoding, called by the engine once per step.

After the scheduler applied a step, `SpecDecoder.after_step` counts what the step verified, gives
every request that just sampled its draft limit (room left under max_tokens / max_model_len, and
blocks for the KV the drafts will need), asks the proposer for drafts, and hands them to the
requests; the next `schedule()` feeds them and the runner verifies them.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from pdserve.common.kv_cache import KVCachePool
from pdserve.common.spec_metrics import RequestSpecStats
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.model_runner import StepResult
from pdserve.engine.proposers import DRAFTING_STATUSES, DraftProposer, ProposalInput, make_proposer
from pdserve.engine.request import Request
from pdserve.engine.scheduler import RequestUpdate, ScheduledChunk
from pdserve.engine.spec_config import SpeculativeConfig
from pdserve.engine.spec_metrics import SpecDecodeCounters, log_finished
from pdserve.models.llama import LlamaForCausalLM


class SpecDecoder:
    def __init__(
        self,
        config: SpeculativeConfig,
        proposer: DraftProposer,
        block_manager: BlockManager,
        max_model_len: int,
        counters: SpecDecodeCounters,
    ) -> None:
        self.config = config
        self.proposer = proposer
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.counters = counters
        self._stats: dict[str, RequestSpecStats] = {}

    @classmethod
    def build(
        cls,
        config: SpeculativeConfig,
        model: LlamaForCausalLM,
        kv_pool: KVCachePool,
        block_manager: BlockManager,
        max_model_len: int,
        registry: CollectorRegistry,
    ) -> SpecDecoder:
        return cls(
            config,
            make_proposer(config, model, kv_pool),
            block_manager,
            max_model_len,
            SpecDecodeCounters(registry, config.num_speculative_tokens),
        )

    def after_step(
        self, chunks: Sequence[ScheduledChunk], result: StepResult, updates: Sequence[RequestUpdate]
    ) -> None:
        for update in updates:
            self._record(update)
        limits = {
            u.request.request_id: self.draft_limit(u.request)
            for u in updates
            if u.request.status in DRAFTING_STATUSES
        }
        drafts = self.proposer.propose(
            ProposalInput(tuple(chunks), result.hidden, limits, result.positions, result.attn_meta)
        )
        for update in updates:
            if update.request.request_id in drafts:
                update.request.set_draft_tokens(drafts[update.request.request_id])

    def draft_limit(self, request: Request) -> int:
        """Drafts the request may get: at most k, never past its last possible token, and only as
        many as its blocks can hold KV for (the next step writes positions up to num_tokens + d - 1;
        MTP substeps write below that)."""
        room = request.max_num_tokens(self.max_model_len) - request.num_tokens - 1
        limit = max(0, min(self.config.num_speculative_tokens, room))
        if limit and not self.block_manager.ensure_capacity(request, request.num_tokens + limit):
            capacity = len(request.block_table) * self.block_manager.block_size
            limit = max(0, min(limit, capacity - request.num_tokens))
        return limit

    def forget(self, request_ids: Sequence[str]) -> None:
        """Drop per-request state of requests that left the engine (aborted, preempted-and-finished)."""
        for request_id in request_ids:
            self._stats.pop(request_id, None)

    def on_preempted(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            if request_id in self._stats:
                self._stats[request_id].on_preempted()

    def _record(self, update: RequestUpdate) -> None:
        self.counters.on_verified(update.num_draft_tokens, update.num_accepted_draft_tokens)
        request_id = update.request.request_id
        stats = self._stats.get(request_id)
        if stats is None:  # not setdefault: that would build a new one every step
            stats = self._stats[request_id] = RequestSpecStats(self.config.num_speculative_tokens)
        stats.on_tokens(len(update.new_token_ids))
        if update.request.is_finished:
            log_finished(request_id, stats.metrics())
            del self._stats[request_id]
