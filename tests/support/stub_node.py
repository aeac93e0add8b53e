"""A stub ``Node`` gRPC server for router tests and the router benchmark — not a model server.

It answers ``Generate`` at once with a deterministic token sequence (token ``i`` of a request is
``STUB_FIRST_TOKEN + (prompt_ids[-1] + i) % STUB_TOKEN_SPAN`` with text ``" w<id>"``; a migrated
continuation, whose prompt ends with ``resumed_output_tokens`` outputs, goes on with the same
sequence from there, as a real node's greedy continuation would), serves
grpc.health.v1, and takes failure injection through ``StubBehavior`` (a mutable control block the
test owns): fail before the first chunk, fail after k chunks, hang, report an error chunk, go
NOT_SERVING. It counts calls, completions and cancellations so tests can see what the router did.

    python -m pdserve.tests.support.stub_node --role mixed --register http://127.0.0.1:8000   # for bench
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from pdserve.common.tokens import SampledTokens
from pdserve.node.registry_client import Heartbeater, registry_client_for
from pdserve.rpc import node_pb2, node_pb2_grpc
from pdserve.rpc.chunks import whole_answer
from pdserve.rpc.convert import tokens_to_proto
from pdserve.rpc.keepalive import SERVER_OPTIONS
from pdserve.rpc.registry import HEARTBEAT_PATH, NodeInfo, RegistryAuth, Role
from pdserve.tests.support.secret import TEST_SECRET

STUB_FIRST_TOKEN = 3  # ids 0-2 are the demo tokenizer's special tokens
STUB_TOKEN_SPAN = 1000


def stub_token(prompt_ids: list[int], i: int) -> int:
    return STUB_FIRST_TOKEN + ((prompt_ids[-1] if prompt_ids else 0) + i) % STUB_TOKEN_SPAN


def _stub_sequence_start(request: node_pb2.GenerateRequest) -> tuple[list[int], int]:
    """(the real prompt, the position of the request's first token in the undisturbed sequence)."""
    resumed = request.sampling.resumed_output_tokens
    prompt = list(request.prompt_token_ids)
    return prompt[: len(prompt) - resumed], resumed


@dataclass
class StubBehavior:
    """Test-controlled behaviour; read at the start of each call (and per chunk for the delays)."""

    # the whole sequence of a request (fewer when max_tokens is smaller; a continuation sends the rest)
    tokens: int = 8
    tokens_per_chunk: int = 1  # >1 imitates speculative decoding's multi-token steps
    token_delay_s: float = 0.0
    first_token_delay_s: float = 0.0
    fail_first_calls: int = 0  # this many calls abort with UNAVAILABLE before any chunk
    error_first_chunk: bool = False  # every call answers with a finish_reason "error" chunk
    error_calls: int = 0  # this many calls (the first ones) answer with an error chunk
    error_cause: int = 0  # the FailureCause on error chunks; a prefill peer cause names the request's peer
    fail_after_chunks: int | None = None  # abort with INTERNAL after this many chunks (the node died)
    # after this many chunks, an error chunk (error_cause, else CAUSE_DECODE_NODE_FAILED: the engine
    # died, the node lives)
    error_after_chunks: int | None = None
    hang: bool = False  # never answer
    silent_after_chunks: int | None = None  # after this many chunks, send nothing more (a stopped node)
    end_delay_s: float = 0.0  # after the last chunk, the call's status comes this much later
    speculate: bool = True  # report speculate_metrics on the last chunk
    reported_waiting: int = 0  # what Stats says is queued (load the router reads only from Stats)
    total_blocks: int = 0  # the KV blocks Stats reports (0: none reported)
    # data addresses of the peers this stub cannot reach: Stats reports them, and (a decode stub) a
    # Generate naming one as its prefill node answers a CAUSE_PREFILL_PEER_UNREACHABLE error chunk
    unreachable_peers: tuple[str, ...] = ()
    # a decode stub: a Generate naming one of these prefill data addresses never answers (its prefill
    # peer cannot reach it, and nobody tells it)
    stall_with_prefills: tuple[str, ...] = ()


@dataclass
class StubCounters:
    calls: int = 0
    completed: int = 0
    cancelled: int = 0
    requests: list[node_pb2.GenerateRequest] = field(default_factory=list)


class StubNodeServicer(node_pb2_grpc.NodeServicer):
    def __init__(self, node_id: str, role: Role, model: str, behavior: StubBehavior) -> None:
        self.node_id = node_id
        self.role = role
        self.model = model
        self.behavior = behavior
        self.counters = StubCounters()
        self.draining = False
        self.running = 0

    async def Generate(self, request: node_pb2.GenerateRequest,  # noqa: N802 - the gRPC method name
                       context: grpc.aio.ServicerContext) -> AsyncIterator[node_pb2.GenerateChunk]:
        async for chunk in self._counted(request, context):
            yield chunk

    async def Complete(self, request: node_pb2.GenerateRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> node_pb2.GenerateChunk:
        # the decode node's own merge and timeouts (decode_node/server.py)
        return await whole_answer(self._counted(request, context), request.first_token_timeout_s,
                                  request.silence_timeout_s)

    async def _counted(self, request: node_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[node_pb2.GenerateChunk]:
        b = self.behavior
        self.counters.calls += 1
        self.counters.requests.append(request)
        if self.counters.calls <= b.fail_first_calls:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "injected failure before the first chunk")
        self.running += 1
        try:
            async for chunk in self._chunks(request, b, context):
                yield chunk
            self.counters.completed += 1
        except (asyncio.CancelledError, GeneratorExit):  # the call was cancelled, or Complete timed out
            self.counters.cancelled += 1
            raise
        finally:
            self.running -= 1

    async def _chunks(self, request: node_pb2.GenerateRequest, b: StubBehavior,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[node_pb2.GenerateChunk]:
        if b.hang or request.prefill.data_address in b.stall_with_prefills:
            await asyncio.Event().wait()
        cause = b.error_cause if b.error_first_chunk or self.counters.calls <= b.error_calls else None
        if request.prefill.data_address and request.prefill.data_address in b.unreachable_peers:
            cause = node_pb2.CAUSE_PREFILL_PEER_UNREACHABLE
        if cause is not None:
            peer_causes = (node_pb2.CAUSE_PREFILL_PEER_FAILED, node_pb2.CAUSE_PREFILL_PEER_UNREACHABLE)
            blamed = request.prefill.node_id if cause in peer_causes else ""
            yield node_pb2.GenerateChunk(finish_reason="error", error="injected node error",
                                         cause=cause, failed_node_id=blamed)
            return
        await asyncio.sleep(b.first_token_delay_s)
        prompt, start = _stub_sequence_start(request)
        total = min(b.tokens - start, request.sampling.max_tokens or b.tokens)
        sent = chunks = 0
        while sent < total:
            if b.fail_after_chunks is not None and chunks >= b.fail_after_chunks:
                await context.abort(grpc.StatusCode.INTERNAL, "injected failure mid-stream")
            if b.error_after_chunks is not None and chunks >= b.error_after_chunks:
                cause = b.error_cause or node_pb2.CAUSE_DECODE_NODE_FAILED
                yield node_pb2.GenerateChunk(finish_reason="error", cause=cause,
                                             error="injected engine failure mid-stream")
                return
            if b.silent_after_chunks is not None and chunks >= b.silent_after_chunks:
                await asyncio.Event().wait()
            if sent and b.token_delay_s:
                await asyncio.sleep(b.token_delay_s)
            ids = [stub_token(prompt, start + i) for i in range(sent, min(sent + b.tokens_per_chunk, total))]
            sent += len(ids)
            chunks += 1
            yield self._chunk(request, ids, sent, total, b, first=chunks == 1)
        if b.end_delay_s:
            await asyncio.sleep(b.end_delay_s)

    def _chunk(self, request: node_pb2.GenerateRequest, ids: list[int], sent: int, total: int,
               b: StubBehavior, first: bool) -> node_pb2.GenerateChunk:
        tokens = SampledTokens(ids)
        if request.sampling.HasField("logprobs"):
            k = request.sampling.logprobs
            tokens = SampledTokens(ids, [-0.5] * len(ids), [1] * len(ids), k,
                                   [t + j for t in ids for j in range(k)],
                                   [-0.5 - j for _ in ids for j in range(k)])
        chunk = node_pb2.GenerateChunk(tokens=tokens_to_proto(tokens), text="".join(f" w{t}" for t in ids))
        if first:
            chunk.timing.CopyFrom(node_pb2.TimingInfo(queue_s=0.0, prefill_s=0.001, transfer_s=0.0))
            if request.sampling.HasField("prompt_logprobs"):  # prompt token i (i >= 1) scores -0.25 * i
                scored = list(request.prompt_token_ids[1:])
                logprobs = [-0.25 * i for i in range(1, len(scored) + 1)]
                chunk.prompt_logprobs.CopyFrom(tokens_to_proto(
                    SampledTokens(scored, logprobs, [1] * len(scored), 1, scored, logprobs)))
        if sent >= total:
            chunk.finish_reason = "length"
            chunk.usage.CopyFrom(node_pb2.Usage(prompt_tokens=len(request.prompt_token_ids),
                                                completion_tokens=total))
            if b.speculate:
                chunk.speculate_metrics.CopyFrom(node_pb2.SpeculateMetrics(
                    accepted_tokens=total - 1, rejected_tokens=1, accept_ratio=(total - 1) / total,
                    average_accept_length=1.5, accepted_tokens_per_head=[total - 1],
                    accept_ratio_per_head=[(total - 1) / total]))
        return chunk

    async def Stats(self, request: node_pb2.StatsRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> node_pb2.NodeStats:
        return node_pb2.NodeStats(node_id=self.node_id, role=self.role, running=self.running,
                                  waiting=self.behavior.reported_waiting, draining=self.draining,
                                  model=self.model, total_blocks=self.behavior.total_blocks,
                                  free_blocks=self.behavior.total_blocks,
                                  unreachable_peer_addresses=list(self.behavior.unreachable_peers))

    async def Drain(self, request: node_pb2.DrainRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> node_pb2.DrainResponse:
        self.draining = True
        return node_pb2.DrainResponse(draining=True, inflight=self.running)


class StubNodeServer:
    """The stub in a background thread with its own event loop: ``with StubNodeServer(...) as node``."""

    def __init__(self, node_id: str, role: Role = "mixed", model: str = "pdserve-demo",
                 behavior: StubBehavior | None = None, host: str = "127.0.0.1") -> None:
        self.servicer = StubNodeServicer(node_id, role, model, behavior or StubBehavior())
        self._host = host
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"stub-{node_id}", daemon=True)
        self._server: grpc.aio.Server | None = None
        self._health: health_aio.HealthServicer | None = None
        self.port = 0

    @property
    def behavior(self) -> StubBehavior:
        return self.servicer.behavior

    @property
    def counters(self) -> StubCounters:
        return self.servicer.counters

    @property
    def address(self) -> str:
        return f"{self._host}:{self.port}"

    def info(self, capacity: int = 8, load: float = 0.0, draining: bool = False) -> NodeInfo:
        s = self.servicer
        return NodeInfo(node_id=s.node_id, role=s.role, model=s.model, grpc_address=self.address,
                        data_address=f"tcp://{self._host}:{self.port}", capacity=capacity, load=load,
                        draining=draining)  # a stand-in data address, distinct per stub

    def _call(self, coro: object, timeout_s: float = 10.0) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)  # type: ignore[arg-type]

    async def _start(self) -> None:
        self._server = grpc.aio.server(options=SERVER_OPTIONS)  # a real node's keepalive policy
        node_pb2_grpc.add_NodeServicer_to_server(self.servicer, self._server)
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port = self._server.add_insecure_port(f"{self._host}:{self.port}")
        await self._server.start()
        await self._set_serving(True)

    async def _set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        assert self._health is not None
        await self._health.set("", status)

    def set_serving(self, serving: bool) -> None:
        self._call(self._set_serving(serving))

    def start(self) -> StubNodeServer:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        """Stop serving (a node killed); idempotent."""
        if self._loop.is_closed():
            return
        if self._server is not None:
            self._call(self._server.stop(grace=None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def restart(self) -> None:
        """Stop serving and serve again on the same port (a node that crashed and came back)."""
        assert self._server is not None
        self._call(self._server.stop(grace=None))
        self._call(self._start())

    def __enter__(self) -> StubNodeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _serve_forever(args: argparse.Namespace) -> None:
    behavior = StubBehavior(tokens=args.tokens, first_token_delay_s=args.first_token_delay)
    servicer = StubNodeServicer(args.node_id, args.role, args.model, behavior)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    node_pb2_grpc.add_NodeServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    print(f"{args.host}:{port}", flush=True)
    info = NodeInfo(node_id=args.node_id, role=args.role, model=args.model,
                    grpc_address=f"{args.host}:{port}", capacity=args.capacity)
    beater = None
    if args.register:
        client = registry_client_for(args.register, RegistryAuth(TEST_SECRET), args.api_key)
        beater = Heartbeater(client, lambda: info, args.heartbeat_s)
        await beater.start()
    try:
        await server.wait_for_termination()
    finally:
        if beater is not None:
            await beater.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--node-id", default="stub-0")
    parser.add_argument("--role", default="mixed", choices=["prefill", "decode", "mixed"])
    parser.add_argument("--model", default="pdserve-demo")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--capacity", type=int, default=256)
    parser.add_argument("--first-token-delay", type=float, default=0.0, help="seconds before the first chunk")
    parser.add_argument("--register", default=None, help="router URL or redis:// URL to heartbeat to")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--heartbeat-s", type=float, default=1.0)
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve_forever(args))
    except KeyboardInterrupt:
        return 0
    return 0


def register_with_router(router_url: str, info: NodeInfo, api_key: str | None = None,
                         auth: RegistryAuth | None = None) -> None:
    """One synchronous heartbeat to a router's embedded registry (tests and scripts), sealed with the
    test cluster's secret unless `auth` says otherwise."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = (auth or RegistryAuth(TEST_SECRET)).seal(info)
    response = httpx.post(router_url + HEARTBEAT_PATH, content=body, headers=headers, timeout=5)
    response.raise_for_status()


if __name__ == "__main__":
    raise SystemExit(main())
