"""Tool calling: the grammar that forces a call, and the parser that finds calls in a model's text.

A parser is chosen per model by name (``pdserve router --tool-call-parser NAME``, vLLM's flag); a model
without one refuses ``tools``. ``tool_choice`` "required" or a named function is enforced by
structured output: the request's grammar is the parser's call format around the JSON schema of the
call, so the text always parses. "auto" lets the model choose; "none" renders no call format at all.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pdserve.common.sampling_params import GrammarSpec

_CALL_ID_PREFIX = os.urandom(6).hex()
_CALL_COUNTER = itertools.count()


def new_call_id() -> str:
    return f"call_{_CALL_ID_PREFIX}{next(_CALL_COUNTER):x}"


@dataclass(frozen=True)
class ParsedToolCall:
    """One call the model made: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str


@dataclass(frozen=True)
class ParsedOutput:
    content: str  # the text outside the calls ("" when there is none)
    tool_calls: tuple[ParsedToolCall, ...]


class ToolCallParser(ABC):
    """A model family's tool-call format.

    Invariants: ``forced_grammar`` accepts exactly the texts ``parse`` turns into one call of one of
    ``functions`` (name + arguments valid against the function's parameters schema); ``parse`` never
    raises on free text: text that is not a well-formed call stays content.
    """

    name: ClassVar[str]

    @abstractmethod
    def forced_grammar(self, functions: Sequence[dict[str, Any]]) -> GrammarSpec:
        """The grammar of one call to one of ``functions`` (OpenAI function definitions)."""

    @abstractmethod
    def parse(self, text: str, max_calls: int | None = None) -> ParsedOutput:
        """The calls in a complete output (the first ``max_calls`` of them; later ones stay text), and the
        text around them."""

    @abstractmethod
    def content_prefix_len(self, text: str) -> int:
        """Streaming: how much of ``text`` (an output so far) is certainly content, not part of a call."""


def call_schema(function: dict[str, Any]) -> dict[str, Any]:
    """JSON schema of {"name": <the function>, "arguments": <its parameters>}."""
    parameters = function.get("parameters") or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


class HermesToolParser(ToolCallParser):
    """Hermes, Qwen2.5, the demo model: ``<tool_call>\\n{"name": .., "arguments": {..}}\\n</tool_call>``."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def forced_grammar(self, functions: Sequence[dict[str, Any]]) -> GrammarSpec:
        schemas = [call_schema(f) for f in functions]
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
        lark = f'start: "{self.OPEN}\\n" call "\\n{self.CLOSE}"\ncall: %json {json.dumps(schema)}\n'
        return GrammarSpec("lark", lark)

    def parse(self, text: str, max_calls: int | None = None) -> ParsedOutput:
        calls: list[ParsedToolCall] = []
        content: list[str] = []
        position = 0
        for match in self._CALL.finditer(text):
            if max_calls is not None and len(calls) >= max_calls:
                break
            call = _json_call(match.group(1))
            if call is None:
                continue  # not a well-formed call: it stays in the content
            content.append(text[position:match.start()])
            position = match.end()
            calls.append(call)
        content.append(text[position:])
        return ParsedOutput("".join(content).strip() if calls else text, tuple(calls))

    def content_prefix_len(self, text: str) -> int:
        start = text.find(self.OPEN)
        if start >= 0:
            return start
        # a partial "<tool_c" at the end might still become a call
        for keep in range(min(len(self.OPEN) - 1, len(text)), 0, -1):
            if self.OPEN.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)


def _json_call(body: str) -> ParsedToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(value["name"], json.dumps(arguments, ensure_ascii=False), new_call_id())


TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {HermesToolParser.name: HermesToolParser}


def make_tool_call_parser(name: str | None) -> ToolCallParser | None:
    if name is None:
        return None
    if name not in TOOL_CALL_PARSERS:
        names = ", ".join(sorted(TOOL_CALL_PARSERS))
        raise ValueError(f"tool_call_parser must be one of {names} (got {name!r})")
    return TOOL_CALL_PARSERS[name]()
