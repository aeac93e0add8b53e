"""Shared fixtures: the bundled demo model, and tiny random HF checkpoints (built once per session,
fp32 HF reference included)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pdserve.models.llama import LlamaForCausalLM
from pdserve.models.loader import default_model_dir, load_model
from pdserve.tests.unit.model_fixtures import save_tiny_hf_model


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    """The bundled demo model, float32, loaded as engines load it; one per test module."""
    return load_model(default_model_dir(), "float32")


@dataclass(frozen=True)
class TinyCheckpoint:
    model_dir: Path  # config.json + safetensors, as HF save_pretrained writes them
    hf_model: torch.nn.Module  # the same weights in HF transformers (fp32, eval), the reference


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """Llama, GQA (4 heads, 2 kv heads), tied embeddings, one safetensors file."""
    model_dir = tmp_path_factory.mktemp("tiny_llama")
    return TinyCheckpoint(model_dir, save_tiny_hf_model(model_dir, "llama", seed=1, tie_word_embeddings=True))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """Qwen2 (q/k/v bias), untied LM head, sharded into several files with an index."""
    model_dir = tmp_path_factory.mktemp("tiny_qwen2")
    hf_model = save_tiny_hf_model(
        model_dir, "qwen2", seed=2, tie_word_embeddings=False, max_shard_size="40KB"
    )
    return TinyCheckpoint(model_dir, hf_model)
