"""Structured output's cost on the demo model: the grammar mask per token, and decode tokens/s with and
without a JSON schema at batch 1 and 8, measured side by side (interleaved rounds) in one run.

Run: ``OMP_NUM_THREADS=1 python bench/bench_grammar.py`` (a script, not a test).

- mask: `GrammarMatcher.allowed_tokens()` (llguidance's bitmask for the state, unpacked to the
  `[vocab]` bool row sampling takes) at every state along a JSON document the schema accepts; the
  raw llguidance fill alone is reported beside it.
- decode: B requests (a 15-token prompt, greedy, max_tokens 64) are prefilled, then decode steps are
  timed until every request finished; tokens/s = tokens emitted by those steps / their time. Plain
  requests ignore EOS; JSON requests stop when their document is complete.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from pdserve.common.kv_cache import KVCachePool
from pdserve.common.sampling_params import GrammarSpec, SamplingParams
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine, kv_spec_for
from pdserve.engine.grammar import GrammarCompiler
from pdserve.models.loader import default_model_dir, load_model
from pdserve.models.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "version": {"type": "integer"},
    "files": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 8},
    "license": {"enum": ["MIT", "BSD", "GPL"]}}, "required": ["name", "version", "files", "license"]}
DOCUMENT = {"name": "pdserve", "version": 3, "files": ["router.py", "engine.py", "kernels/sampling.py"],
            "license": "MIT"}
PROMPT = "import json\n\n# the package description, as JSON\nconfig = "
MAX_TOKENS = 64


def mask_costs(compiler: GrammarCompiler, tokenizer: Tokenizer, repeats: int) -> tuple[float, float, int]:
    """(median us of allowed_tokens(), median us of the raw llguidance fill, states measured)."""
    ids = tokenizer.encode(json.dumps(DOCUMENT, separators=(",", ":")))
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    full, raw = [], []
    for _ in range(repeats):
        matcher = compiler.matcher(spec)
        bitmask = allocate_token_bitmask(1, compiler.vocab_size)
        for token in ids:
            start = time.perf_counter()
            matcher.allowed_tokens()
            full.append(time.perf_counter() - start)
            start = time.perf_counter()
            fill_next_token_bitmask(matcher._matcher, bitmask)  # noqa: SLF001 - the library's part alone
            raw.append(time.perf_counter() - start)
            matcher.advance(token)
    return statistics.median(full) * 1e6, statistics.median(raw) * 1e6, len(ids)


def decode_tokens_per_s(engine: LLMEngine, prompt: list[int], batch: int, grammar: GrammarSpec | None,
                        round_id: int) -> float:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, seed=1, grammar=grammar,
                            ignore_eos=grammar is None)
    for i in range(batch):
        engine.add_request(f"r{round_id}-{i}", prompt, params)
    engine.step()  # the prefill step, which also samples each request's first token
    tokens, elapsed = 0, 0.0
    while engine.has_unfinished():
        start = time.perf_counter()
        outputs = engine.step()
        elapsed += time.perf_counter() - start
        tokens += sum(len(o.tokens.token_ids) for o in outputs)
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mask-repeats", type=int, default=20)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_dir(default_model_dir())
    model = load_model(default_model_dir(), "float32")
    compiler = GrammarCompiler.for_model(default_model_dir(), tokenizer.eos_token_ids,
                                         model.config.vocab_size)
    full_us, raw_us, states = mask_costs(compiler, tokenizer, args.mask_repeats)
    print(f"mask per token (vocab {model.config.vocab_size}, {states} states x {args.mask_repeats}): "
          f"allowed_tokens {full_us:.0f} us median, llguidance fill alone {raw_us:.0f} us")
    config = EngineConfig(CacheConfig(num_blocks=128, block_size=16),
                          SchedulerConfig(max_num_batched_tokens=1024, max_num_seqs=8, max_model_len=256),
                          None)
    engine = LLMEngine(model, config, KVCachePool.allocate(kv_spec_for(model, config)),
                       tokenizer.eos_token_ids, grammars=compiler)
    prompt = tokenizer.encode(PROMPT)
    schema = GrammarSpec("json_schema", json.dumps(SCHEMA))
    results: dict[tuple[int, str], list[float]] = {}
    for r in range(args.rounds):  # interleaved: both variants see the same machine load
        for batch in (1, 8):
            for name, grammar in (("plain", None), ("json_schema", schema)):
                rate = decode_tokens_per_s(engine, prompt, batch, grammar, r * 100 + batch * 10 + len(name))
                results.setdefault((batch, name), []).append(rate)
    print("| batch | plain tok/s | JSON schema tok/s | ratio |")
    print("| --- | --- | --- | --- |")
    for batch in (1, 8):
        plain = statistics.median(results[batch, "plain"])
        constrained = statistics.median(results[batch, "json_schema"])
        print(f"| {batch} | {plain:.0f} | {constrained:.0f} | {constrained / plain:.2f} |")


if __name__ == "__main__":
    main()
