"""Request validation and tokenization at the router (the bundled demo tokenizer, no sockets)."""

from __future__ import annotations

import pytest

from pdserve.models.tokenizer import Tokenizer
from pdserve.router.config import default_model_dir
from pdserve.router.errors import APIError
from pdserve.router.prepare import Preparer, model_max_len
from pdserve.router.protocol import ChatCompletionRequest, CompletionRequest

MODEL = "demo"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir())


@pytest.fixture()
def preparer(tokenizer: Tokenizer) -> Preparer:
    return Preparer(tokenizer, MODEL, max_model_len=64)


def _completion(**kw: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": MODEL, "prompt": "def f(x):", **kw})


def test_model_max_len_reads_the_demo_config() -> None:
    assert model_max_len(default_model_dir()) == 2048


def test_completion_tokenizes_once_and_maps_sampling(preparer: Preparer, tokenizer: Tokenizer) -> None:
    (p,) = preparer.completion(_completion(max_tokens=5, temperature=0.0, top_k=-1, stop="\n", seed=3,
                                           logprobs=2, echo=True)).choices
    assert p.prompt_token_ids == tokenizer.encode("def f(x):")
    assert p.prompt_text == "def f(x):" and p.echo
    s = p.sampling
    assert (s.max_tokens, s.temperature, s.top_k, s.stop, s.seed, s.logprobs) == (5, 0.0, 0, ("\n",), 3, 2)
    proto = p.to_proto()
    assert list(proto.prompt_token_ids) == p.prompt_token_ids
    assert proto.sampling.seed == 3 and proto.sampling.logprobs == 2 and not proto.HasField("prefill")
    assert p.token_budget == len(p.prompt_token_ids) + 5


def test_completion_accepts_token_id_prompts(preparer: Preparer) -> None:
    assert preparer.completion(_completion(prompt=[5, 6, 7])).choices[0].prompt_token_ids == [5, 6, 7]
    assert preparer.completion(_completion(prompt=[[5, 6]])).choices[0].prompt_token_ids == [5, 6]


@pytest.mark.parametrize(("body", "status", "param", "fragment"), [
    ({"model": "other"}, 404, "model", "does not exist"),
    ({"prompt": [1, 99999]}, 400, "prompt", "out of the vocabulary"),
    ({"prompt": ["a", ""]}, 400, "prompt", "empty"),
    ({"prompt": ["a"] * 9, "n": 15}, 400, "n", "more than 128"),
    ({"best_of": 1, "n": 2}, 400, "best_of", ">= n"),
    ({"best_of": 3, "stream": True}, 400, "best_of", "streamed"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"max_tokens": 60}, 400, "max_tokens", "maximum context length is 64 tokens"),
])
def test_completion_errors(preparer: Preparer, body: dict[str, object], status: int, param: str,
                           fragment: str) -> None:
    with pytest.raises(APIError) as info:
        preparer.completion(_completion(**body))
    assert (info.value.status, info.value.param) == (status, param)
    assert fragment in info.value.message


def test_context_overflow_names_the_limit_and_the_counts(preparer: Preparer, tokenizer: Tokenizer) -> None:
    prompt = "x " * 80
    n = len(tokenizer.encode(prompt))
    with pytest.raises(APIError) as info:
        preparer.completion(_completion(prompt=prompt, max_tokens=1))
    assert info.value.code == "context_length_exceeded"
    assert "64 tokens" in info.value.message and f"{n} in the prompt" in info.value.message


def test_chat_default_max_tokens_fills_the_context(preparer: Preparer, tokenizer: Tokenizer) -> None:
    req = ChatCompletionRequest.model_validate({"model": MODEL,
                                                "messages": [{"role": "user", "content": "hi"}]})
    (p,) = preparer.chat(req).choices
    # the demo's template, written out by hand
    expected = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                                add_special_tokens=False)
    assert p.prompt_token_ids == expected
    assert p.sampling.max_tokens == 64 - len(expected)
    assert p.top_logprobs is None


