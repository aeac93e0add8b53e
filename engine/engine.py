"""The engine: scheduler -> model runner -> per-request outputs, one step at a time.

`LLMEngine` owns one node's requests, KV pool, scheduler and runner. It does no I/O: callers add and
abort requests and call `step()`; the engine process (engine/process.py) and the offline path
(engine/offline.py) wrap it with their own input and output channels.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache import KVCachePool, KVCacheSpec
from pdserve.engine.model_runner import ModelRunner, TokenInfo
from pdserve.engine.protocol import EngineStats
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.models.llama import LlamaForCausalLM


@dataclass(frozen=True)
class RequestOutput:
    """What one step did to one request."""

    request_id: str
    seq_id: int
    new_token_ids: tuple[int, ...]
    infos: tuple[TokenInfo, ...]  # per new token when logprobs were asked for, else empty
    status: RequestStatus  # RUNNING, PREEMPTED or a FINISHED_* status
    num_accepted_drafts: int = 0
    error: str | None = None
    # Raw logprobs of prompt tokens 1 .. n-1, on the request's first sampled output, when asked for.
    prompt_logprobs: tuple[TokenInfo, ...] = ()

    @property
    def finished(self) -> bool:
        return self.status.is_finished


def kv_spec_for(model: LlamaForCausalLM, config: EngineConfig) -> KVCacheSpec:
    c = model.config
    return KVCacheSpec(
        num_layers=c.num_hidden_layers + (1 if model.mtp is not None else 0),
        num_blocks=config.cache.num_blocks,
        block_size=config.cache.block_size,
        num_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
    )


class LLMEngine:
    def __init__(self, model: LlamaForCausalLM, config: EngineConfig, kv_pool: KVCachePool,
                 eos_token_ids: Sequence[int]) -> None:
        if kv_pool.spec != kv_spec_for(model, config):
            raise ValueError(f"KV pool {kv_pool.spec} does not match the model and config")
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        self.block_manager = BlockManager(config.cache.num_blocks, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.runner = ModelRunner(model, kv_pool)
        self.steps = 0
        # Prompt logprobs gathered chunk by chunk until the request's first output carries them,
        # keyed by position so a prefill recomputed after preemption does not add them twice.
        self._prompt_logprobs: dict[str, dict[int, TokenInfo]] = {}

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                    seq_id: int) -> Request:
        """Queue a request. Raises AdmissionError if it can never be served (the request is then
        already FINISHED_ERROR). An unseeded request gets its seed here, so it can be replayed."""
        if params.seed is None:
            params = replace(params, seed=secrets.randbits(63))
        request = Request(request_id, prompt_token_ids, params, seq_id, self.eos_token_ids)
        self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            free_blocks=self.block_manager.num_free_blocks,
            total_blocks=self.config.cache.num_blocks,
            steps=self.steps,
        )

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns outputs of sampled and preempted requests."""
        plan = self.scheduler.schedule()
        outputs = [
            RequestOutput(r.request_id, r.seq_id, (), (), RequestStatus.PREEMPTED)
            for r in map(self.scheduler.get, plan.preempted_request_ids) if r is not None
        ]
        for request_id in plan.finished_request_ids:  # aborted before their first output
            self._prompt_logprobs.pop(request_id, None)
        if not plan.chunks:
            return outputs
        result = self.runner.execute(plan)
        self.steps += 1
        self._collect_prompt_logprobs(result.prompt_logprobs)
        sampled = {rid: s.token_ids for rid, s in result.sampled.items()}
        for update in self.scheduler.on_step_done(plan, sampled):
            request = update.request
            infos = result.sampled[request.request_id].infos[: len(update.new_token_ids)]
            prompt = self._prompt_logprobs.pop(request.request_id, {})
            outputs.append(RequestOutput(
                request.request_id, request.seq_id, update.new_token_ids, infos, request.status,
                update.num_accepted_draft_tokens, request.error, tuple(prompt[p] for p in sorted(prompt)),
            ))
        return outputs

    def _collect_prompt_logprobs(self, computed: dict[str, tuple[int, tuple[TokenInfo, ...]]]) -> None:
        for request_id, (first_position, infos) in computed.items():
            request = self.scheduler.get(request_id)
            if request is None or request.num_output_tokens:  # already reported (recomputed after preemption)
                continue
            held = self._prompt_logprobs.setdefault(request_id, {})
            for offset, info in enumerate(infos):
                held.setdefault(first_position + offset, info)
