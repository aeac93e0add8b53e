"""One client flooding the router with ~4 MB prompts, back to back (the issue's scenario), does not
slow the others down: bodies over the limit are refused from their Content-Length (413), bodies under
it are parsed and validated on the prepare pool and refused untokenized when they cannot fit the
context. Real processes: a `pdserve router`, a stub node with a fixed 100 ms to its first token, the
flooding process, and this test as the other client measuring TTFT."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import httpx

from pdserve.tests.support.cluster import free_port

MODEL = "pdserve-demo"
MAX_BODY = 4 << 20
FLOOD = f"""
import sys, httpx
url, size = sys.argv[1], int(sys.argv[2])
def flood(size):
    # one client, back to back: a body just under the limit (read, parsed, refused as too long for
    # the context) and one just over it (413 from its Content-Length)
    bodies = [('{{"model": "{MODEL}", "max_tokens": 4, "prompt": "' + "word " * (n // 5) + '"}}').encode()
              for n in (size - 4096, size + 4096)]
    with httpx.Client(timeout=120) as client:
        while True:
            for body in bodies:
                try:
                    status = client.post(url + "/v1/completions", content=body,
                                         headers={{"content-type": "application/json"}}).status_code
                    print(status, flush=True)
                except httpx.HTTPError as e:
                    print(type(e).__name__, flush=True)
flood(size)
"""


def _ttfts(url: str, count: int) -> list[float]:
    body = {"model": MODEL, "prompt": "def f(", "max_tokens": 4, "stream": True}
    ttfts = []
    with httpx.Client(timeout=60) as client:
        for _ in range(count):
            t0 = time.monotonic()
            with client.stream("POST", url + "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                first = None
                for line in resp.iter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.monotonic() - t0
                assert first is not None
                ttfts.append(first)
    return ttfts


def _start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def test_a_4mb_prompt_flood_leaves_other_clients_ttft_within_1_5x() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes = []
    try:
        router = _start([sys.executable, "-m", "pdserve.cli", "router", "--port", str(port),
                         "--health-interval", "0.5"])
        processes.append(router)
        assert "listening on" in router.stdout.readline()
        stub = _start([sys.executable, "-m", "pdserve.tests.support.stub_node", "--register", url,
                       "--capacity", "64", "--tokens", "4", "--first-token-delay", "0.1"])
        processes.append(stub)
        stub.stdout.readline()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the router never saw the stub node"
            time.sleep(0.1)
        _ttfts(url, 3)  # warm up
        quiet = _ttfts(url, 20)
        flood = _start([sys.executable, "-c", FLOOD, url, str(MAX_BODY)])
        processes.append(flood)
        time.sleep(2.0)
        flooded = _ttfts(url, 20)
        flood.kill()
        statuses = set(flood.stdout.read().split())
        ratio = statistics.median(flooded) / statistics.median(quiet)
        print(f"\nTTFT p50 quiet {statistics.median(quiet) * 1000:.0f} ms, under a 4 MB flood "
              f"{statistics.median(flooded) * 1000:.0f} ms (x{ratio:.2f}); flood answers {sorted(statuses)}")
        assert {"400", "413"} <= statuses  # tokenized and refused (context length), refused while read
        assert ratio <= 1.5
        t0 = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 0.5
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