def test_chat_logprobs_and_content_parts(preparer: Preparer, tokenizer: Tokenizer) -> None:
    req = ChatCompletionRequest.model_validate({
        "model": MODEL, "logprobs": True, "top_logprobs": 3, "max_completion_tokens": 4,
        "messages": [{"role": "user",
                      "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]})
    (p,) = preparer.chat(req).choices
    assert p.top_logprobs == 3 and p.sampling.logprobs == 3 and p.sampling.max_tokens == 4
    assert tokenizer.decode(p.prompt_token_ids, skip_special_tokens=False).count("hi") == 1


def test_chat_top_logprobs_needs_logprobs(preparer: Preparer) -> None:
    req = ChatCompletionRequest.model_validate({"model": MODEL, "top_logprobs": 2,
                                                "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(APIError) as info:
        preparer.chat(req)
    assert (info.value.status, info.value.param) == (400, "top_logprobs")


@pytest.mark.parametrize(("body", "param"), [
    ({"logit_bias_x": {"5": 1}}, "logit_bias_x"),
    ({"prompt_logprobs": 2}, "prompt_logprobs"),
    ({"suffix": "end"}, "suffix"),
    ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ({"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    # chat's fields sent to /v1/completions are undeclared there: named, never read as chat's
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_unimplemented_completion_fields_are_refused_by_name(preparer: Preparer, body: dict[str, object],
                                                            param: str) -> None:
    with pytest.raises(APIError) as info:
        preparer.completion(_completion(**body))
    assert (info.value.status, info.value.param, info.value.code) == (400, param, "unsupported_parameter")
    assert param in info.value.message


def test_null_unknown_fields_mean_not_set(preparer: Preparer) -> None:
    assert preparer.completion(_completion(suffix=None, max_tokens=2)).choices[0].sampling.max_tokens == 2


def test_stream_options_without_stream_is_refused(preparer: Preparer) -> None:
    with pytest.raises(APIError) as info:
        preparer.completion(_completion(stream_options={"include_usage": True}))
    assert (info.value.status, info.value.param) == (400, "stream_options")


@pytest.mark.parametrize(("message", "param", "code"), [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
     "messages", "unsupported_content_type"),
    ({"role": "user", "content": [{"type": "text"}]}, "messages", "invalid_value"),
    ({"role": "assistant", "content": "x", "audio": {"id": "a1"}}, "messages[0].audio",
     "unsupported_parameter"),
])
def test_chat_messages_are_honoured_or_refused(preparer: Preparer, message: dict[str, object], param: str,
                                               code: str) -> None:
    req = ChatCompletionRequest.model_validate({"model": MODEL, "messages": [message]})
    with pytest.raises(APIError) as info:
        preparer.chat(req)
    assert (info.value.status, info.value.param, info.value.code) == (400, param, code)


def test_batched_prompts_times_n_choices_in_openai_index_order(preparer: Preparer,
                                                               tokenizer: Tokenizer) -> None:
    batch = preparer.completion(_completion(prompt=["a", "c = 1", "b"], n=2, seed=7, max_tokens=3))
    assert [p.index for p in batch.choices] == list(range(6))
    expected = [tokenizer.encode(t) for t in ("a", "c = 1", "b")]
    assert [p.prompt_token_ids for p in batch.choices[::2]] == expected
    assert [p.first_of_prompt for p in batch.choices] == [True, False] * 3
    seeds = [p.sampling.seed for p in batch.choices]
    assert seeds[0::2] == [7, 7, 7] and len(set(seeds[1::2])) == 1 and seeds[1] != 7
    assert len({p.request_id for p in batch.choices}) == 6
    again = preparer.completion(_completion(prompt=["a", "c = 1", "b"], n=2, seed=7, max_tokens=3))
    assert [p.sampling.seed for p in again.choices] == seeds
    assert batch.token_budget == sum(len(p.prompt_token_ids) + 3 for p in batch.choices)
    tokens = preparer.completion(_completion(prompt=[[5, 6], [7]]))
    assert [p.prompt_token_ids for p in tokens.choices] == [[5, 6], [7]]


def test_logit_bias_reaches_the_node_request(preparer: Preparer) -> None:
    (p,) = preparer.completion(_completion(logit_bias={"7": -100, "3": 2.5})).choices
    assert p.sampling.logit_bias == ((3, 2.5), (7, -100.0))
    assert dict(p.to_proto().sampling.logit_bias) == {3: 2.5, 7: -100.0}
    with pytest.raises(APIError) as info:
        preparer.completion(_completion(logit_bias={"99999999": 1}))
    assert info.value.param == "logit_bias"


def test_best_of_candidates_report_logprobs_for_the_ranking(preparer: Preparer) -> None:
    batch = preparer.completion(_completion(prompt=["a", "b"], best_of=3, n=2, seed=1))
    assert (batch.n, batch.best_of, len(batch.choices)) == (2, 3, 6)
    assert all(p.sampling.logprobs == 0 and p.top_logprobs is None for p in batch.choices)
    assert [p.sampling.seed for p in batch.choices[:3]] == [p.sampling.seed for p in batch.choices[3:]]


def test_truncate_prompt_tokens_keeps_the_last_tokens(preparer: Preparer, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("def f(x):\n    return x + 1")
    (p,) = preparer.completion(_completion(prompt="def f(x):\n    return x + 1", truncate_prompt_tokens=3,
                                           echo=True)).choices
    assert p.prompt_token_ids == ids[-3:]
    assert p.prompt_text == tokenizer.decode(ids[-3:], skip_special_tokens=False)
    (long,) = preparer.completion(_completion(prompt=[7] * 100, truncate_prompt_tokens=60,
                                              max_tokens=4)).choices
    assert long.prompt_token_ids == [7] * 60
    with pytest.raises(APIError) as info:
        preparer.completion(_completion(truncate_prompt_tokens=0))
    assert info.value.param == "truncate_prompt_tokens"
