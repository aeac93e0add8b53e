"""Grammar-constrained decoding inside one engine, on the bundled demo model: every output belongs to its
grammar and the request stops when the grammar is complete; speculative decoding (each method) gives
the same greedy output as plain decoding, and a request split into a prefill phase and a decode phase
(first token and drafts handed over, KV copied) equals the single-phase run."""

from __future__ import annotations

import json
import re

import pytest

from pdserve.common.kv_cache import KVCachePool
from pdserve.common.sampling_params import GrammarSpec, SamplingParams
from pdserve.common.tokens import SampledTokens
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine, kv_spec_for
from pdserve.engine.grammar import GrammarCompiler
from pdserve.engine.protocol import RequestOutput
from pdserve.engine.request import RequestStatus
from pdserve.engine.scheduler import AdmissionError
from pdserve.engine.spec_config import SpeculativeConfig
from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.loader import default_model_dir
from pdserve.models.tokenizer import Tokenizer

MAX_TOKENS = 40
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12}, "size": {"type": "integer"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "size", "tags"], "additionalProperties": False}
REGEX = r"def [a-z_]{1,12}\((self|x|a, b)\):"
CHOICES = ["return None", "raise ValueError", "pass"]
CASES = {
    "json_schema": ("config = ", GrammarSpec("json_schema", json.dumps(SCHEMA))),
    "json_object": ("data = ", GrammarSpec("json_object")),
    "regex": ("class Stack:\n    ", GrammarSpec("regex", REGEX)),
    "choice": ("def f(x):\n    ", GrammarSpec("choice", json.dumps(CHOICES))),
    "lark": ("x = ", GrammarSpec("lark", 'start: NUM " + " NUM\nNUM: /[0-9]{1,3}/')),
}
METHODS = {
    "mtp": '{"method": "mtp", "num_speculative_tokens": 3}',
    "ngram": '{"method": "ngram", "num_speculative_tokens": 3, "max_ngram_size": 3, "min_ngram_size": 1}',
    "hybrid": '{"method": "mtp", "num_speculative_tokens": 4, "num_model_steps": 1, '
              '"mtp_strategy": "with_ngram"}',
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir())


def make_engine(model: LlamaForCausalLM, spec: str | None, max_num_seqs: int = 8) -> LLMEngine:
    speculative = None if spec is None else SpeculativeConfig.from_json(spec)
    config = EngineConfig(CacheConfig(num_blocks=160, block_size=16),
                          SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=max_num_seqs,
                                          max_model_len=256),
                          speculative)
    pool = KVCachePool.allocate(kv_spec_for(model, config))
    grammars = GrammarCompiler.for_model(default_model_dir(), [0], model.config.vocab_size)
    return LLMEngine(model, config, pool, eos_token_ids=[0], grammars=grammars)


def params(case: str, temperature: float = 0.0, seed: int = 7) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=seed, logprobs=2,
                          grammar=CASES[case][1])


Requests = dict[str, tuple[list[int], SamplingParams]]


def run(engine: LLMEngine, requests: Requests) -> dict[str, list[RequestOutput]]:
    for request_id, (ids, p) in requests.items():
        engine.add_request(request_id, ids, p)
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(len(requests) * (MAX_TOKENS + 2)):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert not engine.has_unfinished()
    return outputs


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.tokens.token_ids]


def check_output(case: str, text: str) -> None:
    if case == "json_schema":
        value = json.loads(text)
        assert set(value) == {"name", "size", "tags"} and isinstance(value["size"], int), text
        assert len(value["name"]) <= 12 and all(t in ("a", "b") for t in value["tags"])
    elif case == "json_object":
        assert isinstance(json.loads(text), dict), text
    elif case == "regex":
        assert re.fullmatch(REGEX, text), text
    elif case == "choice":
        assert text in CHOICES, text
    else:
        assert re.fullmatch(r"[0-9]{1,3} \+ [0-9]{1,3}", text), text


def requests_for(tokenizer: Tokenizer, temperature: float = 0.0) -> Requests:
    return {case: (tokenizer.encode(prompt), params(case, temperature))
            for case, (prompt, _) in CASES.items()}


@pytest.fixture(scope="module")
def baseline(model: LlamaForCausalLM, tokenizer: Tokenizer) -> dict[str, list[RequestOutput]]:
    return run(make_engine(model, None), requests_for(tokenizer))


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_output_follows_the_grammar_and_stops_when_complete(
        baseline: dict[str, list[RequestOutput]], tokenizer: Tokenizer, case: str) -> None:
    outs = baseline[case]
    ids = tokens(outs)
    check_output(case, tokenizer.decode(ids))
    if case != "regex":  # languages where the grammar, not max_tokens, ends the output
        assert outs[-1].status is RequestStatus.FINISHED_STOPPED and len(ids) < MAX_TOKENS


def test_sampled_outputs_follow_the_grammar(model: LlamaForCausalLM, tokenizer: Tokenizer) -> None:
    engine = make_engine(model, None)
    requests = {f"{case}-{seed}": (tokenizer.encode(prompt), params(case, temperature=1.0, seed=seed))
                for case, (prompt, _) in CASES.items() if case != "json_object" for seed in range(3)}
    outputs = run(engine, requests)
    for request_id, outs in outputs.items():
        if outs[-1].status is RequestStatus.FINISHED_STOPPED:
            check_output(request_id.rsplit("-", 1)[0], tokenizer.decode(tokens(outs)))


