"""An authenticated data plane on real nodes: a prefill node acts only on tasks a decode node of the
cluster signed, once.

Forged tasks (valid schema; unsigned, signed with another secret, or altered after signing) are sent
to a real prefill node's task port by a peer that holds the CURVE key, as a compromised or buggy
member would: each is refused and counted, the decode node's pool is byte for byte unchanged, and
concurrent greedy requests through the pair return exactly what they return without the noise. A
genuine task replayed to the prefill node is refused too and writes nothing into the pool it names
(a same-host pool, which the prefill node would write in place). A peer without the secret gets no
CURVE handshake on either node's data port. Node RPCs without the cluster credential are refused; a
node without a secret does not start. A signed task gets its first token with the logprobs it asks
for, and none when it asks for none.
"""

from __future__ import annotations

import hashlib
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import msgspec
import pytest

from pdserve.common.kv_cache import KVCachePool, KVCacheSpec
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.secret import ClusterSecret
from pdserve.engine.engine import kv_spec_for_model
from pdserve.models.config import ModelConfig
from pdserve.models.loader import default_model_dir
from pdserve.rpc import node_pb2 as pb
from pdserve.rpc import node_pb2_grpc
from pdserve.tests.support.cluster import (
    Node,
    NodeSpec,
    generate,
    sampling,
    scrape_metric,
    start_nodes,
    stop_nodes,
    tokenizer,
    wait_until,
)
from pdserve.tests.support.secret import TEST_SECRET
from pdserve.transfer.auth import MessageSigner
from pdserve.transfer.channel import Outbox, TransferError
from pdserve.transfer.config import CurveKeys, TransferConfig
from pdserve.transfer.endpoint import KVEndpoint
from pdserve.transfer.messages import Abort, ErrorCode, FirstToken, KVTarget, LeaseRenewal, PrefillTask
from pdserve.transfer.receiver import ChunkResult
from pdserve.transfer.transport import local_host_id

NUM_BLOCKS = 64
BLOCK_SIZE = 16
REJECTIONS = "pdserve_auth_rejections_total"
PROMPTS = ["def fibonacci(n):", "The capital of France is", "import numpy as np\n", "Once upon a time"]
QUIET_S = 3.0  # how long "nothing arrives" is watched for
RENEW_EVERY_S = 1.0  # the fake decode node's renewal interval, while it waits for an answer


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    blocks = ("--num-blocks", str(NUM_BLOCKS), "--block-size", str(BLOCK_SIZE))
    specs = [NodeSpec("prefill", "prefill", (*blocks, "--metrics-port", "0")),
             NodeSpec("decode", "decode", blocks)]
    started = start_nodes(specs, tmp_path_factory.mktemp("auth_nodes"))
    yield started
    stop_nodes(started.values())


@pytest.fixture(scope="module")
def metrics_port(nodes: dict[str, Node]) -> int:
    return nodes["prefill"].metrics_port


@pytest.fixture(scope="module")
def layout() -> KVCacheSpec:
    return kv_spec_for_model(ModelConfig.from_dir(default_model_dir()), NUM_BLOCKS, BLOCK_SIZE)


def pool_digest(node: Node) -> str:
    return hashlib.sha256((Path("/dev/shm") / node.pool_name).read_bytes()).hexdigest()


def rejections(port: int, reason: str) -> float:
    return scrape_metric(port, REJECTIONS, {"channel": "data_plane", "reason": reason})


def greedy_outputs(decode: Node, prefill: Node, tag: str) -> list[list[int]]:
    tok = tokenizer()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(generate, decode, f"{tag}-{i}", tok.encode(p), sampling(max_tokens=12),
                               prefill) for i, p in enumerate(PROMPTS)]
        return [f.result().token_ids for f in futures]


def task_at(target: KVTarget, request_id: str, block_ids: tuple[int, ...]) -> PrefillTask:
    """A task a prefill node can serve, whose prompt fills every block it names."""
    prompt = tuple(range(1, len(block_ids) * BLOCK_SIZE + 1))
    return PrefillTask(request_id=request_id, prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=1),
                       block_ids=block_ids, decode_node_id="decode", kv_target=target, lease_ms=10_000)


