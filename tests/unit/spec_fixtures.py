"""An engine for the speculative-decoding tests: the demo model's paged pool, 16-token blocks,
256-token context, eos id 0, and the scheduler's draft room set from the speculative config."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from pdserve.common.kv_cache import KVCachePool
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine, kv_spec_for
from pdserve.engine.spec_config import SpeculativeConfig
from pdserve.models.llama import LlamaForCausalLM


def make_spec_engine(
    model: LlamaForCausalLM,
    spec: SpeculativeConfig | None,
    *,
    num_blocks: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    registry: CollectorRegistry | None = None,
) -> LLMEngine:
    """Plain decoding when ``spec`` is None, else speculative with ``spec``."""
    config = EngineConfig(
        CacheConfig(num_blocks=num_blocks, block_size=16),
        SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, max_model_len=256,
        ),
        spec,
    )
    pool = KVCachePool.allocate(kv_spec_for(model, config))
    return LLMEngine(model, config, pool, eos_token_ids=[0], spec_registry=registry)
