"""The engine: scheduler -> model runner -> per-request outputs, one step at a time.

`LLMEngine` owns one node's requests, KV pool, scheduler and runner. It does no I/O: callers add and
abort requests and call `step()`; the engine process (engine/process.py) and the offline path
(engine/offline.py) wrap it with their own input and output channels.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry

from pdserve.common.kv_cache import KVCachePool, KVCacheSpec
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig
from pdserve.engine.model_runner import ModelRunner, TokenInfo
from pdserve.engine.protocol import EngineStats
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import AdmissionError, Scheduler
from pdserve.engine.spec_decoder import SpecDecoder
from pdserve.models.config import ModelConfig
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
    # FINISHED_PREFILLED (prefill node): the MTP / n-gram drafts the decode node's first step verifies.
    draft_token_ids: tuple[int, ...] = ()

    @property
    def finished(self) -> bool:
        return self.status.is_finished


def kv_spec_for_model(model_config: ModelConfig, num_blocks: int, block_size: int,
                      dtype: str = "float32") -> KVCacheSpec:
    """The pool a model needs: one layer per decoder layer plus its MTP layers (always last). The one
    place the layout is derived; the engine's ready record carries it to the node server and peers."""
    return KVCacheSpec(
        num_layers=model_config.num_hidden_layers + model_config.num_nextn_predict_layers,
        num_blocks=num_blocks, block_size=block_size, num_kv_heads=model_config.num_key_value_heads,
        head_dim=model_config.head_dim, dtype=dtype,
    )


def kv_spec_for(model: LlamaForCausalLM, config: EngineConfig) -> KVCacheSpec:
    return kv_spec_for_model(model.config, config.cache.num_blocks, config.cache.block_size)


class LLMEngine:
    def __init__(self, model: LlamaForCausalLM, config: EngineConfig, kv_pool: KVCachePool,
                 eos_token_ids: Sequence[int], spec_registry: CollectorRegistry | None = None) -> None:
        if kv_pool.spec != kv_spec_for(model, config):
            raise ValueError(f"KV pool {kv_pool.spec} does not match the model and config")
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        self.block_manager = BlockManager(config.cache.num_blocks, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.runner = ModelRunner(model, kv_pool)
        # Speculative decoding's draft side; its counters go to the registry given (a private one if none).
        self.spec = None if config.speculative is None else SpecDecoder.build(
            config.speculative, model, kv_pool, self.block_manager, config.scheduler.max_model_len,
            spec_registry or CollectorRegistry())
        self.steps = 0
        self._held: dict[str, Request] = {}  # prefilled requests whose blocks the transfer agent reads
        self._progressed: list[Request] = []
        # Prompt logprobs gathered chunk by chunk until the request's first output carries them,
        # keyed by position so a prefill recomputed after preemption does not add them twice.
        self._prompt_logprobs: dict[str, dict[int, TokenInfo]] = {}

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                    seq_id: int) -> Request:
        """Queue a request. Raises AdmissionError if it can never be served (the request is then
        already FINISHED_ERROR). An unseeded request gets its seed here, so it can be replayed."""
        vocab_size = self.runner.vocab_size
        if prompt_token_ids and not 0 <= min(prompt_token_ids) <= max(prompt_token_ids) < vocab_size:
            # Checked here: an out-of-range id would fail the embedding mid-step, taking the whole batch down.
            raise AdmissionError(f"request {request_id!r}: prompt token ids must be in [0, {vocab_size})")
        request = Request(request_id, prompt_token_ids, self._seeded(params), seq_id, self.eos_token_ids)
        self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def has_schedulable_work(self) -> bool:
        """Something to step on: requests waiting for a peer's KV alone keep the engine idle."""
        return bool(self.scheduler.running or self.scheduler.waiting)

    # -- PD: the decode side ---------------------------------------------------------------------------

    def reserve(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                seq_id: int, num_extra_tokens: int) -> Request:
        """Reserve blocks for a request whose prompt KV a prefill node will write (raises
        AdmissionError / CapacityError). The blocks are `request.block_table`."""
        request = Request(request_id, prompt_token_ids, self._seeded(params), seq_id, self.eos_token_ids)
        self.scheduler.reserve_for_remote_kv(request, num_extra_tokens)
        return request

    def on_remote_kv(self, request_id: str, first_token_id: int,
                     draft_token_ids: Sequence[int] = ()) -> RequestOutput | None:
        """The peer delivered the prompt's KV and sampled the first token: decode from here."""
        update = self.scheduler.on_remote_kv(request_id, first_token_id, draft_token_ids)
        if update is None:
            return None
        r = update.request
        return RequestOutput(r.request_id, r.seq_id, update.new_token_ids, (), r.status, 0, r.error)

    # -- PD: the prefill side --------------------------------------------------------------------------

    def add_prefill_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                            seq_id: int) -> Request:
        """Prefill the prompt and sample the first token (with logprobs), then hold the blocks for the
        transfer agent until `release`."""
        request = Request(request_id, prompt_token_ids, self._seeded(params), seq_id, self.eos_token_ids)
        request.prefill_only = True
        self.scheduler.add(request)
        return request

    def release(self, request_id: str) -> bool:
        """Free a prefilled request's blocks (its KV has been handed over, or the hand-over failed)."""
        request = self._held.pop(request_id, None)
        if request is None:
            return False
        self.block_manager.free(request)
        return True

    def held(self, request_id: str) -> Request | None:
        """A prefilled request whose blocks are held for the transfer agent."""
        return self._held.get(request_id)

    def take_prefill_progress(self) -> list[Request]:
        """Prefill-only requests that computed more prompt KV since the last call (for streaming the
        KV out chunk by chunk while prefill continues)."""
        progressed, self._progressed = self._progressed, []
        return progressed

    def _seeded(self, params: SamplingParams) -> SamplingParams:
        return params if params.seed is not None else replace(params, seed=secrets.randbits(63))

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
        if self.spec is not None:
            self.spec.on_preempted(plan.preempted_request_ids)
            self.spec.forget(plan.finished_request_ids)
        if not plan.chunks:
            return outputs
        result = self.runner.execute(plan)
        self.steps += 1
        self._collect_prompt_logprobs(result.prompt_logprobs)
        sampled = {rid: s.token_ids for rid, s in result.sampled.items()}
        self._progressed.extend(c.request for c in plan.chunks if c.request.prefill_only and not c.sample)
        updates = self.scheduler.on_step_done(plan, sampled)
        if self.spec is not None:
            self.spec.after_step(plan.chunks, result, updates)
        for update in updates:
            request = update.request
            if request.status is RequestStatus.FINISHED_PREFILLED:
                self._held[request.request_id] = request
            infos = result.sampled[request.request_id].infos[: len(update.new_token_ids)]
            prompt = self._prompt_logprobs.pop(request.request_id, {})
            outputs.append(RequestOutput(
                request.request_id, request.seq_id, update.new_token_ids, infos, request.status,
                update.num_accepted_draft_tokens, request.error, tuple(prompt[p] for p in sorted(prompt)),
                tuple(request.draft_token_ids) if request.status is RequestStatus.FINISHED_PREFILLED else (),
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
