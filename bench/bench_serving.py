"""Serving overhead per token: greedy TPOT streamed through the router from one mixed node, against
the engine's own TPOT for the same requests, side by side in one run.

Run: ``OMP_NUM_THREADS=1 python bench/bench_serving.py`` (a script, not a test).

Starts ``pdserve up --prefill 0 --decode 0 --mixed 1`` (router + one mixed node whose engine has one
thread) and, in this process, an `LLMEngine` on the same model with the same config and one thread.
Each prompt runs alone (batch 1) through both, in turns (the order alternates per prompt), so load
from other jobs on this shared machine hits both alike:

- served: a streaming /v1/completions request; TPOT is (time of the last token - time of the first)
  / (tokens - 1), as the client sees it, so it holds everything between the engine and the client:
  the record stream, the node server, gRPC, the router, HTTP/SSE.
- engine: the same request's decode steps in the in-process engine (LLMEngine.step alone).

The table reports medians over prompts and the median of the per-prompt ratios (served / engine).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

OUT_DIR = Path("bench_out")
MODEL_NAME = "pdserve-demo"
ENGINE_FLAGS = {"num_blocks": 512, "max_model_len": 2048}


@dataclass
class Pair:
    served_tpot_s: float
    engine_tpot_s: float
    tokens: int

    @property
    def ratio(self) -> float:
        return self.served_tpot_s / self.engine_tpot_s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(port: int) -> subprocess.Popen[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", "up", "--port", str(port), "--prefill", "0", "--decode", "0",
         "--mixed", "1", "--threads-per-node", "1", "--num-blocks", str(ENGINE_FLAGS["num_blocks"])],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "pdserve is up" in line:
            return proc
        if not line and proc.poll() is not None:
            raise RuntimeError(f"pdserve up exited with {proc.returncode}")
    proc.kill()
    raise RuntimeError("pdserve up did not come up in 180 s")


def served_tpot(client: httpx.Client, prompt_ids: list[int], max_tokens: int) -> tuple[float, int]:
    body = {"model": MODEL_NAME, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True}
    arrivals: list[float] = []
    tokens = 0
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                arrivals.append(time.perf_counter())
                tokens += 1
    # A chunk may carry several tokens (a stop-string hold-back); with plain greedy decoding and no stop
    # strings each chunk is one token.
    return (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1), tokens


def engine_tpot(engine, prompt_ids: list[int], max_tokens: int, request_id: str) -> float:
    from pdserve.common.sampling_params import SamplingParams

    engine.add_request(request_id, prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                              ignore_eos=True))
    emitted: list[float] = []
    while engine.has_unfinished():
        for output in engine.step():
            if len(output.tokens):
                emitted.append(time.perf_counter())
    return (emitted[-1] - emitted[0]) / (len(emitted) - 1)


def build_engine():
    from pdserve.common.kv_cache import KVCachePool
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.engine import LLMEngine, kv_spec_for
    from pdserve.engine.process import tune_malloc
    from pdserve.models.loader import default_model_dir, load_model

    tune_malloc()  # as the engine process does
    config = EngineConfig(cache=CacheConfig(num_blocks=ENGINE_FLAGS["num_blocks"]),
                          scheduler=SchedulerConfig(max_model_len=ENGINE_FLAGS["max_model_len"]))
    model = load_model(default_model_dir())
    return LLMEngine(model, config, KVCachePool.allocate(kv_spec_for(model, config)), eos_token_ids=(0,))


def prompts(count: int, length: int) -> list[list[int]]:
    from pdserve.models.loader import default_model_dir
    from pdserve.models.tokenizer import Tokenizer

    source = (Path(__file__).resolve().parent.parent / "engine" / "scheduler.py").read_text()
    ids = Tokenizer.from_dir(default_model_dir()).encode(source)
    step = max(1, (len(ids) - length) // count)
    return [ids[i * step:i * step + length] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    port = free_port()
    print("starting pdserve up (router + 1 mixed node) and an in-process engine ...", flush=True)
    cluster = start_cluster(port)
    pairs: list[Pair] = []
    try:
        engine = build_engine()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120.0) as client:
            work = prompts(args.prompts + 1, args.prompt_len)
            served_tpot(client, work[0], 8)  # warm-up: connections, the node's first requests
            engine_tpot(engine, work[0], 8, "warm")
            for i, prompt_ids in enumerate(work[1:]):
                if i % 2 == 0:
                    served, tokens = served_tpot(client, prompt_ids, args.max_tokens)
                    own = engine_tpot(engine, prompt_ids, args.max_tokens, f"r{i}")
                else:
                    own = engine_tpot(engine, prompt_ids, args.max_tokens, f"r{i}")
                    served, tokens = served_tpot(client, prompt_ids, args.max_tokens)
                pairs.append(Pair(served, own, tokens))
                print(f"  prompt {i + 1}/{args.prompts}: served {served * 1000:.2f} ms, engine "
                      f"{own * 1000:.2f} ms per token", flush=True)
    finally:
        cluster.terminate()
        cluster.wait(timeout=60)
    served_ms = statistics.median(p.served_tpot_s for p in pairs) * 1000
    engine_ms = statistics.median(p.engine_tpot_s for p in pairs) * 1000
    ratio = statistics.median(p.ratio for p in pairs)
    lines = ["| prompts | tokens each | served TPOT ms | engine TPOT ms | added ms | served / engine |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| {len(pairs)} | {pairs[0].tokens} | {served_ms:.2f} | {engine_ms:.2f} | "
             f"{served_ms - engine_ms:+.2f} | {ratio:.2f}x (per prompt {min(p.ratio for p in pairs):.2f}-"
             f"{max(p.ratio for p in pairs):.2f}) |"]
    print("\n".join(lines))
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "serving_overhead.md").write_text("\n".join(lines) + "\n")
    plot(pairs, OUT_DIR / "serving_overhead.png")
    print(f"wrote {OUT_DIR / 'serving_overhead.md'} and {OUT_DIR / 'serving_overhead.png'}")


def plot(pairs: list[Pair], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = range(1, len(pairs) + 1)
    ax.plot(x, [p.served_tpot_s * 1000 for p in pairs], marker="o", label="served (router, SSE)")
    ax.plot(x, [p.engine_tpot_s * 1000 for p in pairs], marker="s", label="engine alone")
    ax.set_xlabel("prompt (batch 1, greedy, in turns)")
    ax.set_ylabel("TPOT ms")
    ax.set_title("Serving overhead per token")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
