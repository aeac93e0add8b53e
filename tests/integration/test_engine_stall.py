"""A node whose engine goes silent (here: SIGSTOP, as a hung step or a stuck collective would look)
kills it after `--engine-stall-timeout` and fails its requests as a dead engine's, with the cause that
lets the router move them: the decode side's streams end with CAUSE_DECODE_NODE_FAILED (the router
migrates them), a prefill node's peer hears of a prefill-side failure. Without the watchdog they
would wait on the engine until a client or router timeout.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pdserve.common.leftovers import pid_alive
from pdserve.common.leftovers import remove_leftovers as remove_dead_leftovers
from pdserve.rpc import node_pb2 as pb
from pdserve.tests.support.cluster import (
    Node,
    NodeSpec,
    generate,
    leftovers,
    sampling,
    start_nodes,
    stop_nodes,
    tokenizer,
    wait_until,
)

STALL_S = 2.0
DETECTION_SLACK_S = 2.0  # the watchdog's check interval, the kill and the failure's way to the stream
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"


STALL = ("--engine-stall-timeout", str(STALL_S))


@contextmanager
def running(tmp_path: Path, *specs: NodeSpec) -> Iterator[dict[str, Node]]:
    started = start_nodes(specs, tmp_path)
    try:
        yield started
    finally:
        for node in started.values():
            if not node.expect_clean_exit:
                _clean_after_stall(node)
        stop_nodes(started.values())


def _stop_engine(node: Node) -> float:
    node.expect_clean_exit = False  # the node exits 1 once its engine is gone
    os.kill(node.engine_pid, signal.SIGSTOP)
    return time.monotonic()


def _clean_after_stall(node: Node) -> None:
    """The node server exits on its own; its engine was killed; nothing of theirs stays behind."""
    assert node.process.wait(timeout=15) == 1, node.log_tail()
    assert not pid_alive(node.engine_pid)
    remove_dead_leftovers()  # a killed engine's pool and queue, as the next node on this host does
    assert not leftovers(node), leftovers(node)


def test_a_stalled_engine_fails_its_streams_as_a_dead_one_and_the_node_leaves(tmp_path: Path) -> None:
    with running(tmp_path, NodeSpec("m1", "mixed", STALL)) as nodes:
        _stall_a_stream(nodes["m1"])


def _stall_a_stream(mixed: Node) -> None:
    request = pb.GenerateRequest(request_id="long", prompt_token_ids=tokenizer().encode(PROMPT),
                                 sampling=sampling(400, ignore_eos=True))
    stream = mixed.stub.Generate(request, timeout=60.0)
    chunks = [next(stream)]  # streaming: the engine holds the request
    stopped_at = _stop_engine(mixed)
    chunks += list(stream)
    waited = time.monotonic() - stopped_at
    last = chunks[-1]
    assert (last.finish_reason, last.cause) == ("error", pb.CAUSE_DECODE_NODE_FAILED), last
    assert "engine stalled" in last.error, last.error
    assert STALL_S - 0.5 <= waited <= STALL_S + DETECTION_SLACK_S, f"failed {waited:.2f} s after the stop"
    assert sum(len(c.tokens.token_ids) for c in chunks) < 400
    assert "engine stalled: no record for" in _exit_log(mixed)


def test_a_pause_of_the_whole_node_is_not_taken_for_a_stall(tmp_path: Path) -> None:
    """Server and engine stopped together (a frozen host, a stopped process group): the watchdog did not
    run either, so it does not count the pause against the engine, and the stream goes on."""
    with running(tmp_path, NodeSpec("m1", "mixed", STALL)) as nodes:
        mixed = nodes["m1"]
        request = pb.GenerateRequest(request_id="paused", prompt_token_ids=tokenizer().encode(PROMPT),
                                     sampling=sampling(200, ignore_eos=True))
        stream = mixed.stub.Generate(request, timeout=60.0)
        chunks = [next(stream)]
        pids = (mixed.process.pid, mixed.engine_pid)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(STALL_S + 1.5)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        chunks += list(stream)
        assert (chunks[-1].finish_reason, sum(len(c.tokens.token_ids) for c in chunks)) == ("length", 200), \
            chunks[-1]
        assert mixed.process.poll() is None and pid_alive(mixed.engine_pid), mixed.log_tail()


def test_a_stalled_prefill_engine_fails_the_decode_nodes_request_on_the_prefill_side(tmp_path: Path) -> None:
    with running(tmp_path, NodeSpec("p1", "prefill", STALL), NodeSpec("d1", "decode")) as nodes:
        _stall_a_prefill(nodes["p1"], nodes["d1"])


def _stall_a_prefill(prefill: Node, decode: Node) -> None:
    warm = generate(decode, "warm", tokenizer().encode(PROMPT), sampling(2), prefill=prefill)
    assert warm.finish_reason == "length", warm.chunks[-1]
    stopped_at = _stop_engine(prefill)
    result = generate(decode, "stalled", tokenizer().encode(PROMPT), sampling(8), prefill=prefill)
    waited = time.monotonic() - stopped_at
    last = result.chunks[-1]
    # The prefill node's failure notice, or its connection closing as it exits right after: both are
    # the prefill side's, so the router retries elsewhere and never blames the decode node.
    assert last.finish_reason == "error" and last.cause in (pb.CAUSE_PREFILL_PEER_FAILED,
                                                            pb.CAUSE_PREFILL_PEER_UNREACHABLE), last
    assert last.failed_node_id == "p1", last
    assert waited <= STALL_S + DETECTION_SLACK_S, f"failed {waited:.2f} s after the stop"
    assert wait_until(decode.all_blocks_free, 5.0), decode.stats()
    assert "engine stalled: no record for" in _exit_log(prefill)


def _exit_log(node: Node) -> str:
    node.process.wait(timeout=15)  # a node server that lingers without its engine fails the test here
    return node.log_tail(20000)
