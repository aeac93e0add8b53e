"""Tensor parallelism: N rank processes joined by Paddle's gloo collective compute what one process does."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pdserve.tests.support.cluster import free_port
from pdserve.tests.support.listeners import children, is_loopback, tcp_listeners

WORKER = Path(__file__).resolve().parents[1] / "support" / "tp_logits.py"
REPO = Path(__file__).resolve().parents[2]


def _run_ranks(size: int, out: Path, timeout_s: float = 240.0, listeners: set[tuple[str, int]] | None = None,
               port: int | None = None) -> dict[str, np.ndarray]:
    """Run ``size`` ranks of tp_logits.py; with ``listeners``, collect into it every TCP listener that a
    rank or a child of one (the rendezvous store) holds while they run, sampled every few ms."""
    port = port or free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(size), str(port), str(out)],
                              env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for r in range(size)]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pids = [rank.pid for rank in ranks]
            pids += [child for pid in pids for child in children(pid)]
            listeners.update(tcp_listeners(pids))  # type: ignore[union-attr]
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    if listeners is not None:
        sampler.start()
    try:
        for rank in ranks:
            _, err = rank.communicate(timeout=timeout_s)
            assert rank.returncode == 0, err.decode()[-3000:]
    finally:
        done.set()
        if sampler.is_alive():
            sampler.join()
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    with np.load(out) as data:
        return dict(data)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    return _run_ranks(1, tmp_path_factory.mktemp("tp1") / "logits.npz")


def _assert_same_logits(sharded: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    for name in ("prefill", "mtp", "decode"):
        np.testing.assert_allclose(sharded[name], reference[name], atol=1e-4, rtol=0, err_msg=name)
        assert (sharded[name].argmax(-1) == reference[name].argmax(-1)).all(), name


def test_two_ranks_compute_the_logits_of_one(reference: dict[str, np.ndarray], tmp_path: Path) -> None:
    """...and while they join and compute, nothing of theirs listens beyond loopback: the rendezvous
    store (seen, so the sampling works) and gloo's pair listeners are all on 127.0.0.1."""
    port, listeners = free_port(), set()
    sharded = _run_ranks(2, tmp_path / "logits.npz", listeners=listeners, port=port)
    assert ("127.0.0.1", port) in listeners, listeners
    assert all(is_loopback(host) for host, _ in listeners), listeners
    assert int(sharded["kv_heads"]) == int(reference["kv_heads"]) // 2  # each rank holds half the KV heads
    _assert_same_logits(sharded, reference)


@pytest.mark.slow
def test_more_ranks_than_kv_heads_replicate_them(reference: dict[str, np.ndarray], tmp_path: Path) -> None:
    sharded = _run_ranks(8, tmp_path / "logits.npz", timeout_s=280.0)  # 8 ranks share the demo's 4 KV heads
    assert int(sharded["kv_heads"]) == 1
    _assert_same_logits(sharded, reference)


# -- engine ranks: rank 0 decides and emits ------------------------------------------------------------

PROMPTS = [
    "The cat", "Once upon a time", "def main():", "import numpy as np", "Hello, world", "The quick brown fox",
    "In the beginning", "class Node:", "for i in range(10):", "A B C D A B C", "The weather today",
    "return self", "1, 2, 3, 4,", "Dear Sir,", "if __name__ ==", "The meaning of life is",
]
SPECULATIVE = {
    "plain": None,
    "mtp": '{"method": "mtp", "num_speculative_tokens": 1}',
    "ngram": '{"method": "ngram", "num_speculative_tokens": 3, "max_ngram_size": 3, "min_ngram_size": 1}',
    "hybrid": '{"method": "mtp", "num_speculative_tokens": 3, "num_model_steps": 1, '
              '"mtp_strategy": "with_ngram", "max_ngram_size": 3, "min_ngram_size": 1}',
}


def _client(size: int, speculative: str | None = None, num_blocks: int = 256):
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.spec_config import SpeculativeConfig
    from pdserve.models.loader import default_model_dir
    from pdserve.models.tokenizer import Tokenizer
    from pdserve.node.engine_client import EngineClient, EngineClientConfig

    model_dir = default_model_dir()
    engine = EngineConfig(
        cache=CacheConfig(num_blocks=num_blocks, block_size=16),
        scheduler=SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=32, max_model_len=1024),
        speculative=None if speculative is None else SpeculativeConfig.from_json(speculative),
    )
    tokenizer = Tokenizer.from_dir(model_dir)
    config = EngineClientConfig(model_dir=str(model_dir), engine=engine,
                                eos_token_ids=tokenizer.eos_token_ids, omp_num_threads=1,
                                tensor_parallel_size=size)
    return EngineClient(config), tokenizer, engine


