"""Node chunks -> OpenAI responses: one JSON body, or SSE events ending in ``data: [DONE]``.

``speculate_metrics`` (FastDeploy's field) rides on the final choice: the last streamed chunk's choice,
or the choice of a non-streaming response, whenever the node reported it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pdserve.models.tokenizer import Tokenizer
from pdserve.router.dispatch import StreamFailed
from pdserve.router.errors import APIError, error_body
from pdserve.router.metrics import RouterMetrics
from pdserve.router.prepare import Prepared
from pdserve.rpc import node_pb2

DONE_EVENT = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class RequestTimer:
    """Feeds the TTFT, ITL and E2E histograms of one request."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self._metrics = metrics
        self._start = time.perf_counter()
        self._last: float | None = None

    def on_tokens(self, count: int) -> None:
        now = time.perf_counter()
        if self._last is None:
            self._metrics.ttft.observe(now - self._start)
        elif count:
            for _ in range(count):  # a speculative chunk carries several tokens for one interval
                self._metrics.itl.observe((now - self._last) / count)
        self._last = now

    def done(self) -> None:
        self._metrics.e2e.observe(time.perf_counter() - self._start)


def speculate_metrics_json(m: node_pb2.SpeculateMetrics) -> dict[str, Any]:
    return {
        "accepted_tokens": m.accepted_tokens, "rejected_tokens": m.rejected_tokens,
        "accept_ratio": m.accept_ratio, "average_accept_length": m.average_accept_length,
        "accepted_tokens_per_head": list(m.accepted_tokens_per_head),
        "accept_ratio_per_head": list(m.accept_ratio_per_head),
    }


