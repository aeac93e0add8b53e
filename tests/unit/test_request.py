from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.request import Request, RequestStateError, RequestStatus

EOS = 2


def make_request(prompt: list[int] | None = None, eos: tuple[int, ...] = (EOS,), **params: object) -> Request:
    return Request("r", prompt or [5, 6, 7], SamplingParams(**params), eos_token_ids=eos)


def running(**params: object) -> Request:
    request = make_request(**params)
    request.start_running()
    return request


def test_statuses_are_ordered_and_finished_is_a_comparison() -> None:
    order = [RequestStatus.WAITING, RequestStatus.WAITING_FOR_KV, RequestStatus.RUNNING,
             RequestStatus.PREEMPTED, RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
             RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR, RequestStatus.FINISHED_PREFILLED]
    assert order == sorted(RequestStatus)
    assert [s.is_finished for s in order] == [False] * 4 + [True] * 5


def test_new_request_counts_prompt_tokens() -> None:
    request = make_request([1, 2, 3, 4])
    assert request.status is RequestStatus.WAITING
    assert (request.num_tokens, request.num_computed_tokens, request.num_uncomputed_tokens) == (4, 0, 4)
    assert request.block_table == [] and request.draft_token_ids == []
    assert request.finish_reason is None


@pytest.mark.parametrize("kwargs", [{"prompt_token_ids": []}])
def test_invalid_construction_is_rejected(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"request_id": "r", "prompt_token_ids": [1],
                               "sampling_params": SamplingParams()}
    args.update(kwargs)
    with pytest.raises(ValueError):
        Request(**args)  # type: ignore[arg-type]


@given(st.lists(st.integers(0, 99), min_size=1, max_size=8), st.lists(st.integers(0, 99), max_size=8),
       st.data())
def test_token_ids_between_is_a_slice_of_all_token_ids(prompt: list[int], output: list[int],
                                                       data: st.DataObject) -> None:
    request = make_request(prompt, eos=(), max_tokens=20)
    request.start_running()
    for token_id in output:
        request.append_token(token_id)
    total = len(prompt) + len(output)
    start = data.draw(st.integers(0, total))
    end = data.draw(st.integers(start, total))
    assert request.all_token_ids == prompt + output
    assert request.token_ids_between(start, end) == (prompt + output)[start:end]


def test_preempt_keeps_outputs_and_forgets_kv() -> None:
    request = running(max_tokens=5)
    request.append_token(9)
    request.num_computed_tokens = 3
    request.set_draft_tokens([4, 4])
    request.preempt()
    assert request.status is RequestStatus.PREEMPTED
    assert request.num_computed_tokens == 0 and request.draft_token_ids == []
    assert request.output_token_ids == [9]
    request.start_running()
    assert request.status is RequestStatus.RUNNING


def test_preempt_with_blocks_still_held_is_a_bug() -> None:
    request = running()
    request.block_table.append(0)
    with pytest.raises(RequestStateError, match="free its blocks"):
        request.preempt()


def test_illegal_transitions_raise() -> None:
    request = make_request()
    with pytest.raises(RequestStateError):
        request.preempt()  # not running
    with pytest.raises(RequestStateError):
        request.append_token(1)  # not running
    request.wait_for_remote_kv()
    assert request.status is RequestStatus.WAITING_FOR_KV
    request.start_running()
    with pytest.raises(RequestStateError):
        request.finish(RequestStatus.RUNNING)
    request.abort()
    assert request.finish_reason == "abort"
    with pytest.raises(RequestStateError, match="already finished"):
        request.finish(RequestStatus.FINISHED_STOPPED)
    with pytest.raises(RequestStateError):
        request.start_running()


def test_finish_with_error_keeps_the_reason() -> None:
    request = make_request()
    request.finish(RequestStatus.FINISHED_ERROR, error="too long")
    assert (request.finish_reason, request.error) == ("error", "too long")


def test_eos_stops_unless_ignored() -> None:
    request = running(max_tokens=10)
    request.append_token(EOS)
    assert request.stop_status(max_model_len=100) is RequestStatus.FINISHED_STOPPED
    ignoring = running(max_tokens=10, ignore_eos=True)
    ignoring.append_token(EOS)
    assert ignoring.stop_status(max_model_len=100) is None


def test_stop_token_ids_stop_even_with_ignore_eos() -> None:
    request = running(max_tokens=10, stop_token_ids=(8,), ignore_eos=True)
    request.append_token(7)
    assert request.stop_status(max_model_len=100) is None
    request.append_token(8)
    assert request.stop_status(max_model_len=100) is RequestStatus.FINISHED_STOPPED


def test_min_tokens_suppresses_stops() -> None:
    request = running(max_tokens=10, min_tokens=2)
    statuses = []
    for _ in range(3):
        request.append_token(EOS)
        statuses.append(request.stop_status(max_model_len=100))
    assert statuses == [None, None, RequestStatus.FINISHED_STOPPED]


def test_length_limits() -> None:
    request = running(max_tokens=2)
    request.append_token(1)
    assert request.stop_status(max_model_len=100) is None
    request.append_token(1)
    assert request.stop_status(max_model_len=100) is RequestStatus.FINISHED_LENGTH
    short = running(max_tokens=10)  # prompt of 3: max_model_len 4 leaves room for one token
    short.append_token(1)
    assert short.stop_status(max_model_len=4) is RequestStatus.FINISHED_LENGTH
    assert short.max_num_tokens(max_model_len=4) == 4
    assert short.max_num_tokens(max_model_len=100) == 13


def test_stop_token_wins_over_length_on_the_same_token() -> None:
    request = running(max_tokens=1)
    request.append_token(EOS)
    assert request.stop_status(max_model_len=100) is RequestStatus.FINISHED_STOPPED