def _generate(size: int, speculative: str | None) -> list:
    from pdserve.common.sampling_params import SamplingParams
    from pdserve.node.offline import generate

    client, tokenizer, engine = _client(size, speculative)
    with client:
        params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=2)
        return generate(client, tokenizer, PROMPTS, params, speculative=engine.speculative)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SPECULATIVE))
def test_greedy_outputs_of_two_ranks_equal_one(method: str) -> None:
    one, two = _generate(1, SPECULATIVE[method]), _generate(2, SPECULATIVE[method])
    for a, b in zip(one, two, strict=True):
        assert b.error is None and b.finish_reason == a.finish_reason
        assert b.token_ids == a.token_ids, a.prompt
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4, rtol=0)
        for top_a, top_b in zip(a.top_logprobs, b.top_logprobs, strict=True):
            assert [t for t, _ in top_a] == [t for t, _ in top_b]
            np.testing.assert_allclose([lp for _, lp in top_b], [lp for _, lp in top_a], atol=1e-4, rtol=0)
    if method != "plain":  # the drafts were used, and accepted alike on both
        assert [r.speculate_metrics for r in two] == [r.speculate_metrics for r in one]


def test_sampled_requests_draw_the_same_tokens_on_every_rank() -> None:
    """Unseeded sampled requests with the hybrid proposer: rank 0 fixes each seed before the broadcast,
    so every rank draws the same tokens; a rank that drew another would fail its state check at the
    next turn, and the engine with it."""
    from pdserve.common.sampling_params import SamplingParams
    from pdserve.node.offline import generate

    client, tokenizer, engine = _client(2, SPECULATIVE["hybrid"])
    with client:
        params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, ignore_eos=True)
        results = generate(client, tokenizer, PROMPTS[:8], params, speculative=engine.speculative)
        assert client.alive()
    assert [(r.error, r.finish_reason, len(r.token_ids)) for r in results] == [(None, "length", 24)] * 8
    assert len({tuple(r.token_ids) for r in results}) > 1  # really sampled


def test_grammar_constrained_outputs_of_two_ranks_equal_one() -> None:
    """Structured output under TP: every rank masks with its own grammar matcher, in step."""
    import re

    from pdserve.common.sampling_params import GrammarSpec, SamplingParams
    from pdserve.node.offline import generate

    grammar = GrammarSpec(kind="regex", text=r"[a-z]{2,8}( [a-z]{2,8}){3}")
    params = [SamplingParams(max_tokens=24, temperature=0.0, grammar=grammar),
              SamplingParams(max_tokens=24, temperature=0.9, seed=7, grammar=grammar)]
    outputs = {}
    for size in (1, 2):
        client, tokenizer, engine = _client(size, SPECULATIVE["mtp"])
        with client:
            outputs[size] = [r for p in params for r in generate(client, tokenizer, PROMPTS[:3], p,
                                                                  speculative=engine.speculative)]
    for one, two in zip(outputs[1], outputs[2], strict=True):
        assert two.error is None and two.token_ids == one.token_ids
        assert re.fullmatch(r"[a-z]{2,8}( [a-z]{2,8}){3}", two.text), two.text


def test_only_rank_0_writes_the_record_stream() -> None:
    """Every record the reader takes was sent by rank 0: the queue's last sender is checked after each
    one (a second writer would also break the stream's sequence numbers, which the reader checks)."""
    import sysv_ipc

    from pdserve.common.sampling_params import SamplingParams
    from pdserve.engine.protocol import StepOutputs

    client, tokenizer, _ = _client(2, SPECULATIVE["mtp"])
    with client:
        rank0, rank1 = client.rank_pids
        queue = sysv_ipc.MessageQueue(client.records_address.key)
        senders = {queue.last_send_pid}
        for i, prompt in enumerate(PROMPTS[:8]):
            client.generate(f"r{i}", tokenizer.encode(prompt), SamplingParams(max_tokens=24, ignore_eos=True))
        unfinished = {f"r{i}" for i in range(8)}
        while unfinished:
            record = client.receive()
            senders.add(queue.last_send_pid)
            if isinstance(record, StepOutputs):
                unfinished -= {o.request_id for o in record.outputs if o.finished}
        assert senders == {rank0}, f"rank 1 is pid {rank1}"


