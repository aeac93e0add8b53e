"""pdserve's Paddle Llama/Qwen2 against HF transformers (fp32), through the paged KV cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.loader import default_model_dir, load_model
from pdserve.tests.unit.model_fixtures import PagedSequences, last_rows, make_kv_caches, save_tiny_hf_model

BLOCK_SIZE = 4
TOLERANCE = 1e-4
PROMPTS = [
    [5, 17, 99, 3, 42, 8, 120],
    [1, 2, 3],
    [100, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],
]


def hf_logits(hf_model: torch.nn.Module, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float().numpy()  # [len, vocab]


def paged_prefill_logits(model: LlamaForCausalLM, prompts: list[list[int]]) -> list[np.ndarray]:
    seqs = PagedSequences(len(prompts), blocks_per_seq=6, block_size=BLOCK_SIZE)
    caches = make_kv_caches(model.config, model.config.num_hidden_layers, seqs.num_blocks, BLOCK_SIZE)
    input_ids, positions, meta = seqs.step(prompts)
    logits = model.compute_logits(model(input_ids, positions, caches, meta)).numpy()
    return np.split(logits, np.cumsum([len(p) for p in prompts])[:-1])


def assert_matches_hf(model: LlamaForCausalLM, hf_model: torch.nn.Module, prompts: list[list[int]]) -> None:
    for prompt, ours in zip(prompts, paged_prefill_logits(model, prompts), strict=True):
        ref = hf_logits(hf_model, prompt)
        assert ref.std() > 0.3, "reference logits too small for the tolerance to mean anything"
        np.testing.assert_allclose(ours, ref, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_prefill_batch_matches_hf(fixture: str, request: pytest.FixtureRequest) -> None:
    checkpoint = request.getfixturevalue(fixture)
    assert_matches_hf(load_model(checkpoint.model_dir), checkpoint.hf_model, PROMPTS)


def test_qwen2_fixture_is_sharded_with_bias_and_untied_head(tiny_qwen2) -> None:
    # The parity test above only proves these paths if the fixture really exercises them.
    assert (tiny_qwen2.model_dir / "model.safetensors.index.json").is_file()
    assert len(list(tiny_qwen2.model_dir.glob("model-*.safetensors"))) > 1
    model = load_model(tiny_qwen2.model_dir)
    assert model.lm_head is not None
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    ],
    ids=lambda d: d["rope_type"],
)
def test_rope_scaling_matches_hf(rope_scaling: dict, tmp_path: Path) -> None:
    hf_model = save_tiny_hf_model(
        tmp_path, "llama", seed=3, num_hidden_layers=1, rope_scaling=rope_scaling, rope_theta=500.0
    )
    model = load_model(tmp_path)
    assert (
        model.config.rope_scaling is not None
        and model.config.rope_scaling.rope_type == rope_scaling["rope_type"]
    )
    assert_matches_hf(model, hf_model, [PROMPTS[2], PROMPTS[0]])


def test_prefill_then_decode_through_cache_matches_hf(tiny_llama) -> None:
    """Prefill, one decode token per sequence, then a mixed step (a decode and a 5-token chunk):
    each step's logits equal HF's logits for the full sequence so far."""
    model = load_model(tiny_llama.model_dir)
    prompts = [list(p) for p in PROMPTS]
    seqs = PagedSequences(len(prompts), blocks_per_seq=8, block_size=BLOCK_SIZE, seed=7)
    caches = make_kv_caches(model.config, model.config.num_hidden_layers, seqs.num_blocks, BLOCK_SIZE)
    steps = [prompts, [[31], [32], [33]], [[40], [41, 42, 43, 44, 45], [46]]]
    full = [[] for _ in prompts]
    for new_tokens in steps:
        input_ids, positions, meta = seqs.step(new_tokens)
        hidden = model(input_ids, positions, caches, meta)
        logits = model.compute_logits(hidden[last_rows([len(t) for t in new_tokens])]).numpy()
        for i, tokens in enumerate(new_tokens):
            full[i] += tokens
            np.testing.assert_allclose(
                logits[i], hf_logits(tiny_llama.hf_model, full[i])[-1], atol=TOLERANCE, rtol=0
            )


def test_bundled_demo_model_matches_hf() -> None:
    model_dir = default_model_dir()
    if not (model_dir / "model.safetensors").is_file():
        pytest.skip(
            f"demo weights {model_dir / 'model.safetensors'} are absent (trained separately; "
            "the lead adds them before CI)"
        )
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = load_model(model_dir)
    assert model.mtp is not None
    prompts = [[3, 500, 1200, 7, 4000, 42, 9, 8000, 15, 16], [1, 77, 78]]
    assert_matches_hf(model, hf_model, prompts)
