"""Grammars for structured output, compiled by llguidance: shared by the router (which refuses a
grammar llguidance cannot compile, so a bad schema never reaches a node) and the engine (which builds
one matcher per request from it).

Why llguidance: a dependency-free wheel that reads the HF tokenizer.json the models ship, computes a
mask in well under a millisecond on the demo's 8k vocabulary, and can check draft tokens and roll
back, which speculative decoding needs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import llguidance

from pdserve.common.sampling_params import GrammarSpec

# JSON output with separators the way json.dumps writes them, and no free whitespace between tokens:
# a small model left free to emit whitespace can pad until max_tokens (vLLM's guidance backend does
# the same).
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """llguidance cannot compile the grammar; the message says why."""


def grammar_tokenizer(tokenizer_json: str, eos_token_ids: Sequence[int],
                      vocab_size: int | None = None) -> llguidance.LLTokenizer:
    """The llguidance view of a model's tokenizer (the text of its tokenizer.json). ``vocab_size`` is
    the model's (logits may be wider than the tokenizer's vocabulary); ``eos_token_ids`` end a
    complete output."""
    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids) or None)


def llguidance_grammar(spec: GrammarSpec) -> str:
    """The spec as an llguidance grammar definition (not yet checked: see ``check_grammar``)."""
    if spec.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(spec.text, overrides=_JSON_OPTIONS)
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.text)
    if spec.kind == "choice":
        choices = json.loads(spec.text)
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    return llguidance.LLMatcher.grammar_from_lark(spec.text)


def compile_grammar(spec: GrammarSpec, tokenizer: llguidance.LLTokenizer) -> str:
    """The checked llguidance grammar for ``spec``; raises GrammarError naming what is wrong."""
    try:
        grammar = llguidance_grammar(spec)
    except ValueError as exc:
        raise GrammarError(f"{spec.kind} grammar: {exc}") from None
    message = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if message and not message.startswith("WARNING"):
        raise GrammarError(f"{spec.kind} grammar: {message.strip()}")
    return grammar
