"""Mid-stream migration with real nodes: 1 prefill + 2 decode nodes behind the router, concurrent greedy
and seeded streams; kill -9 of one decode node (server and engine) while they stream. Every request
succeeds, its text equals the same request's text in an undisturbed run, and usage counts the prompt
and every completion token once. Prints the seam (failure to the continuation's first chunk)."""

from __future__ import annotations

import json
import logging
import re
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from pdserve.router.config import HealthConfig, PolicyConfig, RetryConfig, RouterConfig
from pdserve.router.server import BackgroundRouter
from pdserve.tests.integration.test_pd_faults import _clean_after_kill, _kill, _stop
from pdserve.tests.support.cluster import Node, NodeSpec, start_nodes, wait_until
from pdserve.tests.support.secret import TEST_SECRET

MODEL = "pdserve-demo"
MAX_TOKENS = 200
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, item):",
           "for i in range(", "# compute the", "x = ["]
EVENTS_BEFORE_KILL = 6  # every stream is this far in when the decode node dies


# A grammar long enough to outlast the kill: the continuation's matcher must start where the outputs
# left it (a fresh one would refuse the next identifier character, or let a second "def" through).
GRAMMAR_REGEX = r"def [a-z_]{1,12}\(x\):\n(    [a-z_]{1,10} = [0-9]{1,4}\n){20}"


def _bodies() -> list[dict[str, object]]:
    """Half greedy, half seeded sampling, and two greedy ones constrained by a grammar (with round robin
    over two decode nodes, one of them on each); ignore_eos keeps every stream but the grammar's
    MAX_TOKENS long."""
    common = {"model": MODEL, "max_tokens": MAX_TOKENS, "ignore_eos": True, "logprobs": 1, "stream": True,
              "stream_options": {"include_usage": True}}
    return [{**common, "prompt": prompt,
             **({"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "top_p": 0.95, "seed": 100 + i})}
            for i, prompt in enumerate(PROMPTS)] + [
        {**common, "prompt": prompt, "temperature": 0, "guided_regex": GRAMMAR_REGEX}
        for prompt in ("class Stack:\n    ", "import math\n")]


@dataclass
class Stream:
    text: str = ""
    tokens: int = 0
    usage: dict | None = None
    error: str | None = None
    finish_reason: str | None = None
    events: int = 0
    arrivals: list[float] = field(default_factory=list)

    @property
    def longest_gap_s(self) -> float:
        return max((b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)), default=0.0)


def _stream(url: str, body: dict[str, object], progress: threading.Semaphore | None) -> Stream:
    got = Stream()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
        if resp.status_code != 200:
            got.error = f"status {resp.status_code}: {resp.read()!r}"
            return got
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line.removeprefix("data: "))
            if "error" in payload:
                got.error = payload["error"]["message"]
                continue
            if payload.get("usage"):
                got.usage = payload["usage"]
            for choice in payload["choices"]:
                got.arrivals.append(time.monotonic())
                got.text += choice["text"]
                got.tokens += len(choice["logprobs"]["tokens"])
                got.finish_reason = choice["finish_reason"] or got.finish_reason
                got.events += 1
                if progress is not None and got.events == EVENTS_BEFORE_KILL:
                    progress.release()
    return got


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[BackgroundRouter, dict[str, Node]]]:
    config = RouterConfig(port=0, model_name=MODEL, cluster_secret=TEST_SECRET,
                          health=HealthConfig(interval_s=0.5, timeout_s=2.0, eject_after=2),
                          retry=RetryConfig(attempts=3, backoff_s=0.05, first_chunk_timeout_s=60.0,
                                            chunk_timeout_s=10.0),
                          policy=PolicyConfig(decode="round_robin"))
    with BackgroundRouter(config) as router:
        common = ("--registry", router.url, "--transport", "zmq")
        specs = [NodeSpec("p1", "prefill", common), NodeSpec("d1", "decode", common),
                 NodeSpec("d2", "decode", common)]
        nodes = start_nodes(specs, tmp_path)
        try:
            assert wait_until(lambda: len(httpx.get(router.url + "/internal/v1/nodes", timeout=5)
                                          .json()["nodes"]) == 3, 30.0)
            yield router, nodes
        finally:
            _stop(nodes)


def _metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def test_kill_of_a_decode_node_mid_stream_loses_no_stream_and_changes_no_text(
        cluster: tuple[BackgroundRouter, dict[str, Node]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pdserve.router.dispatch")
    router, nodes = cluster
    bodies = _bodies()
    with ThreadPoolExecutor(len(bodies)) as pool:
        reference = list(pool.map(lambda b: _stream(router.url, b, None), bodies))
    d1 = nodes["d1"]
    progress = threading.Semaphore(0)
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(_stream, router.url, b, progress) for b in bodies]
        for _ in bodies:
            assert progress.acquire(timeout=60), "a stream never got going"
        assert d1.stats().running > 0, "d1 had no stream to lose"
        _kill(d1)
        disturbed = [f.result() for f in futures]
    assert all(r.error is None for r in reference), [r.error for r in reference]
    for ref, got, body in zip(reference, disturbed, bodies, strict=True):
        assert got.error is None, (body["prompt"], got.error)
        assert got.text == ref.text, body["prompt"]
        assert (got.tokens, got.finish_reason) == (ref.tokens, ref.finish_reason)
        assert got.usage == ref.usage
        if "guided_regex" in body:
            assert re.fullmatch(GRAMMAR_REGEX, got.text), got.text
        else:
            assert got.tokens == MAX_TOKENS and got.finish_reason == "length"
    metrics = httpx.get(router.url + "/metrics", timeout=5).text
    migrations = _metric(metrics, "pdserve_router_migrations_total")
    assert migrations >= 1
    assert _metric(metrics, "pdserve_router_migration_latency_seconds_count") == migrations
    seams = [float(m.group(1)) for r in caplog.records
             if (m := re.search(r"resumed (\S+) s after the failure", r.getMessage()))]
    assert len(seams) == migrations
    longest_gap = max(s.longest_gap_s for s in disturbed)
    assert longest_gap < 10.0, f"a stream paused {longest_gap:.1f} s"
    _clean_after_kill(d1)
    print(f"\nkill -9 of d1: {migrations:.0f} of {len(bodies)} streams migrated; seam (failure to the "
          f"continuation's first chunk) p50 {statistics.median(seams):.3f} s, max {max(seams):.3f} s; "
          f"longest client gap {longest_gap:.3f} s")
