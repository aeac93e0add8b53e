"""Validate and tokenize a request once, at the router: OpenAI body -> a node ``GenerateRequest``."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import jinja2

from pdserve.common.sampling_params import SamplingParams, SamplingParamsError
from pdserve.models.tokenizer import Tokenizer
from pdserve.router.errors import APIError
from pdserve.router.protocol import ChatCompletionRequest, CompletionRequest, _SamplingFields
from pdserve.rpc import node_pb2
from pdserve.rpc.convert import sampling_to_proto


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

    @property
    def token_budget(self) -> int:
        """What admission charges: every token the request may hold in KV."""
        return len(self.prompt_token_ids) + self.sampling.max_tokens

    def to_proto(self) -> node_pb2.GenerateRequest:
        return node_pb2.GenerateRequest(request_id=self.request_id, prompt_token_ids=self.prompt_token_ids,
                                        sampling=sampling_to_proto(self.sampling))


def model_max_len(model_dir: Path) -> int:
    """config.json's max_position_embeddings (the context the model was built for)."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        return int(config["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"max_model_len: cannot read max_position_embeddings from {model_dir}: {e}") from e


class Preparer:
    def __init__(self, tokenizer: Tokenizer, model_name: str, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self._model_name = model_name
        self.max_model_len = max_model_len

    def completion(self, req: CompletionRequest) -> Prepared:
        self._check_common(req)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported (n=1)", "prompt",
                               "invalid_value")
            prompt = prompt[0]
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
            text = prompt
        else:
            token_ids = list(prompt)
            self._check_ids(token_ids)
            text = self.tokenizer.decode(token_ids, skip_special_tokens=False)
        return self._build(req, token_ids, text, req.max_tokens, req.logprobs, req.echo)

    def chat(self, req: ChatCompletionRequest) -> Prepared:
        self._check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs", "invalid_value")
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt)
        except jinja2.TemplateError as e:  # the model's template refused these messages
            raise APIError(422, f"the chat template rejected the messages: {e}", "messages",
                           "chat_template_error") from e
        except ValueError as e:  # the model has no chat template
            raise APIError(400, str(e), "messages", "no_chat_template") from e
        token_ids = self.tokenizer.encode(text, add_special_tokens=False)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        return self._build(req, token_ids, text, max_tokens, top, echo=False)

    def _check_common(self, req: _SamplingFields) -> None:
        if req.model != self._model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{self._model_name!r}", "model", "model_not_found")

    def _check_ids(self, token_ids: list[int]) -> None:
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in token_ids if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt token id {bad} is out of the vocabulary (size {vocab})", "prompt",
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
               top_logprobs: int | None, echo: bool) -> Prepared:
        budget = self._context_budget(len(token_ids), max_tokens)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        try:
            sampling = SamplingParams(
                max_tokens=budget, min_tokens=min(req.min_tokens, budget),
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=max(req.top_k or 0, 0), min_p=req.min_p or 0.0, seed=req.seed,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                stop_token_ids=tuple(req.stop_token_ids or ()), stop=stop, ignore_eos=req.ignore_eos,
                logprobs=top_logprobs,
                # completions' echo + logprobs: the echoed prompt tokens get theirs too (OpenAI's API)
                prompt_logprobs=top_logprobs if echo else None,
            )
        except SamplingParamsError as e:  # the message starts with the field's name
            raise APIError(400, str(e), str(e).split(" ", 1)[0], "invalid_value") from e
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        return Prepared(f"req-{uuid.uuid4().hex}", token_ids, text, sampling, req.stream, include_usage,
                        echo, top_logprobs)
