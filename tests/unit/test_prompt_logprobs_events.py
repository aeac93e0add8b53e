"""PromptLogprobs control events: a request's prompt logprobs split into bounded parts, and their codec."""

from __future__ import annotations

from pdserve.engine.model_runner import TokenInfo
from pdserve.engine.process import prompt_logprobs_parts
from pdserve.engine.protocol import PromptLogprobs, decode_event, encode_event


def _info(i: int) -> TokenInfo:
    return TokenInfo(logprob=-0.5 * i, rank=i + 1, top_ids=(i, i + 1), top_logprobs=(-0.1, -0.2 * i))


def test_parts_cover_every_position_once_in_order_and_only_the_last_is_last() -> None:
    infos = [_info(i) for i in range(5)]
    parts = prompt_logprobs_parts(3, infos, part_size=2)
    assert [(p.first_position, len(p.logprobs), p.last) for p in parts] == [(1, 2, False), (3, 2, False),
                                                                             (5, 1, True)]
    assert [lp for p in parts for lp in p.logprobs] == [-0.5 * i for i in range(5)]
    assert [r for p in parts for r in p.ranks] == [1, 2, 3, 4, 5]
    assert [ids for p in parts for ids in p.top_ids] == [[i, i + 1] for i in range(5)]
    assert {p.seq_id for p in parts} == {3}


def test_a_one_token_prompt_still_gets_a_last_part() -> None:
    assert prompt_logprobs_parts(9, []) == [PromptLogprobs(9, 1, [], [], [], [], last=True)]


def test_parts_round_trip_through_the_event_codec() -> None:
    for part in prompt_logprobs_parts(1, [_info(i) for i in range(3)], part_size=2):
        assert decode_event(encode_event(part)) == part
