"""Validate and tokenize a request once, at the router: OpenAI body -> a node ``GenerateRequest``."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jinja2

from pdserve.common.grammar import GrammarError, compile_grammar, grammar_tokenizer
from pdserve.common.sampling_params import GrammarSpec, SamplingParams, SamplingParamsError
from pdserve.models.tokenizer import Tokenizer
from pdserve.router.errors import APIError
from pdserve.router.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    _Body,
    _SamplingFields,
    unsupported_fields,
)
from pdserve.router.tool_calls import ToolCallParser
from pdserve.rpc import node_pb2
from pdserve.rpc.convert import sampling_to_proto

MAX_CHOICES = 128  # prompts x n of one request: each is its own node request
# grammars llguidance accepted, remembered so that a repeated schema is not compiled again
_CHECKED_GRAMMARS_KEPT = 512


@dataclass(frozen=True)
class Prepared:
    request_id: str
    prompt_token_ids: list[int]
    prompt_text: str  # for completions' echo
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool
    top_logprobs: int | None  # None: no logprobs asked for
    # max_tokens=0 with echo: the node generates one token for the prompt's logprobs, which the
    # response leaves out (OpenAI's and vLLM's "score the prompt only")
    prompt_only: bool = False
    index: int = 0  # the choice's index in the response: prompt i, choice j -> i * n + j
    first_of_prompt: bool = True  # usage counts each prompt once, not once per choice
    # chat with tools (tool_choice auto, required or named): the output is parsed into tool calls
    tool_parser: ToolCallParser | None = None
    max_tool_calls: int | None = None  # parallel_tool_calls false: 1
    # A migrated continuation (router/dispatch.py): characters of its resumed outputs' text the
    # client already has (sampling.resumed_output_tokens says how many prompt tokens are outputs)
    resumed_output_chars: int = 0

    @property
    def token_budget(self) -> int:
        """What admission charges: every token the request may hold in KV."""
        return len(self.prompt_token_ids) + self.sampling.max_tokens

    def to_proto(self) -> node_pb2.GenerateRequest:
        return node_pb2.GenerateRequest(request_id=self.request_id, prompt_token_ids=self.prompt_token_ids,
                                        sampling=sampling_to_proto(self.sampling),
                                        resumed_output_chars=self.resumed_output_chars)


@dataclass(frozen=True)
class PreparedBatch:
    """One OpenAI request fanned out: a node request per (prompt, candidate), in index order."""

    request_id: str
    choices: tuple[Prepared, ...]  # best_of per prompt: candidate j of prompt i at i * best_of + j
    n: int = 1  # choices returned per prompt
    best_of: int = 1  # candidates generated per prompt; the n with the highest total logprob return

    @property
    def stream(self) -> bool:
        return self.choices[0].stream

    @property
    def include_usage(self) -> bool:
        return self.choices[0].include_usage

    @property
    def token_budget(self) -> int:
        return sum(p.token_budget for p in self.choices)


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of choice ``choice`` of a request seeded with ``seed``: choice 0 keeps it (n=1 answers
    exactly as before), every later choice gets a distinct seed derived from (seed, choice), so a
    seeded n>1 request returns distinct choices and returns the same ones again."""
    if seed is None or choice == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{choice}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # [0, 2**63), what SamplingParams takes


_SEEDS = random.Random()  # seeded from the OS once; a seed steers sampling and need not be secret


def draw_seed() -> int:
    """A fresh seed for a sampled request without one: [0, 2**63), what SamplingParams takes."""
    return _SEEDS.getrandbits(63)


