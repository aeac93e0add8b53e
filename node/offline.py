"""`pdserve generate`: continue prompts through a real engine process, offline.

The same path a node serves (engine process, SysV output queue, detokenizer, stop strings), driven by a
plain loop instead of a gRPC stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.common.sampling_params import SamplingParams
from pdserve.common.spec_metrics import RequestSpecStats, SpeculateMetrics
from pdserve.engine.output_codec import SlotEvent
from pdserve.engine.protocol import EngineFailed, RequestRejected
from pdserve.engine.spec_config import SpeculativeConfig
from pdserve.models.tokenizer import Tokenizer
from pdserve.node.engine_client import EngineClient, EngineError
from pdserve.node.request_stream import RequestStream, TokenLogprob


@dataclass(frozen=True)
class GenerationResult:
    prompt: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    top_logprobs: list[list[list[float]]] | None  # per token: [[token_id, logprob], ...]
    finish_reason: str
    error: str | None = None
    speculate_metrics: SpeculateMetrics | None = None  # with speculative decoding on

    def to_json(self) -> dict:
        out = {"prompt": self.prompt, "token_ids": self.token_ids, "text": self.text,
               "logprobs": self.logprobs, "top_logprobs": self.top_logprobs,
               "finish_reason": self.finish_reason}
        if self.error is not None:
            out["error"] = self.error
        if self.speculate_metrics is not None:
            out["speculate_metrics"] = self.speculate_metrics.to_json()
        return out


@dataclass
class _Pending:
    index: int
    stream: RequestStream
    logprobs: list[TokenLogprob]
    spec_stats: RequestSpecStats | None = None
    error: str | None = None
    engine_done: bool = False  # the engine sent this seq_id's last event; the id may be reused


def generate(client: EngineClient, tokenizer: Tokenizer, prompts: Sequence[str], params: SamplingParams,
             poll_s: float = 0.5, speculative: SpeculativeConfig | None = None) -> list[GenerationResult]:
    pending: dict[int, _Pending] = {}
    for index, prompt in enumerate(prompts):
        prompt_ids = tokenizer.encode(prompt)
        seq_id = client.submit(f"generate-{index}", prompt_ids, params)
        stream = RequestStream(f"generate-{index}", params, tokenizer, prompt_ids)
        stats = RequestSpecStats(speculative.num_speculative_tokens) if speculative else None
        pending[seq_id] = _Pending(index, stream, [], stats)
    results: dict[int, _Pending] = {}
    while any(not p.engine_done for p in pending.values()):
        _handle_events(client, pending)
        step = client.receive(timeout_s=poll_s)
        for slot in step.slots if step else ():
            entry = pending.get(slot.seq_id)
            if entry is None:
                continue
            if entry.spec_stats is not None:
                entry.spec_stats.on_slot(slot.event is SlotEvent.PREEMPTED, slot.num_tokens)
            if not entry.stream.finished:
                delta = entry.stream.on_slot(slot)
                entry.logprobs.extend(delta.logprobs)
                if delta.stopped_by_string:
                    client.abort(slot.seq_id)
            if slot.event.is_terminal:
                _done(client, slot.seq_id, entry)
        results.update({p.index: p for p in pending.values()})
    return [_result(prompts[i], results[i]) for i in range(len(prompts))]


def _handle_events(client: EngineClient, pending: dict[int, _Pending]) -> None:
    for event in client.events():
        if isinstance(event, RequestRejected) and event.seq_id in pending:
            entry = pending[event.seq_id]
            entry.error = event.message
            entry.stream.finish_reason = "error"
            _done(client, event.seq_id, entry)
        elif isinstance(event, EngineFailed):
            raise EngineError(f"engine failed: {event.message}")


def _done(client: EngineClient, seq_id: int, entry: _Pending) -> None:
    entry.engine_done = True
    client.release(seq_id)


def _result(prompt: str, entry: _Pending) -> GenerationResult:
    stream = entry.stream
    wants_logprobs = stream.params.logprobs is not None and entry.error is None
    return GenerationResult(
        prompt=prompt,
        token_ids=list(stream.token_ids),
        text=stream.text,
        logprobs=[lp.logprob for lp in entry.logprobs] if wants_logprobs else None,
        top_logprobs=[[[t, lp] for t, lp in x.top] for x in entry.logprobs] if wants_logprobs else None,
        finish_reason=stream.finish_reason or "error",
        error=entry.error,
        speculate_metrics=entry.spec_stats.metrics() if entry.spec_stats is not None else None,
    )
