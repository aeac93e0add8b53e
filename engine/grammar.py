"""Grammar-constrained decoding inside the engine: one llguidance matcher per request.

The matcher follows the request's output tokens (`Request.append_token` advances it), answers which
tokens may come next (a boolean row per logits row, applied in sampling before temperature, top-k
and top-p: kernels/sampling.py) and how many of a list of draft tokens the grammar accepts (drafts
are cut at the first that violates it). Masks for speculative rows are computed by consuming the
drafts and rolling back, so row j's mask is the state after the outputs and drafts 0 .. j-1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import llguidance
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from pdserve.common.grammar import GrammarError, compile_grammar, grammar_tokenizer
from pdserve.common.sampling_params import GrammarSpec


class GrammarMatcher:
    """The grammar state of one request's output."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._bitmask = allocate_token_bitmask(1, vocab_size)

    @property
    def is_finished(self) -> bool:
        """Complete: the grammar allows no token but an end of sequence (or one was consumed)."""
        return self._matcher.is_stopped()

    def accepts(self, token_id: int) -> bool:
        """Whether ``token_id`` may come next (the state is unchanged)."""
        return self._matcher.validate_tokens([token_id]) == 1

    def advance(self, token_id: int) -> None:
        """Consume an output token; a token the mask did not allow is a bug in the caller."""
        if not self._matcher.consume_token(token_id):
            raise GrammarError(f"token {token_id} violates the grammar: {self._matcher.get_error()}")

    def valid_prefix(self, token_ids: Sequence[int]) -> int:
        """How many of ``token_ids``, in order, the grammar accepts from the current state."""
        return self._matcher.validate_tokens(list(token_ids)) if token_ids else 0

    def allowed_tokens(self, drafts: Sequence[int] = ()) -> np.ndarray:
        """``[len(drafts) + 1, vocab_size]`` bool: row j allows the tokens that may follow the outputs
        plus drafts 0 .. j-1. Rows after a draft the grammar refuses repeat the last valid state's row
        (verification rejects that draft, since its own row does not allow it, so they are never read)."""
        rows = np.empty((len(drafts) + 1, self.vocab_size), dtype=bool)
        # Validated first: consuming a refused token would leave the matcher in its error state for good.
        valid = self.valid_prefix(drafts)
        for j in range(valid + 1):
            rows[j] = self._mask_row()
            if j < valid:
                self.advance(drafts[j])
        rows[valid + 1:] = rows[valid]
        if valid and not self._matcher.rollback(valid):
            raise GrammarError(
                f"grammar matcher could not roll back {valid} drafts: {self._matcher.get_error()}")
        return rows

    def _mask_row(self) -> np.ndarray:
        fill_next_token_bitmask(self._matcher, self._bitmask)
        # one bit per token, token i at bit i % 32 of word i // 32 (little-endian words): unpacked
        # little-endian, bit i lands at index i; viewing the 0/1 bytes as bool needs no copy
        bits = np.unpackbits(self._bitmask.view(np.uint8), count=self.vocab_size, bitorder="little")
        return bits.view(bool)


class GrammarCompiler:
    """Builds matchers for one model's tokenizer; refuses grammars llguidance cannot compile."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    @classmethod
    def for_model(cls, model_dir: str | Path, eos_token_ids: Sequence[int],
                  vocab_size: int) -> GrammarCompiler:
        text = (Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8")
        tokenizer = grammar_tokenizer(text, eos_token_ids, vocab_size)
        return cls(tokenizer, vocab_size)

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        """A fresh matcher for ``spec``; raises GrammarError naming what is wrong."""
        matcher = llguidance.LLMatcher(self.tokenizer, compile_grammar(spec, self.tokenizer), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{spec.kind} grammar: {matcher.get_error()}")
        return GrammarMatcher(matcher, self.vocab_size)
