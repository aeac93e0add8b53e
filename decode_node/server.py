"""The decode node (and the mixed node): owns a request from routing to its last token.

`Generate` admits the request into this node's engine and streams its tokens; `Complete` runs the
same and answers it whole (rpc/chunks.py). With a prefill target
(PD), the prompt's KV comes from that prefill node (decode_node/remote_prefill.py); without one — a
mixed node, or a decode node asked to prefill locally — this engine prefills it.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from pdserve.common.sampling_params import SamplingParams, SamplingParamsError
from pdserve.common.spec_metrics import RequestSpecStats, SpeculateMetrics
from pdserve.decode_node.remote_prefill import Cause, RemotePrefill, RemotePrefillError, reject_cause
from pdserve.engine.protocol import RequestRejected
from pdserve.engine.request import RequestStatus
from pdserve.models.tokenizer import Tokenizer
from pdserve.node.engine_bridge import EngineGone, RequestHandle
from pdserve.node.engine_client import EngineError
from pdserve.node.request_stream import RequestStream
from pdserve.node.server import NodeConfig, NodeServer
from pdserve.rpc import node_pb2 as pb
from pdserve.rpc.chunks import whole_answer
from pdserve.rpc.convert import sampling_from_proto, tokens_to_proto
from pdserve.rpc.registry import Role
from pdserve.transfer.messages import FirstToken, PrefillTimings

log = logging.getLogger("pdserve.decode")

_PEER_CAUSES = (pb.CAUSE_PREFILL_PEER_FAILED, pb.CAUSE_PREFILL_PEER_UNREACHABLE)


class GenerateFailed(Exception):
    """The request fails before its first token, with a cause the router acts on (router/blame.py);
    `failed_node_id` names the prefill peer when it is the one that failed."""

    def __init__(self, cause: Cause, message: str, failed_node_id: str = "") -> None:
        super().__init__(message)
        self.cause = cause
        self.failed_node_id = failed_node_id

    def chunk(self) -> pb.GenerateChunk:
        return pb.GenerateChunk(finish_reason="error", error=str(self), cause=self.cause,
                                failed_node_id=self.failed_node_id)


class DecodeNodeServer(NodeServer):
    def __init__(self, config: NodeConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__(config)
        self.tokenizer = tokenizer or Tokenizer.from_dir(config.model_dir)
        self.remote: RemotePrefill | None = None
        # Reserved beyond the prompt: the peer's first token and the drafts our first step verifies.
        self._extra_tokens = 1 + config.engine.num_speculative_tokens

    async def start_data_plane(self) -> None:
        if self.config.role is Role.DECODE:
            kv_spec, pool_names = self.engine_kv_pools()
            self.remote = RemotePrefill(self.config, self.bridge, kv_spec, self.metrics)
            self.data_address = self.remote.start(pool_names)

    async def stop_data_plane(self) -> None:
        if self.remote is not None:
            await self.remote.close()

    def node_stats(self) -> pb.NodeStats:
        stats = super().node_stats()
        if self.remote is not None:
            stats.unreachable_peer_addresses.extend(self.remote.unreachable_peer_addresses())
        return stats

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        async for chunk in self._generate(request, context):
            yield chunk

    async def Complete(self, request: pb.GenerateRequest,  # noqa: N802 - the gRPC method name
                       context: grpc.aio.ServicerContext) -> pb.GenerateChunk:
        for name in ("first_token_timeout_s", "silence_timeout_s"):
            value = getattr(request, name)
            if not math.isfinite(value) or value < 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{name} must be >= 0 (0: no limit), got {value}")
        return await whole_answer(self._generate(request, context), request.first_token_timeout_s,
                                  request.silence_timeout_s)

    async def _generate(self, request: pb.GenerateRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        """Chunks of one request; a failure before its first token ends it with one error chunk that
        carries the cause."""
        try:
            async for chunk in self._generate_or_fail(request, context):
                yield chunk
        except GenerateFailed as exc:
            log.info("request %s failed: %s: %s", request.request_id, pb.FailureCause.Name(exc.cause), exc)
            yield exc.chunk()

    async def _generate_or_fail(self, request: pb.GenerateRequest,
                                context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        params, prompt = await self._validated(request, context)
        stream = RequestStream(request.request_id, params, self.tokenizer, prompt,
                               resumed_output_chars=request.resumed_output_chars)
        spec = self.config.engine.speculative
        stats = RequestSpecStats(spec.num_speculative_tokens) if spec is not None else None
        started = time.monotonic()
        engine_request_id = request.request_id
        timings = None  # where a remote prefill's TTFT went, from the prefill node
        handle = None
        # Prompt logprobs (completions' echo) are computed where the prompt is prefilled, and the PD
        # hand-over carries only KV and the first token: such a request is prefilled here.
        if request.HasField("prefill") and params.prompt_logprobs is None and self.remote is not None:
            prefilled = await self._prefill_remotely(request, prompt, params, context)
            if prefilled is not None:
                handle, first = prefilled
                timings = first.timings
            else:
                # The abandoned reservation holds the request id in the engine until its abort lands.
                engine_request_id = f"{request.request_id}/local-prefill"
        if handle is None:
            try:
                handle = self.bridge.generate(engine_request_id, prompt, params)
            except EngineError as exc:
                self.metrics.outcome("error")
                raise GenerateFailed(pb.CAUSE_DECODE_NODE_FAILED, str(exc)) from exc
        async for chunk in self._relay(handle, stream, started, stats, timings):
            yield chunk

    async def _validated(self, request: pb.GenerateRequest,
                         context: grpc.aio.ServicerContext) -> tuple[SamplingParams, list[int]]:
        """The request's sampling params (seed resolved) and prompt; aborts the call if invalid."""
        if self.draining:
            raise GenerateFailed(pb.CAUSE_DRAINING, f"node {self.config.node_id} is draining")
        if not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids must not be empty")
        try:
            params = sampling_from_proto(request.sampling)
        except SamplingParamsError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        prompt = list(request.prompt_token_ids)
        if max(prompt) >= self.tokenizer.vocab_size:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prompt token id {max(prompt)} is outside the vocabulary "
                                f"({self.tokenizer.vocab_size} tokens)")
        if params.resumed_output_tokens >= len(prompt):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"resumed_output_tokens ({params.resumed_output_tokens}) must leave at least "
                                f"one prompt token of the {len(prompt)}")
        # One seed for both nodes: the first token is drawn on the prefill node, the rest here.
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        return replace(params, seed=seed), prompt

    async def _prefill_remotely(self, request: pb.GenerateRequest, prompt: list[int], params: SamplingParams,
                                context: grpc.aio.ServicerContext) -> tuple[RequestHandle, FirstToken] | None:
        """The engine handle (now decoding) and the peer's first token; None when the peer failed and
        this node falls back to prefilling locally; otherwise raises GenerateFailed."""
        try:
            return await self.remote.prefill(request.request_id, prompt, params,
                                             request.prefill.data_address, self._extra_tokens)
        except RemotePrefillError as exc:
            peer_failed = exc.cause in _PEER_CAUSES
            if self.config.prefill_fallback != "local" or not peer_failed:
                self.metrics.outcome("prefill_failed")
                raise GenerateFailed(exc.cause, f"remote prefill failed: {exc}",
                                     request.prefill.node_id if peer_failed else "") from exc
            log.warning("remote prefill of %s failed (%s); prefilling locally", request.request_id, exc)
            return None

    async def _relay(self, handle: RequestHandle, stream: RequestStream, started: float,
                     stats: RequestSpecStats | None,
                     timings: PrefillTimings | None) -> AsyncIterator[pb.GenerateChunk]:
        """Engine outputs -> chunks (the first one carries the TTFT split). Leaving early (the client
        cancelled) aborts the engine request."""
        first = True
        try:
            while not stream.finished:
                item = await handle.items.get()
                if isinstance(item, (RequestRejected, EngineGone)):
                    self.metrics.outcome("error")
                    cause = (reject_cause(item) if isinstance(item, RequestRejected)
                             else pb.CAUSE_DECODE_NODE_FAILED)
                    yield pb.GenerateChunk(finish_reason="error", error=item.message, cause=cause,
                                           usage=_usage(handle, stream))
                    return
                if stats is not None:
                    stats.on_slot(item.status is RequestStatus.PREEMPTED, len(item.tokens))
                delta = stream.on_output(item)
                if delta.stopped_by_string:
                    self.bridge.abort(handle)
                if delta.preempted or (not delta.tokens.token_ids and not delta.finish_reason):
                    continue
                chunk = pb.GenerateChunk(tokens=tokens_to_proto(delta.tokens), text=delta.text,
                                         finish_reason=delta.finish_reason or "")
                if first:
                    if item.prompt_logprobs is not None:
                        chunk.prompt_logprobs.CopyFrom(tokens_to_proto(item.prompt_logprobs))
                    chunk.timing.CopyFrom(self._ttft(started, timings))
                    first = False
                if stream.finished:
                    chunk.usage.CopyFrom(_usage(handle, stream))
                    if stats is not None:
                        metrics = stats.metrics()
                        self.metrics.speculation(metrics)
                        chunk.speculate_metrics.CopyFrom(_metrics_to_proto(metrics))
                    self.metrics.outcome(stream.finish_reason)
                yield chunk
        finally:
            if not stream.finished:
                self.metrics.outcome("cancelled")
                self.bridge.abort(handle)

    def _ttft(self, started: float, timings: PrefillTimings | None) -> pb.TimingInfo:
        """The first token's TTFT split: the prefill node's (queue, prefill, transfer), or all of it
        prefill when this node prefilled."""
        ttft = time.monotonic() - started
        self.metrics.ttft.labels(part="total").observe(ttft)
        if timings is None:
            return pb.TimingInfo(queue_s=0.0, prefill_s=ttft, transfer_s=0.0)
        for part in ("queue", "prefill", "transfer"):
            self.metrics.ttft.labels(part=part).observe(getattr(timings, f"{part}_ms") / 1000)
        return pb.TimingInfo(queue_s=timings.queue_ms / 1000, prefill_s=timings.prefill_ms / 1000,
                             transfer_s=timings.transfer_ms / 1000)


def _usage(handle: RequestHandle, stream: RequestStream) -> pb.Usage:
    return pb.Usage(prompt_tokens=handle.prompt_len, completion_tokens=len(stream.token_ids))




def _metrics_to_proto(m: SpeculateMetrics) -> pb.SpeculateMetrics:
    return pb.SpeculateMetrics(
        accepted_tokens=m.accepted_tokens, rejected_tokens=m.rejected_tokens, accept_ratio=m.accept_ratio,
        average_accept_length=m.average_accept_length,
        accepted_tokens_per_head=list(m.accepted_tokens_per_head),
        accept_ratio_per_head=list(m.accept_ratio_per_head),
    )
