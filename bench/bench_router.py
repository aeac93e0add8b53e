"""Router overhead and request rate, against a stub node that answers instantly.

    python bench/bench_router.py [--requests 300] [--tokens 16] [--rate-seconds 5]

Starts a stub node (``pdserve.tests.support.stub_node``) and the router (``pdserve router``, pinned to one
core) as subprocesses. For concurrency 1, 10 and 50 it measures TTFT and end-to-end latency of
streaming requests through the router (HTTP/SSE) and directly on the node's gRPC Generate, side by
side in one run; overhead = router median - direct median. Then the router's request rate: as many
non-streaming requests as it completes per second at concurrency 50. Prints a table and writes
bench_out/bench_router.{md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from pdserve.models.tokenizer import Tokenizer
from pdserve.router.config import default_model_dir
from pdserve.rpc import node_pb2, node_pb2_grpc

MODEL = "pdserve-demo"
PROMPT = "def fibonacci(n):\n    "
OUT_DIR = Path(__file__).resolve().parent.parent / "bench_out"


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    e2e_s: float


def _spawn(cmd: list[str], cpu: int | None) -> tuple[subprocess.Popen[str], str]:
    """Start a process that prints its address as its first stdout line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(proc.pid, {cpu})
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        raise RuntimeError(f"{cmd[:4]} printed no address")
    return proc, line.split()[-1]


async def _direct_one(stub: node_pb2_grpc.NodeStub, prompt_ids: list[int], tokens: int) -> Sample:
    t0 = time.perf_counter()
    ttft = None
    request = node_pb2.GenerateRequest(request_id="bench", prompt_token_ids=prompt_ids,
                                       sampling=node_pb2.SamplingParams(max_tokens=tokens, temperature=1.0))
    async for chunk in stub.Generate(request):
        if ttft is None and chunk.tokens.token_ids:
            ttft = time.perf_counter() - t0
    return Sample(ttft or 0.0, time.perf_counter() - t0)


async def _router_one(client: httpx.AsyncClient, tokens: int) -> Sample:
    t0 = time.perf_counter()
    ttft = None
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if ttft is None and line.startswith("data: {"):
                ttft = time.perf_counter() - t0
    return Sample(ttft or 0.0, time.perf_counter() - t0)


async def _run_at(concurrency: int, total: int, one: Callable[[], Awaitable[Sample]]) -> list[Sample]:
    samples: list[Sample] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            samples.append(await one())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


async def _request_rate(client: httpx.AsyncClient, seconds: float, concurrency: int, tokens: int) -> float:
    done = 0
    deadline = time.perf_counter() + seconds
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": tokens}

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            (await client.post("/v1/completions", json=body)).raise_for_status()
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - t0)


def _median_ms(samples: list[Sample], field: str) -> float:
    return statistics.median(getattr(s, field) for s in samples) * 1000


async def _bench(router_url: str, node_address: str,
                 args: argparse.Namespace) -> tuple[list[dict], float]:
    prompt_ids = Tokenizer.from_dir(default_model_dir()).encode(PROMPT)
    rows = []
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with grpc.aio.insecure_channel(node_address) as channel, \
            httpx.AsyncClient(base_url=router_url, limits=limits, timeout=30) as client:
        stub = node_pb2_grpc.NodeStub(channel)
        await _run_at(5, 50, lambda: _direct_one(stub, prompt_ids, args.tokens))  # warm-up
        await _run_at(5, 50, lambda: _router_one(client, args.tokens))
        for concurrency in (1, 10, 50):
            n = max(args.requests, concurrency * 4)
            direct = await _run_at(concurrency, n, lambda: _direct_one(stub, prompt_ids, args.tokens))
            routed = await _run_at(concurrency, n, lambda: _router_one(client, args.tokens))
            row = {"concurrency": concurrency, "requests": n}
            for field in ("ttft_s", "e2e_s"):
                row[f"direct_{field}"] = _median_ms(direct, field)
                row[f"router_{field}"] = _median_ms(routed, field)
                row[f"overhead_{field}"] = row[f"router_{field}"] - row[f"direct_{field}"]
            rows.append(row)
        rate = await _request_rate(client, args.rate_seconds, 50, args.tokens)
    return rows, rate


def _report(rows: list[dict], rate: float, tokens: int) -> str:
    lines = [f"Router overhead, stub node answering at once ({tokens} tokens per request, streaming, "
             "medians, ms)",
             "",
             "| concurrency | requests | TTFT direct | TTFT router | TTFT overhead | E2E direct | "
             "E2E router | "
             "E2E overhead |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['direct_ttft_s']:.2f} | "
                     f"{r['router_ttft_s']:.2f} | {r['overhead_ttft_s']:+.2f} | {r['direct_e2e_s']:.2f} | "
                     f"{r['router_e2e_s']:.2f} | "
                     f"{r['overhead_e2e_s']:+.2f} |")
    lines += ["", f"Router request rate on one core (non-streaming, concurrency 50): **{rate:.0f} req/s**"]
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = [str(r["concurrency"]) for r in rows]
    for ax, field, title in ((axes[0], "ttft_s", "TTFT"), (axes[1], "e2e_s", "End-to-end")):
        width = 0.38
        idx = range(len(xs))
        ax.bar([i - width / 2 for i in idx], [r[f"direct_{field}"] for r in rows], width, label="direct gRPC")
        ax.bar([i + width / 2 for i in idx], [r[f"router_{field}"] for r in rows], width,
               label="through router")
        ax.set_xticks(list(idx), xs)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("median ms")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rate-seconds", type=float, default=5.0)
    parser.add_argument("--router-cpu", type=int, default=0, help="the core the router is pinned to")
    args = parser.parse_args()
    router, router_url = _spawn([sys.executable, "-m", "pdserve.cli", "router", "--port", "0",
                                 "--health-interval", "5"], cpu=args.router_cpu)
    node = None
    try:
        node, node_address = _spawn([sys.executable, "-m", "pdserve.tests.support.stub_node", "--tokens",
                                     str(args.tokens), "--register", router_url, "--heartbeat-s", "1"],
                                    cpu=None)
        deadline = time.monotonic() + 10
        while httpx.get(router_url + "/health").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the router never became ready")
            time.sleep(0.05)
        rows, rate = asyncio.run(_bench(router_url, node_address, args))
    finally:
        for proc in (node, router):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=10)
    report = _report(rows, rate, args.tokens)
    print(report)
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "bench_router.md").write_text(report + "\n")
    _plot(rows, OUT_DIR / "bench_router.png")
    print(f"\nwrote {OUT_DIR / 'bench_router.md'} and {OUT_DIR / 'bench_router.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
