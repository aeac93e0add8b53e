"""OpenAPI-driven fuzz of the router: for any request body, no 5xx, and every 4xx carries the OpenAI
error body. Field names come from the router's own /openapi.json; values are arbitrary JSON (and
non-JSON: NaN, raw bytes), mixed into otherwise valid requests so that deep validation paths run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.router.config import HealthConfig, RegistryConfig, RouterConfig
from pdserve.router.server import BackgroundRouter
from pdserve.tests.support.secret import TEST_SECRET
from pdserve.tests.support.stub_node import StubBehavior, StubNodeServer, register_with_router

MODEL = "pdserve-demo"
ENDPOINTS = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest",
             "/tokenize": "TokenizeRequest", "/detokenize": "DetokenizeRequest"}
VALID = {
    "/v1/completions": {"model": MODEL, "prompt": "def f(", "max_tokens": 2},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 2},
    "/tokenize": {"prompt": "def f("},
    "/detokenize": {"tokens": [5, 6]},
}
# the fields this fuzz must reach (it fails if the schema stops declaring them)
NEW_FIELDS = {"/v1/completions": {"n", "best_of", "logit_bias", "max_completion_tokens", "prompt"},
              "/v1/chat/completions": {"n", "logit_bias", "max_completion_tokens", "response_format", "tools",
                                       "tool_choice", "parallel_tool_calls", "guided_json", "guided_regex",
                                       "guided_choice", "guided_grammar"},
              "/tokenize": {"prompt", "messages", "add_special_tokens", "return_token_strs"},
              "/detokenize": {"tokens"}}
FUZZ_SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, -1, 20, 21, 2048, 2**32, 0.5, 2.5]),
    st.text(max_size=40), st.sampled_from(["", "user", "text", MODEL, "\x00", "\ud7ff", "\ud800"]),
)
# values aimed at the new fields' edges, drawn besides arbitrary JSON
FIELD_VALUES = {
    "n": st.integers(min_value=-2, max_value=200),
    "best_of": st.integers(min_value=-2, max_value=200),
    "max_completion_tokens": st.integers(min_value=-2, max_value=5000),
    "logit_bias": st.dictionaries(st.one_of(st.integers(min_value=-5, max_value=2**40).map(str),
                                            st.text(max_size=8)),
                                  st.one_of(st.floats(allow_nan=False), st.integers(-200, 200)), max_size=5),
    "prompt": st.one_of(st.lists(st.text(max_size=8), max_size=5),
                        st.lists(st.lists(st.integers(min_value=-1, max_value=70000), max_size=4),
                                 max_size=4)),
    "tokens": st.lists(st.integers(min_value=-1, max_value=2**33), max_size=6),
}
# structured output and tools: schemas, patterns and grammars llguidance accepts or refuses
schemas = st.one_of(
    st.sampled_from([{"type": "object"}, {"type": "string", "maxLength": 3}, {"type": "no-such-type"},
                     {"enum": []}, {"$ref": "#/missing"}, {"type": "integer", "minimum": 5, "maximum": 1},
                     {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "number"}}}},
                     {"anyOf": [{"type": "null"}, {"const": 1}]}, {"pattern": "(", "type": "string"}]),
    st.dictionaries(st.sampled_from(["type", "properties", "items", "enum", "required", "x"]), json_scalars,
                    max_size=3))
STRUCTURED_VALUES = {
    "guided_json": st.one_of(schemas, schemas.map(json.dumps), st.text(max_size=12)),
    "guided_regex": st.one_of(st.sampled_from(["[0-9]+", "a(b", "(?P<x>a)", "\\", "a{2,1}", "^$", ".*"]),
                              st.text(max_size=10)),
    "guided_choice": st.lists(st.text(max_size=6), max_size=4),
    "guided_grammar": st.one_of(st.sampled_from(['start: "a"+', "start: undefined", "x", 'start: %json {}']),
                                st.text(max_size=12)),
    "response_format": st.one_of(
        st.sampled_from([{"type": "json_object"}, {"type": "text"}, {"type": "json_schema"},
                         {"type": "xml"}]),
        st.builds(lambda s, strict: {"type": "json_schema", "json_schema": {"name": "x", "schema": s,
                                                                            "strict": strict}},
                  schemas, st.booleans())),
    "tools": st.lists(st.builds(lambda name, params: {"type": "function",
                                                      "function": {"name": name, "parameters": params}},
                                st.sampled_from(["f", "get_weather", "", "bad name", "x" * 70]), schemas),
                      max_size=3),
    "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required", "any"]),
                             st.builds(lambda n: {"type": "function", "function": {"name": n}},
                                       st.sampled_from(["f", "get_weather", "missing"]))),
    "parallel_tool_calls": st.booleans(),
}
FIELD_VALUES.update(STRUCTURED_VALUES)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)


@pytest.fixture(scope="module")
def router() -> Iterator[tuple[BackgroundRouter, dict[str, list[str]]]]:
    # Neither health checks nor the registry's TTL may drop the one node (registered once, with no
    # heartbeats) while this busy machine runs the fuzz for minutes: 5xx here would mean "no
    # capacity", which is not what the fuzz looks for.
    config = RouterConfig(port=0, model_name=MODEL, health=HealthConfig(interval_s=1.0, timeout_s=5.0,
                                                                        eject_after=100),
                          registry=RegistryConfig(heartbeat_ttl_s=3600.0), tool_call_parser="hermes",
                          cluster_secret=TEST_SECRET)
    with StubNodeServer("fuzz-0", behavior=StubBehavior(tokens=2)) as node, BackgroundRouter(config) as r:
        register_with_router(r.url, node.info(capacity=64))
        schema = httpx.get(r.url + "/openapi.json").json()["components"]["schemas"]
        fields = {path: sorted(schema[name]["properties"]) for path, name in ENDPOINTS.items()}
        assert all(NEW_FIELDS[path] <= set(fields[path]) for path in ENDPOINTS)
        nested = [name for name in ("ChatMessage", "StreamOptions", "ContentPart") if name in schema]
        assert len(nested) == 3 and "messages" in fields["/v1/chat/completions"]
        yield r, fields


def _check(response: httpx.Response, streaming: bool) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    elif streaming and response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]")


def _post(url: str, content: bytes) -> httpx.Response:
    return httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=10)


@FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_valid_requests_never_5xx(router: tuple[BackgroundRouter, dict[str, list[str]]],
                                          data: st.DataObject) -> None:
    r, fields = router
    path = data.draw(st.sampled_from(sorted(ENDPOINTS)))
    body: dict[str, Any] = dict(VALID[path])
    names = data.draw(st.lists(st.sampled_from(fields[path] + ["unknown_field"]), min_size=1, max_size=4))
    for name in names:
        body[name] = data.draw(st.one_of(json_values, FIELD_VALUES[name]) if name in FIELD_VALUES
                               else json_values)
    if data.draw(st.booleans()) and "messages" in body and isinstance(body["messages"], list):
        body["messages"] = [data.draw(st.dictionaries(st.sampled_from(["role", "content", "name", "x"]),
                                                      json_values, max_size=3))]
    content = json.dumps(body, allow_nan=False).encode()
    _check(_post(r.url + path, content), streaming=body.get("stream") is True)


@FUZZ_SETTINGS
@given(data=st.data())
def test_structured_output_and_tool_fields_never_5xx(router: tuple[BackgroundRouter, dict[str, list[str]]],
                                                     data: st.DataObject) -> None:
    r, _ = router
    path = data.draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    body: dict[str, Any] = dict(VALID[path])
    allowed = sorted(STRUCTURED_VALUES) if path.endswith("chat/completions") else [
        name for name in sorted(STRUCTURED_VALUES) if name.startswith("guided_")]
    for name in data.draw(st.lists(st.sampled_from(allowed), min_size=1, max_size=3)):
        body[name] = data.draw(STRUCTURED_VALUES[name])
    body["stream"] = data.draw(st.booleans())
    _check(_post(r.url + path, json.dumps(body).encode()), streaming=body["stream"])


@FUZZ_SETTINGS
@given(path=st.sampled_from(sorted(ENDPOINTS)), value=json_values)
def test_any_json_document_never_5xx(router: tuple[BackgroundRouter, dict[str, list[str]]], path: str,
                                     value: object) -> None:
    r, _ = router
    _check(_post(r.url + path, json.dumps(value).encode()), streaming=False)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(sorted(ENDPOINTS)), raw=st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b'{"model": "pdserve-demo", "prompt": "x", "temperature": NaN}',
                     b'{"model": "pdserve-demo", "prompt": "x", "top_p": Infinity}',
                     b'{"model": "pdserve-demo", "prompt": "x", "max_tokens": 1e400}',
                     b'{"model": "pdserve-demo", "prompt": "\\ud800"}', b"", b"[]", b"null"])))
def test_non_json_bodies_never_5xx(router: tuple[BackgroundRouter, dict[str, list[str]]], path: str,
                                   raw: bytes) -> None:
    r, _ = router
    _check(_post(r.url + path, raw), streaming=False)
