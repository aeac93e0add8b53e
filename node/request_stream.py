"""Turns one request's engine outputs into what a client sees: text deltas, the tokens with their
logprobs (the engine's `SampledTokens`, cut where a stop string ended the request), and a finish
reason. Stop strings live here, not in the engine: the engine only knows token ids.

Streaming never shows text that a stop string might still claim: the last ``len(longest stop) - 1``
characters are held back until the next token proves they are not the start of a stop string.

A migrated continuation (``params.resumed_output_tokens``) decodes the outputs it resumes from (the
prompt's tail) first, with the real prompt as context, and sends its text from the character the client
already has (``resumed_output_chars``): a character split across the seam, or held back by the earlier
node as a possible stop string's start, is sent once, and a stop string that began before the seam
still matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.common.sampling_params import SamplingParams
from pdserve.common.tokens import NO_TOKENS, SampledTokens
from pdserve.engine.protocol import RequestOutput
from pdserve.engine.request import RequestStatus
from pdserve.models.tokenizer import IncrementalDetokenizer, Tokenizer

FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(frozen=True)
class StreamDelta:
    tokens: SampledTokens  # logprob columns only when the request asked for logprobs
    text: str
    finish_reason: str | None  # set on the last delta of the request
    stopped_by_string: bool = False  # the engine still runs it: the caller must abort it
    preempted: bool = False


@dataclass
class RequestStream:
    request_id: str
    params: SamplingParams
    tokenizer: Tokenizer
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # every character decoded so far (stop strings already cut)
    finish_reason: str | None = None
    num_accepted_drafts: int = 0
    resumed_output_chars: int = 0  # of the resumed outputs' text, the characters the client already has
    _emitted_chars: int = 0
    _detokenizer: IncrementalDetokenizer = field(init=False)

    def __post_init__(self) -> None:
        resumed = self.params.resumed_output_tokens
        prompt_len = len(self.prompt_token_ids) - resumed
        if prompt_len < 1:
            raise ValueError(f"request {self.request_id!r} resumes {resumed} outputs of a "
                             f"{len(self.prompt_token_ids)}-token prompt")
        self._detokenizer = IncrementalDetokenizer(self.tokenizer, self.prompt_token_ids[:prompt_len])
        for token_id in self.prompt_token_ids[prompt_len:]:
            self.text += self._detokenizer.add(token_id)
        if self.resumed_output_chars > len(self.text):
            raise ValueError(f"request {self.request_id!r}: {self.resumed_output_chars} characters already "
                             f"sent, but its resumed outputs decode to {len(self.text)}")
        self._emitted_chars = self.resumed_output_chars

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def on_output(self, output: RequestOutput) -> StreamDelta:
        if self.finished:
            raise ValueError(f"request {self.request_id!r} got an output after it finished")
        if output.status is RequestStatus.PREEMPTED:
            return StreamDelta(NO_TOKENS, "", None, preempted=True)
        tokens = output.tokens if self.params.logprobs is not None else SampledTokens(output.tokens.token_ids)
        self.num_accepted_drafts += output.num_accepted_drafts
        stopped = False
        kept = 0  # tokens of this output up to (and including) the one that completed a stop string
        for token_id in tokens.token_ids:
            self.token_ids.append(token_id)
            kept += 1
            previous_len = len(self.text)
            self.text += self._detokenizer.add(token_id)
            if self._cut_at_stop_string(previous_len):
                stopped = True
                break
        if stopped:
            self.finish_reason = "stop"
        elif output.status in FINISH_REASONS:
            self.text += self._detokenizer.flush()
            self.finish_reason = FINISH_REASONS[output.status]
        return StreamDelta(tokens.head(kept), self._take_text(), self.finish_reason,
                           stopped_by_string=stopped)

    def _cut_at_stop_string(self, previous_len: int) -> bool:
        """Cut the text before the first stop string that the newest characters complete."""
        if not self.params.stop:
            return False
        start = max(0, previous_len - (max(map(len, self.params.stop)) - 1))
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def _take_text(self) -> str:
        """The text not yet emitted, minus a tail that could still become a stop string."""
        end = len(self.text)
        if not self.finished and self.params.stop:
            end = max(self._emitted_chars, end - (max(map(len, self.params.stop)) - 1))
        delta = self.text[self._emitted_chars:end]
        self._emitted_chars = end
        return delta
