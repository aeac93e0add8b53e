"""Prompt logprobs across the engine -> node-server boundary: the engine process sends them as
PromptLogprobs control events, and the bridge hands a request its prompt logprobs before its first token
even though the two travel on different channels (control pipe, SysV queue). Real engine process.
"""

from __future__ import annotations

import asyncio
import time

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.output_codec import SlotOutput
from pdserve.engine.protocol import PromptLogprobs
from pdserve.models.loader import default_model_dir
from pdserve.models.tokenizer import Tokenizer
from pdserve.node.engine_bridge import BridgeItem, EngineBridge, RequestHandle
from pdserve.node.engine_client import EngineClient, EngineClientConfig

ENGINE = EngineConfig(
    cache=CacheConfig(num_blocks=64, block_size=16),
    scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=8, max_model_len=512),
)


def _config() -> EngineClientConfig:
    return EngineClientConfig(model_dir=str(default_model_dir()), engine=ENGINE, eos_token_ids=(0,),
                              startup_timeout_s=90.0)


async def _items_until_done(handle: RequestHandle) -> list[BridgeItem]:
    items: list[BridgeItem] = []
    async with asyncio.timeout(60):
        while not (items and isinstance(items[-1], SlotOutput) and items[-1].event.is_terminal):
            items.append(await handle.items.get())
    return items


async def _run_three_requests(prompt: list[int]) -> dict[str, list[BridgeItem]]:
    bridge = EngineBridge(EngineClient(_config()))
    await bridge.start()
    try:
        handles = {
            "asked": bridge.submit("asked", prompt,
                                   SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2)),
            # one prompt token, one output token: the first slot is also the terminal one
            "one-token": bridge.submit("one-token", prompt[:1],
                                       SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)),
            "not-asked": bridge.submit("not-asked", prompt, SamplingParams(max_tokens=3, temperature=0.0)),
        }
        return {name: await _items_until_done(h) for name, h in handles.items()}
    finally:
        await asyncio.get_running_loop().run_in_executor(None, bridge.close)


def test_prompt_logprobs_reach_the_request_before_its_first_token() -> None:
    prompt = Tokenizer.from_dir(default_model_dir()).encode("import os\nimport sys\n\n\ndef main(argv):")
    got = asyncio.run(_run_three_requests(prompt))

    first, *rest = got["asked"]
    assert isinstance(first, PromptLogprobs) and first.last and first.first_position == 1
    assert len(first.logprobs) == len(first.ranks) == len(first.top_ids) == len(prompt) - 1
    assert all(len(ids) == len(lps) == 2 for ids, lps in zip(first.top_ids, first.top_logprobs, strict=True))
    for lp, rank, top in zip(first.logprobs, first.ranks, first.top_logprobs, strict=True):
        assert lp <= 0.0 and rank >= 1 and top == sorted(top, reverse=True)
        assert (rank == 1) == (abs(lp - top[0]) < 1e-6)  # rank 1 is the top entry, nothing else is
    assert all(isinstance(item, SlotOutput) for item in rest)
    assert sum(item.num_tokens for item in rest) == 3

    one_first, one_slot = got["one-token"]
    assert isinstance(one_first, PromptLogprobs) and one_first.last and one_first.logprobs == []
    assert isinstance(one_slot, SlotOutput) and one_slot.num_tokens == 1 and one_slot.event.is_terminal

    assert not any(isinstance(item, PromptLogprobs) for item in got["not-asked"])


def test_a_first_token_without_its_prompt_logprobs_is_not_held_forever() -> None:
    # An engine that never sends the PromptLogprobs it owes (a broken one; a real engine always sends
    # them first): the bridge waits its bound, then lets the token through rather than stall the pump.
    bridge = EngineBridge(EngineClient(_config()), prompt_logprobs_wait_s=0.3)
    handle = RequestHandle("r", seq_id=7, prompt_len=4, awaits_prompt_logprobs=True)
    bridge._handles[7] = handle  # the engine is never started: its control channel stays silent
    started = time.monotonic()
    bridge._wait_for_prompt_logprobs(7)
    assert 0.3 <= time.monotonic() - started < 2.0
    assert not handle.awaits_prompt_logprobs and handle.items.empty()
