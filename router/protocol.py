"""The OpenAI request bodies the router accepts (pydantic: FastAPI's schema and first validation).

Every field is honoured or refused: a body may carry fields these models do not declare (pydantic keeps
them as ``model_extra``), and ``unsupported_fields`` names each one that is set, so that ``prepare``
answers 400 instead of silently ignoring what the client asked for. Ranges are checked here so a bad
value is a 400 naming the field; cross-field rules (context length, n) are checked in ``prepare``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_GUIDED_CHOICES = 1024
MAX_TOOLS = 128
UINT32_MAX = 2**32 - 1



def _encodable(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"): valid Python str, but not UTF-8 the tokenizer can take
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text: {e.reason} at position {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenId = Annotated[int, Field(ge=0, le=UINT32_MAX)]
StopString = Annotated[Text, Field(min_length=1, max_length=1024)]
BiasKey = Annotated[str, Field(max_length=12)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]


class _Body(BaseModel):
    # "allow", not "forbid": a field pdserve does not implement is reported by ``unsupported_fields``
    # as a 400 naming it (OpenAI's error body), not as a schema failure deep in a union
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    def set_extra_fields(self) -> list[str]:
        """Undeclared fields with a value; ``null`` means "not set", as OpenAI's API reads it."""
        return [name for name, value in (self.model_extra or {}).items() if value is not None]


class StreamOptions(_Body):
    include_usage: bool = False


def unsupported_fields(req: _Body) -> list[str]:
    """Every field of ``req`` that is set but not implemented, as a dotted path
    (``logit_bias``, ``messages[1].tool_calls``, ``stream_options.continuous_usage_stats``)."""
    names = list(req.set_extra_fields())
    # declared fields only (``vars``): getattr would also find an undeclared field of that name (a
    # ``tools`` list sent to /v1/completions, already named above) and raise for a missing one
    declared = vars(req)
    options = declared.get("stream_options")
    if options is not None:
        names += [f"stream_options.{name}" for name in options.set_extra_fields()]
    response_format = declared.get("response_format")
    if response_format is not None:
        names += [f"response_format.{name}" for name in response_format.set_extra_fields()]
        if response_format.json_schema is not None:
            names += [f"response_format.json_schema.{name}"
                      for name in response_format.json_schema.set_extra_fields()]
    for i, tool in enumerate(declared.get("tools") or ()):
        names += [f"tools[{i}].{name}" for name in tool.set_extra_fields()]
        names += [f"tools[{i}].function.{name}" for name in tool.function.set_extra_fields()]
    for i, message in enumerate(declared.get("messages") or ()):
        names += [f"messages[{i}].{name}" for name in message.set_extra_fields()]
        if isinstance(message.content, list):
            # a non-text part is refused for its type (``prepare``), not for its payload's field
            names += [f"messages[{i}].content[{j}].{name}" for j, part in enumerate(message.content)
                      if part.type == "text" for name in part.set_extra_fields()]
    return names


class _SamplingFields(_Body):
    """Fields shared by both endpoints; pdserve extensions (vLLM's names) marked."""

    model: Text | None = Field(default=None, min_length=1, max_length=256,
                               description="optional: the one served model when left out")
    n: int = Field(default=1, ge=1, le=128, description="choices per prompt")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1, description="extension; 0 or -1: off")
    min_p: Probability | None = Field(default=None, description="extension")
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: StopString | list[StopString] | None = Field(default=None, max_length=MAX_STOP_STRINGS)
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=64, description="extension")
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0, description="extension")
    ignore_eos: bool = Field(default=False, description="extension")
    min_tokens: int = Field(default=0, ge=0, le=UINT32_MAX, description="extension")
    user: Text | None = Field(default=None, max_length=512)
    stream: bool = False
    stream_options: StreamOptions | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1, le=UINT32_MAX,
                                               description="extension: keep the prompt's last k tokens; "
                                                           "-1: the model's context")
    logit_bias: dict[BiasKey, Bias] | None = Field(default=None, max_length=MAX_LOGIT_BIAS_ENTRIES,
                                                   description="token id (a string) -> bias in [-100, 100]")
    # vLLM's structured-output extensions: at most one of them (or response_format, or a forced tool call)
    guided_json: dict[str, Any] | Text | None = Field(
        default=None, description="extension: output is JSON valid against this schema (a dict or its text)")
    guided_regex: Text | None = Field(default=None, min_length=1, description="extension: output matches it")
    guided_choice: list[Text] | None = Field(default=None, min_length=1, max_length=MAX_GUIDED_CHOICES,
                                             description="extension: output is exactly one of these")
    guided_grammar: Text | None = Field(default=None, min_length=1,
                                        description="extension: a Lark grammar (llguidance's dialect)")


class CompletionRequest(_SamplingFields):
    prompt: Text | list[TokenId] | list[Text] | list[list[TokenId]]
    max_tokens: int | None = Field(default=16, ge=0, le=UINT32_MAX,
                                   description="0 needs echo: the prompt only")
    max_completion_tokens: int | None = Field(default=None, ge=0, le=UINT32_MAX,
                                              description="wins over max_tokens")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=128, description="only equal to n")


class ContentPart(_Body):
    """A chat content part; only ``text`` parts can be served (``prepare`` refuses the others by name)."""

    type: Text = Field(max_length=64)
    text: Text | None = None


class FunctionCall(_Body):
    name: Text = Field(max_length=256)
    arguments: Text = Field(description="the arguments as a JSON object's text")


class ToolCall(_Body):
    """A tool call of an earlier assistant message, sent back in the conversation."""

    id: Text = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(default=None, description="assistant messages")
    tool_call_id: Text | None = Field(default=None, max_length=256, description="tool messages")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class JsonSchemaFormat(_Body):
    name: Text = Field(min_length=1, max_length=256)
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema",
                                           description="absent: any JSON object")
    strict: bool | None = Field(default=None, description="the output always follows the schema")


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(_Body):
    name: Annotated[Text, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON schema of the arguments")
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: Text = Field(min_length=1, max_length=64)


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="default: auto with tools, none without")
    parallel_tool_calls: bool | None = Field(default=None, description="false: at most one call")
    max_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = Field(default=True, description="extension")


class TokenizeRequest(_Body):
    """vLLM's ``/tokenize``: a ``prompt`` or chat ``messages`` (rendered by the chat template)."""

    model: Text | None = Field(default=None, min_length=1, max_length=256)
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = Field(default=None, description="default: true for a prompt, "
                                                                      "false for messages")
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: Text | None = Field(default=None, min_length=1, max_length=256)
    tokens: list[TokenId]
