from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import Request


def make_request() -> Request:
    # The block manager only looks at block_table and num_computed_tokens: ids may repeat.
    return Request("r", [1], SamplingParams())


def test_blocks_needed_rounds_up() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    assert [manager.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_ensure_capacity_grows_block_by_block() -> None:
    manager = BlockManager(num_blocks=4, block_size=4)
    request = make_request()
    assert manager.ensure_capacity(request, 3)
    assert len(request.block_table) == 1
    assert manager.ensure_capacity(request, 4)  # same block still has room
    assert len(request.block_table) == 1
    assert manager.ensure_capacity(request, 9)
    assert len(request.block_table) == 3 and len(set(request.block_table)) == 3
    assert manager.num_free_blocks == 1
    assert all(manager.ref_count(b) == 1 for b in request.block_table)


def test_ensure_capacity_failure_allocates_nothing() -> None:
    manager = BlockManager(num_blocks=3, block_size=2)
    holder, request = make_request(), make_request()
    assert manager.ensure_capacity(holder, 2)
    assert manager.ensure_capacity(request, 2)
    assert not manager.ensure_capacity(request, 7)  # needs 3 more blocks, 1 free
    assert len(request.block_table) == 1 and manager.num_free_blocks == 1


def test_free_returns_blocks_and_clears_the_table() -> None:
    manager = BlockManager(num_blocks=4, block_size=4)
    request = make_request()
    manager.ensure_capacity(request, 16)
    assert manager.num_free_blocks == 0
    manager.free(request)
    assert request.block_table == [] and manager.num_free_blocks == 4


def test_fork_shares_full_blocks_until_the_last_holder_frees() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    parent, child = make_request(), make_request()
    manager.ensure_capacity(parent, 5)
    parent.num_computed_tokens = 5
    manager.fork(parent, child, 4)
    assert child.block_table == parent.block_table[:2]
    assert [manager.ref_count(b) for b in parent.block_table] == [2, 2, 1]
    manager.free(parent)
    assert manager.num_free_blocks == 2  # the two shared blocks stay with the child
    assert [manager.ref_count(b) for b in child.block_table] == [1, 1]
    manager.free(child)
    assert manager.num_free_blocks == 4


@pytest.mark.parametrize("num_tokens", [3, 6])
def test_fork_rejects_partial_or_uncomputed_blocks(num_tokens: int) -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    parent, child = make_request(), make_request()
    manager.ensure_capacity(parent, 5)
    parent.num_computed_tokens = 5
    with pytest.raises(ValueError, match="fork"):
        manager.fork(parent, child, num_tokens)
    assert child.block_table == []


class BlockManagerMachine(RuleBasedStateMachine):
    """Random grow / fork / free sequences: reference counts always match the block tables held."""

    NUM_BLOCKS = 12
    BLOCK_SIZE = 3
    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.manager = BlockManager(self.NUM_BLOCKS, self.BLOCK_SIZE)
        self.live: list[Request] = []

    @rule(target=requests, num_tokens=st.integers(0, 20))
    def new_request(self, num_tokens: int) -> Request:
        request = make_request()
        before = self.manager.num_free_blocks
        needed = -(-num_tokens // self.BLOCK_SIZE)
        ok = self.manager.ensure_capacity(request, num_tokens)
        assert ok == (needed <= before)
        assert len(request.block_table) == (needed if ok else 0)
        self.live.append(request)
        return request

    @rule(request=requests, extra=st.integers(0, 12))
    def grow(self, request: Request, extra: int) -> None:
        if request not in self.live:
            return
        held = len(request.block_table)
        target = held * self.BLOCK_SIZE + extra
        before = self.manager.num_free_blocks
        ok = self.manager.ensure_capacity(request, target)
        expected = max(held, -(-target // self.BLOCK_SIZE))
        assert len(request.block_table) == (expected if ok else held)
        assert ok == (expected - held <= before)

    @rule(parent=requests, num_full_blocks=st.integers(0, 4))
    def fork(self, parent: Request, num_full_blocks: int) -> None:
        if parent not in self.live or num_full_blocks > len(parent.block_table):
            return
        parent.num_computed_tokens = len(parent.block_table) * self.BLOCK_SIZE
        child = make_request()
        self.manager.fork(parent, child, num_full_blocks * self.BLOCK_SIZE)
        self.live.append(child)

    @rule(request=consumes(requests))
    def free(self, request: Request) -> None:
        if request in self.live:
            self.manager.free(request)
            self.live.remove(request)

    @invariant()
    def ref_counts_match_block_tables(self) -> None:
        holders = Counter(b for r in self.live for b in r.block_table)
        for block_id in range(self.NUM_BLOCKS):
            assert self.manager.ref_count(block_id) == holders[block_id]
        assert self.manager.num_free_blocks == self.NUM_BLOCKS - len(holders)
        for request in self.live:  # a request never holds a block twice
            assert len(set(request.block_table)) == len(request.block_table)

    def teardown(self) -> None:
        for request in self.live:
            self.manager.free(request)
        assert self.manager.num_free_blocks == self.NUM_BLOCKS


BlockManagerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase
