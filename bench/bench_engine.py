"""Engine throughput on the demo model, and where a step's time goes.

Run: ``OMP_NUM_THREADS=1 python bench/bench_engine.py`` (a script, not a test; ``--threads`` is
only reported: paddle reads OMP_NUM_THREADS when it is imported).

- decode: B requests with ~128-token prompts are prefilled, then N decode steps are timed; tokens/s
  is B / median step time. Each step's outputs go through a real SysV record stream (a reader thread
  drains it), as in the engine process.
- prefill: one 512-token prompt in a single step (max_tokens=1); tokens/s is 512 / median step time.
- breakdown: the step's pieces are timed by wrapping the engine's own methods from this script (no
  timing code lives in the engine): schedule (`Scheduler.schedule` + `on_step_done`), prepare
  (`ModelRunner._prepare`), forward (the model's `forward` + `compute_logits`, i.e. with the LM head),
  sampling + logprobs (`ModelRunner._sample` minus its `compute_logits`), record stream (encode + send),
  and other (the rest of `LLMEngine.step`: building outputs). Overhead = everything but forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdserve.common.kv_cache import KVCachePool
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine, kv_spec_for
from pdserve.engine.output_stream import RecordWriter
from pdserve.engine.process import tune_malloc
from pdserve.engine.protocol import StepOutputs
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.loader import default_model_dir, load_model
from pdserve.models.tokenizer import Tokenizer
from pdserve.node.engine_stream import RecordReader, StreamClosed

PARTS = ("schedule", "prepare", "forward", "sampling+logprobs", "record stream", "other")
OUT_DIR = Path(__file__).resolve().parent.parent / "bench_out"


class StepTimer:
    """Accumulates wall time per part of the current step by wrapping bound methods in place."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)

    def wrap(self, owner: object, name: str, part: str) -> None:
        inner = getattr(owner, name)

        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.current[part] += time.perf_counter() - start

        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        parts, self.current = dict(self.current), defaultdict(float)
        return parts