def model_max_len(model_dir: Path) -> int:
    """config.json's max_position_embeddings (the context the model was built for)."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        return int(config["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"max_model_len: cannot read max_position_embeddings from {model_dir}: {e}") from e


def _check_content_parts(messages: list[ChatMessage]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            where = f"messages[{i}].content[{j}]"
            if part.type != "text":
                raise APIError(400, f"{where}: content part type {part.type!r} is not supported: the served "
                                    f"model takes text only (parts of type 'text')", "messages",
                               "unsupported_content_type")
            if part.text is None:
                raise APIError(400, f"{where}: a 'text' part needs a 'text' string", "messages",
                               "invalid_value")


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it (HF's convention: a tool call's arguments as an object)."""
    rendered: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.name:
        rendered["name"] = message.name
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        rendered["tool_calls"] = [{"id": call.id, "type": "function", "function": {
            "name": call.function.name, "arguments": _arguments_object(call.function.arguments)}}
            for call in message.tool_calls]
    return rendered


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


_ID_PREFIX = os.urandom(8).hex()  # unique per router process: ids never collide across routers
_ID_COUNTER = itertools.count()


def _next_request_id() -> str:
    # a counter, not uuid4: reading the OS's randomness per request showed in the router's profile
    return f"req-{_ID_PREFIX}{next(_ID_COUNTER):x}"


def _choice_id(request_id: str, index: int, count: int) -> str:
    # a one-choice request keeps the request's id on the node, so logs match across hops
    return request_id if count == 1 else f"{request_id}-{index}"