def cluster_outbox(address: str) -> Outbox:
    """A peer holding the CURVE key: it gets through the handshake, so only signatures stop it."""
    curve = CurveKeys.from_cluster_secret(TEST_SECRET)
    return Outbox(address, TransferConfig(curve=curve, send_timeout_s=5.0))


def test_forged_tasks_are_refused_counted_and_write_nothing(nodes: dict[str, Node], metrics_port: int,
                                                            layout: KVCacheSpec) -> None:
    prefill, decode = nodes["prefill"], nodes["decode"]
    reference = greedy_outputs(decode, prefill, "reference")
    assert wait_until(decode.all_blocks_free, 10.0)
    before = pool_digest(decode)
    target = KVTarget(decode.info["data"], local_host_id(), layout, shm_name=decode.pool_name)
    # both ends of the pool, where a block manager hands out blocks first
    blocks = (*range(6), *range(NUM_BLOCKS - 6, NUM_BLOCKS))
    genuine = MessageSigner(TEST_SECRET).sign(task_at(target, "forged-0", blocks))
    forgeries = {
        "unsigned": task_at(target, "forged-1", blocks),
        "bad_mac": MessageSigner(ClusterSecret(b"not-the-cluster-secret-at-all")).sign(
            task_at(target, "forged-2", blocks)),
        "altered": msgspec.structs.replace(genuine, request_id="forged-3"),
    }
    counts = {reason: rejections(metrics_port, reason) for reason in ("unsigned", "bad_mac")}
    outbox = cluster_outbox(prefill.info["data"])
    try:
        for message in forgeries.values():
            outbox.send(message)
        assert wait_until(lambda: rejections(metrics_port, "unsigned") == counts["unsigned"] + 1
                          and rejections(metrics_port, "bad_mac") == counts["bad_mac"] + 2, 10.0)
        time.sleep(QUIET_S)
        assert pool_digest(decode) == before, "a forged task wrote into the decode node's pool"
        # Forgeries aimed at every block while greedy requests run through the pair.
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                for message in forgeries.values():
                    outbox.send(message)
                time.sleep(0.01)

        flooder = threading.Thread(target=flood)
        flooder.start()
        try:
            under_attack = greedy_outputs(decode, prefill, "attacked")
        finally:
            stop.set()
            flooder.join()
    finally:
        outbox.close()
    assert under_attack == reference
    assert prefill.stats().running == 0 and wait_until(decode.all_blocks_free, 10.0)


def test_a_replayed_task_is_refused_and_writes_nothing(nodes: dict[str, Node], metrics_port: int,
                                                       layout: KVCacheSpec) -> None:
    """The replay target is a same-host shared pool of this test's own: the prefill node would write
    it in place, without the receiver's checks, if it accepted the task."""
    prefill = nodes["prefill"]
    events: queue.Queue[object] = queue.Queue()
    pool = KVCachePool.create_shared(layout)
    transfer = TransferConfig(curve=CurveKeys.from_cluster_secret(TEST_SECRET))
    endpoint = KVEndpoint(pool, transfer, events.put).start()
    outbox = cluster_outbox(prefill.info["data"])
    try:
        signed = MessageSigner(TEST_SECRET).sign(task_at(endpoint.target(), "replay-0", (0, 1)))
        endpoint.reservations.reserve("replay-0", range(2), 2 * BLOCK_SIZE, lease_s=30.0)
        outbox.send(signed)
        first = _first_token(events, 30.0)
        assert first.ok, first.error_message
        assert pool.array[:, :, :2].any(), "the genuine task wrote the KV it was for"
        # Ready to be written again: a fresh reservation for the same request and blocks, zeroed.
        endpoint.reservations.release("replay-0")
        endpoint.reservations.reserve("replay-0", range(2), 2 * BLOCK_SIZE, lease_s=30.0)
        pool.array[...] = 0
        replayed = rejections(metrics_port, "replayed")
        outbox.send(signed)
        assert wait_until(lambda: rejections(metrics_port, "replayed") == replayed + 1, 10.0)
        time.sleep(QUIET_S)
        assert events.empty(), f"the replay reached the decode side: {events.get()}"
        assert not pool.array.any(), "a replayed task wrote into the pool"
    finally:
        outbox.close()
        endpoint.close()
        pool.close()


