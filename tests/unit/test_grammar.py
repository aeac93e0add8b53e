"""The glue between llguidance and sampling: grammar specs, the matcher's masks (draft rows included),
the mask in the sampling kernels and in verification, the router's checks of structured-output and
tool fields, and the hermes tool-call parser."""

from __future__ import annotations

import json

import numpy as np
import paddle
import pytest

from pdserve.common.sampling_params import GrammarSpec, SamplingParams, SamplingParamsError
from pdserve.engine.grammar import GrammarCompiler
from pdserve.kernels.sampling import SamplingBatch, SamplingRow, is_plain_greedy, sample
from pdserve.kernels.spec_verify import verify_drafts
from pdserve.models.loader import default_model_dir
from pdserve.models.tokenizer import Tokenizer
from pdserve.router.errors import APIError
from pdserve.router.prepare import Preparer
from pdserve.router.protocol import ChatCompletionRequest, CompletionRequest
from pdserve.router.tool_calls import HermesToolParser

VOCAB = 8192
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir())


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    return GrammarCompiler.for_model(default_model_dir(), [0], VOCAB)


@pytest.mark.parametrize(("kind", "text", "match"), [
    ("yaml", "", "kind"), ("json_schema", "{not json", "JSON"), ("json_schema", "[1]", "schema"),
    ("choice", "[]", "list of strings"), ("choice", '["a", 1]', "list of strings"), ("regex", "", "empty"),
    ("json_object", "{}", "empty"),
])
def test_bad_grammar_specs_are_refused_naming_the_problem(kind: str, text: str, match: str) -> None:
    with pytest.raises(SamplingParamsError, match=match):
        GrammarSpec(kind, text)


def test_allowed_tokens_of_draft_rows_are_the_states_after_the_drafts(compiler: GrammarCompiler,
                                                                       tokenizer: Tokenizer) -> None:
    spec = GrammarSpec("regex", r"def [a-z]+\(x\):")
    ids = tokenizer.encode("def foo(x):")
    matcher = compiler.matcher(spec)
    matcher.advance(ids[0])
    drafts = [*ids[1:3], tokenizer.encode("!")[0], ids[3]]  # the third draft breaks the grammar
    assert matcher.valid_prefix(drafts) == 2
    rows = matcher.allowed_tokens(drafts)
    assert rows.shape == (5, VOCAB)
    for j in range(3):  # each against a fresh matcher fed the same tokens
        fresh = compiler.matcher(spec)
        for t in [ids[0], *drafts[:j]]:
            fresh.advance(t)
        np.testing.assert_array_equal(rows[j], fresh.allowed_tokens()[0])
    assert not rows[2][drafts[2]]  # the refused draft's own row refuses it: verification cuts there
    np.testing.assert_array_equal(matcher.allowed_tokens()[0], rows[0])  # rolled back: state unchanged
    assert 0 < rows[0].sum() < VOCAB


def test_a_complete_choice_finishes_the_matcher(compiler: GrammarCompiler, tokenizer: Tokenizer) -> None:
    matcher = compiler.matcher(GrammarSpec("choice", json.dumps(["yes", "no"])))
    for t in tokenizer.encode("yes"):
        matcher.advance(t)
    assert matcher.is_finished


def _row(params: SamplingParams, allowed: np.ndarray | None, outputs: int = 0) -> SamplingRow:
    return SamplingRow(params, 1, np.zeros(1, np.int64), np.zeros(outputs, np.int64), (0,), allowed)


def test_the_mask_rules_greedy_and_sampled_draws() -> None:
    rng = np.random.default_rng(0)
    logits = paddle.to_tensor(rng.normal(size=(3, 64)).astype(np.float32))
    allowed = np.zeros(64, dtype=bool)
    allowed[[5, 17, 40]] = True
    greedy = SamplingParams(temperature=0.0, grammar=GrammarSpec("regex", "a"))
    assert not is_plain_greedy(greedy, 5, ())
    rows = [_row(greedy, allowed), _row(SamplingParams(temperature=1.5, seed=1), allowed), _row(greedy, None)]
    batch = SamplingBatch.from_rows(rows, 64)
    tokens = sample(logits, batch).numpy()
    raw = logits.numpy()
    assert tokens[0] == [5, 17, 40][int(np.argmax(raw[0, [5, 17, 40]]))]
    assert tokens[1] in (5, 17, 40)
    assert tokens[2] == int(np.argmax(raw[2]))  # a row without a grammar is untouched
    for seed in range(20):  # sampled draws never leave the mask
        row = SamplingRow(SamplingParams(temperature=2.0, seed=seed), seed, np.zeros(1, np.int64),
                          np.zeros(0, np.int64), (), allowed)
        assert sample(logits[:1], SamplingBatch.from_rows([row], 64)).numpy()[0] in (5, 17, 40)


def test_min_tokens_gives_way_when_the_grammar_allows_only_the_end() -> None:
    only_eos = np.zeros(64, dtype=bool)
    only_eos[0] = True
    params = SamplingParams(temperature=0.0, min_tokens=5, grammar=GrammarSpec("regex", "a"))
    logits = paddle.to_tensor(np.random.default_rng(1).normal(size=(1, 64)).astype(np.float32))
    assert sample(logits, SamplingBatch.from_rows([_row(params, only_eos)], 64)).numpy()[0] == 0