class Preparer:
    def __init__(self, tokenizer: Tokenizer, model_name: str, max_model_len: int,
                 tool_call_parser: ToolCallParser | None = None) -> None:
        self.tokenizer = tokenizer
        self._model_name = model_name
        self.max_model_len = max_model_len
        self.tool_call_parser = tool_call_parser
        self._grammar_tokenizer: Any = None  # llguidance's view of the tokenizer, built on first use
        self._checked_grammars: dict[GrammarSpec, None] = {}
        self._grammar_lock = threading.Lock()  # prepare runs on the loop and on the prepare pool's threads

    def completion(self, req: CompletionRequest) -> PreparedBatch:
        self._check_common(req)
        best_of = req.n if req.best_of is None else req.best_of
        if best_of < req.n:
            raise APIError(400, f"best_of ({best_of}) must be >= n ({req.n})", "best_of", "invalid_value")
        if best_of > req.n and req.stream:  # the best ones are known only at the end (OpenAI's rule too)
            raise APIError(400, "best_of > n cannot be streamed", "best_of", "invalid_value")
        truncating = req.truncate_prompt_tokens is not None
        prompts = [self._truncate(req, ids, text)
                   for ids, text in self._completion_prompts(req.prompt, truncating)]
        if len(prompts) * best_of > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x {best_of} choices is more than {MAX_CHOICES}",
                           "best_of" if req.best_of else "n", "invalid_value")
        max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        prompt_only = max_tokens == 0
        if prompt_only and not req.echo:
            raise APIError(400, "max_tokens=0 needs echo=true (it returns the prompt and its logprobs only)",
                           "max_tokens", "invalid_value")
        grammar = self._grammar(self._guided(req))
        request_id = _next_request_id()
        choices = []
        for i, (token_ids, text) in enumerate(prompts):
            for j in range(best_of):
                index = i * best_of + j
                choices.append(self._build(
                    req, token_ids, text, 1 if prompt_only else max_tokens, req.logprobs, req.echo,
                    prompt_only, _choice_id(request_id, index, len(prompts) * best_of), index, j,
                    rank=best_of > req.n, grammar=grammar))
        return PreparedBatch(request_id, tuple(choices), n=req.n, best_of=best_of)

    def _completion_prompts(self, prompt: str | list[int] | list[str] | list[list[int]], truncating: bool
                            ) -> list[tuple[list[int], str]]:
        """(token ids, text) per prompt: a string, a token list, or a list of either."""
        batch: list[str] | list[list[int]]
        if isinstance(prompt, str):
            batch = [prompt]
        elif prompt and isinstance(prompt[0], (str, list)):
            batch = prompt  # type: ignore[assignment]
        else:
            batch = [prompt]  # type: ignore[list-item]
        prompts = []
        for item in batch:
            if isinstance(item, str):
                self._refuse_unfittable(item, truncating, "prompt")
                prompts.append((self.tokenizer.encode(item), item))
            else:
                token_ids = list(item)
                self._check_ids(token_ids)
                prompts.append((token_ids, self.tokenizer.decode(token_ids, skip_special_tokens=False)))
        return prompts

    def chat(self, req: ChatCompletionRequest) -> PreparedBatch:
        self._check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs", "invalid_value")
        tools, forced_call = self._tools(req)
        sources = self._guided(req) + self._response_format(req)
        if forced_call is not None:
            sources.append(("tool_choice", forced_call))
        grammar = self._grammar(sources)
        text = self._render_chat(req.messages, req.add_generation_prompt, tools)
        self._refuse_unfittable(text, req.truncate_prompt_tokens is not None, "messages")
        token_ids, text = self._truncate(req, self.tokenizer.encode(text, add_special_tokens=False), text)
        max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        request_id = _next_request_id()
        parser = self.tool_call_parser if tools else None
        max_calls = 1 if req.parallel_tool_calls is False else None
        return PreparedBatch(request_id, tuple(
            replace(self._build(req, token_ids, text, max_tokens, top, False, False,
                                _choice_id(request_id, j, req.n), j, j, grammar=grammar),
                    tool_parser=parser, max_tool_calls=max_calls)
            for j in range(req.n)), n=req.n, best_of=req.n)

    # ---- structured output and tools
    def _guided(self, req: _SamplingFields) -> list[tuple[str, GrammarSpec]]:
        """vLLM's guided_* fields, each as (field, grammar)."""
        sources: list[tuple[str, GrammarSpec]] = []
        if req.guided_json is not None:
            schema = req.guided_json if isinstance(req.guided_json, str) else json.dumps(req.guided_json)
            sources.append(("guided_json", self._spec("guided_json", "json_schema", schema)))
        if req.guided_regex is not None:
            sources.append(("guided_regex", self._spec("guided_regex", "regex", req.guided_regex)))
        if req.guided_choice is not None:
            choices = json.dumps(req.guided_choice)
            sources.append(("guided_choice", self._spec("guided_choice", "choice", choices)))
        if req.guided_grammar is not None:
            sources.append(("guided_grammar", self._spec("guided_grammar", "lark", req.guided_grammar)))
        return sources

    def _response_format(self, req: ChatCompletionRequest) -> list[tuple[str, GrammarSpec]]:
        fmt = req.response_format
        if fmt is None or fmt.type == "text":
            return []
        if fmt.type == "json_object":
            return [("response_format", GrammarSpec("json_object"))]
        if fmt.json_schema is None:
            raise APIError(400, "response_format: type json_schema needs a json_schema object",
                           "response_format", "invalid_value")
        schema = fmt.json_schema.schema_
        if schema is None:
            return [("response_format", GrammarSpec("json_object"))]
        return [("response_format", self._spec("response_format", "json_schema", json.dumps(schema)))]

    @staticmethod
    def _spec(field: str, kind: str, text: str) -> GrammarSpec:
        try:
            return GrammarSpec(kind, text)
        except SamplingParamsError as e:
            raise APIError(400, f"{field}: {e}", field, "invalid_value") from e

    def _grammar(self, sources: list[tuple[str, GrammarSpec]]) -> GrammarSpec | None:
        """The one grammar asked for, checked by llguidance (a 400 naming the field if it cannot compile)."""
        if not sources:
            return None
        if len(sources) > 1:
            names = ", ".join(name for name, _ in sources)
            raise APIError(400, f"only one structured-output constraint may be given (got {names})",
                           sources[1][0], "invalid_value")
        field, spec = sources[0]
        if spec in self._checked_grammars:
            return spec
        with self._grammar_lock:
            if self._grammar_tokenizer is None:
                self._grammar_tokenizer = grammar_tokenizer(self.tokenizer.to_json(),
                                                            self.tokenizer.eos_token_ids)
        try:
            compile_grammar(spec, self._grammar_tokenizer)
        except GrammarError as e:
            raise APIError(400, f"{field}: {e}", field, "invalid_value") from e
        with self._grammar_lock:
            if len(self._checked_grammars) >= _CHECKED_GRAMMARS_KEPT:
                self._checked_grammars.pop(next(iter(self._checked_grammars)))
            self._checked_grammars[spec] = None
        return spec

    def _tools(self, req: ChatCompletionRequest) -> tuple[list[dict[str, Any]], GrammarSpec | None]:
        """(the tools to render, the grammar of a forced call) for tool_choice; ([], None) without tools."""
        choice = req.tool_choice
        if not req.tools:
            if choice not in (None, "none"):
                raise APIError(400, "tool_choice needs tools", "tool_choice", "invalid_value")
            return [], None
        parser = self.tool_call_parser
        if parser is None:
            raise APIError(400, "tools: this model has no tool-call parser configured (start the router with "
                                "--tool-call-parser)", "tools", "unsupported_parameter")
        if not self.tokenizer.renders_tools:
            raise APIError(400, "tools: this model's chat template does not render tools", "tools",
                           "unsupported_parameter")
        if choice == "none":
            return [], None  # no call may be made, so no tool is shown to the model
        functions = [tool.function.model_dump(exclude_none=True) for tool in req.tools]
        tools = [{"type": "function", "function": f} for f in functions]
        if choice is None or choice == "auto":
            return tools, None
        if choice == "required":
            return tools, parser.forced_grammar(functions)
        named = [f for f in functions if f["name"] == choice.function.name]
        if not named:
            raise APIError(400, f"tool_choice: no tool named {choice.function.name!r} in tools",
                           "tool_choice", "invalid_value")
        return tools, parser.forced_grammar(named)

    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        """vLLM's /tokenize answer: ``count``, ``max_model_len``, ``tokens``, ``token_strs``."""
        self._check_fields(req)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt", "invalid_value")
        if req.prompt is not None:
            add_special = req.add_special_tokens is not False
            token_ids = self.tokenizer.encode(req.prompt, add_special_tokens=add_special)
        else:
            text = self._render_chat(req.messages or [], req.add_generation_prompt)
            token_ids = self.tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))
        strs = [self.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
        return {"count": len(token_ids), "max_model_len": self.max_model_len, "tokens": token_ids,
                "token_strs": strs if req.return_token_strs else None}

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self._check_fields(req)
        self._check_ids(req.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    def tokenizer_info(self) -> dict[str, Any]:
        """What vLLM's /tokenizer_info reports and lm-eval's remote tokenizer reads (the special tokens
        and the chat template)."""
        special = self.tokenizer.special_tokens
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special.bos_token,
                "eos_token": special.eos_token, "unk_token": special.unk_token,
                "pad_token": special.pad_token,
                "chat_template": self.tokenizer.chat_template, "model_max_length": self.max_model_len,
                "vocab_size": self.tokenizer.vocab_size, "eos_token_ids": list(self.tokenizer.eos_token_ids)}

    def _check_fields(self, req: _Body) -> None:
        unsupported = unsupported_fields(req)
        if unsupported:
            name = unsupported[0]
            raise APIError(400, f"{name}: this parameter is not supported by pdserve (docs/api.md lists "
                                f"the supported ones)", name, "unsupported_parameter")
        model = getattr(req, "model", None)
        if model is not None and model != self._model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self._model_name!r}", "model", "model_not_found")

    def _render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                     tools: list[dict[str, Any]] | None = None) -> str:
        _check_content_parts(messages)
        rendered = [_template_message(m) for m in messages]
        try:
            return self.tokenizer.apply_chat_template(rendered, add_generation_prompt=add_generation_prompt,
                                                      tools=tools or None)
        except jinja2.TemplateError as e:  # the model's template refused these messages
            raise APIError(422, f"the chat template rejected the messages: {e}", "messages",
                           "chat_template_error") from e
        except ValueError as e:  # the model has no chat template
            raise APIError(400, str(e), "messages", "no_chat_template") from e

    def _check_common(self, req: _SamplingFields) -> None:
        self._check_fields(req)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options",
                           "invalid_value")

    def _refuse_unfittable(self, text: str, truncating: bool, param: str) -> None:
        """A text that cannot fit the context however densely it tokenizes is refused untokenized
        (tokenizing 4 MB of text costs seconds of CPU); one to be truncated is tokenized to keep its tail."""
        least = self.tokenizer.min_tokens(text)
        if not truncating and least > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. "
                                f"However, the prompt has at least {least} tokens. Please reduce the prompt.",
                           param, "context_length_exceeded")

    def _truncate(self, req: _SamplingFields, token_ids: list[int], text: str) -> tuple[list[int], str]:
        """vLLM's truncate_prompt_tokens: keep the prompt's last k tokens (-1: the model's context)."""
        k = req.truncate_prompt_tokens
        if k is None:
            return token_ids, text
        if k == 0:
            raise APIError(400, "truncate_prompt_tokens must be >= 1, or -1 for the model's context",
                           "truncate_prompt_tokens", "invalid_value")
        keep = self.max_model_len if k == -1 else k
        if len(token_ids) <= keep:
            return token_ids, text
        kept = token_ids[len(token_ids) - keep:]
        return kept, self.tokenizer.decode(kept, skip_special_tokens=False)

    def _logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        pairs = []
        for key, value in (bias or {}).items():
            if not key.isdigit() or int(key) >= self.tokenizer.vocab_size:
                raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0 .. "
                                    f"{self.tokenizer.vocab_size - 1})", "logit_bias", "invalid_value")
            pairs.append((int(key), value))
        return tuple(sorted(pairs))

    def _check_ids(self, token_ids: list[int], field: str = "prompt") -> None:
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in token_ids if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"{field} token id {bad} is out of the vocabulary (size {vocab})", field,
                           "invalid_value")

    def _context_budget(self, prompt_len: int, max_tokens: int | None) -> int:
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", "prompt", "invalid_value")
        room = self.max_model_len - prompt_len
        if max_tokens is None and room >= 1:
            return room
        if max_tokens is None or prompt_len + max_tokens > self.max_model_len:
            asked = prompt_len + (max_tokens or 1)
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. "
                                f"However, you requested {asked} tokens ({prompt_len} in the prompt, "
                                f"{asked - prompt_len} for the completion). Please reduce the prompt or "
                                f"max_tokens.", "max_tokens", "context_length_exceeded")
        return max_tokens

    def _build(self, req: _SamplingFields, token_ids: list[int], text: str, max_tokens: int | None,
               top_logprobs: int | None, echo: bool, prompt_only: bool, request_id: str, index: int,
               choice: int, rank: bool = False, grammar: GrammarSpec | None = None) -> Prepared:
        """``rank``: a best_of candidate, whose tokens' logprobs the node must report for the ranking
        even when the client asked for none (the response then shows none)."""
        budget = self._context_budget(len(token_ids), max_tokens)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        temperature = 1.0 if req.temperature is None else req.temperature
        seed = choice_seed(req.seed, choice)
        if seed is None and temperature != 0.0:
            # a sampled request's seed, drawn once here: a migrated continuation draws the same numbers
            # (router/dispatch.py), and the request is built once instead of copied with it later
            seed = draw_seed()
        try:
            sampling = SamplingParams(
                max_tokens=budget, min_tokens=min(req.min_tokens, budget), temperature=temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=max(req.top_k or 0, 0), min_p=req.min_p or 0.0, seed=seed,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                stop_token_ids=tuple(req.stop_token_ids or ()), stop=stop, ignore_eos=req.ignore_eos,
                logprobs=0 if top_logprobs is None and rank else top_logprobs,
                logit_bias=self._logit_bias(req.logit_bias),
                # completions' echo + logprobs: the echoed prompt tokens get theirs too (OpenAI's API)
                prompt_logprobs=top_logprobs if echo else None,
                grammar=grammar,
            )
        except SamplingParamsError as e:  # the message starts with the field's name
            raise APIError(400, str(e), str(e).split(" ", 1)[0], "invalid_value") from e
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        return Prepared(request_id, token_ids, text, sampling, req.stream, include_usage, echo, top_logprobs,
                        prompt_only, index, first_of_prompt=choice == 0)
