"""Per-request sampling parameters, validated once at admission."""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_TOP_LOGPROBS = 20
MAX_GRAMMAR_CHARS = 1 << 20  # a grammar's text; a schema past a megabyte is a mistake, not a request
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token in practice, +100 all but forces it
# the messages that need formatting, formatted once rather than on every request's checks
_LOGPROBS_RANGE = f"must be in [0, {MAX_TOP_LOGPROBS}]"
_LOGIT_BIAS_RANGE = f"must map token ids to biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; the message names the field."""


GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "lark")


@dataclass(frozen=True)
class GrammarSpec:
    """The language a request's output must belong to (structured output), as the client gave it.

    ``text`` by kind: json_schema — the schema as JSON; json_object — "" (any JSON object);
    regex — the pattern; choice — a JSON list of the allowed strings; lark — a Lark grammar
    (llguidance's dialect). llguidance compiles it (common/grammar.py) on the router, which refuses
    what it cannot compile, and again in the engine.
    """

    kind: str
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise SamplingParamsError(
                f"grammar kind must be one of {', '.join(GRAMMAR_KINDS)} (got {self.kind!r})")
        if not isinstance(self.text, str) or len(self.text) > MAX_GRAMMAR_CHARS:
            raise SamplingParamsError(
                f"grammar text must be a string of at most {MAX_GRAMMAR_CHARS} characters")
        if self.kind == "json_object" and self.text:
            raise SamplingParamsError("grammar text must be empty for kind json_object")
        if self.kind in ("json_schema", "choice"):
            try:
                value = json.loads(self.text)
            except ValueError as exc:
                raise SamplingParamsError(f"grammar text of kind {self.kind} must be JSON ({exc})") from None
            ok = (isinstance(value, dict | bool) if self.kind == "json_schema" else
                  isinstance(value, list) and bool(value) and all(isinstance(c, str) for c in value))
            if not ok:
                shape = ("a JSON schema (an object)" if self.kind == "json_schema"
                         else "a non-empty list of strings")
                raise SamplingParamsError(f"grammar text of kind {self.kind} must be {shape}")
        elif self.kind in ("regex", "lark") and not self.text:
            raise SamplingParamsError(f"grammar text of kind {self.kind} must not be empty")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k filtering
    min_p: float = 0.0
    seed: int | None = None  # None: the engine draws one at admission, so every request is replayable
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, matched on detokenized text by the node server
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (0 = only the sampled token's)
    prompt_logprobs: int | None = None
    # (token id, bias) pairs, ids ascending: added to the token's logit after penalties (OpenAI's logit_bias)
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Output constrained to a language: a token mask in sampling, the request stops when it is complete
    grammar: GrammarSpec | None = None
    # A migrated continuation (router/dispatch.py): the prompt's last ``resumed_output_tokens`` tokens
    # are output an earlier node already sent. They key the random stream (generation index), count as
    # output for the penalties, and seed the detokenizer and stop strings; max_tokens and min_tokens
    # count the continuation's own tokens.
    resumed_output_tokens: int = 0

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must be in [0, max_tokens]"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "must be in [0, 2**63)"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS, _LOGPROBS_RANGE),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
             _LOGPROBS_RANGE),
            ("stop_token_ids", all(t >= 0 for t in self.stop_token_ids), "must be non-negative ids"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("logit_bias", all(t >= 0 and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for t, b in self.logit_bias),
             _LOGIT_BIAS_RANGE),
            ("grammar", self.grammar is None or isinstance(self.grammar, GrammarSpec),
             "must be a GrammarSpec"),
            ("resumed_output_tokens", self.resumed_output_tokens >= 0, "must be >= 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise SamplingParamsError(f"{name} {why} (got {getattr(self, name)!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether anything changes the logits before temperature (penalties or a logit bias)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0 or bool(self.logit_bias))
