"""Zero lost streams: a decode node that dies, stops or is cut off from the router mid-stream loses
none of its streams (issue #15's chaos cases).

One prefill and two decode nodes in network namespaces (KV over ZMQ, Redis registry, the router on the
host). 16 concurrent streams of 200 tokens through the official `openai` client, half greedy and half
seeded sampling, are first run undisturbed for reference; then, once every stream is under way, one
fault hits the decode node `decode-0`: kill -9 of its server and engine, SIGSTOP of both beyond the
router's liveness timeout (its HTTP/2 pings: rpc/keepalive.py), or a partition between the router and
it. Every stream must end as its undisturbed run did: same text, 200 tokens, usage counting the
prompt and every completion token once, and no silence on the client's side longer than 3 s.
Each scenario adds a row to the chaos table with the share of streams that migrated and the seam
(the longest silence of a migrated stream, failure detection included; and the router's own
failure-to-next-token time).
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import openai
import pytest

from pdserve.tests.chaos.fabric import ChaosCluster, node_gone
from pdserve.tests.integration.test_pd_faults import _clean_after_kill
from pdserve.tests.support.cluster import Node, wait_until
from pdserve.tests.support.secret import secret_flags

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="network namespaces and nftables need root (CI runs as root)")

PREFILL, DECODE = ["prefill-0"], ["decode-0", "decode-1"]
VICTIM = "decode-0"
NODE_FLAGS: tuple[str, ...] = ("--num-blocks", "512")
# round robin spreads the 16 streams over both decode nodes, so the victim always holds some
ROUTER_FLAGS: tuple[str, ...] = (*secret_flags(), "--decode-policy", "round_robin")
MODEL = "pdserve-demo"
STREAMS = 16
MAX_TOKENS = 200
GAP_BOUND_S = 3.0
EVENTS_BEFORE_FAULT = 8  # every stream is this far in when the fault hits
STOP_S = 6.0  # SIGSTOP and partition: well past the 1.25 s the router's pings take to give up
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, item):",
           "for i in range(", "# compute the", "x = [", "def quicksort(items):", "while True:\n    "]


@dataclass
class Stream:
    """What one client saw of one request."""

    response_id: str = ""
    text: str = ""
    tokens: int = 0
    usage: tuple[int, int] | None = None  # (prompt, completion)
    finish_reason: str | None = None
    error: str | None = None
    arrivals: list[float] = field(default_factory=list)

    @property
    def longest_gap_s(self) -> float:
        return max((b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)), default=0.0)


def _request(i: int) -> dict[str, object]:
    sampled = {"temperature": 0.8, "top_p": 0.95, "seed": 1000 + i} if i % 2 else {"temperature": 0.0}
    return {"model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS, "logprobs": 1,
            "stream": True, "stream_options": {"include_usage": True}, "extra_body": {"ignore_eos": True},
            **sampled}


async def _one(client: openai.AsyncOpenAI, i: int, under_way: asyncio.Semaphore) -> Stream:
    got = Stream()
    try:
        async for chunk in await client.completions.create(**_request(i)):
            got.response_id = chunk.id
            if chunk.usage is not None:
                got.usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
            for choice in chunk.choices:
                got.arrivals.append(time.monotonic())
                got.text += choice.text
                got.tokens += len(choice.logprobs.tokens) if choice.logprobs else 0
                got.finish_reason = choice.finish_reason or got.finish_reason
                if len(got.arrivals) == EVENTS_BEFORE_FAULT:
                    under_way.release()
    except openai.APIError as exc:
        got.error = f"{type(exc).__name__}: {exc}"[:300]
    return got


def run_streams(url: str, fault: Callable[[], None] | None = None) -> list[Stream]:
    """The 16 streams; `fault()` runs (in a thread) once every stream is EVENTS_BEFORE_FAULT events in."""

    async def run() -> list[Stream]:
        under_way = asyncio.Semaphore(0)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="chaos", max_retries=0, timeout=120.0)
        async with client:
            tasks = [asyncio.create_task(_one(client, i, under_way)) for i in range(STREAMS)]
            if fault is not None:
                for _ in range(STREAMS):
                    await asyncio.wait_for(under_way.acquire(), 60.0)
                await asyncio.to_thread(fault)
            return list(await asyncio.gather(*tasks))

    return asyncio.run(run())


@pytest.fixture(scope="module")
def cluster(chaos_log_dir: Path) -> Iterator[ChaosCluster]:
    workdir = chaos_log_dir / "migration"
    workdir.mkdir()
    # INFO: the router logs each migration's seam as it measured it
    cluster = ChaosCluster.create(workdir, PREFILL, DECODE, NODE_FLAGS, ROUTER_FLAGS, router_log_level="INFO")
    try:
        yield cluster
    finally:
        for node in cluster.nodes.values():
            node.expect_clean_exit = False  # the victim is killed on purpose; leftovers are still checked
        problems = cluster.close()
    assert not problems, problems


@pytest.fixture(scope="module")
def reference(cluster: ChaosCluster) -> list[Stream]:
    streams = run_streams(cluster.router.url)
    assert all(s.error is None and s.tokens == MAX_TOKENS for s in streams), [s.error for s in streams]
    return streams


def _migrations(cluster: ChaosCluster, since: int) -> tuple[set[str], list[tuple[float, int, float]]]:
    """From the router's log after offset `since`: the client response ids of the requests it migrated,
    and per migration the seam as the router measured it (failure to the continuation's first chunk),
    the tokens prefilled again and the seconds that prefill took."""
    text = cluster.router.log_path.read_text(errors="replace")[since:]
    ids = {f"cmpl-{i}" for i in re.findall(r"request req-(\S+): migration \d+ after", text)}
    seams = [(float(s), int(n), float(p)) for s, n, p in re.findall(
        r"migration \d+ resumed (\S+) s after the failure; (\d+) tokens prefilled again: queue \S+ s, "
        r"prefill (\S+) s", text)]
    return ids, seams


def _log_offset(cluster: ChaosCluster) -> int:
    return len(cluster.router.log_path.read_text(errors="replace"))


def check_and_report(row, cluster: ChaosCluster, reference: list[Stream], disturbed: list[Stream],
                     log_offset: int) -> None:
    migrated_ids, router_seams = _migrations(cluster, log_offset)
    migrated = [s for s in disturbed if s.response_id in migrated_ids]
    row.sent, row.ok = len(disturbed), sum(s.error is None for s in disturbed)
    row.failed = len(disturbed) - row.ok
    gaps = [s.longest_gap_s for s in migrated]
    if gaps and router_seams:
        seams, tokens, prefills = zip(*router_seams, strict=True)
        row.figure = (f"{len(migrated)}/{len(disturbed)} migrated; client gap p50 "
                      f"{statistics.median(gaps):.2f} / max {max(gaps):.2f} s, of which after detection p50 "
                      f"{statistics.median(seams):.2f} / max {max(seams):.2f} s; re-prefill p50 "
                      f"{statistics.median(tokens):.0f} tokens in "
                      f"{statistics.median(prefills) * 1000:.0f} ms")
    for ref, got in zip(reference, disturbed, strict=True):
        assert got.error is None, got.error
        assert got.text == ref.text, f"{got.response_id}: the text differs from the undisturbed run"
        assert got.tokens == MAX_TOKENS and got.finish_reason == "length", (got.tokens, got.finish_reason)
        assert got.usage == ref.usage, (got.usage, ref.usage)
    assert migrated, "no stream migrated: the fault hit no stream"
    longest = max(s.longest_gap_s for s in disturbed)
    assert longest <= GAP_BOUND_S, f"a stream was silent {longest:.2f} s"


def victim_holds_streams(cluster: ChaosCluster) -> None:
    assert cluster.router.inflight(VICTIM) > 0, "the victim had no stream when the fault hit"


def back_in_rotation(cluster: ChaosCluster, node: Node) -> None:
    """The victim serves again and holds no KV: its abandoned streams were aborted, not leaked."""

    def holds_no_kv() -> bool:
        try:
            return node.all_blocks_free()
        except grpc.RpcError:  # this test's own connection to the node did not outlive a partition
            return False

    assert cluster.router.wait_usable(len(PREFILL), len(DECODE), 30.0), cluster.router.usable_nodes()
    # Back in the pool is not yet back in rotation: after a stop or a cut the node reports its prefill
    # peer unreachable until its data-plane connection is up again, and until the router has that
    # report no request goes to the pair, so the next scenario's victim would get no stream.
    assert wait_until(lambda: cluster.router.unreachable_peers(node.name) == [], 30.0, 0.2), \
        cluster.router.unreachable_peers(node.name)
    assert wait_until(holds_no_kv, 30.0, 0.2), f"{node.name} keeps KV blocks: {node.stats()}"


BOUND = f"0 failed, texts = undisturbed, usage right, no gap > {GAP_BOUND_S:.0f} s"


def disturbed_run(cluster: ChaosCluster, reference: list[Stream], report, fault_name: str,
                  fault: Callable[[], None]) -> None:
    """The 16 streams with `fault` hitting the victim once they are under way; the row and the bound."""
    with report(f"migration: {fault_name}, {STREAMS} x {MAX_TOKENS} tokens", BOUND) as row:
        offset = _log_offset(cluster)

        def checked_fault() -> None:
            victim_holds_streams(cluster)
            fault()

        disturbed = run_streams(cluster.router.url, checked_fault)
        check_and_report(row, cluster, reference, disturbed, offset)


def test_sigstop_decode_node_past_liveness(cluster: ChaosCluster, reference: list[Stream], report) -> None:
    victim = cluster.nodes[VICTIM]

    def fault() -> None:
        with cluster.stopped(victim.process.pid, victim.engine_pid):
            time.sleep(STOP_S)

    disturbed_run(cluster, reference, report, f"SIGSTOP {VICTIM} {STOP_S:.0f} s", fault)
    back_in_rotation(cluster, victim)


def test_partition_router_from_decode_node(cluster: ChaosCluster, reference: list[Stream], report) -> None:
    victim = cluster.nodes[VICTIM]

    def fault() -> None:
        with cluster.router_cut_off(VICTIM):
            time.sleep(STOP_S)

    disturbed_run(cluster, reference, report, f"router cut off from {VICTIM} {STOP_S:.0f} s", fault)
    back_in_rotation(cluster, victim)


def test_kill9_decode_node(cluster: ChaosCluster, reference: list[Stream], report) -> None:
    victim = cluster.nodes[VICTIM]

    def fault() -> None:
        victim.expect_clean_exit = False
        cluster.kill9(victim.process.pid)
        cluster.kill9(victim.engine_pid)

    disturbed_run(cluster, reference, report, f"kill -9 {VICTIM} (server + engine)", fault)
    assert wait_until(lambda: node_gone(victim), 10.0), "the killed node's processes linger"
    # its pool and record queue stay until a node starting on the host removes them: do that here
    _clean_after_kill(victim)
