"""Helpers for model tests: tiny random HF checkpoints and paged-cache batches.

HF's default init (std 0.02, norms at 1) makes logits so small that a wrong RoPE or a swapped
projection still lands within 1e-4 of the reference; ``randomize_`` rescales every weight so
activations and logits are O(1) and a 1e-4 tolerance means something.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import torch
from safetensors.torch import load_file, save_file

from pdserve.kernels.attention import AttentionMetadata
from pdserve.models.config import ModelConfig

TINY_DIMS: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """O(1) activations: Linear weights ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1), biases ~ N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.1 * noise)
        elif p.ndim == 1:
            p.copy_(0.1 * noise)
        elif "embed_tokens" in name:
            p.copy_(noise)
        else:
            p.copy_(noise / math.sqrt(p.shape[1]))


def save_tiny_hf_model(
    out_dir: Path, family: str = "llama", seed: int = 0, max_shard_size: str | None = None, **overrides: Any
) -> torch.nn.Module:
    """A tiny random HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` saved as safetensors; returns it
    (fp32, eval mode) as the reference."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]
    config = config_cls(**{**TINY_DIMS, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize_(model, seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kwargs)
    return model


def make_kv_caches(
    config: ModelConfig, num_layers: int, num_blocks: int, block_size: int
) -> list[tuple[paddle.Tensor, paddle.Tensor]]:
    """Zeroed caches ``[num_blocks, num_kv_heads, block_size, head_dim]`` per layer."""
    shape = [num_blocks, config.num_key_value_heads, block_size, config.head_dim]
    return [(paddle.zeros(shape, "float32"), paddle.zeros(shape, "float32")) for _ in range(num_layers)]


class PagedSequences:
    """Block tables for a few sequences, handed out in a scrambled block order so that the paged
    path is exercised (a sequence's blocks are not contiguous and not in id order)."""

    def __init__(self, num_seqs: int, blocks_per_seq: int, block_size: int, seed: int = 0) -> None:
        self.block_size = block_size
        ids = np.random.default_rng(seed).permutation(num_seqs * blocks_per_seq + 1)
        ids = ids[ids != 0][: num_seqs * blocks_per_seq]  # block 0 stays unused: it is the padding id
        self.block_tables = [ids[i::num_seqs].tolist() for i in range(num_seqs)]
        self.num_blocks = num_seqs * blocks_per_seq + 1
        self.context_lens = [0] * num_seqs

    def step(
        self, new_tokens: Sequence[Sequence[int]]
    ) -> tuple[paddle.Tensor, paddle.Tensor, AttentionMetadata]:
        """Append each sequence's new tokens; returns flattened (input_ids, positions, metadata)."""
        ids: list[int] = []
        positions: list[int] = []
        for i, tokens in enumerate(new_tokens):
            ids += list(tokens)
            positions += range(self.context_lens[i], self.context_lens[i] + len(tokens))
            self.context_lens[i] += len(tokens)
        meta = AttentionMetadata.build(
            self.block_tables, [len(t) for t in new_tokens], self.context_lens, self.block_size
        )
        return (
            paddle.to_tensor(np.asarray(ids, np.int64)),
            paddle.to_tensor(np.asarray(positions, np.int64)),
            meta,
        )


def last_rows(query_lens: Sequence[int]) -> paddle.Tensor:
    """Row of each sequence's last token in a flattened batch."""
    return paddle.to_tensor(np.cumsum(query_lens).astype(np.int64) - 1)


def add_mtp_layer(model_dir: Path, seed: int) -> None:
    """Append a DeepSeek-style MTP layer (random, O(1) activations) to a saved HF Llama checkpoint,
    including the duplicated shared tensors DeepSeek-V3 checkpoints carry."""
    config = json.loads((model_dir / "config.json").read_text())
    tensors = load_file(model_dir / "model.safetensors")
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    gen = torch.Generator().manual_seed(seed)
    p = f"model.layers.{layers}."
    for name, t in list(tensors.items()):
        if name.startswith("model.layers.0."):  # the MTP block has a decoder layer's shapes
            noise = torch.randn(t.shape, generator=gen)
            scaled = 1 + 0.1 * noise if t.ndim == 1 else noise / t.shape[1] ** 0.5
            tensors[p + name[len("model.layers.0.") :]] = scaled.contiguous()
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"{p}{norm}.weight"] = 1 + 0.1 * torch.randn(hidden, generator=gen)
    tensors[p + "eh_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=gen) / (2 * hidden) ** 0.5
    tensors[p + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[p + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    config["num_nextn_predict_layers"] = 1
    (model_dir / "config.json").write_text(json.dumps(config))
