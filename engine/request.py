"""One request's state: its tokens, its KV bookkeeping and its place in the state machine.

Bookkeeping counts tokens, not phases: `num_computed_tokens` is how many of `all_token_ids` have
their KV in the cache. A prefill chunk, a decode step, KV arriving from a prefill peer and accepted
speculative drafts all just advance it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pdserve.common.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pdserve.engine.grammar import GrammarMatcher


class RequestStatus(enum.IntEnum):
    """Ordered so that `status >= FINISHED_STOPPED` means finished."""

    WAITING = 0
    WAITING_FOR_KV = 1  # decode side: blocks reserved, KV arriving from a prefill peer
    RUNNING = 2
    PREEMPTED = 3  # blocks taken back; waits (at the front of the queue) to be recomputed
    FINISHED_STOPPED = 4  # a stop token (eos or stop_token_ids), or the grammar's output is complete
    FINISHED_LENGTH = 5  # max_tokens or max_model_len
    FINISHED_ABORTED = 6
    FINISHED_ERROR = 7  # rejected or failed; `Request.error` says why
    # Prefill node: the first token is sampled and the request left the scheduler, but its blocks stay
    # allocated until the transfer agent has copied its KV to the decode node (LLMEngine.release).
    FINISHED_PREFILLED = 8

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
    RequestStatus.FINISHED_PREFILLED: "prefilled",
}


class RequestStateError(RuntimeError):
    """A transition was asked from a status that does not allow it (a bug in the caller)."""


class Request:
    """A generation request inside one engine. Transitions only through the named methods below."""

    def __init__(self, request_id: str, prompt_token_ids: Sequence[int], sampling_params: SamplingParams,
                 eos_token_ids: Sequence[int] = (), grammar: GrammarMatcher | None = None) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: prompt_token_ids must not be empty")
        if sampling_params.resumed_output_tokens >= len(prompt_token_ids):
            raise ValueError(f"request {request_id!r}: resumed_output_tokens ("
                             f"{sampling_params.resumed_output_tokens}) must leave at least one prompt token")
        self.request_id = request_id
        self.prompt_token_ids: tuple[int, ...] = tuple(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling_params = sampling_params
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0  # tokens of all_token_ids whose KV is in the cache
        self.block_table: list[int] = []  # owned by the BlockManager; read by everyone else
        # Proposed continuation of all_token_ids, verified by the next decode step.
        self.draft_token_ids: list[int] = []
        self.error: str | None = None
        # Prefill node: stop after the first token and hand the KV over instead of decoding on.
        self.prefill_only = False
        # The grammar state of the output (sampling_params.grammar compiled), advanced with every token.
        self.grammar = grammar

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")

    # -- token views ---------------------------------------------------------------------------

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (decode reads one token)."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return list(self.prompt_token_ids[start:end])
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return [*self.prompt_token_ids[start:], *self.output_token_ids[:end - num_prompt]]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens (not drafts) still to feed; 1 for a request that is decoding."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """OpenAI-style reason ("stop", "length", "abort", "error"), None while unfinished."""
        return _FINISH_REASONS.get(self.status)

    # -- growth ----------------------------------------------------------------------------------

    def append_token(self, token_id: int) -> None:
        if self.status is not RequestStatus.RUNNING:
            raise RequestStateError(f"{self!r}: append_token needs RUNNING")
        if self.grammar is not None:
            self.grammar.advance(token_id)
        self.output_token_ids.append(token_id)

    def set_draft_tokens(self, draft_token_ids: Sequence[int]) -> None:
        """Drafts to verify next step, cut at the first one the grammar (if any) refuses."""
        if self.grammar is not None:
            draft_token_ids = draft_token_ids[:self.grammar.valid_prefix(draft_token_ids)]
        self.draft_token_ids = list(draft_token_ids)

    def stop_status(self, max_model_len: int) -> RequestStatus | None:
        """The FINISHED_* status the last appended token calls for, or None to keep going.

        A stop token ends the request unless min_tokens has not been reached; eos counts as a stop
        token unless ignore_eos. A grammar that is complete ends the request whatever min_tokens says
        (nothing but an end of sequence could follow). Stop *strings* are matched on text by the node
        server, not here.
        """
        params = self.sampling_params
        num_output = len(self.output_token_ids)
        if num_output == 0:
            return None
        if self.grammar is not None and self.grammar.is_finished:
            return RequestStatus.FINISHED_STOPPED
        last = self.output_token_ids[-1]
        if num_output > params.min_tokens and (
                last in params.stop_token_ids or (not params.ignore_eos and last in self.eos_token_ids)):
            return RequestStatus.FINISHED_STOPPED
        if num_output >= params.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def max_num_tokens(self, max_model_len: int) -> int:
        """The most tokens (prompt + output) this request can ever hold."""
        return min(self.num_prompt_tokens + self.sampling_params.max_tokens, max_model_len)

    # -- transitions -----------------------------------------------------------------------------

    def start_running(self) -> None:
        """Admitted into the running batch (from the waiting queue or once a peer's KV arrived)."""
        self._require({RequestStatus.WAITING, RequestStatus.PREEMPTED, RequestStatus.WAITING_FOR_KV},
                      "start_running")
        self.status = RequestStatus.RUNNING

    def wait_for_remote_kv(self) -> None:
        """Decode side: blocks are reserved, a prefill peer will write the prompt's KV."""
        self._require({RequestStatus.WAITING}, "wait_for_remote_kv")
        self.status = RequestStatus.WAITING_FOR_KV

    def preempt(self) -> None:
        """Recompute-mode preemption: the caller has freed the blocks, so no token is computed.

        Output tokens are kept; on re-admission they are prefilled with the prompt, so the request
        continues exactly where it stopped.
        """
        self._require({RequestStatus.RUNNING}, "preempt")
        if self.block_table:
            raise RequestStateError(f"{self!r}: free its blocks before preempting it")
        self.status = RequestStatus.PREEMPTED
        self.num_computed_tokens = 0
        self.draft_token_ids = []

    def finish(self, status: RequestStatus, error: str | None = None) -> None:
        """Final transition; the caller frees the request's blocks."""
        if not status.is_finished:
            raise RequestStateError(f"{self!r}: finish needs a FINISHED_* status, got {status.name}")
        if self.is_finished:
            raise RequestStateError(f"{self!r}: already finished")
        self.status = status
        self.error = error
        self.draft_token_ids = []

    def abort(self) -> None:
        self.finish(RequestStatus.FINISHED_ABORTED)

    def _require(self, allowed: set[RequestStatus], transition: str) -> None:
        if self.status not in allowed:
            names = ", ".join(sorted(s.name for s in allowed))
            raise RequestStateError(f"{self!r}: {transition} needs one of {names}")