@dataclass
class Bench:
    engine: LLMEngine
    timer: StepTimer
    writer: RecordWriter

    def step(self) -> dict[str, float]:
        """One engine step plus its output-queue send; seconds per part, 'total' included."""
        start = time.perf_counter()
        outputs = self.engine.step()
        sent = time.perf_counter()
        if outputs:
            self.writer.send(StepOutputs(self.engine.steps, outputs))
        end = time.perf_counter()
        parts = self.timer.take()
        # _sample includes the LM head (compute_logits), which belongs to the forward pass.
        parts["sampling+logprobs"] = parts.pop("sample", 0.0) - parts.get("lm head", 0.0)
        parts["forward"] = parts.get("forward", 0.0) + parts.pop("lm head", 0.0)
        parts["record stream"] = end - sent
        parts["total"] = end - start
        parts["other"] = parts["total"] - sum(parts.get(p, 0.0) for p in PARTS if p != "other")
        return parts

    def run_until_idle(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.engine.has_unfinished():
                return
            self.step()
        raise RuntimeError("engine did not finish")


def build_bench(model: LlamaForCausalLM, config: EngineConfig, writer: RecordWriter) -> Bench:
    engine = LLMEngine(model, config, KVCachePool.allocate(kv_spec_for(model, config)), eos_token_ids=(0,))
    timer = StepTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(engine.scheduler, "on_step_done", "schedule")
    timer.wrap(engine.runner, "_prepare", "prepare")
    timer.wrap(engine.runner, "_sample", "sample")
    timer.wrap(model, "forward", "forward")  # paddle's Layer.__call__ looks forward up on the instance
    # Called only inside _sample here (no request asks for prompt logprobs).
    timer.wrap(model, "compute_logits", "lm head")
    return Bench(engine, timer, writer)


def unwrap(model: LlamaForCausalLM) -> None:
    for name in ("forward", "compute_logits"):
        model.__dict__.pop(name, None)


def prompt_windows(tokens: list[int], length: int, count: int) -> list[list[int]]:
    step = max(1, (len(tokens) - length) // max(count, 1))
    return [tokens[i * step: i * step + length] for i in range(count)]


@dataclass(frozen=True)
class Row:
    case: str
    tokens_per_s: float
    step_ms: float
    shares: dict[str, float]  # part -> share of the median step (medians of per-step shares)


def summarize(case: str, samples: list[dict[str, float]], tokens_per_step: int) -> Row:
    step_s = statistics.median(s["total"] for s in samples)
    shares = {p: statistics.median(s.get(p, 0.0) / s["total"] for s in samples) for p in PARTS}
    return Row(case, tokens_per_step / step_s, step_s * 1e3, shares)


def bench_decode(model: LlamaForCausalLM, writer: RecordWriter, prompts: list[list[int]], batch: int,
                 steps: int, logprobs: int | None) -> Row:
    config = EngineConfig(cache=CacheConfig(num_blocks=batch * (128 + steps + 8) // 16 + 16, block_size=16),
                          scheduler=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=batch,
                                                    max_model_len=1024))
    bench = build_bench(model, config, writer)
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    for i in range(batch):
        bench.engine.add_request(f"d{i}", prompts[i % len(prompts)], params)
    scheduler = bench.engine.scheduler
    while scheduler.waiting or any(r.num_output_tokens == 0 for r in scheduler.running):
        bench.step()  # prefill (chunked by the budget) until every request decodes
    for _ in range(2):
        bench.step()  # warm-up decode steps
    samples = [bench.step() for _ in range(steps)]
    bench.run_until_idle()
    unwrap(model)
    label = f"decode batch {batch}" + (f" (logprobs {logprobs})" if logprobs is not None else "")
    return summarize(label, samples, batch)


def bench_prefill(model: LlamaForCausalLM, writer: RecordWriter, prompt: list[int], repeats: int) -> Row:
    config = EngineConfig(cache=CacheConfig(num_blocks=64, block_size=16),
                          scheduler=SchedulerConfig(max_num_batched_tokens=len(prompt), max_model_len=1024))
    bench = build_bench(model, config, writer)
    samples = []
    for i in range(repeats + 1):
        bench.engine.add_request(f"p{i}", prompt, SamplingParams(max_tokens=1, temperature=0.0))
        parts = bench.step()
        assert not bench.engine.has_unfinished(), "the prompt did not prefill in one step"
        if i:  # the first is a warm-up
            samples.append(parts)
    unwrap(model)
    return summarize(f"prefill {len(prompt)} tokens", samples, len(prompt))


def drain(reader: RecordReader) -> None:
    """The node server's side: read every record until the stream is closed."""
    try:
        while True:
            reader.receive()
    except StreamClosed:
        return


def print_table(rows: list[Row]) -> list[str]:
    header = f"| case | tokens/s | step ms | {' | '.join(PARTS)} | overhead outside forward |"
    lines = [header, "|" + " --- |" * (4 + len(PARTS))]
    for r in rows:
        shares = " | ".join(f"{100 * r.shares[p]:.1f}%" for p in PARTS)
        overhead = 100 * (1 - r.shares["forward"])
        lines.append(f"| {r.case} | {r.tokens_per_s:,.0f} | {r.step_ms:.2f} | {shares} | {overhead:.1f}% |")
    print("\n".join(lines))
    return lines


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.5))
    left = np.zeros(len(rows))
    for part in PARTS:
        values = np.array([100 * r.shares[part] for r in rows])
        ax.barh([f"{r.case}\n{r.tokens_per_s:,.0f} tok/s" for r in rows], values, left=left, label=part)
        left += values
    ax.set_xlabel("share of the median step (%)")
    ax.invert_yaxis()
    ax.legend(ncol=3, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--decode-steps", type=int, default=30)
    parser.add_argument("--prefill-repeats", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--cpu-ops", choices=["pdserve", "paddle"], default="pdserve",
                        help="pdserve's CPU ops (packed projections, norms, attention: the default) "
                        "or Paddle's own ops throughout")
    args = parser.parse_args()
    tune_malloc()  # as the engine process does
    model_dir = default_model_dir()
    model = load_model(model_dir, "float32", cpu_fast_path=args.cpu_ops == "pdserve")
    source = (Path(__file__).resolve().parent.parent / "engine" / "scheduler.py").read_text()
    tokens = Tokenizer.from_dir(model_dir).encode(source * 4)
    prompts = prompt_windows(tokens, args.prompt_len, 32)
    rows: list[Row] = []
    with RecordReader() as reader:
        drainer = threading.Thread(target=drain, args=(reader,), daemon=True)
        drainer.start()
        writer = RecordWriter(reader.address)
        try:
            cases: list[Callable[[], Row]] = [
                *(lambda b=b: bench_decode(model, writer, prompts, b, args.decode_steps, None)
                  for b in args.batches),
                lambda: bench_decode(model, writer, prompts, max(args.batches), args.decode_steps, 20),
                lambda: bench_prefill(model, writer, tokens[: args.prefill_len], args.prefill_repeats),
            ]
            for case in cases:
                rows.append(case())
        finally:
            reader.close()  # wakes the drainer
            drainer.join()
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"demo model ({model_dir.name}), fp32, OMP_NUM_THREADS={threads}, "
          f"{args.prompt_len}-token prompts, medians of {args.decode_steps} decode steps / "
          f"{args.prefill_repeats} prefills")
    lines = print_table(rows)
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "engine.md").write_text("\n".join(lines) + "\n")
    plot(rows, OUT_DIR / "engine.png")
    print(f"wrote {OUT_DIR / 'engine.md'} and {OUT_DIR / 'engine.png'}")


if __name__ == "__main__":
    main()