class FakeDecode:
    """A decode node's data plane in this process: a shared pool, a KV endpoint whose events land in a
    queue, and an outbox to the prefill node holding the CURVE key (tasks still need signing)."""

    def __init__(self, prefill: Node, layout: KVCacheSpec) -> None:
        self._prefill = prefill
        self._layout = layout

    def __enter__(self) -> tuple[queue.Queue[object], KVEndpoint, Outbox]:
        events: queue.Queue[object] = queue.Queue()
        self._pool = KVCachePool.create_shared(self._layout)
        config = TransferConfig(curve=CurveKeys.from_cluster_secret(TEST_SECRET))
        self._endpoint = KVEndpoint(self._pool, config, events.put).start()
        self._outbox = cluster_outbox(self._prefill.info["data"])
        return events, self._endpoint, self._outbox

    def __exit__(self, *exc: object) -> None:
        self._outbox.close()
        self._endpoint.close()
        self._pool.close()


def test_a_renewal_for_a_task_the_prefill_node_does_not_hold_is_answered(nodes: dict[str, Node],
                                                                        layout: KVCacheSpec) -> None:
    """A decode node whose task or FirstToken was lost with a closed connection learns it from its next
    renewal (UNKNOWN_TASK) instead of waiting out its prefill timeout; a renewal naming an address
    that is not the prefill node's peer gets no answer (no reflection to addresses a signer names)."""
    with FakeDecode(nodes["prefill"], layout) as (events, endpoint, outbox):
        signer = MessageSigner(TEST_SECRET)
        endpoint.reservations.reserve("renewed-0", range(2), 2 * BLOCK_SIZE, lease_s=30.0)
        outbox.send(signer.sign(task_at(endpoint.target(), "renewed-0", (0, 1))))
        assert _first_token(events, 30.0).ok
        # As if that FirstToken had been lost: the decode node keeps renewing. The prefill node sends
        # the FirstToken from its engine-record reader and closes the job on its event loop after, so
        # a renewal that lands in between finds the job and is taken silently; a later one is answered.
        answer = _renew_until_answered(outbox, signer, events, "renewed-0", endpoint.address)
        assert (answer.request_id, answer.error_code) == ("renewed-0", ErrorCode.UNKNOWN_TASK)
        outbox.send(signer.sign(LeaseRenewal("never-sent", 1000, reply_to=endpoint.address)))
        while (answer := _first_token(events, 10.0)).request_id == "renewed-0":
            pass  # a second answer to renewed-0, when an answer took longer than RENEW_EVERY_S
        assert (answer.request_id, answer.error_code) == ("never-sent", ErrorCode.UNKNOWN_TASK)
        outbox.send(signer.sign(LeaseRenewal("never-sent", 1000, reply_to="tcp://10.255.255.1:9")))
        outbox.send(LeaseRenewal("never-sent", 1000, reply_to=endpoint.address))  # unsigned
        time.sleep(QUIET_S)
        assert events.empty(), events.get()


