"""PD disaggregation end to end: real prefill, decode and mixed nodes on localhost, driven over gRPC.

The mixed node (prefill and decode in one engine) is the reference: a request served by a prefill node
and a decode node must produce exactly its tokens, and the first token's logprob, rank and top-k must
match it within 1e-5 — over the same-host shared-memory transport and over ZMQ forced on. Every node
that prefills runs with a 64-token step budget, so long prompts are prefilled (and shipped) in several
chunks, cut at the same places on both paths: the comparison isolates the hand-off. Where chunks are
cut moves logprobs by ~1e-5 on its own (attention sums over a different padded width); the engine
tests bound that effect separately.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from pdserve.engine.process import STATS_MIN_INTERVAL_S
from pdserve.rpc import node_pb2 as pb
from pdserve.tests.support.cluster import (
    Node,
    NodeSpec,
    Result,
    assert_same_first_token,
    free_port,
    generate,
    sampling,
    scrape_metric,
    start_nodes,
    stop_nodes,
    tokenizer,
    wait_until,
)

CHUNK_BUDGET = 64  # the prefill nodes' --max-num-batched-tokens: a 200-token prompt takes 4 steps
SMALL_DECODE_BLOCKS = 16  # decode_small's pool: 256 tokens, one 200-token request at a time
PREFILL_TIMEOUT_S = 3.0
TEXT = (
    "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n"
    "    parser.add_argument('--verbose', action='store_true')\n    args = parser.parse_args(argv)\n"
    "    for name in sorted(os.listdir(args.path)):\n        if name.endswith('.py'):\n"
    "            print(name)\n    return 0\n\n\nclass Stack:\n    def __init__(self):\n"
    "        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n"
)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    budget = ("--max-num-batched-tokens", str(CHUNK_BUDGET))
    timeout = ("--prefill-timeout", str(PREFILL_TIMEOUT_S))
    specs = [
        NodeSpec("prefill_shm", "prefill",
                 (*budget, "--transport", "auto", "--metrics-port", "0")),
        NodeSpec("prefill_zmq", "prefill",
                 (*budget, "--transport", "zmq", "--metrics-port", "0")),
        NodeSpec("decode", "decode", timeout),
        NodeSpec("decode_fallback", "decode", (*budget, *timeout, "--prefill-fallback", "local")),
        NodeSpec("decode_small", "decode", (*timeout, "--num-blocks", str(SMALL_DECODE_BLOCKS))),
        NodeSpec("mixed", "mixed", budget),
    ]
    started = start_nodes(specs, tmp_path_factory.mktemp("pd_nodes"))
    yield started
    stop_nodes(started.values())


@pytest.fixture(scope="module")
def prompts() -> dict[str, list[int]]:
    tok = tokenizer()
    text_ids = tok.encode(TEXT)
    long_ids = (text_ids * 4)[:200]
    assert len(long_ids) == 200 > 3 * CHUNK_BUDGET
    return {"short": tok.encode("def fibonacci(n):"), "medium": text_ids[:60], "long": long_ids}


_ids = itertools.count()


def rid(tag: str) -> str:
    return f"{tag}-{next(_ids)}-{time.monotonic_ns()}"


# -- 1. 1P1D equals the mixed node -------------------------------------------------------------------------

@pytest.mark.parametrize("prefill_name", ["prefill_shm", "prefill_zmq"])
def test_pd_greedy_and_seeded_equal_mixed(nodes: dict[str, Node], prompts: dict[str, list[int]],
                                          prefill_name: str) -> None:
    prefill, decode, mixed = nodes[prefill_name], nodes["decode"], nodes["mixed"]
    greedy = sampling(16, logprobs=5)
    seeded = sampling(16, temperature=0.8, seed=1234, logprobs=5)
    # structured output: P's first token is sampled under the grammar, D checks it and decodes on
    grammar = pb.Grammar(kind="regex", text=r"(return|print)\([a-z_]{1,10}(, [0-9]{1,3})?\)")
    constrained = (sampling(16, logprobs=5, grammar=grammar),
                   sampling(16, temperature=0.8, seed=1234, logprobs=5, grammar=grammar))
    for name, ids in prompts.items():
        for params in (greedy, seeded, *constrained):
            pd = generate(decode, rid(f"pd-{name}"), ids, params, prefill=prefill)
            ref = generate(mixed, rid(f"mixed-{name}"), ids, params)
            assert pd.token_ids == ref.token_ids, (name, params.temperature)
            assert len(pd.token_ids) >= 1 and pd.finish_reason == ref.finish_reason
            assert_same_first_token(pd, ref)
            # Every later token was decoded on D from the transferred KV: a wrong byte anywhere would
            # move these far more than float rounding between chunked and unchunked prefill does.
            assert pd.tokens.logprobs == pytest.approx(ref.tokens.logprobs, abs=1e-4)
            timing = pd.chunks[0].timing
            assert timing.prefill_s > 0 and timing.transfer_s > 0
    # The transport really was the one the prefill node was told to use.
    sender = {"prefill_shm": "shm", "prefill_zmq": "zmq"}[prefill_name]
    sent = scrape_metric(prefill.metrics_port, "pdserve_kv_transfer_bytes_total",
                         {"direction": "out", "transport": sender})
    assert sent > 0


# -- 2. 2P2D under concurrency ---------------------------------------------------------------------------

def test_two_by_two_concurrent_requests_equal_mixed_and_free_all_blocks(
        nodes: dict[str, Node], prompts: dict[str, list[int]]) -> None:
    long_ids = prompts["long"]
    lengths = [5, 17, 40, 90, 150, 200]  # 90+ tokens span several 64-token prefill steps
    batch = [long_ids[i % 7:][:lengths[i % len(lengths)]] for i in range(32)]
    pairs = [(p, d) for p in ("prefill_shm", "prefill_zmq") for d in ("decode", "decode_fallback")]
    params = sampling(8)

    def run_pd(i: int) -> Result:
        p, d = pairs[i % len(pairs)]
        return generate(nodes[d], rid(f"rr{i}"), batch[i], params, prefill=nodes[p])

    with ThreadPoolExecutor(32) as pool:
        pd_results = list(pool.map(run_pd, range(32)))
    with ThreadPoolExecutor(8) as pool:
        mixed_results = list(pool.map(lambda i: generate(nodes["mixed"], rid(f"m{i}"), batch[i], params),
                                      range(32)))
    for i, (pd, ref) in enumerate(zip(pd_results, mixed_results, strict=True)):
        assert pd.finish_reason in ("stop", "length"), (i, pd.chunks[-1].error)
        assert pd.token_ids == ref.token_ids, f"request {i} ({len(batch[i])} prompt tokens)"
    for name in ("prefill_shm", "prefill_zmq", "decode", "decode_fallback"):
        assert wait_until(nodes[name].all_blocks_free, 2.0), f"{name}: {nodes[name].stats()}"


# -- 3. aborts free blocks on both sides -----------------------------------------------------------------

@pytest.mark.parametrize("prefill_name", ["prefill_shm", "prefill_zmq"])
def test_abort_mid_prefill_frees_blocks_on_both_nodes(nodes: dict[str, Node], prompts: dict[str, list[int]],
                                                      prefill_name: str) -> None:
    prefill, decode = nodes[prefill_name], nodes["decode"]
    very_long = (prompts["long"] * 8)[:1500]  # ~24 prefill steps of 64 tokens
    request = pb.GenerateRequest(request_id=rid("abort-prefill"), prompt_token_ids=very_long,
                                 sampling=sampling(4), prefill=prefill.target())
    call = decode.stub.Generate(request, timeout=30.0)
    # Mid-prefill: the prefill node holds blocks for the prompt and the decode node its reservation.
    assert wait_until(lambda: not prefill.all_blocks_free() and not decode.all_blocks_free(), 10.0)
    call.cancel()
    cancelled = time.monotonic()
    assert wait_until(lambda: prefill.all_blocks_free() and decode.all_blocks_free(), 1.0), (
        prefill.stats(), decode.stats())
    assert time.monotonic() - cancelled <= 1.1
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED


def test_abort_mid_decode_frees_blocks(nodes: dict[str, Node], prompts: dict[str, list[int]]) -> None:
    prefill, decode = nodes["prefill_shm"], nodes["decode"]
    call = decode.stub.Generate(
        pb.GenerateRequest(request_id=rid("abort-decode"), prompt_token_ids=prompts["medium"],
                           sampling=sampling(1000, ignore_eos=True), prefill=prefill.target()),
        timeout=60.0)
    try:
        first = next(call)
        assert first.tokens.token_ids and not first.finish_reason
        second = next(call)  # decoding on D now, not just the peer's first token
        assert second.tokens.token_ids and not second.finish_reason
        # Stats reach the node server at most every 50 ms, so two fast tokens can beat the first report.
        assert wait_until(lambda: not decode.all_blocks_free(), 2.0), decode.stats()
    finally:
        call.cancel()  # a failed assertion must not leave 1000 tokens decoding into the next test
    assert wait_until(lambda: prefill.all_blocks_free() and decode.all_blocks_free(), 1.0), (
        prefill.stats(), decode.stats())


# -- 3b. Complete: the same request answered whole ----------------------------------------------------------

@pytest.mark.parametrize("route", ["pd", "mixed"])
def test_complete_answers_what_generate_streams(nodes: dict[str, Node], prompts: dict[str, list[int]],
                                               route: str) -> None:
    head = nodes["decode"] if route == "pd" else nodes["mixed"]
    prefill = nodes["prefill_shm"].target() if route == "pd" else None
    params = sampling(24, temperature=0.8, seed=7, logprobs=2)
    def request(tag: str) -> pb.GenerateRequest:
        return pb.GenerateRequest(request_id=rid(tag), prompt_token_ids=prompts["medium"], sampling=params,
                                  prefill=prefill)

    chunks = list(head.stub.Generate(request("stream"), timeout=30.0))
    answer = head.stub.Complete(request("whole"), timeout=30.0)
    assert list(answer.tokens.token_ids) == [t for c in chunks for t in c.tokens.token_ids]
    assert answer.text == "".join(c.text for c in chunks)
    streamed_logprobs = [lp for c in chunks for lp in c.tokens.logprobs]
    assert list(answer.tokens.logprobs) == pytest.approx(streamed_logprobs, abs=1e-5)
    assert answer.finish_reason == chunks[-1].finish_reason == "length"
    assert answer.usage == chunks[-1].usage and answer.timing.prefill_s > 0 and answer.timing.decode_s > 0


@pytest.mark.parametrize(("name", "value"), [("first_token_timeout_s", -1.0),
                                           ("silence_timeout_s", float("nan"))])
def test_complete_refuses_a_bad_bound(nodes: dict[str, Node], prompts: dict[str, list[int]], name: str,
                                      value: float) -> None:
    request = pb.GenerateRequest(request_id=rid("whole-bad"), prompt_token_ids=prompts["short"],
                                 sampling=sampling(4), **{name: value})
    with pytest.raises(grpc.RpcError) as err:
        nodes["mixed"].stub.Complete(request, timeout=10.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and name in err.value.details()


def test_complete_past_its_first_token_bound_is_a_deadline_and_frees_blocks(
        nodes: dict[str, Node], prompts: dict[str, list[int]]) -> None:
    prefill, decode = nodes["prefill_shm"], nodes["decode"]
    very_long = (prompts["long"] * 8)[:1500]  # ~24 prefill steps: its first token takes longer than 50 ms
    answer = decode.stub.Complete(pb.GenerateRequest(
        request_id=rid("whole-late"), prompt_token_ids=very_long, sampling=sampling(4),
        prefill=prefill.target(), first_token_timeout_s=0.05, silence_timeout_s=10.0), timeout=30.0)
    assert answer.finish_reason == "error" and answer.cause == pb.CAUSE_DEADLINE
    assert "no first token within 0.05 s" in answer.error and not answer.tokens.token_ids
    assert wait_until(lambda: prefill.all_blocks_free() and decode.all_blocks_free(), 2.0), (
        prefill.stats(), decode.stats())


# -- 4. validation and an unreachable prefill node ----------------------------------------------------------

@pytest.mark.parametrize("bad", [
    sampling(0),  # max_tokens 0
    pb.SamplingParams(max_tokens=8, repetition_penalty=1.0),  # proto3 default top_p 0
    sampling(8, temperature=-1.0),
    sampling(8, logprobs=21),
    sampling(8, min_tokens=9),
    sampling(8, grammar=pb.Grammar(kind="yaml", text="a: 1")),
], ids=["max_tokens", "top_p", "temperature", "logprobs", "min_tokens", "grammar_kind"])
@pytest.mark.parametrize("node_name", ["decode", "mixed"])
def test_bad_sampling_params_are_invalid_argument(nodes: dict[str, Node], prompts: dict[str, list[int]],
                                                  bad: pb.SamplingParams, node_name: str) -> None:
    prefill = nodes["prefill_shm"] if node_name == "decode" else None
    node = nodes[node_name]
    assert wait_until(node.all_blocks_free, 2.0), node.stats()  # nothing left over from earlier tests
    with pytest.raises(grpc.RpcError) as err:
        generate(node, rid("bad"), prompts["short"], bad, prefill=prefill, timeout_s=10.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(3 * STATS_MIN_INTERVAL_S)  # long enough for an allocation to show in the stats
    assert node.all_blocks_free(), node.stats()


def test_a_grammar_the_engine_cannot_compile_is_rejected(nodes: dict[str, Node],
                                                         prompts: dict[str, list[int]]) -> None:
    """The engine's typed rejection (the router refuses such grammars before they get here): the decode
    node's reservation fails with a BAD_REQUEST error chunk (the router answers 400, no retry), a mixed
    node ends the stream with an error chunk."""
    bad = sampling(8, grammar=pb.Grammar(kind="regex", text="a(b"))
    decode = generate(nodes["decode"], rid("bad-grammar"), prompts["short"], bad,
                      prefill=nodes["prefill_shm"], timeout_s=10.0)
    assert decode.finish_reason == "error" and not decode.token_ids
    assert decode.chunks[-1].cause == pb.CAUSE_BAD_REQUEST and "regex" in decode.chunks[-1].error
    mixed = generate(nodes["mixed"], rid("bad-grammar"), prompts["short"], bad, timeout_s=10.0)
    assert mixed.finish_reason == "error" and "regex" in mixed.chunks[-1].error and not mixed.token_ids
    for node in (nodes["decode"], nodes["mixed"]):
        assert wait_until(node.all_blocks_free, 2.0), node.stats()


@pytest.mark.parametrize("prompt", [[1, 2, 8192], [2**31], []], ids=["vocab_size", "huge", "empty"])
@pytest.mark.parametrize("node_name", ["decode", "mixed"])
def test_bad_prompt_ids_are_invalid_argument(nodes: dict[str, Node], prompt: list[int],
                                             node_name: str) -> None:
    prefill = nodes["prefill_shm"] if node_name == "decode" else None
    with pytest.raises(grpc.RpcError) as err:
        generate(nodes[node_name], rid("oov"), prompt, sampling(4), prefill=prefill, timeout_s=10.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_prefill_node_does_not_serve_generate_but_answers_stats(nodes: dict[str, Node],
                                                                  prompts: dict[str, list[int]]) -> None:
    prefill = nodes["prefill_shm"]
    with pytest.raises(grpc.RpcError) as err:
        generate(prefill, rid("misrouted"), prompts["short"], sampling(4), timeout_s=10.0)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert prefill.stats().role == "prefill" and prefill.all_blocks_free()


def _unreachable_target() -> pb.PrefillTarget:
    port = free_port()
    return pb.PrefillTarget(node_id="nobody", grpc_address=f"127.0.0.1:{port}",
                            data_address=f"tcp://127.0.0.1:{port}")


@pytest.mark.parametrize("prefill_name", ["prefill_shm", "prefill_zmq"])
def test_a_refused_reservation_keeps_its_cause_and_leaves_no_blocks(
        nodes: dict[str, Node], prompts: dict[str, list[int]], prefill_name: str) -> None:
    """The decode node's engine refuses the reservation (no room now, or never): the request ends with
    that cause, no prefill node is blamed, and neither node keeps a block."""
    prefill, decode = nodes[prefill_name], nodes["decode_small"]
    # Holds every block of decode_small while it decodes (200 + 48 tokens = 16 blocks).
    holder = decode.stub.Generate(pb.GenerateRequest(
        request_id=rid("holder"), prompt_token_ids=prompts["long"], sampling=sampling(48, ignore_eos=True),
        prefill=prefill.target()), timeout=60.0)
    first = next(iter(holder))
    assert first.tokens.token_ids, first
    no_room = generate(decode, rid("no-room"), prompts["long"], sampling(8), prefill=prefill)
    assert no_room.finish_reason == "error" and not no_room.token_ids, no_room.chunks
    assert no_room.chunks[-1].cause == pb.CAUSE_KV_CAPACITY and not no_room.chunks[-1].failed_node_id
    list(holder)
    too_long = (prompts["long"] * 11)[:2100]  # past max_model_len (2048) on every node
    never = generate(decode, rid("never"), too_long, sampling(4), prefill=prefill)
    assert never.finish_reason == "error" and never.chunks[-1].cause == pb.CAUSE_BAD_REQUEST, never.chunks
    assert wait_until(lambda: prefill.all_blocks_free() and decode.all_blocks_free(), 5.0), (
        prefill.stats(), decode.stats())
    assert wait_until(lambda: prefill.stats().running == 0, 5.0), prefill.stats()
    ok = generate(decode, rid("after-refusals"), prompts["short"], sampling(4), prefill=prefill)
    assert ok.finish_reason in ("stop", "length"), ok.chunks


def test_unreachable_prefill_node_fails_within_timeout_and_frees_blocks(
        nodes: dict[str, Node], prompts: dict[str, list[int]]) -> None:
    decode = nodes["decode"]
    started = time.monotonic()
    failed = generate(decode, rid("unreachable"), prompts["medium"], sampling(8),
                      prefill=_unreachable_target(), timeout_s=30.0)
    elapsed = time.monotonic() - started
    # The peer is blamed, not this node: the router retries on this node with another prefill node.
    assert failed.finish_reason == "error" and not failed.token_ids, failed.chunks
    assert failed.chunks[-1].cause == pb.CAUSE_PREFILL_PEER_UNREACHABLE, failed.chunks
    assert failed.chunks[-1].failed_node_id == "nobody"
    assert elapsed < PREFILL_TIMEOUT_S + 1.5, f"failed after {elapsed:.1f} s"
    assert wait_until(decode.all_blocks_free, 2.0), decode.stats()
    # The node is not wedged by the dead peer: the next PD request goes through at once.
    ok = generate(decode, rid("after-unreachable"), prompts["short"], sampling(4),
                  prefill=nodes["prefill_shm"], timeout_s=10.0)
    assert ok.finish_reason in ("stop", "length")


def test_unreachable_prefill_node_with_local_fallback_equals_mixed(
        nodes: dict[str, Node], prompts: dict[str, list[int]]) -> None:
    decode = nodes["decode_fallback"]
    params = sampling(12, logprobs=5)
    pd = generate(decode, rid("fallback"), prompts["long"], params, prefill=_unreachable_target(),
                  timeout_s=30.0)
    ref = generate(nodes["mixed"], rid("fallback-ref"), prompts["long"], params)
    assert pd.token_ids == ref.token_ids
    assert_same_first_token(pd, ref)
    assert wait_until(decode.all_blocks_free, 2.0), decode.stats()


def test_stalled_prefill_node_does_not_delay_requests_to_a_live_one(
        nodes: dict[str, Node], prompts: dict[str, list[int]]) -> None:
    decode = nodes["decode"]
    assert wait_until(decode.all_blocks_free, 2.0), decode.stats()  # nothing left over from earlier tests
    # A port that accepts TCP but never speaks ZMTP: the PrefillTask's send waits for the handshake
    # (bounded by the heartbeat timeout), on that peer's own sender thread.
    with socket.socket() as listener, ThreadPoolExecutor(1) as pool:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        stalled = pb.PrefillTarget(node_id="stalled", grpc_address="127.0.0.1:1",
                                   data_address=f"tcp://127.0.0.1:{listener.getsockname()[1]}")
        dead = pool.submit(generate, decode, rid("to-stalled"), prompts["medium"], sampling(4), stalled, 30.0)
        assert wait_until(lambda: not decode.all_blocks_free(), 5.0)
        started = time.monotonic()
        ok = generate(decode, rid("to-live"), prompts["short"], sampling(4), prefill=nodes["prefill_shm"],
                      timeout_s=10.0)
        elapsed = time.monotonic() - started
        assert not dead.done(), "the live request waited until the stalled peer's send gave up"
        failed = dead.result(timeout=PREFILL_TIMEOUT_S + 5)
    assert failed.chunks[-1].cause == pb.CAUSE_PREFILL_PEER_UNREACHABLE, failed.chunks
    assert failed.chunks[-1].failed_node_id == "stalled"
    assert ok.finish_reason in ("stop", "length")
    assert elapsed < 1.0, f"the live peer's request took {elapsed:.2f} s"
    assert wait_until(decode.all_blocks_free, 2.0), decode.stats()
