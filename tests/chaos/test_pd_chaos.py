"""PD under failure: real nodes killed, stopped and fed garbage while requests run.

Each failure must end in a bounded, clear outcome — an error within the decode node's prefill timeout,
never a hang — with every KV block back and no process, SysV queue or /dev/shm pool left behind.
Each test breaks a node of its own, so the order of the tests does not matter.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import zmq
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.engine.engine import kv_spec_for_model
from pdserve.models.config import ModelConfig
from pdserve.models.loader import default_model_dir
from pdserve.rpc import node_pb2 as pb
from pdserve.tests.support.cluster import (
    Node,
    NodeSpec,
    Result,
    generate,
    leftovers,
    pid_alive,
    sampling,
    scrape_metric,
    start_nodes,
    stop_nodes,
    tokenizer,
    wait_until,
)
from pdserve.tests.support.secret import TEST_SECRET
from pdserve.transfer.config import CurveKeys
from pdserve.transfer.messages import Abort, KVChunkHeader, LeaseRenewal, WireCodec

PREFILL_TIMEOUT_S = 3.0
FAIL_BOUND_S = PREFILL_TIMEOUT_S + 2.0  # the timeout, the abort grace and a loaded machine's slack
PROMPT_TEXT = ("def fibonacci(n):\n    if n < 2:\n        return n\n"
               "    return fibonacci(n - 1) + fibonacci(n - 2)\n")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    timeout = ("--prefill-timeout", str(PREFILL_TIMEOUT_S))
    specs = [
        # A small step budget: a long prompt takes many steps, so a kill lands mid-prefill.
        NodeSpec("prefill_kill", "prefill", ("--max-num-batched-tokens", "32")),
        NodeSpec("prefill_stop", "prefill", ("--max-num-batched-tokens", "64")),
        NodeSpec("decode", "decode", (*timeout, "--metrics-port", "0")),
        NodeSpec("decode_engine_kill", "decode", timeout),
        NodeSpec("decode_server_kill", "decode", timeout),
    ]
    started = start_nodes(specs, tmp_path_factory.mktemp("chaos_nodes"))
    yield started
    stop_nodes(started.values())


@pytest.fixture(scope="module")
def metrics_port(nodes: dict[str, Node]) -> int:
    return nodes["decode"].metrics_port


@pytest.fixture(scope="module")
def prompt_ids() -> list[int]:
    return tokenizer().encode(PROMPT_TEXT)


_ids = itertools.count()


def rid(tag: str) -> str:
    return f"chaos-{tag}-{next(_ids)}-{time.monotonic_ns()}"


def long_prompt(ids: list[int], n: int) -> list[int]:
    return (ids * (n // len(ids) + 1))[:n]


def start_generate(node: Node, request_id: str, ids: list[int], params: pb.SamplingParams,
                   prefill: Node | None) -> tuple[ThreadPoolExecutor, Future[Result]]:
    pool = ThreadPoolExecutor(1)
    return pool, pool.submit(generate, node, request_id, ids, params, prefill, 30.0)


def outcome_of(future: Future[Result], timeout_s: float) -> tuple[str, str]:
    """(status code name or 'OK:<finish_reason>', details) of a finished Generate call."""
    try:
        result = future.result(timeout=timeout_s)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    return f"OK:{result.finish_reason}", result.chunks[-1].error if result.chunks else ""


def serves(decode: Node, ids: list[int], prefill: Node | None = None) -> bool:
    result = generate(decode, rid("probe"), ids, sampling(4), prefill=prefill, timeout_s=10.0)
    return result.finish_reason in ("stop", "length") and bool(result.token_ids)


def still_serves(decode: Node, ids: list[int], prefill: Node | None = None) -> None:
    started = time.monotonic()
    result = generate(decode, rid("after"), ids, sampling(4), prefill=prefill, timeout_s=10.0)
    assert result.finish_reason in ("stop", "length") and result.token_ids
    assert time.monotonic() - started < 5.0


# -- garbage on the data plane ---------------------------------------------------------------------------

def garbage_messages(request_id: str, rng: random.Random) -> Iterator[list[bytes]]:
    """Multipart messages a confused or hostile peer might send: none may disturb a real transfer."""
    codec = WireCodec()
    spec = kv_spec_for_model(ModelConfig.from_dir(default_model_dir()), 1024, 16)
    block_nbytes = int(np.prod(spec.block_shape)) * spec.itemsize
    yield [rng.randbytes(n) for n in (1, 7)]
    yield [rng.randbytes(rng.randrange(1, 4096))]
    yield [bytes([99]) + rng.randbytes(64)]  # unknown wire version
    valid = codec.encode(LeaseRenewal(request_id, 1000))
    yield [valid[:len(valid) // 2]]  # truncated msgpack
    yield [codec.encode(Abort(request_id)), rng.randbytes(32)]  # control message with a payload

    def header(**changes: object) -> KVChunkHeader:
        fields = dict(request_id=request_id, seq=0, layer_start=0, layer_end=1, token_start=0, token_end=16,
                      block_ids=(rng.randrange(1024),), dtype=spec.dtype, block_shape=spec.block_shape,
                      payload_nbytes=2 * block_nbytes, last=False)
        return KVChunkHeader(**{**fields, **changes})

    yield [codec.encode(header())]  # frames missing entirely
    def frames(n: int = 2, nbytes: int = block_nbytes) -> list[bytes]:
        return [rng.randbytes(nbytes) for _ in range(n)]

    yield [codec.encode(header()), *frames(1)]  # one of two frames
    yield [codec.encode(header()), *frames(1), *frames(1, block_nbytes // 2)]  # a short frame
    yield [codec.encode(header(seq=rng.randrange(1, 50))), *frames()]  # out of sequence
    yield [codec.encode(header(request_id="nobody")), *frames()]
    wrong_shape = (spec.block_shape[0] * 2, spec.block_shape[1], spec.block_shape[2] // 2)
    yield [codec.encode(header(block_shape=wrong_shape)), *frames()]
    yield [codec.encode(header(in_place=True, payload_nbytes=0, layer_end=spec.num_layers + 3))]


def malformed_count(metrics_port: int) -> float:
    return scrape_metric(metrics_port, "pdserve_kv_transfer_failures_total", {"reason": "malformed"})


def test_garbage_on_data_ports_does_not_disturb_a_real_request(nodes: dict[str, Node], prompt_ids: list[int],
                                                              metrics_port: int) -> None:
    decode, prefill = nodes["decode"], nodes["prefill_stop"]
    ids = long_prompt(prompt_ids, 600)
    params = sampling(24)
    reference = generate(decode, rid("local-ref"), ids, params)  # this decode node prefilling itself
    malformed_before = malformed_count(metrics_port)
    request_id = rid("under-fire")
    pool, future = start_generate(decode, request_id, ids, params, prefill)
    context = zmq.Context()
    sockets = []
    try:
        for target in (decode, prefill):
            sock = context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, 2000)
            # a cluster member gone wrong: it holds the CURVE key, so its garbage gets through
            keys = CurveKeys.from_cluster_secret(TEST_SECRET)
            sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
            sock.curve_serverkey = keys.public
            sock.connect(target.info["data"])
            sockets.append(sock)
        assert wait_until(lambda: not decode.all_blocks_free(), 5.0)  # the request holds its reservation
        rng = random.Random(5)
        rounds = 0
        while not future.done() and rounds < 50:
            for sock in sockets:
                for frames in garbage_messages(request_id, rng):
                    sock.send_multipart(frames)
            rounds += 1
        result = future.result(timeout=30.0)
    finally:
        for sock in sockets:
            sock.close()
        context.term()
        pool.shutdown()
    assert rounds >= 1
    assert result.token_ids == reference.token_ids
    assert result.finish_reason == reference.finish_reason
    assert malformed_count(metrics_port) > malformed_before  # the garbage arrived and was dropped
    assert wait_until(lambda: decode.all_blocks_free() and prefill.all_blocks_free(), 2.0)
    still_serves(decode, prompt_ids, prefill)


# -- a prefill node dies or stalls -----------------------------------------------------------------------

def test_kill9_prefill_node_mid_request(nodes: dict[str, Node], prompt_ids: list[int]) -> None:
    decode, prefill = nodes["decode"], nodes["prefill_kill"]
    ids = long_prompt(prompt_ids, 1500)
    pool, future = start_generate(decode, rid("p-killed"), ids, sampling(8), prefill)
    try:
        assert wait_until(lambda: not prefill.all_blocks_free(), 10.0), "prefill never started"
        prefill.expect_clean_exit = False
        os.kill(prefill.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        code, details = outcome_of(future, FAIL_BOUND_S + 5.0)
        elapsed = time.monotonic() - killed
    finally:
        pool.shutdown()
    # the decode node's error chunk (cause PREFILL_PEER_*): the router retries it elsewhere
    assert code == "OK:error" and "prefill" in details, (code, details)
    assert elapsed < FAIL_BOUND_S, f"the request failed {elapsed:.1f} s after the kill"
    assert wait_until(decode.all_blocks_free, 2.0), decode.stats()
    still_serves(decode, prompt_ids)  # local prefill
    still_serves(decode, prompt_ids, nodes["prefill_stop"])  # and PD with a live peer
    # The orphaned engine of the killed node server notices (stdin EOF), exits and cleans up.
    assert prefill.process.wait(timeout=5.0) == -signal.SIGKILL
    assert wait_until(lambda: not leftovers(prefill), 10.0, 0.1), leftovers(prefill)


def test_sigstop_prefill_node_fails_bounded_then_recovers(nodes: dict[str, Node],
                                                         prompt_ids: list[int]) -> None:
    decode, prefill = nodes["decode"], nodes["prefill_stop"]
    pids = (prefill.process.pid, prefill.engine_pid)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        pool, future = start_generate(decode, rid("p-stopped"), long_prompt(prompt_ids, 200), sampling(8),
                                      prefill)
        code, details = outcome_of(future, FAIL_BOUND_S + 5.0)
        elapsed = time.monotonic() - started
        pool.shutdown()
        assert code == "OK:error" and "prefill" in details, (code, details)
        # data-plane heartbeats stop with the process: noticed before the prefill timeout runs out
        assert elapsed < FAIL_BOUND_S, f"failed after {elapsed:.1f} s"
        assert wait_until(decode.all_blocks_free, 2.0), decode.stats()
        still_serves(decode, prompt_ids)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    # Resumed, the prefill node finds the task and its Abort: it drops the task and serves again. The
    # decode node saw the pair's connection drop: it serves through it once heartbeats resume (< 5 s).
    assert wait_until(prefill.all_blocks_free, 3.0), prefill.stats()
    assert wait_until(lambda: serves(decode, prompt_ids, prefill), 5.0, 0.2), "the pair did not come back"
    assert wait_until(lambda: decode.all_blocks_free() and prefill.all_blocks_free(), 2.0)


# -- a decode node's processes die ------------------------------------------------------------------------

def test_kill9_decode_engine_fails_inflight_requests_and_health(nodes: dict[str, Node],
                                                                prompt_ids: list[int]) -> None:
    decode = nodes["decode_engine_kill"]
    health = health_pb2_grpc.HealthStub(decode.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30.0)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    requests = [pb.GenerateRequest(request_id=rid("e-killed"), prompt_token_ids=prompt_ids,
                                   sampling=sampling(1500, ignore_eos=True)) for _ in range(2)]
    calls = [decode.stub.Generate(request, timeout=30.0) for request in requests]
    for call in calls:
        assert next(call).tokens.token_ids  # both are decoding
    decode.expect_clean_exit = False
    os.kill(decode.engine_pid, signal.SIGKILL)
    killed = time.monotonic()
    for call in calls:
        last = None
        try:
            for chunk in call:
                last = chunk
        except grpc.RpcError as exc:  # the node server shutting down may cut the stream instead
            assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
        else:
            assert last is not None and last.finish_reason == "error" and last.error, last
    assert time.monotonic() - killed < 3.0
    statuses = []
    try:
        for response in watch:
            statuses.append(response.status)
            if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
    except grpc.RpcError:
        pass  # the stream ends when the node server exits; NOT_SERVING must have come before
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, statuses
    assert time.monotonic() - killed < 5.0
    # The node server stops by itself (an engineless node must not linger) and cleans up after it.
    assert decode.process.wait(timeout=15.0) == 1
    assert wait_until(lambda: not leftovers(decode), 5.0, 0.1), leftovers(decode)


def test_kill9_decode_server_engine_exits_and_cleans_up(nodes: dict[str, Node]) -> None:
    decode = nodes["decode_server_kill"]
    assert len(leftovers(decode)) == 3  # engine process, SysV queue and shared pool, all live
    decode.expect_clean_exit = False
    os.kill(decode.process.pid, signal.SIGKILL)
    assert decode.process.wait(timeout=5.0) == -signal.SIGKILL
    killed = time.monotonic()
    assert wait_until(lambda: not pid_alive(decode.engine_pid), 5.0, 0.05), "engine outlived its server"
    assert wait_until(lambda: not leftovers(decode), 2.0, 0.05), leftovers(decode)
    assert time.monotonic() - killed < 7.0
