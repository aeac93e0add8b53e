"""Structured output and tool calling through the official `openai` client against `pdserve up`: a
prefill + decode pair, plain and with the hybrid MTP + n-gram speculative method (real processes).

`parse()` with a pydantic model returns a valid object, json_object output parses, guided_choice and
guided_regex hold, tool_choice required / named return valid calls (streamed too), and a greedy
grammar request's PD output equals a single (mixed) engine's, run here in-process on the same
model as the independent reference.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from pdserve.common.kv_cache import KVCachePool
from pdserve.common.sampling_params import GrammarSpec, SamplingParams
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine, kv_spec_for
from pdserve.engine.grammar import GrammarCompiler
from pdserve.models.loader import default_model_dir, load_model
from pdserve.models.tokenizer import Tokenizer
from pdserve.tests.support.cluster import pdserve_up

MODEL = "pdserve-demo"
HYBRID = ('{"method": "mtp", "num_speculative_tokens": 3, "num_model_steps": 1, '
          '"mtp_strategy": "with_ngram", "max_ngram_size": 3, "min_ngram_size": 1}')
CLUSTERS = {"pd": [], "pd_hybrid": ["--speculative-config", HYBRID]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 999}, "b": {"type": "integer", "minimum": 0,
                                                                      "maximum": 999}},
        "required": ["a", "b"], "additionalProperties": False}}}


class Package(BaseModel):
    name: str = Field(max_length=12)
    version: int = Field(ge=0, le=99)
    kind: Literal["lib", "app"]


@pytest.fixture(scope="module", params=list(CLUSTERS))
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    with pdserve_up("--prefill", "1", "--decode", "1", *CLUSTERS[request.param], "--num-blocks", "256",
                    "--threads-per-node", "1", "--tool-call-parser", "hermes") as (_proc, router_url):
        yield router_url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_parse_with_a_pydantic_model_returns_a_valid_object(client: openai.OpenAI) -> None:
    for temperature in (0.0, 1.0):
        out = client.chat.completions.parse(model=MODEL, messages=_user("Describe a python package as JSON."),
                                            response_format=Package, max_tokens=80, temperature=temperature,
                                            seed=5)
        parsed = out.choices[0].message.parsed
        assert isinstance(parsed, Package), out.choices[0].message.content
        assert out.choices[0].finish_reason == "stop"


def test_json_object_output_parses(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=_user("Give me a JSON object."),
                                         max_tokens=120, temperature=0,
                                         response_format={"type": "json_object"})
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_guided_choice_returns_one_of_the_choices(client: openai.OpenAI) -> None:
    choices = ["True", "False", "None"]
    for seed in range(3):
        out = client.chat.completions.create(model=MODEL, messages=_user("x is"), max_tokens=10,
                                             temperature=1.0, seed=seed,
                                             extra_body={"guided_choice": choices})
        assert out.choices[0].message.content in choices


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_guided_regex_matches(client: openai.OpenAI, stream: bool) -> None:
    pattern = r"def [a-z_]{1,10}\((self)?\):"
    out = client.completions.create(model=MODEL, prompt="class Stack:\n    ", max_tokens=30, temperature=0,
                                    stream=stream, extra_body={"guided_regex": pattern})
    text = "".join(c.choices[0].text for c in out if c.choices) if stream else out.choices[0].text
    assert re.fullmatch(pattern, text), text


def test_tool_choice_required_returns_a_valid_call(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=_user("What is 2 + 3?"), tools=[WEATHER, ADD],
                                         tool_choice="required", max_tokens=80, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice.message
    call = choice.message.tool_calls[0]
    assert call.id and call.type == "function" and call.function.name in ("get_weather", "add")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == ({"city"} if call.function.name == "get_weather" else {"a", "b"})


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_named_tool_choice_returns_a_call_of_that_tool(client: openai.OpenAI, stream: bool) -> None:
    ask = {"model": MODEL, "messages": _user("Weather in Paris?"), "tools": [WEATHER, ADD], "max_tokens": 80,
           "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "temperature": 0}
    if not stream:
        choice = client.chat.completions.create(**ask).choices[0]
        calls, finish = choice.message.tool_calls, choice.finish_reason
        assert choice.message.content is None
    else:
        calls_by_index: dict[int, dict[str, str]] = {}
        finish = None
        for chunk in client.chat.completions.create(**ask, stream=True):
            delta = chunk.choices[0].delta
            assert not delta.content  # nothing of the call leaks as text
            for part in delta.tool_calls or ():
                entry = calls_by_index.setdefault(part.index, {"name": "", "arguments": "", "id": ""})
                entry["id"] += part.id or ""
                entry["name"] += part.function.name or ""
                entry["arguments"] += part.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        calls = [openai.types.chat.ChatCompletionMessageToolCall(
            id=c["id"], type="function", function={"name": c["name"], "arguments": c["arguments"]})
            for c in calls_by_index.values()]
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert set(json.loads(calls[0].function.arguments)) == {"city"}


def test_a_tool_result_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=MODEL, messages=_user("Weather in Oslo?"), tools=[WEATHER],
                                           tool_choice="required", max_tokens=60, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    out = client.chat.completions.create(model=MODEL, tools=[WEATHER], max_tokens=8, temperature=0, messages=[
        *_user("Weather in Oslo?"), first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "rain"}])
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.fixture(scope="module")
def mixed_engine() -> LLMEngine:
    """One engine doing both phases, in this process: the reference a PD cluster must equal."""
    model = load_model(default_model_dir(), "float32")
    config = EngineConfig(CacheConfig(num_blocks=64, block_size=16),
                          SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=4, max_model_len=512),
                          None)
    tokenizer = Tokenizer.from_dir(default_model_dir())
    return LLMEngine(model, config, KVCachePool.allocate(kv_spec_for(model, config)), tokenizer.eos_token_ids,
                     grammars=GrammarCompiler.for_model(default_model_dir(), tokenizer.eos_token_ids,
                                                        model.config.vocab_size))


@pytest.mark.parametrize(("prompt", "field", "value"), [
    ("setup(", "guided_json", Package.model_json_schema()),
    ("def f(x):\n    ", "guided_regex", r"(return|yield) [a-z_]{1,12}(\.[a-z_]{1,8})?"),
])
def test_pd_output_equals_the_mixed_engine_for_greedy_grammar_requests(
        client: openai.OpenAI, mixed_engine: LLMEngine, prompt: str, field: str, value: object) -> None:
    served = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0,
                                       extra_body={field: value})
    tokenizer = Tokenizer.from_dir(default_model_dir())
    spec = (GrammarSpec("json_schema", json.dumps(value)) if field == "guided_json"
            else GrammarSpec("regex", value))
    request_id = f"ref-{field}-{id(client)}"
    mixed_engine.add_request(request_id, tokenizer.encode(prompt),
                             SamplingParams(max_tokens=40, temperature=0.0, seed=0, grammar=spec))
    ids: list[int] = []
    while mixed_engine.has_unfinished():
        ids += [t for o in mixed_engine.step() if o.request_id == request_id for t in o.tokens.token_ids]
    assert served.choices[0].text == tokenizer.decode(ids)
