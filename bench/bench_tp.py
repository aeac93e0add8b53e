"""Tensor parallelism on this host: TP=2 (one thread per rank) against TP=1 (two threads).

Run: ``python bench/bench_tp.py`` (it starts the rank processes itself and sets their OMP_NUM_THREADS).

Every rank builds an `LLMEngine` on its shard of the demo model and is given the same requests with
the same seeds, as rank 0's task broadcast does in the engine process, then steps in lockstep (the
all-reduces inside the forward keep them so). Rank 0 times each step and, by wrapping
``paddle.distributed.all_reduce`` from this script (no timing code lives in the engine), the time its
step spent in all-reduces (which includes waiting for the slower rank). Cases as bench_engine.py:
decode at batch 1 and 32 with 128-token prompts (median of the timed decode steps) and one 512-token
prefill in a single step (median of 5).
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
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "bench_out"


def _rank_main(rank: int, size: int, port: int, steps: int, out: str) -> None:
    from paddle import distributed

    from pdserve.common.kv_cache import KVCachePool
    from pdserve.common.sampling_params import SamplingParams
    from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.engine import LLMEngine, kv_spec_for
    from pdserve.engine.process import tune_malloc
    from pdserve.models.loader import default_model_dir, load_model
    from pdserve.models.tensor_parallel import TensorParallel, join_ranks
    from pdserve.models.tokenizer import Tokenizer

    tune_malloc()
    tp = TensorParallel(rank, size)
    join_ranks(tp, port)
    model_dir = default_model_dir()
    model = load_model(model_dir, tp=tp)
    source = (Path(__file__).resolve().parent.parent / "engine" / "scheduler.py").read_text()
    tokens = Tokenizer.from_dir(model_dir).encode(source * 4)
    reduce_s = [0.0]
    inner = distributed.all_reduce

    def timed_all_reduce(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            reduce_s[0] += time.perf_counter() - start

    distributed.all_reduce = timed_all_reduce

    def engine(num_blocks: int, budget: int, max_num_seqs: int) -> LLMEngine:
        scheduler = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                                    max_model_len=1024)
        config = EngineConfig(cache=CacheConfig(num_blocks=num_blocks, block_size=16), scheduler=scheduler)
        return LLMEngine(model, config, KVCachePool.allocate(kv_spec_for(model, config)), (0,))

    def timed_step(e: LLMEngine) -> tuple[float, float]:
        reduce_s[0] = 0.0
        start = time.perf_counter()
        e.step()
        total = time.perf_counter() - start
        return total, reduce_s[0]

    results = {}
    for batch in (1, 32):
        e = engine(batch * (128 + steps + 8) // 16 + 16, 2048, batch)
        params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True, seed=1)
        step = len(tokens) // 32
        for i in range(batch):
            e.add_request(f"d{i}", tokens[i * step: i * step + 128], params)
        while e.scheduler.waiting or any(r.num_output_tokens == 0 for r in e.scheduler.running):
            e.step()
        for _ in range(2):
            e.step()
        results[f"decode batch {batch}"] = ([timed_step(e) for _ in range(steps)], batch)
    e = engine(64, 512, 8)
    samples = []
    for i in range(6):
        e.add_request(f"p{i}", tokens[:512], SamplingParams(max_tokens=1, temperature=0.0, seed=1))
        sample = timed_step(e)
        if i:
            samples.append(sample)
    results["prefill 512 tokens"] = (samples, 512)
    if rank == 0:
        summary = {}
        for case, (samples, tokens_per_step) in results.items():
            step_s = statistics.median(s for s, _ in samples)
            share = statistics.median(r / s for s, r in samples)
            summary[case] = {"step_ms": step_s * 1e3, "tokens_per_s": tokens_per_step / step_s,
                             "all_reduce_share": share}
        Path(out).write_text(json.dumps(summary))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(size: int, threads: int, steps: int) -> dict:
    out = OUT_DIR / f"tp{size}.json"
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    argv = [sys.executable, __file__, "--size", str(size), "--port", str(port), "--steps", str(steps),
            "--out", str(out)]
    ranks = [subprocess.Popen([*argv, "--rank", str(r)], env=env, stderr=subprocess.DEVNULL)
             for r in range(size)]
    try:
        for rank in ranks:
            if rank.wait(timeout=900) != 0:
                raise RuntimeError(f"a TP={size} rank exited with code {rank.returncode}")
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps")
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        _rank_main(args.rank, args.size, args.port, args.steps, args.out)
        return
    OUT_DIR.mkdir(exist_ok=True)
    one, two = _run(1, 2, args.steps), _run(2, 1, args.steps)
    lines = ["| case | TP=1, 2 threads: tokens/s (step ms) | TP=2, 1 thread/rank: tokens/s (step ms) | "
             "TP=2 / TP=1 | all-reduce share of a TP=2 step |",
             "| --- | --- | --- | --- | --- |"]
    for case in one:
        a, b = one[case], two[case]
        lines.append(f"| {case} | {a['tokens_per_s']:,.0f} ({a['step_ms']:.2f}) | {b['tokens_per_s']:,.0f} "
                     f"({b['step_ms']:.2f}) | {b['tokens_per_s'] / a['tokens_per_s']:.2f}x | "
                     f"{b['all_reduce_share']:.0%} |")
    print("\n".join(lines))
    (OUT_DIR / "tp.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