def test_engine_ranks_listen_on_no_port_once_joined() -> None:
    """Once the engine is up, its ranks hold no listener at all: the rendezvous store is stopped
    after the join, and gloo's pair listeners are closed once the pairs connect."""
    client, _, _ = _client(2)
    with client:
        ranks = client.rank_pids
        assert len(ranks) == 2
        assert tcp_listeners(ranks + [c for pid in ranks for c in children(pid)]) == []


# -- a rank that dies takes its node down -------------------------------------------------------------


def _rank_pids(node_server_pid: int) -> dict[int, int]:
    """rank -> pid of the node server's engine rank processes (from their command lines)."""
    from pdserve.engine.protocol import decode_config

    ranks = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != node_server_pid:
                continue
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if b"pdserve.engine.process" in argv:
            config = decode_config(argv[argv.index(b"pdserve.engine.process") + 1].decode())
            ranks[config.ranks.rank] = int(proc.name)
    return ranks


def test_killing_rank_1_under_load_takes_the_node_out_of_routing(tmp_path: Path) -> None:
    import threading
    import time

    import httpx

    from pdserve.common.leftovers import pid_alive
    from pdserve.router.config import HealthConfig, RetryConfig, RouterConfig
    from pdserve.router.server import BackgroundRouter
    from pdserve.tests.support.cluster import NodeSpec, queue_exists, start_nodes, stop_nodes, wait_until
    from pdserve.tests.support.secret import TEST_SECRET

    config = RouterConfig(port=0, model_name="pdserve-demo", cluster_secret=TEST_SECRET,
                          health=HealthConfig(interval_s=0.2, timeout_s=2.0, eject_after=1),
                          retry=RetryConfig(attempts=1, backoff_s=0.01, first_chunk_timeout_s=30.0))
    with BackgroundRouter(config) as router:
        flags = ("--tensor-parallel-size", "2", "--registry", router.url)
        nodes = start_nodes([NodeSpec("tp2", "mixed", flags)], tmp_path)
        node = nodes["tp2"]
        node.expect_clean_exit = False  # it stops itself after losing a rank
        try:
            ranks = _rank_pids(node.process.pid)
            assert sorted(ranks) == [0, 1] and ranks[0] == node.engine_pid

            def routable() -> bool:
                listed = httpx.get(router.url + "/internal/v1/nodes").json()["nodes"]
                return any(n["node_id"] == "tp2" and not n["ejected"] for n in listed)

            assert wait_until(routable, 30)
            statuses: list[int] = []

            def request() -> None:
                body = {"model": "pdserve-demo", "prompt": "Once upon a time", "max_tokens": 200,
                        "ignore_eos": True}
                statuses.append(httpx.post(router.url + "/v1/completions", json=body, timeout=60).status_code)

            clients = [threading.Thread(target=request) for _ in range(4)]
            for client in clients:
                client.start()
            assert wait_until(lambda: node.stats().running > 0, 30)
            os.kill(ranks[1], 9)
            killed_at = time.monotonic()
            assert wait_until(lambda: not routable(), 2.0), "still routable 2 s after rank 1 died"
            out_after_s = time.monotonic() - killed_at
            for client in clients:
                client.join(timeout=30)
                assert not client.is_alive(), "a request hung after its node lost a rank"
            assert statuses and all(s >= 500 for s in statuses), statuses  # failed, none silently cut short
            assert node.process.wait(timeout=20) is not None
            assert wait_until(lambda: not any(pid_alive(p) for p in ranks.values()), 5.0)
            assert not queue_exists(node.queue_key)
            print(f"node out of routing {out_after_s:.2f} s after kill -9 of rank 1")
        finally:
            stop_nodes(nodes.values(), check=False)


