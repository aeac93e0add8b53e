"""TTFT added by PD disaggregation versus a mixed node, over the shm and the ZMQ transport.

Run: ``OMP_NUM_THREADS=1 python bench/bench_pd.py`` (a script, not a test).

Real processes, started like the integration tests do (tests/support/cluster.py): a prefill
node per transport (``--transport auto``, which picks shm on one host, and ``--transport zmq``), one
decode node, and one mixed node, each with a one-thread engine. TTFT is the time from opening the
gRPC ``Generate`` stream to the first chunk that carries a token, as a router would see it.

Requests run one at a time. Each repetition sends the same fresh prompt (random token ids, so no two
repetitions share a prefix) through every path in turn — PD over shm, PD over zmq, mixed — so load
from other jobs on this shared machine hits all paths alike; tables report medians, the ratio
column is the median of per-repetition ratios, and "paired added - transfer" is the median over
repetitions of PD TTFT - mixed TTFT - KV transfer of the same prompt (issue #13's measure: pairs
taken seconds apart cancel the drift that moves either path's median between runs). The decode
node's split of a PD first token (``GenerateChunk.timing``, measured on the prefill node: queue,
prefill compute, KV transfer) is shown beside it; "other" is the rest of PD TTFT: the reservation on
D, the PrefillTask and FirstToken messages, D's engine taking the request, and the gRPC stream.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pdserve.rpc import node_pb2 as pb
from pdserve.tests.support.cluster import Node, NodeSpec, sampling, start_nodes, stop_nodes, tokenizer

OUT_DIR = Path("bench_out")
PATHS = ("pd shm", "pd zmq", "mixed")
PREFILL_OF = {"pd shm": "prefill_shm", "pd zmq": "prefill_zmq"}
VOCAB_LOW = 10  # stay clear of special tokens (eos is 0) in random prompts


@dataclass
class Sample:
    ttft_s: float
    timing: pb.TimingInfo


@dataclass
class Cell:
    """All repetitions of one prompt length on one path."""

    samples: list[Sample] = field(default_factory=list)

    def median_ms(self, part: str = "ttft") -> float:
        if part == "ttft":
            return statistics.median(s.ttft_s for s in self.samples) * 1000
        if part == "other":
            return statistics.median(s.ttft_s - _split_total(s.timing) for s in self.samples) * 1000
        return statistics.median(getattr(s.timing, f"{part}_s") for s in self.samples) * 1000


def _split_total(t: pb.TimingInfo) -> float:
    return t.queue_s + t.prefill_s + t.transfer_s


def time_to_first_token(node: Node, request_id: str, prompt: list[int],
                        prefill: Node | None) -> Sample:
    request = pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, sampling=sampling(1),
                                 prefill=prefill.target() if prefill is not None else None)
    started = time.perf_counter()
    call = node.stub.Generate(request, timeout=120.0)
    for chunk in call:
        if chunk.tokens.token_ids:
            sample = Sample(time.perf_counter() - started, chunk.timing)
            break
        if chunk.error:
            raise RuntimeError(f"{request_id}: {chunk.error}")
    else:
        raise RuntimeError(f"{request_id}: the stream ended without a token")
    for _ in call:  # drain: max_tokens 1 ends the stream right after
        pass
    return sample


def run_path(nodes: dict[str, Node], path: str, request_id: str, prompt: list[int]) -> Sample:
    if path == "mixed":
        return time_to_first_token(nodes["mixed"], request_id, prompt, None)
    return time_to_first_token(nodes["decode"], request_id, prompt, nodes[PREFILL_OF[path]])


def measure(nodes: dict[str, Node], lengths: list[int], repeats: int,
            vocab_size: int) -> dict[tuple[int, str], Cell]:
    rng = np.random.default_rng(0)
    cells = {(n, p): Cell() for n in lengths for p in PATHS}
    for n in lengths:  # warm-up: first use of each path and length (allocations, connections)
        prompt = rng.integers(VOCAB_LOW, vocab_size, n).tolist()
        for path in PATHS:
            run_path(nodes, path, f"warm-{n}-{path}", prompt)
    for rep in range(repeats):
        for n in lengths:
            prompt = rng.integers(VOCAB_LOW, vocab_size, n).tolist()
            order = PATHS if rep % 2 == 0 else PATHS[::-1]  # alternate who goes first
            for path in order:
                cells[n, path].samples.append(run_path(nodes, path, f"r{rep}-{n}-{path}", prompt))
        print(f"  repetition {rep + 1}/{repeats} done", flush=True)
    return cells


def ratio(cells: dict[tuple[int, str], Cell], n: int, path: str) -> float:
    pd, mixed = cells[n, path].samples, cells[n, "mixed"].samples
    return statistics.median(a.ttft_s / b.ttft_s for a, b in zip(pd, mixed, strict=True))


def paired_added_beyond_transfer_ms(cells: dict[tuple[int, str], Cell], n: int, path: str) -> float:
    pd, mixed = cells[n, path].samples, cells[n, "mixed"].samples
    return statistics.median(a.ttft_s - b.ttft_s - a.timing.transfer_s
                             for a, b in zip(pd, mixed, strict=True)) * 1000


def table(cells: dict[tuple[int, str], Cell], lengths: list[int]) -> list[str]:
    header = ["prompt tokens", "transport", "PD TTFT ms", "mixed TTFT ms", "added ms", "PD/mixed",
              "P queue ms", "P prefill ms", "KV transfer ms", "other ms", "paired added - transfer ms"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for n in lengths:
        mixed = cells[n, "mixed"].median_ms()
        for path in PREFILL_OF:
            cell = cells[n, path]
            pd = cell.median_ms()
            row = [str(n), path.split()[1], f"{pd:.1f}", f"{mixed:.1f}", f"{pd - mixed:+.1f}",
                   f"{ratio(cells, n, path):.2f}", f"{cell.median_ms('queue'):.1f}",
                   f"{cell.median_ms('prefill'):.1f}", f"{cell.median_ms('transfer'):.1f}",
                   f"{cell.median_ms('other'):.1f}",
                   f"{paired_added_beyond_transfer_ms(cells, n, path):+.1f}"]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def plot(cells: dict[tuple[int, str], Cell], lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for name in PATHS:
        left.plot(lengths, [cells[n, name].median_ms() for n in lengths], marker="o", label=name)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("prompt tokens")
    left.set_ylabel("TTFT ms (median)")
    left.set_title("TTFT: PD vs mixed node")
    left.legend()
    left.grid(True, alpha=0.3)
    for color, name in enumerate(PREFILL_OF):  # each path keeps its left-panel colour
        right.plot(lengths, [cells[n, name].median_ms() - cells[n, "mixed"].median_ms() for n in lengths],
                   marker="o", color=f"C{color}", label=f"{name}: added")
        right.plot(lengths, [cells[n, name].median_ms("transfer") for n in lengths], "--", marker=".",
                   color=f"C{color}", label=f"{name}: KV transfer part")
    right.set_xscale("log", base=2)
    right.set_xlabel("prompt tokens")
    right.set_ylabel("ms (median)")
    right.set_title("TTFT added by disaggregation")
    right.axhline(0, color="grey", linewidth=0.5)
    right.legend()
    right.grid(True, alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 128, 512, 1024])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if max(args.lengths) > 1024:
        parser.error("--lengths: at most 1024 (the nodes' default step budget: one prefill step each)")
    specs = [
        NodeSpec("prefill_shm", "prefill", ("--transport", "auto")),
        NodeSpec("prefill_zmq", "prefill", ("--transport", "zmq")),
        NodeSpec("decode", "decode"),
        NodeSpec("mixed", "mixed"),
    ]
    vocab_size = tokenizer().vocab_size
    with tempfile.TemporaryDirectory(prefix="bench_pd-") as log_dir:
        print("starting 2 prefill, 1 decode and 1 mixed node ...", flush=True)
        nodes = start_nodes(specs, Path(log_dir))
        try:
            cells = measure(nodes, args.lengths, args.repeats, vocab_size)
        finally:
            stop_nodes(nodes.values())
    lines = table(cells, args.lengths)
    print("\n".join(lines))
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "pd_ttft.md").write_text("\n".join(lines) + "\n")
    plot(cells, args.lengths, OUT_DIR / "pd_ttft.png")
    print(f"wrote {OUT_DIR / 'pd_ttft.md'} and {OUT_DIR / 'pd_ttft.png'}")


if __name__ == "__main__":
    main()
