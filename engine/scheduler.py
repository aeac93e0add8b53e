"""Continuous-batching scheduler: decides which tokens of which requests one step feeds.

Never touches tensors. Each step has a token budget (`max_num_batched_tokens`) and a batch cap
(`max_num_seqs`). Running decodes go first (1 token + its drafts each), then running requests that
are still prefilling, then waiting requests, whose prompts are chunked to the remaining budget.
When a running request cannot get a block, the most recently admitted request not yet scheduled
this step is preempted (recompute mode) and re-queued at the front of the waiting queue.

The model runner consumes only `SchedulerOutput`; the engine loop then calls `on_step_done` with
the sampled tokens, which advances `num_computed_tokens`, appends tokens and finishes requests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import SchedulerConfig
from pdserve.engine.request import Request, RequestStatus


class AdmissionError(ValueError):
    """A request can never be served by this engine (the message says why); it is FINISHED_ERROR."""


class CapacityError(AdmissionError):
    """No room for the request right now (a busy pool); another node, or later, may serve it."""


@dataclass(frozen=True)
class ScheduledChunk:
    """The tokens one request feeds in one step."""

    request: Request
    # Tokens to feed: the request's next uncomputed tokens, then num_draft_tokens drafts at the tail.
    token_ids: tuple[int, ...]
    # Position of token_ids[0] (= request.num_computed_tokens before the step); the chunk's tokens
    # occupy positions start_position .. start_position + len(token_ids) - 1.
    start_position: int
    # The request's blocks, already covering every position of this chunk.
    block_table: tuple[int, ...]
    # Whether the chunk reaches the end of the request's tokens, so the logits of its last
    # 1 + num_draft_tokens positions produce new tokens. False for a non-final prefill chunk.
    sample: bool
    # Speculative drafts at the tail of token_ids, to verify this step (0 without speculation).
    num_draft_tokens: int

    @property
    def context_len(self) -> int:
        """Tokens in the cache for this request after the step's writes."""
        return self.start_position + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """Everything the model runner needs for one step, and nothing else."""

    # In batch order: decodes first, then prefill chunks. Empty when there is nothing to run.
    chunks: tuple[ScheduledChunk, ...]
    # Sum of len(chunk.token_ids); never above max_num_batched_tokens.
    num_batched_tokens: int
    # Requests that lost their KV this step (recomputed on re-admission): drop per-request state.
    preempted_request_ids: tuple[str, ...]
    # Requests finished or aborted since the previous step: drop per-request state.
    finished_request_ids: tuple[str, ...]


@dataclass(frozen=True)
class RequestUpdate:
    """What one step did to one sampled request, for the engine's output queue."""

    request: Request  # its status says whether (and why) it finished
    new_token_ids: tuple[int, ...]  # appended this step; nothing after a stop token
    num_draft_tokens: int  # drafts verified this step
    num_accepted_draft_tokens: int  # of those, accepted by the target model


