"""Speculative decoding on the demo model: acceptance and decode speedup per method, side by side.

Run: ``OMP_NUM_THREADS=1 python bench/bench_spec.py`` (a script, not a test).

For each prompt set (code completion, chat-like prose) and batch size (1, 16), the plain engine and
every speculative method generate the same greedy continuations in one process, one after another.
TPOT is, per request, (time of its last token - time of its first token) / (tokens - 1). Batch 1 and
batch 16 use the same 16 prompts of a set (batch 1 one request at a time). The host is shared, so
every configuration runs `--repeats` times, plain and speculative runs interleaved (at batch 1 per
prompt: plain, then each method, on the same prompt, then the next prompt). A repeat's TPOT is the
median over its 16 requests, and the table shows the median over repeats; speedup = TPOT plain /
TPOT spec. The last column does the same with the mean over requests instead of the median (and
gives the range of its per-repeat ratios): with
equal token counts that is total decode time over total tokens, where the requests that accept
little weigh more than in the median. `--clock cpu` stamps tokens with the engine thread's CPU time
instead of the wall clock (the engine runs single-threaded in this process), which leaves out the
time other jobs on a busy host take the core away. Average accept length and the
acceptance per draft position are FastDeploy's speculate_metrics over all requests of a repeat.
Writes bench_out/spec.md (the table) and bench_out/spec.png.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pdserve.common.kv_cache import KVCachePool
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.spec_metrics import SpeculateMetrics
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine, kv_spec_for
from pdserve.engine.spec_config import SpeculativeConfig
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.loader import default_model_dir, load_model
from pdserve.models.tokenizer import Tokenizer

CODE_PROMPTS = [
    "import os\nimport sys\n\n\ndef main(",
    "class Stack:\n    def __init__(self):\n        self.",
    "def read_lines(path):\n    with open(path) as f:\n        ",
    "for key, value in sorted(",
    "    def __repr__(self):\n        return '%s(%r)' % (",
    "try:\n    import _thread\nexcept ImportError:\n    ",
    "def test_basic(self):\n        self.assertEqual(",
    "if __name__ == '__main__':\n    ",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n",
    "    @property\n    def name(self):\n        ",
    'class Error(Exception):\n    """Base class',
    "import unittest\nfrom test import support\n\n\nclass ",
    "        if not isinstance(other, ",
    "    raise ValueError('invalid ",
    "def _check(self, value):\n        if ",
    "with self.assertRaises(",
]
CHAT_PROMPTS = [
    "Hello! Can you tell me how",
    "The weather today is",
    "Please explain why the sky",
    "My favourite book is",
    "Write a short story about a",
    "What is the capital of",
    "I think that the best way to learn",
    "Thank you for your help with",
    "Could you summarize the following",
    "Once upon a time there",
    "The meeting is scheduled for",
    "Why do cats like to",
    "Here is a recipe for",
    "In my opinion, the",
    "Dear team, I wanted to",
    "The history of the Roman",
]
METHODS = {
    "mtp s=1": '{"method": "mtp", "num_speculative_tokens": 1}',
    "mtp s=3": '{"method": "mtp", "num_speculative_tokens": 3}',
    "ngram k=5": '{"method": "ngram", "num_speculative_tokens": 5, "max_ngram_size": 5, "min_ngram_size": 1}',
    "hybrid s=1 k=5": '{"method": "mtp", "num_speculative_tokens": 5, "num_model_steps": 1, '
    '"mtp_strategy": "with_ngram", "min_ngram_size": 1}',
}

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


@dataclass(frozen=True)
class RunResult:
    tpots_ms: list[float]  # one per request
    step_lengths: list[int]  # tokens emitted per decode step, every request's (after its first token)


