"""How much of one request's KV has been delivered: the same bookkeeping on both ends of a transfer.

Per layer, a count of delivered tokens (chunks of a layer arrive in token order, so a count is
enough), plus the next chunk sequence number. The prefill side uses it to cut chunks
(`KVChunker`), the decode side to check and advance (`KVReceiver`): both count tokens, not phases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkRange:
    """The part of a request's KV one chunk covers."""

    seq: int
    layer_start: int
    layer_end: int  # exclusive
    token_start: int
    token_end: int  # exclusive


class KVProgress:
    def __init__(self, num_layers: int, num_tokens: int) -> None:
        if num_layers < 1 or num_tokens < 1:
            raise ValueError(f"num_layers and num_tokens must be >= 1 (got {num_layers}, {num_tokens})")
        self.num_tokens = num_tokens
        self.delivered = [0] * num_layers  # tokens delivered per layer
        self.next_seq = 0

    @property
    def complete(self) -> bool:
        return all(n == self.num_tokens for n in self.delivered)

    def problem(self, chunk: ChunkRange) -> str | None:
        """Why `chunk` cannot be the next one (None when it can)."""
        if chunk.seq != self.next_seq:
            return "bad_sequence"
        if chunk.layer_end > len(self.delivered) or chunk.token_end > self.num_tokens:
            return "out_of_range"
        layers = range(chunk.layer_start, chunk.layer_end)
        if any(self.delivered[layer] != chunk.token_start for layer in layers):
            return "not_contiguous"
        return None

    def would_complete(self, chunk: ChunkRange) -> bool:
        """Whether accepting `chunk` (already checked) completes every layer."""
        return chunk.token_end == self.num_tokens and all(
            n == self.num_tokens or chunk.layer_start <= layer < chunk.layer_end
            for layer, n in enumerate(self.delivered)
        )

    def advance(self, chunk: ChunkRange) -> None:
        for layer in range(chunk.layer_start, chunk.layer_end):
            self.delivered[layer] = chunk.token_end
        self.next_seq += 1


def blocks_of(block_table: Sequence[int], token_start: int, token_end: int,
              block_size: int) -> tuple[int, ...]:
    """The blocks of `block_table` holding tokens [token_start, token_end)."""
    return tuple(int(b) for b in block_table[token_start // block_size: -(-token_end // block_size)])
