"""The scheduler's PD paths: decode-side reservations for a peer's KV, and prefill-only hand-off."""

from __future__ import annotations

import pytest

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import SchedulerConfig
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import AdmissionError, CapacityError, Scheduler

BLOCK_SIZE = 4


def make(num_blocks: int = 8, **config: object) -> Scheduler:
    cfg = SchedulerConfig(max_num_batched_tokens=16, max_model_len=64, **config)
    return Scheduler(cfg, BlockManager(num_blocks, BLOCK_SIZE))


def request(request_id: str, prompt_len: int, **params: object) -> Request:
    params.setdefault("max_tokens", 8)
    return Request(request_id, list(range(1, prompt_len + 1)), SamplingParams(**params), eos_token_ids=(0,))


def test_reservation_holds_blocks_and_is_never_scheduled() -> None:
    scheduler = make()
    r = request("a", prompt_len=9)
    scheduler.reserve_for_remote_kv(r, num_extra_tokens=1)
    assert r.status is RequestStatus.WAITING_FOR_KV
    assert len(r.block_table) == 3  # 9 prompt tokens + 1 first token in blocks of 4
    assert scheduler.block_manager.num_free_blocks == 5
    assert scheduler.schedule().chunks == ()


def test_remote_kv_starts_decoding_after_the_prompt() -> None:
    scheduler = make()
    r = request("a", prompt_len=9)
    scheduler.reserve_for_remote_kv(r, num_extra_tokens=1)
    update = scheduler.on_remote_kv("a", first_token_id=42)
    assert update.new_token_ids == (42,) and r.status is RequestStatus.RUNNING
    assert r.num_computed_tokens == 9 and r.output_token_ids == [42]
    (chunk,) = scheduler.schedule().chunks
    assert chunk.token_ids == (42,) and chunk.start_position == 9 and chunk.sample


def test_a_first_token_that_ends_the_request_frees_its_blocks() -> None:
    scheduler = make()
    r = request("a", prompt_len=5, max_tokens=1)
    scheduler.reserve_for_remote_kv(r, num_extra_tokens=1)
    scheduler.on_remote_kv("a", first_token_id=7)
    assert r.status is RequestStatus.FINISHED_LENGTH
    assert scheduler.block_manager.num_free_blocks == 8 and scheduler.num_unfinished == 0


def test_abort_of_a_reservation_frees_its_blocks() -> None:
    scheduler = make()
    scheduler.reserve_for_remote_kv(request("a", prompt_len=9), num_extra_tokens=1)
    assert scheduler.abort("a")
    assert scheduler.block_manager.num_free_blocks == 8
    assert scheduler.on_remote_kv("a", first_token_id=1) is None


def test_reservation_without_room_is_a_capacity_error_and_leaks_nothing() -> None:
    scheduler = make(num_blocks=4)
    first = request("a", prompt_len=11, max_tokens=4)
    scheduler.reserve_for_remote_kv(first, num_extra_tokens=1)
    with pytest.raises(CapacityError):
        second = request("b", prompt_len=11, max_tokens=4)
        scheduler.reserve_for_remote_kv(second, num_extra_tokens=1)
    assert scheduler.block_manager.num_free_blocks == 1
    with pytest.raises(AdmissionError) as info:  # never servable: not a capacity problem
        scheduler.reserve_for_remote_kv(request("c", prompt_len=70), num_extra_tokens=1)
    assert not isinstance(info.value, CapacityError)


def test_prefill_only_request_hands_off_and_keeps_its_blocks() -> None:
    scheduler = make()
    r = request("a", prompt_len=20)  # two chunks with a budget of 16
    r.prefill_only = True
    scheduler.add(r)
    first = scheduler.schedule()
    assert [c.sample for c in first.chunks] == [False]
    scheduler.on_step_done(first, {})
    second = scheduler.schedule()
    (update,) = scheduler.on_step_done(second, {"a": (99,)})
    assert r.status is RequestStatus.FINISHED_PREFILLED and update.new_token_ids == (99,)
    assert scheduler.num_unfinished == 0 and scheduler.schedule().chunks == ()
    assert len(r.block_table) == 5 and scheduler.block_manager.num_free_blocks == 3  # held for transfer
    scheduler.block_manager.free(r)
    assert scheduler.block_manager.num_free_blocks == 8
