"""The decode node (and the mixed node): owns a request from routing to its last token.

`Generate` admits the request into this node's engine and streams its tokens. With a prefill target
(PD), the prompt's KV comes from that prefill node (decode_node/remote_prefill.py); without one — a
mixed node, or a decode node asked to prefill locally — this engine prefills it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc

from pdserve.engine.bridge import EngineGone, RequestHandle
from pdserve.engine.client import EngineError
from pdserve.engine.node_server import NodeServer
from pdserve.engine.protocol import RequestRejected
from pdserve.engine.request_stream import RequestStream
from pdserve.engine.sampling_params import SamplingParamsError
from pdserve.models.tokenizer import Tokenizer
from pdserve.rpc import node_pb2 as pb
from pdserve.rpc.convert import delta_to_chunk, sampling_from_proto

log = logging.getLogger("pdserve.decode")


class DecodeNodeServer(NodeServer):
    def __init__(self, config, tokenizer: Tokenizer | None = None) -> None:
        super().__init__(config)
        self.tokenizer = tokenizer or Tokenizer.from_dir(config.model_dir)

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"node {self.config.node_id} is draining")
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
        try:
            handle = self.bridge.submit(request.request_id, prompt, params)
        except EngineError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        stream = RequestStream(request.request_id, params, self.tokenizer, prompt)
        async for chunk in self._relay(handle, stream, time.monotonic()):
            yield chunk

    async def _relay(self, handle: RequestHandle, stream: RequestStream,
                     started: float) -> AsyncIterator[pb.GenerateChunk]:
        """Engine outputs -> chunks. Leaving early (client cancelled) aborts the engine request."""
        first = True
        try:
            while not stream.finished:
                item = await handle.items.get()
                if isinstance(item, (RequestRejected, EngineGone)):
                    self.metrics.outcome("error")
                    yield pb.GenerateChunk(finish_reason="error", error=item.message,
                                           usage=_usage(handle, stream))
                    return
                delta = stream.on_slot(item)
                if delta.stopped_by_string:
                    self.bridge.abort(handle)
                if delta.preempted or (not delta.token_ids and not delta.finish_reason):
                    continue
                chunk = delta_to_chunk(delta)
                if first:
                    ttft = time.monotonic() - started
                    self.metrics.ttft.labels(part="total").observe(ttft)
                    chunk.timing.CopyFrom(pb.TimingInfo(queue_s=0.0, prefill_s=ttft, transfer_s=0.0))
                    first = False
                if stream.finished:
                    chunk.usage.CopyFrom(_usage(handle, stream))
                    self.metrics.outcome(stream.finish_reason)
                yield chunk
        finally:
            if not stream.finished:
                self.metrics.outcome("cancelled")
                self.bridge.abort(handle)


def _usage(handle: RequestHandle, stream: RequestStream) -> pb.Usage:
    return pb.Usage(prompt_tokens=handle.prompt_len, completion_tokens=len(stream.token_ids))