def test_sampled_speculative_outputs_follow_the_grammar(model: LlamaForCausalLM,
                                                        tokenizer: Tokenizer) -> None:
    """Rejection sampling against the masked distribution: every emitted token obeys the grammar."""
    engine = make_engine(model, METHODS["hybrid"])
    requests = {f"{case}-{seed}": (tokenizer.encode(prompt), params(case, temperature=0.8, seed=seed))
                for case, (prompt, _) in CASES.items() if case != "json_object" for seed in range(2)}
    outputs = run(engine, requests)
    for request_id, outs in outputs.items():
        if outs[-1].status is RequestStatus.FINISHED_STOPPED:
            check_output(request_id.rsplit("-", 1)[0], tokenizer.decode(tokens(outs)))


@pytest.mark.parametrize("method", list(METHODS))
def test_greedy_speculative_equals_plain_decoding_with_grammars(
        model: LlamaForCausalLM, tokenizer: Tokenizer, baseline: dict[str, list[RequestOutput]],
        method: str) -> None:
    outputs = run(make_engine(model, METHODS[method]), requests_for(tokenizer))
    assert sum(o.num_accepted_drafts for outs in outputs.values() for o in outs) > 0  # drafts were accepted
    for case, expected in baseline.items():
        assert tokens(outputs[case]) == tokens(expected), (method, case)
        assert outputs[case][-1].status == expected[-1].status


def test_prefill_and_decode_phases_equal_the_single_phase_run(
        model: LlamaForCausalLM, tokenizer: Tokenizer, baseline: dict[str, list[RequestOutput]]) -> None:
    spec = METHODS["hybrid"]
    engine = make_engine(model, spec)
    pool = engine.runner.kv_pool
    for case, (ids, p) in requests_for(tokenizer).items():
        engine.add_prefill_request(f"p-{case}", ids, p)
        first = prefilled = None
        for _ in range(4):
            first = next((o for o in engine.step() if o.request_id == f"p-{case}"), None)
            progressed = engine.take_prefill_progress()
            prefilled = next((r for r in progressed if r.request_id == f"p-{case}"), prefilled)
            if first is not None:
                break
        assert first is not None and first.status is RequestStatus.FINISHED_PREFILLED
        decode = engine.reserve(f"d-{case}", ids, p, num_extra_tokens=5)
        num_blocks = -(-len(ids) // pool.spec.block_size)
        src, dst = prefilled.block_table[:num_blocks], decode.block_table[:num_blocks]
        pool.array[:, :, dst] = pool.array[:, :, src]
        engine.release(f"p-{case}")
        outs = [engine.on_remote_kv(f"d-{case}", first.tokens, first.draft_token_ids)]
        for _ in range(MAX_TOKENS + 2):
            if not engine.has_unfinished():
                break
            outs.extend(o for o in engine.step() if o.request_id == f"d-{case}")
        assert tokens(outs) == tokens(baseline[case]), case


def test_a_first_token_outside_the_grammar_fails_the_decode_side(model: LlamaForCausalLM,
                                                                  tokenizer: Tokenizer) -> None:
    engine = make_engine(model, None)
    ids = tokenizer.encode("x = ")
    p = params("choice")
    engine.reserve("d", ids, p, num_extra_tokens=1)
    bad = tokenizer.encode("import")[0]  # no choice starts with it
    out = engine.on_remote_kv("d", SampledTokens([bad]))
    assert out.status is RequestStatus.FINISHED_ERROR and "grammar" in out.error
    assert not out.tokens.token_ids and not engine.has_unfinished()


def test_a_grammar_llguidance_refuses_is_an_admission_error(model: LlamaForCausalLM,
                                                            tokenizer: Tokenizer) -> None:
    engine = make_engine(model, None)
    with pytest.raises(AdmissionError, match="regex"):
        engine.add_request("bad", tokenizer.encode("x"), SamplingParams(grammar=GrammarSpec("regex", "a(b")))
    assert not engine.has_unfinished()


@pytest.mark.parametrize("case", ["json_schema", "regex"])
@pytest.mark.parametrize("split", [1, 5])
def test_a_migrated_continuation_resumes_the_grammar_where_the_outputs_left_it(
        model: LlamaForCausalLM, tokenizer: Tokenizer, baseline: dict[str, list[RequestOutput]],
        case: str, split: int) -> None:
    """A continuation (the prompt + the first `split` outputs, resumed_output_tokens=split) produces the
    rest of the single run's output: its matcher starts past the resumed outputs, not at the start."""
    prompt = tokenizer.encode(CASES[case][0])
    expected = tokens(baseline[case])
    p = params(case)
    resumed = SamplingParams(max_tokens=p.max_tokens - split, temperature=p.temperature, seed=p.seed,
                             logprobs=p.logprobs, grammar=p.grammar, resumed_output_tokens=split)
    outputs = run(make_engine(model, None), {"c": ([*prompt, *expected[:split]], resumed)})
    assert tokens(outputs["c"]) == expected[split:]
    assert outputs["c"][-1].status == baseline[case][-1].status


def test_resumed_outputs_outside_the_grammar_are_an_admission_error(model: LlamaForCausalLM,
                                                                     tokenizer: Tokenizer) -> None:
    engine = make_engine(model, None)
    outside = tokenizer.encode("import")  # no choice starts with it
    resumed = SamplingParams(max_tokens=8, grammar=CASES["choice"][1], resumed_output_tokens=len(outside))
    with pytest.raises(AdmissionError, match="grammar"):
        engine.add_request("c", [*tokenizer.encode("x = "), *outside], resumed)
    assert not engine.has_unfinished()
