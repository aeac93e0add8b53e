"""Prompt logprobs across the engine -> node-server boundary: they ride on the request's first output
record (one stream, so they can never arrive after the first token), also when they need many SysV
messages. Real engine process, read through the node server's bridge.
"""

from __future__ import annotations

import asyncio

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.protocol import RequestOutput
from pdserve.models.loader import default_model_dir
from pdserve.models.tokenizer import Tokenizer
from pdserve.node.engine_bridge import BridgeItem, EngineBridge, RequestHandle
from pdserve.node.engine_client import EngineClient, EngineClientConfig

ENGINE = EngineConfig(
    cache=CacheConfig(num_blocks=128, block_size=16),
    scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=8, max_model_len=1024),
)


def _config() -> EngineClientConfig:
    return EngineClientConfig(model_dir=str(default_model_dir()), engine=ENGINE, eos_token_ids=(0,),
                              startup_timeout_s=90.0)


async def _items_until_done(handle: RequestHandle) -> list[BridgeItem]:
    items: list[BridgeItem] = []
    async with asyncio.timeout(60):
        while not (items and isinstance(items[-1], RequestOutput) and items[-1].finished):
            items.append(await handle.items.get())
    return items


async def _run(requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[BridgeItem]]:
    bridge = EngineBridge(EngineClient(_config()))
    await bridge.start()
    try:
        handles = {name: bridge.generate(name, prompt, params) for name, (prompt, params) in requests.items()}
        return {name: await _items_until_done(h) for name, h in handles.items()}
    finally:
        await asyncio.get_running_loop().run_in_executor(None, bridge.close)


def test_prompt_logprobs_ride_on_the_first_output() -> None:
    prompt = Tokenizer.from_dir(default_model_dir()).encode("import os\nimport sys\n\n\ndef main(argv):")
    # 20 top logprobs for ~700 positions: about 200 KB of record, far more than one 8 KB SysV message.
    long_prompt = (prompt * 80)[:700]
    got = asyncio.run(_run({
        "asked": (prompt, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2)),
        "long": (long_prompt, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=20)),
        # one prompt token, one output token: the first output is also the last one
        "one-token": (prompt[:1], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)),
        "not-asked": (prompt, SamplingParams(max_tokens=3, temperature=0.0)),
    }))

    first, *rest = got["asked"]
    scored = first.prompt_logprobs
    assert scored is not None and scored.token_ids == prompt[1:] and scored.top_k == 2
    for i, (lp, rank) in enumerate(zip(scored.logprobs, scored.ranks, strict=True)):
        top = [x for _, x in scored.top(i)]
        assert lp <= 0.0 and rank >= 1 and top == sorted(top, reverse=True)
        assert (rank == 1) == (abs(lp - top[0]) < 1e-6)  # rank 1 is the top entry, nothing else is
    assert all(isinstance(item, RequestOutput) and item.prompt_logprobs is None for item in rest)
    assert sum(len(item.tokens) for item in got["asked"]) == 3

    long_scored = got["long"][0].prompt_logprobs
    assert long_scored.token_ids == long_prompt[1:] and len(long_scored.top_ids) == 20 * 699

    (only,) = got["one-token"]
    assert only.prompt_logprobs is not None and len(only.prompt_logprobs) == 0
    assert len(only.tokens) == 1 and only.finished

    assert all(item.prompt_logprobs is None for item in got["not-asked"])