class _StepPlan:
    """The chunks chosen so far in one schedule() call and the budget they leave."""

    def __init__(self, token_budget: int) -> None:
        self.token_budget = token_budget
        self.chunks: list[ScheduledChunk] = []
        self.preempted_request_ids: list[str] = []

    def add(self, chunk: ScheduledChunk) -> None:
        self.chunks.append(chunk)
        self.token_budget -= len(chunk.token_ids)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 num_speculative_tokens: int = 0) -> None:
        self.config = config
        self.block_manager = block_manager
        self.num_speculative_tokens = num_speculative_tokens  # drafts a decode step may verify
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        # Decode side: blocks reserved, the prompt's KV is being written by a prefill peer.
        self.awaiting_kv: dict[str, Request] = {}
        self._requests: dict[str, Request] = {}
        self._finished_since_last_step: list[str] = []

    # -- intake and exits --------------------------------------------------------------------------

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def add(self, request: Request) -> None:
        """Queue a new request; raises AdmissionError (and finishes it) if it can never be served."""
        self._check_new(request)
        reason = self._rejection_reason(request)
        if reason is not None:
            request.finish(RequestStatus.FINISHED_ERROR, error=reason)
            raise AdmissionError(f"request {request.request_id!r}: {reason}")
        self._requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """Abort a waiting or running request and free its blocks; False if it is unknown."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus) -> bool:
        """Finish a request from outside the step (abort, a stop string seen by the node server)."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        if request in self.running:
            self.running.remove(request)
        elif request.request_id in self.awaiting_kv:
            del self.awaiting_kv[request.request_id]
        else:
            self.waiting.remove(request)
        request.finish(status)
        self._release(request)
        return True

    # -- the decode side of PD ---------------------------------------------------------------------------

    def reserve_for_remote_kv(self, request: Request, num_extra_tokens: int) -> None:
        """Decode side: allocate blocks for the prompt plus num_extra_tokens (the first token and the
        drafts to verify), which a prefill peer will fill; not scheduled until `on_remote_kv`.

        Raises AdmissionError when the request can never be served, CapacityError when the pool has no
        room for it now (the caller fails fast; the router may retry elsewhere)."""
        self._check_new(request)
        reason = self._rejection_reason(request)
        if reason is not None:
            request.finish(RequestStatus.FINISHED_ERROR, error=reason)
            raise AdmissionError(f"request {request.request_id!r}: {reason}")
        if not self.block_manager.ensure_capacity(request, request.num_prompt_tokens + num_extra_tokens):
            request.finish(RequestStatus.FINISHED_ERROR, error="no free KV blocks")
            raise CapacityError(f"request {request.request_id!r}: no free KV blocks for "
                                f"{request.num_prompt_tokens} prompt tokens")
        request.wait_for_remote_kv()
        self._requests[request.request_id] = request
        self.awaiting_kv[request.request_id] = request

    def on_remote_kv(self, request_id: str, first_token_id: int,
                     draft_token_ids: Sequence[int] = ()) -> RequestUpdate | None:
        """The prompt's KV is in the reserved blocks and the peer sampled the first token: the request
        joins the running batch (or finishes at once if that token ends it). None if it is unknown."""
        request = self.awaiting_kv.pop(request_id, None)
        if request is None:
            return None
        request.num_computed_tokens = request.num_prompt_tokens
        request.start_running()
        if request.grammar is not None and not request.grammar.accepts(first_token_id):
            # The peer's first token is checked like a local one would have been masked.
            request.finish(RequestStatus.FINISHED_ERROR,
                           f"the prefill peer's first token {first_token_id} violates the request's grammar")
            self._release(request)
            return RequestUpdate(request=request, new_token_ids=(), num_draft_tokens=0,
                                 num_accepted_draft_tokens=0)
        request.append_token(first_token_id)
        stop = request.stop_status(self.config.max_model_len)
        if stop is not None:
            request.finish(stop)
            self._release(request)
        else:
            request.set_draft_tokens(draft_token_ids[: self.num_speculative_tokens])
            self.running.append(request)
        return RequestUpdate(request=request, new_token_ids=(first_token_id,), num_draft_tokens=0,
                             num_accepted_draft_tokens=0)

    def _check_new(self, request: Request) -> None:
        if request.status is not RequestStatus.WAITING or request.num_output_tokens:
            raise ValueError(f"add: {request!r} must be a fresh WAITING request")
        if request.request_id in self._requests:
            raise ValueError(f"add: request id {request.request_id!r} in use")

    def _rejection_reason(self, request: Request) -> str | None:
        max_model_len = self.config.max_model_len
        if request.num_prompt_tokens >= max_model_len:
            return (f"prompt has {request.num_prompt_tokens} tokens, max_model_len {max_model_len} "
                    "leaves no room for output")
        # Admitted requests must fit the pool alone, or one left alone would preempt itself forever.
        blocks = self.block_manager.blocks_needed(request.max_num_tokens(max_model_len))
        if blocks > self.block_manager.num_blocks:
            return (f"needs up to {blocks} KV blocks (prompt {request.num_prompt_tokens} + max_tokens "
                    f"{request.sampling_params.max_tokens}) but the pool has {self.block_manager.num_blocks}")
        return None

    def _release(self, request: Request) -> None:
        self.block_manager.free(request)
        del self._requests[request.request_id]
        self._finished_since_last_step.append(request.request_id)

    # -- one step ------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        plan = _StepPlan(self.config.max_num_batched_tokens)
        self._schedule_running(plan)
        # Admitting new work right after preempting would only take the blocks just freed.
        if not plan.preempted_request_ids:
            self._schedule_waiting(plan)
        finished = tuple(self._finished_since_last_step)
        self._finished_since_last_step.clear()
        return SchedulerOutput(
            chunks=tuple(plan.chunks),
            num_batched_tokens=self.config.max_num_batched_tokens - plan.token_budget,
            preempted_request_ids=tuple(plan.preempted_request_ids),
            finished_request_ids=finished,
        )

    def _schedule_running(self, plan: _StepPlan) -> None:
        # Decodes before prefill chunks, each group in admission order.
        pending = ([r for r in self.running if r.num_uncomputed_tokens == 1]
                   + [r for r in self.running if r.num_uncomputed_tokens > 1])
        index = 0
        while index < len(pending) and plan.token_budget > 0:
            request = pending[index]
            num_new, num_drafts = self._num_tokens_to_feed(request, plan.token_budget)
            if num_new == 0:
                index += 1
                continue
            if not self._reserve_or_preempt(request, num_new + num_drafts, pending, index, plan):
                continue  # preempted itself; pending[index] is now the next request
            plan.add(self._make_chunk(request, num_new, num_drafts))
            index += 1

    def _reserve_or_preempt(self, request: Request, num_tokens: int, pending: list[Request], index: int,
                            plan: _StepPlan) -> bool:
        """Get blocks for num_tokens more tokens of pending[index], preempting as needed.

        Returns False if the request itself had to be preempted. Preempted requests leave pending.
        """
        while not self.block_manager.ensure_capacity(request, request.num_computed_tokens + num_tokens):
            # Requests already scheduled this step (pending[:index]) keep their blocks: the runner
            # will use them. Among the rest, the most recently admitted goes.
            victim = max(pending[index:], key=self.running.index)
            pending.remove(victim)
            self._preempt(victim)
            plan.preempted_request_ids.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.preempt()
        self.waiting.appendleft(request)

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        while self.waiting and plan.token_budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_new, _ = self._num_tokens_to_feed(request, plan.token_budget)
            # First come, first served: nobody overtakes a request that does not fit yet.
            if num_new == 0 or not self.block_manager.ensure_capacity(request, num_new):
                return
            self.waiting.popleft()
            request.start_running()
            self.running.append(request)
            plan.add(self._make_chunk(request, num_new, 0))

    def _num_tokens_to_feed(self, request: Request, token_budget: int) -> tuple[int, int]:
        """(uncomputed tokens, drafts) the request feeds this step within the budget; (0, 0): none."""
        num_uncomputed = request.num_uncomputed_tokens
        if num_uncomputed == 1:
            return 1, self._num_drafts_to_verify(request, token_budget)
        num_new = min(num_uncomputed, token_budget)
        if self.config.long_prefill_token_threshold:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        if num_new < num_uncomputed and not self.config.enable_chunked_prefill:
            return 0, 0
        return num_new, 0

    def _num_drafts_to_verify(self, request: Request, token_budget: int) -> int:
        # A step with d drafts can add up to d + 1 tokens; never more than the request may still get.
        room = request.max_num_tokens(self.config.max_model_len) - request.num_tokens - 1
        return max(0, min(len(request.draft_token_ids), self.num_speculative_tokens,
                          token_budget - 1, room))

    @staticmethod
    def _make_chunk(request: Request, num_new: int, num_drafts: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        token_ids = request.token_ids_between(start, start + num_new) + request.draft_token_ids[:num_drafts]
        return ScheduledChunk(
            request=request,
            token_ids=tuple(token_ids),
            start_position=start,
            block_table=tuple(request.block_table),
            sample=start + num_new == request.num_tokens,
            num_draft_tokens=num_drafts,
        )

    # -- after the runner ------------------------------------------------------------------------------

    def on_step_done(self, output: SchedulerOutput,
                     sampled_token_ids: Mapping[str, Sequence[int]]) -> list[RequestUpdate]:
        """Advance every scheduled request by what the runner computed and sampled.

        sampled_token_ids holds, for each chunk with sample=True, the accepted drafts followed by
        one new token (just the new token without drafts). Requests finished meanwhile are skipped.
        """
        updates: list[RequestUpdate] = []
        for chunk in output.chunks:
            request = chunk.request
            if request.status is not RequestStatus.RUNNING:
                continue  # aborted or finished between schedule() and now
            sampled = tuple(sampled_token_ids.get(request.request_id, ()))
            _check_sampled(chunk, sampled)
            num_real = len(chunk.token_ids) - chunk.num_draft_tokens
            if not chunk.sample:
                request.num_computed_tokens += num_real
                continue
            # Accepted drafts' KV was written this step and is valid; rejected drafts' is overwritten.
            request.num_computed_tokens += num_real + len(sampled) - 1
            request.draft_token_ids = []
            if request.prefill_only:
                updates.append(self._hand_off_prefilled(request, sampled[-1]))
            else:
                updates.append(self._append_sampled(request, chunk, sampled))
        return updates

    def _hand_off_prefilled(self, request: Request, first_token_id: int) -> RequestUpdate:
        """Prefill node: the first token is sampled. The request leaves the scheduler but keeps its
        blocks — the transfer agent still reads them — until the engine releases it."""
        request.append_token(first_token_id)
        self.running.remove(request)
        request.finish(RequestStatus.FINISHED_PREFILLED)
        del self._requests[request.request_id]
        return RequestUpdate(request=request, new_token_ids=(first_token_id,), num_draft_tokens=0,
                             num_accepted_draft_tokens=0)

    def _append_sampled(self, request: Request, chunk: ScheduledChunk,
                        sampled: tuple[int, ...]) -> RequestUpdate:
        num_appended = 0
        for token_id in sampled:
            request.append_token(token_id)
            num_appended += 1
            stop = request.stop_status(self.config.max_model_len)
            if stop is not None:
                self.running.remove(request)
                request.finish(stop)
                self._release(request)
                break
        return RequestUpdate(request=request, new_token_ids=sampled[:num_appended],
                             num_draft_tokens=chunk.num_draft_tokens,
                             num_accepted_draft_tokens=len(sampled) - 1)


def _check_sampled(chunk: ScheduledChunk, sampled: tuple[int, ...]) -> None:
    """The runner's tokens must match the chunk: accepted drafts are a prefix of the drafts."""
    request_id = chunk.request.request_id
    if not chunk.sample:
        if sampled:
            raise ValueError(f"request {request_id!r}: tokens sampled for a non-final prefill chunk")
        return
    if not 1 <= len(sampled) <= chunk.num_draft_tokens + 1:
        raise ValueError(f"request {request_id!r}: expected 1..{chunk.num_draft_tokens + 1} sampled "
                         f"tokens, got {len(sampled)}")
    drafts = chunk.token_ids[len(chunk.token_ids) - chunk.num_draft_tokens:]
    if sampled[:-1] != drafts[:len(sampled) - 1]:
        raise ValueError(f"request {request_id!r}: accepted tokens {sampled[:-1]} are not a prefix of "
                         f"the drafts {drafts}")
