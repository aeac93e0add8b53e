"""Tokenizer: HF ``tokenizers`` (tokenizer.json) plus tokenizer_config.json, and streaming detokenization.

Chat templates are untrusted code from a model repository: they are rendered in jinja2's
``ImmutableSandboxedEnvironment`` with the same helpers HF transformers gives them
(``raise_exception``, ``strftime_now``, a non-HTML-escaping ``tojson``, loop controls), so the same
template renders the same prompt here and in transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Incomplete UTF-8 at the end of a decoded window shows up as this replacement character.
REPLACEMENT_CHAR = "\ufffd"
# Tokens of context decoded before the new ones, so that decoders that depend on the previous
# token (leading-space rules of Metaspace/WordPiece) render the new text as the full decode does.
DETOKENIZE_CONTEXT_TOKENS = 5
# A UTF-8 character spans at most 4 bytes, so a window start inside one is at most 3 tokens late.
MAX_CONTINUATION_TOKENS = 3
# texts up to this long are tokenized holding the GIL (Tokenizer.encode): a few microseconds of work
GIL_HELD_ENCODE_CHARS = 4096


_LOSSLESS_PROBE = "a  b\t\n\n  c\u00e9 \u4e2d\u6587 \U0001f600 x=1;  # \u0301e"


def _lossless(backend: HFTokenizer) -> bool:
    """Whether the tokenizer keeps every byte of a text (byte-level BPE does; normalizers that fold
    whitespace or case and pre-tokenizers that drop it do not), judged on a probe text."""
    ids = backend.encode(_LOSSLESS_PROBE, add_special_tokens=False).ids
    return backend.decode(ids, skip_special_tokens=False) == _LOSSLESS_PROBE


def _max_token_bytes(backend: HFTokenizer) -> int:
    """An upper bound on the bytes one token decodes to: its vocabulary string's UTF-8 length (a
    byte-level symbol is one byte of text, a byte-fallback token "<0x41>" one too)."""
    return max(len(token.encode("utf-8")) for token in backend.get_vocab(with_added_tokens=True))


class TokenizerError(ValueError):
    """Tokenizer files are missing or inconsistent; the message names the file or field."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes; chat templates expect plain JSON (as in transformers)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path.name} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path.name} must hold a JSON object")
    return data