@dataclass
class _Accumulated:
    text: list[str] = field(default_factory=list)
    logprobs: list[node_pb2.TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[node_pb2.TokenLogprob] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    usage: node_pb2.Usage | None = None
    speculate_metrics: node_pb2.SpeculateMetrics | None = None

    def add(self, chunk: node_pb2.GenerateChunk) -> None:
        self.text.append(chunk.text)
        self.logprobs.extend(chunk.logprobs)
        self.prompt_logprobs.extend(chunk.prompt_logprobs)
        self.completion_tokens += len(chunk.token_ids)
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        if chunk.HasField("usage"):
            self.usage = chunk.usage
        if chunk.HasField("speculate_metrics"):
            self.speculate_metrics = chunk.speculate_metrics


class ResponseBuilder:
    """Formats one request's chunks for /v1/completions (``chat=False``) or /v1/chat/completions."""

    def __init__(self, prepared: Prepared, chat: bool, model_name: str, tokenizer: Tokenizer,
                 timer: RequestTimer) -> None:
        self._p = prepared
        self._chat = chat
        self._model = model_name
        self._tokenizer = tokenizer
        self._timer = timer
        self._id = ("chatcmpl-" if chat else "cmpl-") + prepared.request_id.removeprefix("req-")
        self._created = int(time.time())
        self._text_offset = len(prepared.prompt_text) if prepared.echo else 0

    # ---- pieces
    def _token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def _usage(self, acc: _Accumulated) -> dict[str, int]:
        prompt = acc.usage.prompt_tokens if acc.usage is not None else len(self._p.prompt_token_ids)
        completion = acc.usage.completion_tokens if acc.usage is not None else acc.completion_tokens
        if self._p.prompt_only:
            completion = 0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _chat_logprobs(self, entries: Sequence[node_pb2.TokenLogprob]) -> dict[str, Any]:
        def item(token_id: int, logprob: float) -> dict[str, Any]:
            text = self._token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**item(e.token_id, e.logprob),
                             "top_logprobs": [item(t.token_id, t.logprob) for t in e.top]} for e in entries]}

    def _top(self, e: node_pb2.TokenLogprob, text: str) -> dict[str, float]:
        top = {self._token_text(t.token_id): t.logprob for t in e.top}
        top.setdefault(text, e.logprob)
        return top

    def _completion_logprobs(self, entries: Sequence[node_pb2.TokenLogprob], prompt_ids: Sequence[int] = (),
                             prompt_entries: Sequence[node_pb2.TokenLogprob] = ()) -> dict[str, Any]:
        tokens, token_logprobs, tops, offsets = [], [], [], []
        # echoed prompt tokens: the first has no logprob (nothing precedes it); entry i - 1 scores token i
        prompt_offset = 0
        for i, token_id in enumerate(prompt_ids):
            text = self._token_text(token_id)
            e = prompt_entries[i - 1] if 0 < i <= len(prompt_entries) else None
            tokens.append(text)
            token_logprobs.append(None if e is None else e.logprob)
            tops.append(None if e is None else self._top(e, text))
            offsets.append(prompt_offset)
            prompt_offset += len(text)
        for e in entries:
            text = self._token_text(e.token_id)
            tokens.append(text)
            token_logprobs.append(e.logprob)
            tops.append(self._top(e, text))
            offsets.append(self._text_offset)
            self._text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
                "text_offset": offsets}

    def _logprobs(self, entries: Sequence[node_pb2.TokenLogprob], prompt_ids: Sequence[int] = (),
                  prompt_entries: Sequence[node_pb2.TokenLogprob] = ()) -> Any:
        if self._p.top_logprobs is None:
            return None
        if self._chat:
            return self._chat_logprobs(entries)
        return self._completion_logprobs(entries, prompt_ids, prompt_entries)

    def _envelope(self, choices: list[dict[str, Any]], streaming: bool) -> dict[str, Any]:
        kind = "text_completion"
        if self._chat:
            kind = "chat.completion.chunk" if streaming else "chat.completion"
        return {"id": self._id, "object": kind, "created": self._created, "model": self._model,
                "choices": choices}

    def _choice(self, text: str, logprobs: Any, finish_reason: str | None, first: bool = False,
                streaming: bool = True) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if not self._chat:
            choice["text"] = text
        elif streaming:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason
        return choice

    # ---- non-streaming
    async def collect(self, chunks: AsyncIterator[node_pb2.GenerateChunk]) -> dict[str, Any]:
        acc = _Accumulated()
        try:
            async for chunk in chunks:
                self._timer.on_tokens(len(chunk.token_ids))
                acc.add(chunk)
        except StreamFailed as e:
            raise APIError(503, f"the request failed while generating: {e}", None, "node_failed", 1) from e
        self._timer.done()
        choice = self._final_choice(acc, streaming=False)
        return {**self._envelope([choice], streaming=False), "usage": self._usage(acc)}

    def _final_choice(self, acc: _Accumulated, streaming: bool) -> dict[str, Any]:
        """The whole answer as one choice (a non-streaming response, or a prompt-only stream's event)."""
        text = "" if self._p.prompt_only else "".join(acc.text)
        generated = [] if self._p.prompt_only else acc.logprobs
        prompt_ids: Sequence[int] = ()
        if self._p.echo:
            text = self._p.prompt_text + text
            prompt_ids = self._p.prompt_token_ids
        logprobs = self._logprobs(generated, prompt_ids, acc.prompt_logprobs)
        finish_reason = "length" if self._p.prompt_only else acc.finish_reason
        choice = self._choice(text, logprobs, finish_reason, first=True, streaming=streaming)
        if acc.speculate_metrics is not None and not self._p.prompt_only:
            choice["speculate_metrics"] = speculate_metrics_json(acc.speculate_metrics)
        return choice

    # ---- streaming
    async def events(self, chunks: AsyncIterator[node_pb2.GenerateChunk]) -> AsyncIterator[bytes]:
        """SSE events; a failure after the first event becomes an error event, then [DONE]."""
        acc = _Accumulated()
        first = True
        try:
            async for chunk in chunks:
                self._timer.on_tokens(len(chunk.token_ids))
                acc.add(chunk)
                if self._p.prompt_only:  # one event once the prompt's logprobs are in
                    continue
                if first and self._p.echo:  # the prompt's logprobs come with the first chunk
                    echoed = self._logprobs([], self._p.prompt_token_ids, chunk.prompt_logprobs)
                    yield sse(self._envelope([self._choice(self._p.prompt_text, echoed, None)], True))
                choice = self._choice(chunk.text, self._logprobs(chunk.logprobs), chunk.finish_reason or None,
                                      first=first)
                first = False
                if chunk.HasField("speculate_metrics"):
                    choice["speculate_metrics"] = speculate_metrics_json(chunk.speculate_metrics)
                yield sse(self._envelope([choice], streaming=True))
        except (StreamFailed, APIError) as e:
            yield sse(error_body(503, f"the request failed while generating: {e}", None, "node_failed"))
            yield DONE_EVENT
            return
        self._timer.done()
        if self._p.prompt_only:
            yield sse(self._envelope([self._final_choice(acc, streaming=True)], streaming=True))
        if self._p.include_usage:
            yield sse({**self._envelope([], streaming=True), "usage": self._usage(acc)})
        yield DONE_EVENT