def test_pdserve_up_with_per_role_tp_sizes_serves_like_one_engine() -> None:
    """A TP=2 mixed node and a (prefill TP=2, decode TP=1) pair behind one router."""
    from openai import OpenAI

    from pdserve.tests.support.cluster import offline_reference, pdserve_up

    prompts, max_tokens = PROMPTS[:4], 16
    reference = offline_reference(prompts, max_tokens)
    flags = ("--prefill", "1", "--decode", "1", "--mixed", "1", "--tensor-parallel-size", "2",
             "--decode-tensor-parallel-size", "1", "--threads-per-node", "1", "--num-blocks", "256")
    with pdserve_up(*flags) as (_proc, url):
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for prompt in prompts * 2:  # the router spreads them over the mixed node and the PD pair
            response = client.completions.create(model="pdserve-demo", prompt=prompt, max_tokens=max_tokens,
                                                 temperature=0, logprobs=2)
            choice = response.choices[0]
            assert choice.text == reference[prompt]["text"]
            assert choice.logprobs.token_logprobs == pytest.approx(reference[prompt]["logprobs"], abs=1e-4)
    port = url.rsplit(":", 1)[1]
    leftover = subprocess.run(["pgrep", "-f", f"--registry http://127.0.0.1:{port}"], capture_output=True)
    assert leftover.stdout == b"", "pdserve up left node processes behind"


# -- PD between nodes of different TP sizes ----------------------------------------------------------

PD_BUDGET = ("--max-num-batched-tokens", "64")  # a 200-token prompt is prefilled and shipped in 4 chunks


@pytest.fixture(scope="module", params=["shm", "zmq"])
def tp_nodes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from pdserve.tests.support.cluster import NodeSpec, start_nodes, stop_nodes

    transport = ("--transport", request.param)
    tp2 = ("--tensor-parallel-size", "2")
    # Hybrid drafting everywhere: the prefill node's MTP drafts travel with its first token, and the
    # decode node's first step verifies them, whatever either side's TP size.
    spec = ("--speculative-config", SPECULATIVE["hybrid"])
    specs = [
        NodeSpec("mixed", "mixed", (*PD_BUDGET, *spec)),
        NodeSpec("p1", "prefill", (*PD_BUDGET, *transport, *spec)),
        NodeSpec("p2", "prefill", (*PD_BUDGET, *transport, *tp2, *spec)),
        NodeSpec("d1", "decode", spec),
        NodeSpec("d2", "decode", (*tp2, *spec)),
    ]
    nodes = start_nodes(specs, tmp_path_factory.mktemp(f"tp_pd_{request.param}"))
    follower_pids = [pid for name in ("p2", "d2") for rank, pid in _rank_pids(nodes[name].process.pid).items()
                     if rank > 0]
    assert len(follower_pids) == 2, "p2 and d2 should each run a second engine rank"
    yield nodes
    stop_nodes(nodes.values())
    leftover = [p.name for pid in follower_pids for p in Path("/dev/shm").glob(f"pdserve-kv-{pid}-*")]
    assert not leftover, f"rank pools left behind: {leftover}"


@pytest.mark.parametrize(("prefill", "decode"), [("p2", "d1"), ("p1", "d2"), ("p2", "d2")])
def test_pd_across_tp_sizes_equals_a_tp1_mixed_node(tp_nodes, prefill: str, decode: str) -> None:
    from pdserve.tests.support.cluster import generate, sampling, tokenizer, wait_until

    tok = tokenizer()
    text = "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n" * 8
    prompts = {"short": tok.encode("def fibonacci(n):"), "long": tok.encode(text)[:200]}
    params = sampling(max_tokens=16, logprobs=2)
    for name, ids in prompts.items():
        ref = generate(tp_nodes["mixed"], f"mixed-{prefill}-{decode}-{name}", ids, params)
        pd = generate(tp_nodes[decode], f"pd-{prefill}-{decode}-{name}", ids, params,
                      prefill=tp_nodes[prefill])
        assert pd.token_ids == ref.token_ids, name
        assert pd.finish_reason == ref.finish_reason
        np.testing.assert_allclose(pd.tokens.logprobs, ref.tokens.logprobs, atol=1e-4, rtol=0)
        assert pd.tokens.head(1).top_ids == ref.tokens.head(1).top_ids
    for node in (tp_nodes[prefill], tp_nodes[decode]):
        assert wait_until(node.all_blocks_free, 10), f"{node.name} holds blocks after its requests"