def test_verification_rejects_a_draft_outside_its_row_mask() -> None:
    logits = np.full((3, 16), -5.0, dtype=np.float32)
    logits[:, 3] = 5.0  # the unconstrained argmax everywhere, drafted twice
    logits[:, 7] = 1.0
    masks = np.ones((3, 16), dtype=bool)
    masks[1, 3] = False  # after the first draft the grammar refuses token 3
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, seed=3, grammar=GrammarSpec("regex", "a"))
        rows = [SamplingRow(params, 3, np.zeros(1, np.int64), np.asarray([3] * j, np.int64), (), masks[j])
                for j in range(3)]
        batch = SamplingBatch.from_rows(rows, 16)
        verified = verify_drafts(paddle.to_tensor(logits), batch, [(3, 3)], [None])
        assert verified.num_accepted_drafts == [1] and verified.token_ids[0][0] == 3
        assert verified.token_ids[0][1] != 3


# ---- router: structured-output and tool fields

@pytest.fixture()
def preparer(tokenizer: Tokenizer) -> Preparer:
    return Preparer(tokenizer, "demo", max_model_len=2048, tool_call_parser=HermesToolParser())


def _chat(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **kw})


@pytest.mark.parametrize(("body", "kind"), [
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "integer"}}}}, "json_schema"),
    ({"guided_json": '{"type": "string"}'}, "json_schema"),
    ({"guided_regex": "[0-9]+"}, "regex"),
    ({"guided_choice": ["a", "b"]}, "choice"),
    ({"guided_grammar": 'start: "x"'}, "lark"),
    ({"response_format": {"type": "json_object"}}, "json_object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"},
                                                                 "strict": True}}}, "json_schema"),
    ({"response_format": {"type": "text"}}, None),
])
def test_structured_output_fields_become_the_requests_grammar(preparer: Preparer, body: dict,
                                                              kind: str | None) -> None:
    (p,) = preparer.chat(_chat(**body)).choices
    assert (p.sampling.grammar.kind if p.sampling.grammar else None) == kind
    assert (p.to_proto().sampling.grammar.kind if kind else not p.to_proto().sampling.HasField("grammar"))
    if "guided_choice" in body or "guided_regex" in body:
        req = CompletionRequest.model_validate({"prompt": "x", **body})
        assert preparer.completion(req).choices[0].sampling.grammar.kind == kind


@pytest.mark.parametrize(("body", "param"), [
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_json": {"type": "no-such-type"}}, "guided_json"),
    ({"guided_json": "{broken"}, "guided_json"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
])
def test_bad_structured_output_is_a_400_naming_the_field(preparer: Preparer, body: dict, param: str) -> None:
    with pytest.raises(APIError) as info:
        preparer.chat(_chat(**body))
    assert (info.value.status, info.value.param) == (400, param), info.value.message


def test_tools_without_a_parser_are_refused(tokenizer: Tokenizer) -> None:
    with pytest.raises(APIError) as info:
        Preparer(tokenizer, "demo", max_model_len=256).chat(_chat(tools=TOOLS))
    assert (info.value.status, info.value.param) == (400, "tools") and "parser" in info.value.message


def test_tools_are_rendered_and_forced_calls_get_a_grammar(preparer: Preparer, tokenizer: Tokenizer) -> None:
    (auto,) = preparer.chat(_chat(tools=TOOLS)).choices
    assert '"get_weather"' in auto.prompt_text and auto.sampling.grammar is None and auto.tool_parser
    (single,) = preparer.chat(_chat(tools=TOOLS, parallel_tool_calls=False)).choices
    assert single.max_tool_calls == 1 and auto.max_tool_calls is None
    (none,) = preparer.chat(_chat(tools=TOOLS, tool_choice="none")).choices
    assert "get_weather" not in none.prompt_text and none.tool_parser is None
    (named,) = preparer.chat(_chat(tools=TOOLS, tool_choice={"type": "function",
                                                            "function": {"name": "add"}})).choices
    compiler = GrammarCompiler.for_model(default_model_dir(), [0], VOCAB)
    matcher = compiler.matcher(named.sampling.grammar)
    good = '<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>'
    ids = tokenizer.encode(good)
    assert matcher.valid_prefix(ids) == len(ids)
    wrong = tokenizer.encode('<tool_call>\n{"name":"get_weather"')
    assert compiler.matcher(named.sampling.grammar).valid_prefix(wrong) < len(wrong)
    parsed = HermesToolParser().parse(good)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("add", {"a": 1, "b": 2})]


def test_earlier_tool_calls_and_results_reach_the_template(preparer: Preparer) -> None:
    (p,) = preparer.chat(ChatCompletionRequest.model_validate({"tools": TOOLS, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"}]})).choices
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert call in p.prompt_text
    assert "<|im_start|>tool\nrain<|im_end|>" in p.prompt_text


def test_hermes_parser_keeps_malformed_calls_as_content_and_streams_only_safe_text() -> None:
    parser = HermesToolParser()
    text = ('Sure. <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>{bad</tool_call>')
    parsed = parser.parse(text)
    assert [c.name for c in parsed.tool_calls] == ["f"]
    assert parsed.content == "Sure. \n<tool_call>{bad</tool_call>"
    assert len({c.id for c in parser.parse(text).tool_calls + parsed.tool_calls}) == 2  # fresh ids
    assert parser.parse("no calls here").tool_calls == ()
    two = text.replace("{bad", '{"name": "g", "arguments": {}}')
    assert [c.name for c in parser.parse(two).tool_calls] == ["f", "g"]
    first_only = parser.parse(two, max_calls=1)  # parallel_tool_calls false
    assert [c.name for c in first_only.tool_calls] == ["f"] and '"g"' in first_only.content
    assert parser.content_prefix_len("hello <tool_c") == len("hello ")
    assert parser.content_prefix_len("hello <tool_call>{") == len("hello ")
    assert parser.content_prefix_len("a < b") == len("a < b")
