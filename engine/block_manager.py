"""Paged-KV block allocation: a free list plus per-block reference counts.

A request's `block_table` lists its blocks in token order; token `i` lives in slot
`block_table[i // block_size] * block_size + i % block_size`. Reference counts let several requests
share full blocks (`fork`), the ground for prefix sharing and parallel sampling; a block returns to
the free list when its last holder frees it.
"""

from __future__ import annotations

from collections import deque

from pdserve.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1 (got {num_blocks}, {block_size})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free_block_ids: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ensure_capacity(self, request: Request, num_tokens: int) -> bool:
        """Grow request.block_table to hold num_tokens tokens.

        All or nothing: returns False, allocating nothing, when the free list is too short.
        """
        missing = self.blocks_needed(num_tokens) - len(request.block_table)
        if missing <= 0:
            return True
        if missing > len(self._free_block_ids):
            return False
        for _ in range(missing):
            block_id = self._free_block_ids.popleft()
            self._ref_counts[block_id] = 1
            request.block_table.append(block_id)
        return True

    def fork(self, parent: Request, child: Request, num_tokens: int) -> None:
        """Share the parent's blocks holding its first num_tokens tokens with a child with no blocks.

        Only whole blocks are shared (num_tokens is a multiple of block_size): both requests then
        write their next tokens into blocks of their own, so no copy-on-write is ever needed.
        """
        if child.block_table:
            raise ValueError(f"fork: child {child.request_id!r} already holds blocks")
        if num_tokens % self.block_size or num_tokens > parent.num_computed_tokens:
            raise ValueError(f"fork: num_tokens={num_tokens} must be a multiple of block_size "
                             f"{self.block_size} within the parent's {parent.num_computed_tokens} "
                             "computed tokens")
        shared = parent.block_table[:num_tokens // self.block_size]
        for block_id in shared:
            self._ref_counts[block_id] += 1
        child.block_table.extend(shared)

    def free(self, request: Request) -> None:
        """Drop the request's hold on its blocks; blocks nobody else holds become free."""
        for block_id in request.block_table:
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                # To the back: the blocks freed last are reused last, which keeps their contents
                # around longest (room for hash-based prefix caching later).
                self._free_block_ids.append(block_id)
        request.block_table.clear()
