"""The router's failure decision table (router/blame.py), cause by cause."""

from __future__ import annotations

import pytest

from pdserve.router.blame import Failure, decide, failure_of_chunk
from pdserve.rpc import node_pb2 as pb

D, P = "d1", "p1"


def _decide(cause: int, blamed: str = D):
    return decide(Failure(cause, blamed, "x"), D, P)


def test_bad_request_is_400_without_retry_or_blame() -> None:
    d = _decide(pb.CAUSE_BAD_REQUEST)
    assert (d.retry, d.status, d.eject, d.suspect, d.broken_pair) == (False, 400, None, None, None)


def test_capacity_retries_on_another_decode_node_and_ends_in_429() -> None:
    d = _decide(pb.CAUSE_KV_CAPACITY)
    assert d.retry and d.status == 429 and d.avoid == {D}
    assert d.eject is None and d.suspect is None and d.keep_decode is None


@pytest.mark.parametrize("cause", [pb.CAUSE_PREFILL_PEER_FAILED, pb.CAUSE_PREFILL_PEER_UNREACHABLE])
def test_prefill_peer_failure_blames_the_peer_never_the_decode_node(cause: int) -> None:
    d = _decide(cause, blamed=P)
    assert d.retry and d.keep_decode == D and d.avoid == {P}
    assert d.eject is None and d.suspect == P
    assert d.broken_pair == ((D, P) if cause == pb.CAUSE_PREFILL_PEER_UNREACHABLE else None)


def test_unreachable_decode_node_is_ejected_at_once() -> None:
    d = _decide(pb.CAUSE_DECODE_NODE_UNREACHABLE)
    assert d.retry and d.eject == D and d.avoid == {D} and d.keep_decode is None


@pytest.mark.parametrize("cause", [pb.CAUSE_DECODE_NODE_FAILED])
def test_failed_decode_node_is_checked_not_ejected_on_one_report(cause: int) -> None:
    d = _decide(cause)
    assert d.retry and d.eject is None and d.suspect == D and d.avoid == {D}


@pytest.mark.parametrize("cause", [pb.CAUSE_DRAINING, pb.CAUSE_ABORTED])
def test_draining_or_aborting_node_is_avoided_without_blame(cause: int) -> None:
    d = _decide(cause)
    assert d.retry and d.eject is None and d.suspect is None and d.avoid == {D}


@pytest.mark.parametrize("cause", [pb.CAUSE_DEADLINE, pb.CAUSE_UNSPECIFIED])
def test_unknown_origin_avoids_both_nodes_and_blames_none(cause: int) -> None:
    d = _decide(cause)
    assert d.retry and d.eject is None and d.suspect is None and d.avoid == {D, P}


def test_chunk_naming_a_peer_blames_it_and_a_bare_abort_is_aborted() -> None:
    chunk = pb.GenerateChunk(finish_reason="error", error="e", cause=pb.CAUSE_PREFILL_PEER_FAILED,
                             failed_node_id="p9")
    assert failure_of_chunk(chunk, D, P).node_id == "p9"
    unnamed = pb.GenerateChunk(finish_reason="error", cause=pb.CAUSE_PREFILL_PEER_UNREACHABLE)
    assert failure_of_chunk(unnamed, D, P).node_id == P
    abort = failure_of_chunk(pb.GenerateChunk(finish_reason="abort"), D, P)
    assert (abort.cause, abort.node_id) == (pb.CAUSE_ABORTED, D)