def test_the_first_token_carries_the_logprobs_the_task_asks_for(nodes: dict[str, Node],
                                                                 layout: KVCacheSpec) -> None:
    """The prefill node computes the first token's logprob, rank and top-k only for a task that asks
    (as a mixed node would): none, the rank alone, or the top 3; the greedy token is the same."""
    firsts = {}
    with FakeDecode(nodes["prefill"], layout) as (events, endpoint, outbox):
        signer = MessageSigner(TEST_SECRET)
        for i, logprobs in enumerate((None, 0, 3)):
            request_id = f"logprobs-{logprobs}"
            blocks = (2 * i, 2 * i + 1)
            endpoint.reservations.reserve(request_id, blocks, 2 * BLOCK_SIZE, lease_s=30.0)
            sampling = SamplingParams(max_tokens=4, temperature=0.0, logprobs=logprobs)
            task = msgspec.structs.replace(task_at(endpoint.target(), request_id, blocks), sampling=sampling)
            outbox.send(signer.sign(task))
            first = _first_token(events, 30.0)
            assert first.ok and first.request_id == request_id, first
            firsts[logprobs] = first.token
    assert firsts[None].logprobs == [] and firsts[None].top_k == 0
    assert len(firsts[0].logprobs) == 1 and firsts[0].ranks[0] >= 1 and firsts[0].top_k == 0
    assert firsts[3].top_k == 3 and len(firsts[3].top_ids) == 3
    # the rank-only path computes on the host, the top-k path in Paddle: float32 apart
    assert firsts[3].logprobs == pytest.approx(firsts[0].logprobs, abs=1e-4)
    assert firsts[3].ranks == firsts[0].ranks
    assert len({tuple(t.token_ids) for t in firsts.values()}) == 1


def _renew_until_answered(outbox: Outbox, signer: MessageSigner, events: queue.Queue[object],
                          request_id: str, reply_to: str, timeout_s: float = 10.0) -> FirstToken:
    deadline = time.monotonic() + timeout_s
    while True:
        outbox.send(signer.sign(LeaseRenewal(request_id, 1000, reply_to=reply_to)))
        try:
            return _first_token(events, RENEW_EVERY_S)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise


def _first_token(events: queue.Queue[object], timeout_s: float) -> FirstToken:
    deadline = time.monotonic() + timeout_s
    while True:
        event = events.get(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(event, FirstToken):
            return event
        assert isinstance(event, ChunkResult) and event.accepted, event


OTHER_CURVE = CurveKeys.from_cluster_secret(ClusterSecret(b"another-cluster-secret"))


@pytest.mark.parametrize("curve", [None, OTHER_CURVE], ids=["plain_tcp", "other_secret"])
def test_a_peer_without_the_secret_cannot_reach_either_node(nodes: dict[str, Node], layout: KVCacheSpec,
                                                             curve: CurveKeys | None) -> None:
    """Neither the prefill node's task port nor the decode node's KV port completes a handshake."""
    prefill, decode = nodes["prefill"], nodes["decode"]
    before = pool_digest(decode)
    target = KVTarget(decode.info["data"], local_host_id(), layout, shm_name=decode.pool_name)
    for address, message in [(prefill.info["data"], task_at(target, "stranger-0", (0, 1))),
                             (decode.info["data"], Abort("stranger-0", "from a stranger"))]:
        outbox = Outbox(address, TransferConfig(curve=curve, send_timeout_s=0.5))
        try:
            with pytest.raises(TransferError, match="refused the handshake"):
                outbox.send(message)
        finally:
            outbox.close()
    time.sleep(QUIET_S)
    assert pool_digest(decode) == before


def test_node_rpcs_need_the_cluster_credential(nodes: dict[str, Node]) -> None:
    decode = nodes["decode"]
    with grpc.insecure_channel(decode.info["grpc"]) as channel:  # no credential
        with pytest.raises(grpc.RpcError) as info:
            node_pb2_grpc.NodeStub(channel).Stats(pb.StatsRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            list(node_pb2_grpc.NodeStub(channel).Generate(pb.GenerateRequest(request_id="x"), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert decode.stats().node_id == "decode"  # the test's channel carries the credential


def test_a_node_without_a_secret_refuses_to_start() -> None:
    result = subprocess.run([sys.executable, "-m", "pdserve.cli", "decode", "--node-id", "no-secret"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no cluster secret" in result.stderr and "--insecure" in result.stderr
