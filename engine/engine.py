"""The engine: scheduler -> model runner -> per-request outputs, one step at a time.

`LLMEngine` owns one node's requests, KV pool, scheduler and runner. It does no I/O: callers add and
abort requests and call `step()`; the engine process (engine/process.py) and the offline path
(engine/offline.py) wrap it with their own input and output channels.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import replace

from prometheus_client import CollectorRegistry

from pdserve.common.kv_cache import KVCachePool, KVCacheSpec
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.tokens import NO_TOKENS, SampledTokens
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig
from pdserve.engine.grammar import GrammarCompiler, GrammarError
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.protocol import EngineStats, RequestOutput
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import AdmissionError, Scheduler
from pdserve.engine.spec_decoder import SpecDecoder
from pdserve.models.config import ModelConfig
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.tensor_parallel import TensorParallel, attention_shard


def kv_spec_for_model(model_config: ModelConfig, num_blocks: int, block_size: int,
                      dtype: str = "float32", tp: TensorParallel | None = None) -> KVCacheSpec:
    """The pool a model needs: one layer per decoder layer plus its MTP layers (always last). The one
    place the layout is derived; the engine's ready record carries it to the node server and peers.
    Under tensor parallelism it is one rank's pool: the KV heads that rank owns."""
    return KVCacheSpec(
        num_layers=model_config.num_hidden_layers + model_config.num_nextn_predict_layers,
        num_blocks=num_blocks, block_size=block_size,
        num_kv_heads=attention_shard(model_config, tp or TensorParallel()).num_kv_heads,
        head_dim=model_config.head_dim, dtype=dtype,
    )


def kv_spec_for(model: LlamaForCausalLM, config: EngineConfig) -> KVCacheSpec:
    return kv_spec_for_model(model.config, config.cache.num_blocks, config.cache.block_size, tp=model.tp)


