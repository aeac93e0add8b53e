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

from pdserve.common.tokens import NO_TOKENS, SampledTokens
from pdserve.models.tokenizer import Tokenizer
from pdserve.router.dispatch import StreamFailed
from pdserve.router.errors import APIError, error_body
from pdserve.router.metrics import RouterMetrics
from pdserve.router.prepare import Prepared
from pdserve.rpc import node_pb2
from pdserve.rpc.convert import tokens_from_proto

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
    tokens: list[SampledTokens] = field(default_factory=list)
    prompt_logprobs: SampledTokens = NO_TOKENS
    completion_tokens: int = 0
    finish_reason: str | None = None
    usage: node_pb2.Usage | None = None
    speculate_metrics: node_pb2.SpeculateMetrics | None = None

    def add(self, chunk: node_pb2.GenerateChunk) -> None:
        self.text.append(chunk.text)
        self.tokens.append(tokens_from_proto(chunk.tokens))
        if chunk.HasField("prompt_logprobs"):
            self.prompt_logprobs = tokens_from_proto(chunk.prompt_logprobs)
        self.completion_tokens += len(chunk.tokens.token_ids)
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
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _chat_logprobs(self, entries: SampledTokens) -> dict[str, Any]:
        def item(token_id: int, logprob: float) -> dict[str, Any]:
            text = self._token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**item(token_id, entries.logprobs[i]),
                             "top_logprobs": [item(t, lp) for t, lp in entries.top(i)]}
                            for i, token_id in enumerate(entries.token_ids)]}

    def _top(self, entries: SampledTokens, i: int, text: str) -> dict[str, float]:
        top = {self._token_text(t): lp for t, lp in entries.top(i)}
        top.setdefault(text, entries.logprobs[i])
        return top

    def _completion_logprobs(self, entries: SampledTokens, prompt_ids: Sequence[int] = (),
                             prompt_entries: SampledTokens = NO_TOKENS) -> dict[str, Any]:
        tokens, token_logprobs, tops, offsets = [], [], [], []
        # echoed prompt tokens: the first has no logprob (nothing precedes it); entry i - 1 scores token i
        prompt_offset = 0
        for i, token_id in enumerate(prompt_ids):
            text = self._token_text(token_id)
            scored = 0 < i <= len(prompt_entries)
            tokens.append(text)
            token_logprobs.append(prompt_entries.logprobs[i - 1] if scored else None)
            tops.append(self._top(prompt_entries, i - 1, text) if scored else None)
            offsets.append(prompt_offset)
            prompt_offset += len(text)
        for i, token_id in enumerate(entries.token_ids):
            text = self._token_text(token_id)
            tokens.append(text)
            token_logprobs.append(entries.logprobs[i])
            tops.append(self._top(entries, i, text))
            offsets.append(self._text_offset)
            self._text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
                "text_offset": offsets}

    def _logprobs(self, entries: SampledTokens, prompt_ids: Sequence[int] = (),
                  prompt_entries: SampledTokens = NO_TOKENS) -> Any:
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
                self._timer.on_tokens(len(chunk.tokens.token_ids))
                acc.add(chunk)
        except StreamFailed as e:
            raise APIError(503, f"the request failed while generating: {e}", None, "node_failed", 1) from e
        self._timer.done()
        text = "".join(acc.text)
        prompt_ids: Sequence[int] = ()
        if self._p.echo:
            text = self._p.prompt_text + text
            prompt_ids = self._p.prompt_token_ids
        logprobs = self._logprobs(SampledTokens.concat(acc.tokens) if acc.tokens else NO_TOKENS, prompt_ids,
                                  acc.prompt_logprobs)
        choice = self._choice(text, logprobs, acc.finish_reason, streaming=False)
        if acc.speculate_metrics is not None:
            choice["speculate_metrics"] = speculate_metrics_json(acc.speculate_metrics)
        return {**self._envelope([choice], streaming=False), "usage": self._usage(acc)}

    # ---- streaming
    async def events(self, chunks: AsyncIterator[node_pb2.GenerateChunk]) -> AsyncIterator[bytes]:
        """SSE events; a failure after the first event becomes an error event, then [DONE]."""
        acc = _Accumulated()
        first = True
        try:
            async for chunk in chunks:
                self._timer.on_tokens(len(chunk.tokens.token_ids))
                acc.add(chunk)
                if first and self._p.echo:  # the prompt's logprobs come with the first chunk
                    echoed = self._logprobs(NO_TOKENS, self._p.prompt_token_ids, acc.prompt_logprobs)
                    yield sse(self._envelope([self._choice(self._p.prompt_text, echoed, None)], True))
                choice = self._choice(chunk.text, self._logprobs(acc.tokens[-1]), chunk.finish_reason or None,
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
        if self._p.include_usage:
            yield sse({**self._envelope([], streaming=True), "usage": self._usage(acc)})
        yield DONE_EVENT