def run(
    model: LlamaForCausalLM,
    prompts: list[list[int]],
    spec: SpeculativeConfig | None,
    batch: int,
    max_tokens: int,
    clock: Callable[[], float] = time.perf_counter,
) -> RunResult:
    config = EngineConfig(
        CacheConfig(num_blocks=512, block_size=16),
        SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=batch, max_model_len=512),
        spec,
    )
    engine = LLMEngine(model, config, KVCachePool.allocate(kv_spec_for(model, config)), eos_token_ids=[])
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, seed=0)
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, params)
    times: dict[str, list[float]] = {}
    counts: dict[str, list[int]] = {}
    while engine.has_unfinished():
        outputs = engine.step()
        now = clock()
        for out in outputs:
            if out.tokens.token_ids:
                times.setdefault(out.request_id, []).append(now)
                counts.setdefault(out.request_id, []).append(len(out.tokens.token_ids))
    tpots = [(t[-1] - t[0]) / (sum(counts[r]) - counts[r][0]) * 1e3 for r, t in times.items()]
    steps = [n for c in counts.values() for n in c[1:]]
    return RunResult(tpots, steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration, interleaved")
    parser.add_argument("--sets", nargs="+", default=["code", "chat"], choices=["code", "chat"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--cpu-ops", choices=["pdserve", "paddle"], default="pdserve",
                        help="pdserve's CPU ops (packed projections, norms, attention: the default) "
                        "or Paddle's own ops throughout")
    args = parser.parse_args()
    model = load_model(default_model_dir(), "float32", cpu_fast_path=args.cpu_ops == "pdserve")
    tokenizer = Tokenizer.from_dir(default_model_dir())
    sets = {"code": CODE_PROMPTS, "chat": CHAT_PROMPTS}
    rows = []
    header = (
        "| prompts | batch | method | avg accept len | acceptance per position | TPOT plain ms "
        "| TPOT spec ms | speedup | per-repeat speedups (min-max) | speedup of mean TPOT (per repeat) |"
    )
    print(header)
    print("|" + "---|" * 10)
    for set_name in args.sets:
        prompts = [tokenizer.encode(t) for t in sets[set_name]]
        for batch in args.batches:
            run(model, prompts[:1], None, batch, 8)  # warm-up
            configs = {"plain": None} | {m: SpeculativeConfig.from_json(METHODS[m]) for m in args.methods}
            # Per configuration, per repeat: every request's TPOT and decode step lengths.
            tpots: dict[str, list[list[float]]] = {name: [] for name in configs}
            steps: dict[str, list[int]] = {name: [] for name in configs}
            # At batch 1 the configurations take turns on each prompt, so the two runs of a ratio
            # are a second apart and share the host's load; a batch runs its prompts together.
            units = [[p] for p in prompts] if batch == 1 else [prompts]
            for repeat in tqdm(range(args.repeats), desc=f"{set_name} batch {batch}", leave=False):
                for name in configs:
                    tpots[name].append([])
                for unit in units:
                    for name, spec in configs.items():
                        result = run(model, unit, spec, batch, args.max_tokens, CLOCKS[args.clock])
                        tpots[name][-1].extend(result.tpots_ms)
                        if repeat == 0:  # greedy: every repeat accepts the same drafts
                            steps[name].extend(result.step_lengths)
            plain_medians = [statistics.median(t) for t in tpots["plain"]]
            plain_means = [statistics.mean(t) for t in tpots["plain"]]
            for name in args.methods:
                m = SpeculateMetrics.from_step_lengths(steps[name], configs[name].num_speculative_tokens)
                medians = [statistics.median(t) for t in tpots[name]]
                means = [statistics.mean(t) for t in tpots[name]]
                per_pos = "/".join(f"{r:.2f}" for r in m.accept_ratio_per_head)
                speedup = statistics.median(plain_medians) / statistics.median(medians)
                mean_speedup = statistics.median(plain_means) / statistics.median(means)
                # Repeat i of plain and of the method ran interleaved: their ratio shares the host's
                # load of that moment, so the spread of these ratios is the noise band.
                pairs = [p / r for p, r in zip(plain_medians, medians, strict=True)]
                mean_pairs = [p / r for p, r in zip(plain_means, means, strict=True)]
                line = (
                    f"| {set_name} | {batch} | {name} | {m.average_accept_length:.2f} | {per_pos} | "
                    f"{statistics.median(plain_medians):.2f} | {statistics.median(medians):.2f} | "
                    f"{speedup:.2f}x | {min(pairs):.2f}-{max(pairs):.2f}x | {mean_speedup:.2f}x "
                    f"({min(mean_pairs):.2f}-{max(mean_pairs):.2f}x) |"
                )
                print(line, flush=True)
                rows.append((set_name, batch, name, speedup, line))
    args.out.mkdir(exist_ok=True)
    (args.out / "spec.md").write_text("\n".join([header, "|" + "---|" * 10, *(r[-1] for r in rows)]) + "\n")
    _plot(rows, args.out / "spec.png")


def _plot(rows: list[tuple[str, int, str, float, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r[0], r[1]) for r in rows))
    names = list(dict.fromkeys(r[2] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [next(r[3] for r in rows if (r[0], r[1], r[2]) == (s, b, name)) for s, b in groups]
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], [f"{s}, batch {b}" for s, b in groups])
    ax.set_ylabel("decode speedup (TPOT plain / spec)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