class LLMEngine:
    def __init__(self, model: LlamaForCausalLM, config: EngineConfig, kv_pool: KVCachePool,
                 eos_token_ids: Sequence[int], spec_registry: CollectorRegistry | None = None,
                 grammars: GrammarCompiler | None = None) -> None:
        if kv_pool.spec != kv_spec_for(model, config):
            raise ValueError(f"KV pool {kv_pool.spec} does not match the model and config")
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        self.block_manager = BlockManager(config.cache.num_blocks, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, config.num_speculative_tokens)
        self.runner = ModelRunner(model, kv_pool)
        # Compiles requests' grammars (structured output); None: an engine without a tokenizer refuses them.
        self.grammars = grammars
        # Speculative decoding's draft side; its counters go to the registry given (a private one if none).
        self.spec = None if config.speculative is None else SpecDecoder.build(
            config.speculative, model, kv_pool, self.block_manager, config.scheduler.max_model_len,
            spec_registry or CollectorRegistry())
        self.steps = 0
        self._held: dict[str, Request] = {}  # prefilled requests whose blocks the transfer agent reads
        self._progressed: list[Request] = []
        # Prompt logprobs gathered chunk by chunk until the request's first output carries them, keyed
        # by first position so a prefill recomputed after preemption does not add them twice.
        self._prompt_logprobs: dict[str, dict[int, SampledTokens]] = {}

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    params: SamplingParams) -> Request:
        """Queue a request. Raises AdmissionError if it can never be served (the request is then
        already FINISHED_ERROR). An unseeded request gets its seed here, so it can be replayed."""
        vocab_size = self.runner.vocab_size
        if prompt_token_ids and not 0 <= min(prompt_token_ids) <= max(prompt_token_ids) < vocab_size:
            # Checked here: an out-of-range id would fail the embedding mid-step, taking the whole batch down.
            raise AdmissionError(f"request {request_id!r}: prompt token ids must be in [0, {vocab_size})")
        request = self._new_request(request_id, prompt_token_ids, params)
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
                num_extra_tokens: int) -> Request:
        """Reserve blocks for a request whose prompt KV a prefill node will write (raises
        AdmissionError / CapacityError). The blocks are `request.block_table`."""
        request = self._new_request(request_id, prompt_token_ids, params)
        self.scheduler.reserve_for_remote_kv(request, num_extra_tokens)
        return request

    def on_remote_kv(self, request_id: str, first: SampledTokens,
                     draft_token_ids: Sequence[int] = ()) -> RequestOutput | None:
        """The peer delivered the prompt's KV and sampled the first token (`first`, with the logprobs
        the request asked for): decode from here. Returns the request's first output; None if the
        request is unknown."""
        update = self.scheduler.on_remote_kv(request_id, first.token_ids[0], draft_token_ids)
        if update is None:
            return None
        r = update.request
        return RequestOutput(r.request_id, r.status, first if update.new_token_ids else NO_TOKENS,
                             error=r.error or "")

    # -- PD: the prefill side --------------------------------------------------------------------------

    def add_prefill_request(self, request_id: str, prompt_token_ids: Sequence[int],
                            params: SamplingParams) -> Request:
        """Prefill the prompt and sample the first token (with the logprobs asked for), then hold the
        blocks for the transfer agent until `release`."""
        request = self._new_request(request_id, prompt_token_ids, params)
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

    def take_prefill_progress(self) -> list[Request]:
        """Prefill-only requests that computed more prompt KV since the last call (for streaming the
        KV out chunk by chunk while prefill continues)."""
        progressed, self._progressed = self._progressed, []
        return progressed

    def _new_request(self, request_id: str, prompt_token_ids: Sequence[int],
                     params: SamplingParams) -> Request:
        """A request with its seed resolved and its grammar compiled (AdmissionError if it cannot be)."""
        grammar = None
        if params.grammar is not None:
            if self.grammars is None:
                raise AdmissionError(
                    f"request {request_id!r}: this engine has no grammar support (no tokenizer)")
            try:
                grammar = self.grammars.matcher(params.grammar)
                # a migrated continuation's grammar state follows the outputs it resumes from
                resumed = params.resumed_output_tokens
                for token_id in prompt_token_ids[len(prompt_token_ids) - resumed:] if resumed else ():
                    grammar.advance(token_id)
            except GrammarError as exc:
                raise AdmissionError(f"request {request_id!r}: {exc}") from None
        return Request(request_id, prompt_token_ids, self._seeded(params), self.eos_token_ids, grammar)

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
            RequestOutput(r.request_id, RequestStatus.PREEMPTED)
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
        self._progressed.extend(c.request for c in plan.chunks if c.request.prefill_only)
        updates = self.scheduler.on_step_done(plan, sampled)
        if self.spec is not None:
            self.spec.after_step(plan.chunks, result, updates)
        for update in updates:
            request = update.request
            if request.status is RequestStatus.FINISHED_PREFILLED:
                self._held[request.request_id] = request
            tokens = result.sampled[request.request_id].head(len(update.new_token_ids))
            outputs.append(RequestOutput(
                request.request_id, request.status, tokens, update.num_accepted_draft_tokens,
                request.error or "", self._take_prompt_logprobs(request, len(tokens)),
                list(request.draft_token_ids) if request.status is RequestStatus.FINISHED_PREFILLED else [],
            ))
        return outputs

    def _take_prompt_logprobs(self, request: Request, num_new_tokens: int) -> SampledTokens | None:
        """For the request's first output, when it asked: its prompt logprobs (none to score for a
        one-token prompt, an empty record rather than None)."""
        chunks = self._prompt_logprobs.pop(request.request_id, None)
        asked = request.sampling_params.prompt_logprobs is not None
        if not asked or request.num_output_tokens != num_new_tokens:
            return None
        return _by_position(chunks) if chunks else NO_TOKENS

    def _collect_prompt_logprobs(self, computed: dict[str, tuple[int, SampledTokens]]) -> None:
        for request_id, (first_position, tokens) in computed.items():
            request = self.scheduler.get(request_id)
            if request is None or request.num_output_tokens:  # already reported (recomputed after preemption)
                continue
            # A recomputed prefill covers the same chunks again: the first copy of each one stays.
            self._prompt_logprobs.setdefault(request_id, {}).setdefault(first_position, tokens)


def _by_position(chunks: dict[int, SampledTokens]) -> SampledTokens:
    """Chunks keyed by their first position, as one run; where chunks overlap (a prefill recomputed
    after preemption may cut its chunks elsewhere) the earlier-starting chunk's tokens are kept."""
    parts, covered = [], None
    for first in sorted(chunks):
        tokens = chunks[first]
        skip = 0 if covered is None else max(0, covered - first)
        if skip < len(tokens):
            parts.append(tokens.slice(skip, len(tokens)))
            covered = first + len(tokens)
    return SampledTokens.concat(parts)
