"""`pdserve generate`: continue prompts through a real engine process, offline.

The same path a node serves (engine process, its record stream, detokenizer, stop strings), driven by
a plain loop instead of a gRPC stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.common.sampling_params import SamplingParams
from pdserve.common.spec_metrics import RequestSpecStats, SpeculateMetrics
from pdserve.common.tokens import NO_TOKENS, SampledTokens
from pdserve.engine.protocol import EngineFailed, RequestOutput, RequestRejected, StepOutputs
from pdserve.engine.request import RequestStatus
from pdserve.engine.spec_config import SpeculativeConfig
from pdserve.models.tokenizer import Tokenizer
from pdserve.node.engine_client import EngineClient, EngineError
from pdserve.node.engine_stream import EngineExited
from pdserve.node.request_stream import RequestStream


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
    tokens: list[SampledTokens]
    spec_stats: RequestSpecStats | None = None
    error: str | None = None
    engine_done: bool = False  # the engine sent this request's last record


def generate(client: EngineClient, tokenizer: Tokenizer, prompts: Sequence[str], params: SamplingParams,
             speculative: SpeculativeConfig | None = None) -> list[GenerationResult]:
    pending: dict[str, _Pending] = {}
    for index, prompt in enumerate(prompts):
        request_id = f"generate-{index}"
        prompt_ids = tokenizer.encode(prompt)
        client.generate(request_id, prompt_ids, params)
        stats = RequestSpecStats(speculative.num_speculative_tokens) if speculative else None
        stream = RequestStream(request_id, params, tokenizer, prompt_ids)
        pending[request_id] = _Pending(index, stream, [], stats)
    while any(not p.engine_done for p in pending.values()):
        record = client.receive()
        if isinstance(record, StepOutputs):
            for output in record.outputs:
                if output.request_id in pending:
                    _on_output(client, pending[output.request_id], output)
        elif isinstance(record, RequestRejected) and record.request_id in pending:
            entry = pending[record.request_id]
            entry.error = record.message
            entry.stream.finish_reason = "error"
            entry.engine_done = True
        elif isinstance(record, EngineFailed):
            raise EngineError(f"engine failed: {record.message}")
        elif isinstance(record, EngineExited):
            raise EngineError(f"engine process exited with code {record.returncode}")
    by_index = sorted(pending.values(), key=lambda p: p.index)
    return [_result(prompts[p.index], p) for p in by_index]


def _on_output(client: EngineClient, entry: _Pending, output: RequestOutput) -> None:
    if entry.spec_stats is not None:
        entry.spec_stats.on_slot(output.status is RequestStatus.PREEMPTED, len(output.tokens))
    if not entry.stream.finished:
        delta = entry.stream.on_output(output)
        entry.tokens.append(delta.tokens)
        if delta.stopped_by_string:
            client.abort(output.request_id)
    entry.engine_done = output.finished


def _result(prompt: str, entry: _Pending) -> GenerationResult:
    stream = entry.stream
    wants_logprobs = stream.params.logprobs is not None and entry.error is None
    tokens = SampledTokens.concat(entry.tokens) if entry.tokens else NO_TOKENS
    top = [[[t, lp] for t, lp in tokens.top(i)] for i in range(len(tokens))]
    return GenerationResult(
        prompt=prompt,
        token_ids=list(stream.token_ids),
        text=stream.text,
        logprobs=list(tokens.logprobs) if wants_logprobs else None,
        top_logprobs=top if wants_logprobs else None,
        finish_reason=stream.finish_reason or "error",
        error=entry.error,
        speculate_metrics=entry.spec_stats.metrics() if entry.spec_stats is not None else None,
    )