def _config_token_ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _chat_template_source(model_dir: Path, config: dict[str, Any]) -> str | None:
    """transformers 5 saves ``chat_template.jinja``; older repos keep it in tokenizer_config.json,
    as a string or a list of named templates (the one named "default" is used)."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template if isinstance(template, str) else None


def _clean_up_tokenization(text: str) -> str:
    # The same substitutions transformers applies when clean_up_tokenization_spaces is set.
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


@dataclass(frozen=True)
class SpecialTokens:
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None

    def as_template_vars(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items() if v is not None}


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        special_tokens: SpecialTokens,
        eos_token_ids: tuple[int, ...],
        chat_template: str | None,
        clean_up_tokenization_spaces: bool,
    ) -> None:
        self._backend = backend
        self.special_tokens = special_tokens
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self._compiled_template = None if chat_template is None else compile_chat_template(chat_template)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._max_token_bytes = _max_token_bytes(backend) if _lossless(backend) else None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"tokenizer.json not found in {model_dir}")
        backend = HFTokenizer.from_file(str(tokenizer_file))
        config = _read_json(model_dir / "tokenizer_config.json")
        special = SpecialTokens(**{k: _token_content(config.get(k)) for k in SPECIAL_TOKEN_KEYS})
        return cls(
            backend,
            special,
            cls._eos_ids(backend, special, model_dir),
            _chat_template_source(model_dir, config),
            bool(config.get("clean_up_tokenization_spaces", False)),
        )

    @staticmethod
    def _eos_ids(backend: HFTokenizer, special: SpecialTokens, model_dir: Path) -> tuple[int, ...]:
        """Every id that ends generation: the tokenizer's eos token and the eos ids of config.json and
        generation_config.json (chat models often stop on an end-of-turn token listed only there)."""
        ids: list[int] = []
        if special.eos_token is not None:
            token_id = backend.token_to_id(special.eos_token)
            if token_id is None:
                raise TokenizerError(
                    f"tokenizer_config.json: eos_token {special.eos_token!r} is not in the vocabulary"
                )
            ids.append(token_id)
        for name in ("config.json", "generation_config.json"):
            ids += _config_token_ids(_read_json(model_dir / name).get("eos_token_id"))
        return tuple(dict.fromkeys(ids))  # unique, in order of appearance

    def to_json(self) -> str:
        """The tokenizer.json text (what llguidance builds its token masks from)."""
        return self._backend.to_str()

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template reads the ``tools`` variable (renders tool definitions)."""
        return self._compiled_template is not None and "tools" in jinja2.meta.find_undeclared_variables(
            self._compiled_template.environment.parse(self.chat_template or ""))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added (special) tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def min_tokens(self, text: str) -> int:
        """A lower bound on the number of tokens ``text`` encodes to, computed without tokenizing it:
        a lossless tokenizer spends a token per at most its longest token's bytes (0: no bound known)."""
        if self._max_token_bytes is None:
            return 0
        return -(-len(text.encode("utf-8", "surrogatepass")) // self._max_token_bytes)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode does not): a long text tokenized on a
        # worker thread then never stalls the thread of an event loop (4 MB of text: 8 s). A short
        # text holds the GIL for microseconds, less than encode_batch's hand-over to its thread pool.
        if len(text) <= GIL_HELD_ENCODE_CHARS:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for ``messages`` (OpenAI-style dicts with ``role`` and ``content``)."""
        if self._compiled_template is None:
            raise TokenizerError(
                "this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)"
            )
        variables = {"documents": None, **self.special_tokens.as_template_vars(), **extra}
        return self._compiled_template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, tools=tools, **variables
        )


class IncrementalDetokenizer:
    """Text deltas for a stream of token ids, for streaming responses.

    Each step decodes a short window (a few tokens of context plus the unread ones) and emits what
    the new tokens added. A delta ending in an incomplete UTF-8 sequence (a multi-byte character
    split across tokens) is held back until the tokens that complete it arrive, so no replacement
    character is ever emitted mid-stream; ``flush`` returns whatever is left at the end.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # The prompt's tail is context only.
        self._ids = list(prompt_ids)[-(DETOKENIZE_CONTEXT_TOKENS + MAX_CONTINUATION_TOKENS):]
        self._read_offset = len(self._ids)  # tokens before this are already emitted
        self._prefix_offset = 0  # start of the decoded window; set with its context text below
        self._prefix = ""  # the window's read tokens, decoded
        self._anchor_window(self._read_offset - DETOKENIZE_CONTEXT_TOKENS)

    def _pending_text(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset :]
        return self._prefix, self._tokenizer.decode(window, self._skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Feed one token; returns the new text (possibly empty)."""
        self._ids.append(token_id)
        prefix, text = self._pending_text()
        if len(text) <= len(prefix) or text.endswith(REPLACEMENT_CHAR):
            return ""
        self._advance()
        return text[len(prefix) :]

    def flush(self) -> str:
        """Text still held back at the end of the stream (an incomplete character decodes to U+FFFD)."""
        prefix, text = self._pending_text()
        self._advance()
        return text[len(prefix) :]

    def _advance(self) -> None:
        """Mark every token read; the next window keeps a few of them as context."""
        start = self._read_offset - DETOKENIZE_CONTEXT_TOKENS
        self._read_offset = len(self._ids)
        self._anchor_window(start)

    def _anchor_window(self, start: int) -> None:
        """Start the window at ``start``, or up to MAX_CONTINUATION_TOKENS tokens earlier: the latest
        start whose context (the tokens up to the read offset) does not decode to a leading
        replacement character. None does when the text itself holds one there; then ``start``, as
        good as any. The context's text is kept: every step until the next advance needs it."""
        start = max(start, 0)
        for candidate in range(start, max(start - MAX_CONTINUATION_TOKENS, 0) - 1, -1):
            text = self._tokenizer.decode(self._ids[candidate : self._read_offset], self._skip_special_tokens)
            if candidate == start:  # kept if no start does better: decoded once, here
                self._prefix_offset, self._prefix = start, text
            if not text.startswith(REPLACEMENT_CHAR):
                self._prefix_offset, self._prefix = candidate, text
                return
