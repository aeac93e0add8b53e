"""Node chunks -> OpenAI responses: one JSON body, or SSE events ending in ``data: [DONE]``.

A request with several choices (n > 1, or a batch of prompts) has one node stream per choice; the
non-streaming answer lists the choices by index, and the streamed one interleaves their chunks as
they arrive, each event carrying one choice with its ``index`` (OpenAI's format). A failure of any
choice fails the request (a 503 before the first event, an error event after it).

``speculate_metrics`` (FastDeploy's field) rides on the final choice: the last streamed chunk's choice,
or the choice of a non-streaming response, whenever the node reported it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from pdserve.common.tokens import NO_TOKENS, SampledTokens
from pdserve.models.tokenizer import Tokenizer
from pdserve.router.dispatch import StreamFailed
from pdserve.router.errors import APIError, error_body
from pdserve.router.metrics import RouterMetrics
from pdserve.router.prepare import Prepared, PreparedBatch
from pdserve.router.tool_calls import ParsedOutput, ToolCallParser
from pdserve.rpc import node_pb2
from pdserve.rpc.convert import tokens_from_proto

DONE_EVENT = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


class RequestTimer:
    """Feeds the TTFT, ITL and E2E histograms of one request. Without ``inter_token`` (a non-streaming
    request, answered whole by the node's Complete) the router cannot see token intervals and observes
    none, and its TTFT is the answer's time less the node's time after its first token."""

    def __init__(self, metrics: RouterMetrics, inter_token: bool = True) -> None:
        self._metrics = metrics
        self._inter_token = inter_token
        self._start = time.perf_counter()
        self._last: float | None = None

    def on_tokens(self, count: int, after_first_token_s: float = 0.0) -> None:
        now = time.perf_counter()
        if self._last is None:
            self._metrics.ttft.observe(max(0.0, now - self._start - after_first_token_s))
        elif count and self._inter_token:
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
    # each chunk's tokens as the node sent them: converted only when logprobs are asked for
    token_msgs: list[node_pb2.SampledTokens] = field(default_factory=list)
    prompt_logprobs: SampledTokens = NO_TOKENS
    completion_tokens: int = 0
    finish_reason: str | None = None
    usage: node_pb2.Usage | None = None
    speculate_metrics: node_pb2.SpeculateMetrics | None = None

    def add(self, chunk: node_pb2.GenerateChunk) -> None:
        self.text.append(chunk.text)
        self.token_msgs.append(chunk.tokens)
        if chunk.HasField("prompt_logprobs"):
            self.prompt_logprobs = tokens_from_proto(chunk.prompt_logprobs)
        self.completion_tokens += len(chunk.tokens.token_ids)
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        if chunk.HasField("usage"):
            self.usage = chunk.usage
        if chunk.HasField("speculate_metrics"):
            self.speculate_metrics = chunk.speculate_metrics


class _ChoiceFormatter:
    """Formats one choice's chunks (one node stream) for /v1/completions or /v1/chat/completions."""

    def __init__(self, prepared: Prepared, chat: bool, tokenizer: Tokenizer, timer: RequestTimer) -> None:
        self._p = prepared
        self._chat = chat
        self._tokenizer = tokenizer
        self._timer = timer
        self._text_offset = len(prepared.prompt_text) if prepared.echo else 0
        self.acc = _Accumulated()
        self._tool_stream = (None if prepared.tool_parser is None
                             else _ToolCallStream(prepared.tool_parser, prepared.max_tool_calls))

    # ---- pieces
    def _token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def usage(self) -> tuple[int, int]:
        """(prompt tokens, completion tokens); the prompt counts on the first choice of its prompt only."""
        acc = self.acc
        prompt = acc.usage.prompt_tokens if acc.usage is not None else len(self._p.prompt_token_ids)
        completion = acc.usage.completion_tokens if acc.usage is not None else acc.completion_tokens
        return (prompt if self._p.first_of_prompt else 0), (0 if self._p.prompt_only else completion)

    def total_logprob(self) -> float:
        """The generated tokens' total logprob (best_of's ranking)."""
        return sum(lp for tokens in self.acc.token_msgs for lp in tokens.logprobs)

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

    def _choice(self, text: str, logprobs: Any, finish_reason: str | None, first: bool = False,
                streaming: bool = True) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": self._p.index}
        if not self._chat:
            choice["text"] = text
        elif streaming:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["message"] = {"role": "assistant", "content": text}
            if self._p.tool_parser is not None:
                parsed = self._p.tool_parser.parse(text, self._p.max_tool_calls)
                if parsed.tool_calls:
                    choice["message"] = {"role": "assistant", "content": parsed.content or None,
                                         "tool_calls": _tool_calls_json(parsed)}
                    finish_reason = _tool_finish_reason(finish_reason)
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason
        return choice

    def final_choice(self, streaming: bool) -> dict[str, Any]:
        """The whole answer as one choice (a non-streaming response, or a prompt-only stream's event)."""
        acc = self.acc
        text = "" if self._p.prompt_only else "".join(acc.text)
        generated = NO_TOKENS
        if self._p.top_logprobs is not None and not self._p.prompt_only and acc.token_msgs:
            generated = SampledTokens.concat([tokens_from_proto(m) for m in acc.token_msgs])
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

    # ---- non-streaming
    async def collect(self, chunks: AsyncIterator[node_pb2.GenerateChunk]) -> dict[str, Any]:
        async for chunk in chunks:
            self._timer.on_tokens(len(chunk.tokens.token_ids), chunk.timing.decode_s)
            self.acc.add(chunk)
        self._timer.done()
        return self.final_choice(streaming=False)

    # ---- streaming
    async def stream(self, chunks: AsyncIterator[node_pb2.GenerateChunk]) -> AsyncIterator[dict[str, Any]]:
        """This choice's streamed choice objects; raises StreamFailed / APIError when the node fails."""
        first = True
        async for chunk in chunks:
            self._timer.on_tokens(len(chunk.tokens.token_ids))
            self.acc.add(chunk)
            if self._p.prompt_only:  # one event once the prompt's logprobs are in
                continue
            if first and self._p.echo:  # the prompt's logprobs come with the first chunk
                echoed = self._logprobs(NO_TOKENS, self._p.prompt_token_ids, self.acc.prompt_logprobs)
                yield self._choice(self._p.prompt_text, echoed, None)
            logprobs = None
            if self._p.top_logprobs is not None:
                logprobs = self._logprobs(tokens_from_proto(chunk.tokens))
            if self._tool_stream is not None:
                choice = self._tool_stream.choice(self._p.index, chunk.text, logprobs,
                                                  chunk.finish_reason or None, first)
            else:
                choice = self._choice(chunk.text, logprobs, chunk.finish_reason or None, first=first)
            first = False
            if chunk.HasField("speculate_metrics"):
                choice["speculate_metrics"] = speculate_metrics_json(chunk.speculate_metrics)
            yield choice
        self._timer.done()
        if self._p.prompt_only:
            yield self.final_choice(streaming=True)


def _tool_calls_json(parsed: ParsedOutput, with_index: bool = False) -> list[dict[str, Any]]:
    return [{**({"index": i} if with_index else {}), "id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}
            for i, call in enumerate(parsed.tool_calls)]


def _tool_finish_reason(finish_reason: str | None) -> str | None:
    # OpenAI ends a turn that called tools with "tool_calls"; a cut-off output stays "length"
    return "tool_calls" if finish_reason == "stop" else finish_reason


class _ToolCallStream:
    """Streamed chat with tools: content deltas for the text that cannot be part of a call; the
    calls, parsed from the whole output, as ``tool_calls`` deltas (each call's id, name and
    arguments in one delta, index-numbered as OpenAI's) in the last event."""

    def __init__(self, parser: ToolCallParser, max_calls: int | None) -> None:
        self._parser = parser
        self._max_calls = max_calls
        self._text = ""
        self._sent = 0

    def choice(self, index: int, text: str, logprobs: Any, finish_reason: str | None,
               first: bool) -> dict[str, Any]:
        self._text += text
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if finish_reason is None:
            safe = self._parser.content_prefix_len(self._text)
            delta["content"] = self._text[self._sent:safe] if safe > self._sent else ""
            self._sent = max(self._sent, safe)
        else:
            parsed = self._parser.parse(self._text, self._max_calls)
            if parsed.tool_calls:
                delta["tool_calls"] = _tool_calls_json(parsed, with_index=True)
                finish_reason = _tool_finish_reason(finish_reason)
            else:
                delta["content"] = self._text[self._sent:]
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


class ResponseBuilder:
    """Formats one request's choices for /v1/completions (``chat=False``) or /v1/chat/completions."""

    def __init__(self, batch: PreparedBatch, chat: bool, model_name: str, tokenizer: Tokenizer,
                 metrics: RouterMetrics) -> None:
        self._chat = chat
        self._model = model_name
        self._choices = [_ChoiceFormatter(p, chat, tokenizer, RequestTimer(metrics, inter_token=p.stream))
                         for p in batch.choices]
        self._id = ("chatcmpl-" if chat else "cmpl-") + batch.request_id.removeprefix("req-")
        self._created = int(time.time())
        self._include_usage = batch.include_usage
        self._n = batch.n
        self._best_of = batch.best_of

    def _envelope(self, choices: list[dict[str, Any]], streaming: bool) -> dict[str, Any]:
        kind = "text_completion"
        if self._chat:
            kind = "chat.completion.chunk" if streaming else "chat.completion"
        return {"id": self._id, "object": kind, "created": self._created, "model": self._model,
                "choices": choices}

    def _usage(self) -> dict[str, int]:
        counts = [c.usage() for c in self._choices]
        prompt = sum(p for p, _ in counts)
        completion = sum(c for _, c in counts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ---- non-streaming
    async def collect(self, streams: Sequence[AsyncIterator[node_pb2.GenerateChunk]]) -> dict[str, Any]:
        try:
            works = [c.collect(s) for c, s in zip(self._choices, streams, strict=True)]
            choices = await gather_or_cancel(works)
        except StreamFailed as e:
            raise APIError(503, f"the request failed while generating: {e}", None, "node_failed", 1) from e
        if self._best_of > self._n:
            choices = self._best(choices)
        return {**self._envelope(choices, streaming=False), "usage": self._usage()}

    def _best(self, choices: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """best_of: per prompt, the n candidates with the highest total logprob of their tokens, best
        first, re-indexed prompt * n + rank (usage still counts every candidate's tokens, as OpenAI's)."""
        best = []
        for start in range(0, len(choices), self._best_of):
            group = range(start, start + self._best_of)
            ranked = sorted(group, key=lambda i: -self._choices[i].total_logprob())[: self._n]
            for rank, i in enumerate(ranked):
                best.append({**choices[i], "index": start // self._best_of * self._n + rank})
        return best

    # ---- streaming
    async def events(self, streams: Sequence[AsyncIterator[node_pb2.GenerateChunk]]) -> AsyncIterator[bytes]:
        """SSE events; a failure after the first event becomes an error event, then [DONE]."""
        sources = [c.stream(s) for c, s in zip(self._choices, streams, strict=True)]
        try:
            async for choice in (sources[0] if len(sources) == 1 else _merge(sources)):
                yield sse(self._envelope([choice], streaming=True))
        except (StreamFailed, APIError) as e:
            yield sse(error_body(503, f"the request failed while generating: {e}", None, "node_failed"))
            yield DONE_EVENT
            return
        if self._include_usage:
            yield sse({**self._envelope([], streaming=True), "usage": self._usage()})
        yield DONE_EVENT


async def gather_or_cancel(works: Sequence[Any]) -> list[Any]:
    """The results of ``works`` in order; the first failure cancels the others (each one's node call
    is then cancelled too) and is raised."""
    if len(works) == 1:
        return [await works[0]]
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_END = object()


async def _merge(sources: Sequence[AsyncIterator[dict[str, Any]]]) -> AsyncIterator[dict[str, Any]]:
    """Items of every source as they arrive; the first source failure is raised, the rest cancelled."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump(source: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for item in source:
                await queue.put(item)
        except (StreamFailed, APIError) as e:
            await queue.put(e)
            return
        await queue.put(_END)

    tasks = [asyncio.create_task(pump(source)) for source in sources]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
