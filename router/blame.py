"""Who failed a try, and what the router does about it: the decision table of failure handling.

A try fails with a cause (rpc/node.proto FailureCause): the decode node reports it on an error chunk,
naming the prefill node when the peer failed; a gRPC error on the call itself is classified here.
`decide` turns a failure into a `Decision`: whether another try may succeed, where it goes (another
prefill node for the same decode node, or another pair), which node leaves rotation at once (only
one whose own gRPC endpoint is unreachable), which node gets an immediate health check (a node
reported failed: the check, not the report, ejects it), which decode/prefill pair is avoided, and the
HTTP answer when no try succeeds. A decode node is never blamed for its prefill peer's failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from pdserve.rpc import node_pb2 as pb

Cause = pb.FailureCause.ValueType

# gRPC status of the Generate call itself -> cause. UNAVAILABLE / UNIMPLEMENTED: no Node API answers
# there (the node is down or is something else). Statuses a live node sets on purpose have their own.
_STATUS_CAUSES: dict[grpc.StatusCode, Cause] = {
    grpc.StatusCode.INVALID_ARGUMENT: pb.CAUSE_BAD_REQUEST,
    grpc.StatusCode.UNAVAILABLE: pb.CAUSE_DECODE_NODE_UNREACHABLE,
    grpc.StatusCode.UNIMPLEMENTED: pb.CAUSE_DECODE_NODE_UNREACHABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: pb.CAUSE_KV_CAPACITY,
    grpc.StatusCode.DEADLINE_EXCEEDED: pb.CAUSE_DEADLINE,
}


@dataclass(frozen=True)
class Failure:
    """One failed try: the cause, the node it blames (a node id) and the message for logs."""

    cause: Cause
    node_id: str
    message: str

    @property
    def cause_name(self) -> str:
        return pb.FailureCause.Name(self.cause).removeprefix("CAUSE_").lower()

    def __str__(self) -> str:
        return f"{self.node_id}: {self.cause_name}: {self.message}"


def failure_of_chunk(chunk: pb.GenerateChunk, decode_node_id: str, prefill_node_id: str | None) -> Failure:
    """The failure an error (or abort) chunk reports; a peer failure blames the peer it names, or the
    route's prefill node when the chunk names none."""
    blamed = decode_node_id
    if chunk.cause in (pb.CAUSE_PREFILL_PEER_FAILED, pb.CAUSE_PREFILL_PEER_UNREACHABLE):
        blamed = chunk.failed_node_id or prefill_node_id or decode_node_id
    cause = chunk.cause
    if cause == pb.CAUSE_UNSPECIFIED and chunk.finish_reason == "abort":
        cause = pb.CAUSE_ABORTED
    return Failure(cause, blamed, chunk.error or chunk.finish_reason)


def failure_of_status(error: grpc.aio.AioRpcError, decode_node_id: str) -> Failure:
    cause = _STATUS_CAUSES.get(error.code(), pb.CAUSE_DECODE_NODE_FAILED)
    return Failure(cause, decode_node_id, f"{error.code().name}: {error.details()}")


@dataclass(frozen=True)
class Decision:
    retry: bool  # another try may succeed
    status: int  # the HTTP status when no try succeeds: 400, 429 or 503
    code: str  # the OpenAI error code with it
    avoid: frozenset[str] = frozenset()  # nodes the next tries of this request do not use
    keep_decode: str | None = None  # the next try goes to this decode node again, with another prefill node
    eject: str | None = None  # out of rotation now: its own endpoint did not answer
    suspect: str | None = None  # health-checked at once: a failing check ejects it
    broken_pair: tuple[str, str] | None = None  # (decode, prefill) ids: no route uses the pair for now


def decide(failure: Failure, decode_node_id: str, prefill_node_id: str | None) -> Decision:
    """What to do after `failure` of a try on the route (decode_node_id, prefill_node_id)."""
    cause, blamed = failure.cause, failure.node_id
    route = frozenset(n for n in (decode_node_id, prefill_node_id) if n)
    if cause == pb.CAUSE_BAD_REQUEST:
        return Decision(retry=False, status=400, code="invalid_value")
    if cause == pb.CAUSE_KV_CAPACITY:
        return Decision(retry=True, status=429, code="overloaded", avoid=frozenset({decode_node_id}))
    if cause in (pb.CAUSE_PREFILL_PEER_FAILED, pb.CAUSE_PREFILL_PEER_UNREACHABLE):
        pair = (decode_node_id, blamed) if cause == pb.CAUSE_PREFILL_PEER_UNREACHABLE else None
        return Decision(retry=True, status=503, code="prefill_failed", avoid=frozenset({blamed}),
                        keep_decode=decode_node_id, suspect=blamed, broken_pair=pair)
    if cause == pb.CAUSE_DECODE_NODE_UNREACHABLE:
        return Decision(retry=True, status=503, code="node_failed", avoid=frozenset({decode_node_id}),
                        eject=decode_node_id)
    if cause == pb.CAUSE_DECODE_NODE_FAILED:
        return Decision(retry=True, status=503, code="node_failed", avoid=frozenset({decode_node_id}),
                        suspect=decode_node_id)
    if cause in (pb.CAUSE_DRAINING, pb.CAUSE_ABORTED):
        return Decision(retry=True, status=503, code="node_failed", avoid=frozenset({decode_node_id}))
    # DEADLINE or unknown: which node stalled is not known, so neither is blamed; both are avoided.
    return Decision(retry=True, status=503, code="node_failed", avoid=route)
