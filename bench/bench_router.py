"""Router overhead and request rate, against a stub node that answers instantly.

    python bench/bench_router.py [--requests 300] [--tokens 16] [--rate-seconds 5] [--rate-rounds 1]

Starts a stub node (``pdserve.tests.support.stub_node``) and the router (``pdserve router``, pinned to
one core) as subprocesses; the stub and this load generator share the other core, so the router's core
does nothing else. For concurrency 1, 10 and 50 it measures TTFT and end-to-end latency of
streaming requests through the router (HTTP/SSE) and directly on the node's gRPC Generate, side by
side in one run; overhead = router median - direct median; and
the router's CPU time per streamed request (from /proc). Then the router's request rate: as many
non-streaming requests as it completes per second at concurrency 50, ``--rate-rounds`` times back to back
(the medians are reported: on a shared machine one round can be a third off). Prints a table and writes
bench_out/bench_router.{md,png}. ``--router-pythonpath`` runs another checkout's router against the same
stub and client, for before/after tables.

The HTTP side is a minimal HTTP/1.1 keep-alive client on raw asyncio streams (``_HTTPConnection``):
a general-purpose client costs more CPU per request than the router under test, and on a 2-core
machine its cost would be measured as the router's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
import uvloop

from pdserve.models.tokenizer import Tokenizer
from pdserve.router.config import default_model_dir
from pdserve.rpc import node_pb2, node_pb2_grpc
from pdserve.tests.support.secret import secret_flags

MODEL = "pdserve-demo"
PROMPT = "def fibonacci(n):\n    "
OUT_DIR = Path(__file__).resolve().parent.parent / "bench_out"


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    e2e_s: float


def _spawn(cmd: list[str], cpu: int | None,
           pythonpath: str | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start a process that prints its address as its first stdout line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
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


class _HTTPConnection:
    """One keep-alive HTTP/1.1 connection: POST a JSON body, read a Content-Length or chunked answer."""

    def __init__(self, url: str) -> None:
        host_port = url.removeprefix("http://")
        self._host, port = host_port.rsplit(":", 1)
        self._port = int(port)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes,
                   on_chunk: Callable[[bytes], None] | None = None) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        head = b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        self._writer.write(head % (path.encode(), self._host.encode(), len(body)) + body)
        head = (await self._reader.readuntil(b"\r\n\r\n")).lower()
        status = int(head[9:12])
        if b"transfer-encoding: chunked" not in head:
            start = head.index(b"content-length:") + 15
            length = int(head[start:head.index(b"\r\n", start)])
            return status, await self._reader.readexactly(length)
        parts = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).strip(), 16)
            data = await self._reader.readexactly(size + 2)
            if size == 0:
                return status, b"".join(parts)
            if on_chunk is not None:
                on_chunk(data)
            parts.append(data[:-2])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class _ConnectionPool:
    """Idle keep-alive connections, the most recently used first. One idle for REUSE_IDLE_S is closed
    instead of reused: the server closes it after its own keep-alive timeout (uvicorn's 5 s), and a
    request sent on it then would read an empty answer."""

    REUSE_IDLE_S = 4.0

    def __init__(self, url: str) -> None:
        self._url = url
        self._idle: list[tuple[float, _HTTPConnection]] = []  # (when it became idle, connection)

    async def post(self, path: str, body: bytes,
                   on_chunk: Callable[[bytes], None] | None = None) -> tuple[int, bytes]:
        conn = None
        while self._idle and conn is None:
            idle_since, candidate = self._idle.pop()
            if time.monotonic() - idle_since < self.REUSE_IDLE_S:
                conn = candidate
            else:
                candidate.close()
        conn = conn or _HTTPConnection(self._url)
        status, data = await conn.post(path, body, on_chunk)
        self._idle.append((time.monotonic(), conn))
        return status, data

    def close(self) -> None:
        for _, conn in self._idle:
            conn.close()


async def _router_one(pool: _ConnectionPool, tokens: int) -> Sample:
    t0 = time.perf_counter()
    ttft = None

    def on_chunk(data: bytes) -> None:
        nonlocal ttft
        if ttft is None and b"data: {" in data:
            ttft = time.perf_counter() - t0

    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "stream": True}).encode()
    status, data = await pool.post("/v1/completions", body, on_chunk)
    if status != 200 or not data.rstrip().endswith(b"data: [DONE]"):
        raise RuntimeError(f"router answered {status}: {data[:200]!r}")
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


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of ``pid`` and its child processes (router workers), from /proc."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # fields[1]: the parent's pid
            total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Rate:
    per_second: float  # requests completed per wall-clock second
    per_cpu_second: float  # requests per CPU-second the router processes used: per core, whatever else runs


async def _request_rate(pool: _ConnectionPool, router_pid: int, seconds: float, concurrency: int,
                        tokens: int) -> Rate:
    done = 0
    deadline = time.perf_counter() + seconds
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": tokens}).encode()

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            status, data = await pool.post("/v1/completions", body)
            if status != 200:
                raise RuntimeError(f"router answered {status}: {data[:200]!r}")
            done += 1

    t0, cpu0 = time.perf_counter(), _cpu_seconds(router_pid)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, _cpu_seconds(router_pid) - cpu0
    return Rate(done / wall, done / cpu if cpu else float("inf"))


async def _floor_client(address: str, seconds: float, concurrency: int, tokens: int) -> float:
    """Complete calls per CPU-second of this process, a bare grpc.aio client at ``concurrency``."""
    prompt_ids = Tokenizer.from_dir(default_model_dir()).encode(PROMPT)
    request = node_pb2.GenerateRequest(request_id="floor", prompt_token_ids=prompt_ids,
                                       sampling=node_pb2.SamplingParams(max_tokens=tokens, temperature=1.0))
    done = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        await stub.Complete(request)  # connected and warm

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await stub.Complete(request)
                done += 1

        deadline = time.perf_counter() + seconds
        cpu0 = time.process_time()  # every thread of this process: gRPC's own included
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu = time.process_time() - cpu0
    return done / cpu


def _grpc_floor(node_address: str, cpu: int, seconds: float, tokens: int) -> float:
    """Complete calls per CPU-second of a bare grpc.aio client on the router's core, against the same
    stub: the part of a non-streaming request's cost that no router built on grpc.aio avoids. Run in
    its own process, between the router's rounds, so the two figures share the host's mood."""
    proc = subprocess.Popen([sys.executable, __file__, "--floor-client", node_address, "--rate-seconds",
                             str(seconds), "--tokens", str(tokens)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    # pinned while it still imports (no preexec_fn: a fork of this gRPC-using process may not run Python)
    os.sched_setaffinity(proc.pid, {cpu})
    out, _ = proc.communicate(timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"the bare gRPC client exited {proc.returncode}")
    return float(out.split()[-1])


def _median_ms(samples: list[Sample], field: str) -> float:
    return statistics.median(getattr(s, field) for s in samples) * 1000


async def _bench(router_url: str, router_pid: int, node_address: str,
                 args: argparse.Namespace) -> tuple[list[dict], list[Rate], list[float]]:
    prompt_ids = Tokenizer.from_dir(default_model_dir()).encode(PROMPT)
    rows = []
    client = _ConnectionPool(router_url)
    async with grpc.aio.insecure_channel(node_address) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        await _run_at(5, 50, lambda: _direct_one(stub, prompt_ids, args.tokens))  # warm-up
        await _run_at(5, 50, lambda: _router_one(client, args.tokens))
        for concurrency in (1, 10, 50):
            n = max(args.requests, concurrency * 4)
            direct = await _run_at(concurrency, n, lambda: _direct_one(stub, prompt_ids, args.tokens))
            cpu0 = _cpu_seconds(router_pid)
            routed = await _run_at(concurrency, n, lambda: _router_one(client, args.tokens))
            row = {"concurrency": concurrency, "requests": n,
                   "router_cpu_ms": (_cpu_seconds(router_pid) - cpu0) / n * 1000}
            for field in ("ttft_s", "e2e_s"):
                row[f"direct_{field}"] = _median_ms(direct, field)
                row[f"router_{field}"] = _median_ms(routed, field)
                row[f"overhead_{field}"] = row[f"router_{field}"] - row[f"direct_{field}"]
            rows.append(row)
        rates, floors = [], []
        for _ in range(args.rate_rounds):
            rates.append(await _request_rate(client, router_pid, args.rate_seconds, 50, args.tokens))
            floors.append(_grpc_floor(node_address, args.router_cpu, args.rate_seconds, args.tokens))
    client.close()
    return rows, rates, floors


def _report(rows: list[dict], rates: list[Rate], floors: list[float], tokens: int) -> str:
    lines = [f"Router overhead, stub node answering at once ({tokens} tokens per request, streaming, "
             "medians, ms)",
             "",
             "| concurrency | requests | TTFT direct | TTFT router | TTFT overhead | E2E direct | "
             "E2E router | E2E overhead | router CPU per request |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['direct_ttft_s']:.2f} | "
                     f"{r['router_ttft_s']:.2f} | {r['overhead_ttft_s']:+.2f} | {r['direct_e2e_s']:.2f} | "
                     f"{r['router_e2e_s']:.2f} | {r['overhead_e2e_s']:+.2f} | {r['router_cpu_ms']:.2f} |")
    per_second = statistics.median(r.per_second for r in rates)
    per_cpu_second = statistics.median(r.per_cpu_second for r in rates)
    lines += ["", f"Router request rate (non-streaming, concurrency 50): **{per_second:.0f} req/s** on "
              f"the router's core, **{per_cpu_second:.0f} requests per router CPU-second**"]
    if len(rates) > 1:
        lines.append(f"(medians of {len(rates)} rounds; per CPU-second: "
                     f"{', '.join(f'{r.per_cpu_second:.0f}' for r in rates)})")
    floor = statistics.median(floors)
    floor_rounds = ", ".join(f"{f:.0f}" for f in floors)
    ratios = ", ".join(f"{f / r.per_cpu_second:.2f}" for f, r in zip(floors, rates, strict=True))
    lines += ["", f"A bare grpc.aio client on the same core, the same Complete calls, its rounds alternated "
              f"with the router's: **{floor:.0f} calls per CPU-second** (rounds: {floor_rounds}). The "
              f"router's request costs **{floor / per_cpu_second:.2f}x** that call (per round: {ratios})."]
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
    parser.add_argument("--rate-rounds", type=int, default=1,
                        help="measure the request rate this many times, back to back (reported: medians)")
    parser.add_argument("--router-cpu", type=int, default=0, help="the core the router is pinned to")
    parser.add_argument("--load-cpu", type=int, default=1, help="the core of the stub node and this client")
    parser.add_argument("--router-workers", type=int, default=1,
                        help="router processes (all on --router-cpu)")
    parser.add_argument("--floor-client", metavar="ADDRESS", default=None,
                        help=argparse.SUPPRESS)  # the bare gRPC client of _grpc_floor, in its own process
    parser.add_argument("--router-pythonpath", default=None,
                        help="PYTHONPATH for the router alone: a folder holding another checkout as "
                             "'pdserve', to measure that code's router against the same stub and client")
    args = parser.parse_args()
    if args.floor_client is not None:
        print(uvloop.run(_floor_client(args.floor_client, args.rate_seconds, 50, args.tokens)))
        return 0
    if args.rate_rounds < 1:
        parser.error("--rate-rounds must be >= 1")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.load_cpu})
    router, router_url = _spawn([sys.executable, "-m", "pdserve.cli", "router", "--port", "0",
                                 "--health-interval", "5", "--workers", str(args.router_workers),
                                 *secret_flags()],  # the stub node registers with the test secret
                                cpu=args.router_cpu, pythonpath=args.router_pythonpath)
    node = None
    try:
        node, node_address = _spawn([sys.executable, "-m", "pdserve.tests.support.stub_node", "--tokens",
                                     str(args.tokens), "--register", router_url, "--heartbeat-s", "1"],
                                    cpu=args.load_cpu)
        deadline = time.monotonic() + 10
        while httpx.get(router_url + "/health").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the router never became ready")
            time.sleep(0.05)
        time.sleep(0.5)  # several workers: every one has read the node's registration
        rows, rates, floors = uvloop.run(_bench(router_url, router.pid, node_address, args))
    finally:
        for proc in (node, router):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=10)
    report = _report(rows, rates, floors, args.tokens)
    print(report)
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "bench_router.md").write_text(report + "\n")
    _plot(rows, OUT_DIR / "bench_router.png")
    print(f"\nwrote {OUT_DIR / 'bench_router.md'} and {OUT_DIR / 'bench_router.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
