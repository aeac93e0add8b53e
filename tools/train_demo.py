"""Train pdserve's bundled demo model: a small Llama-family code model with a DeepSeek-V3-style
MTP module trained jointly, on the token files written by ``tools/demo_data.py``.

PyTorch is used here only because the GPU host has no Paddle; the exported checkpoint is plain HF
layout (config.json + model.safetensors) that pdserve's Paddle model and HF transformers both load.

Reproducible: every hyperparameter is a flag with the default used for the bundled weights, the
seed fixes initialisation and batch sampling, and ``training.json`` records all of it.

    python tools/train_demo.py --data .data --out models/demo            # GPU host
    python tools/train_demo.py --data .data --out /tmp/x --steps 3 --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn


@dataclass(frozen=True)
class Arch:
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class Recipe:
    seed: int = 1234
    steps: int = 5000
    batch_size: int = 64
    seq_len: int = 512
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_loss_weight: float = 0.5
    eval_every: int = 250
    eval_windows: int = 256


def rope_cache(arch: Arch, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    exponents = torch.arange(0, arch.head_dim, 2, device=device).float() / arch.head_dim
    inv_freq = 1.0 / arch.rope_theta**exponents
    freqs = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, head_dim], HF's rotate_half layout
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        d, h, kv, hd = arch.hidden_size, arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, kv * hd, bias=False)
        self.v_proj = nn.Linear(d, kv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        a = self.arch
        q = self.q_proj(x).view(b, t, a.num_attention_heads, a.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, a.num_key_value_heads, a.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, a.num_key_value_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.gate_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPLayer(nn.Module):
    """DeepSeek-V3 MTP module: h' = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]), h = Block(h'),
    logits = head(shared_head.norm(h)), predicting t_{i+2} at position i."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.enorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.hnorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * arch.hidden_size, arch.hidden_size, bias=False)
        self.block = Block(arch)
        self.shared_head_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, next_embeds, hidden, cos, sin):
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], dim=-1))
        return self.shared_head_norm(self.block(x, cos, sin))


class DemoModel(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(Block(arch) for _ in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mtp = MTPLayer(arch)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 style scaled init of residual outputs
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * (arch.num_hidden_layers + 1)))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """ids [B, T] -> (main logits [B, T, V] predicting t+1, mtp logits [B, T-1, V] predicting t+2)."""
        t = ids.shape[1]
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos[:t], sin[:t])
        hidden = self.norm(x)  # the input of the LM head; MTP consumes this
        head = self.embed_tokens.weight
        main_logits = hidden @ head.T
        mtp_hidden = self.mtp(self.embed_tokens(ids[:, 1:]), hidden[:, :-1], cos[: t - 1], sin[: t - 1])
        return main_logits, mtp_hidden @ head.T


def lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine)


def sample_batch(tokens: torch.Tensor, recipe: Recipe, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, tokens.numel() - recipe.seq_len - 1, (recipe.batch_size,), generator=gen)
    offsets = torch.arange(recipe.seq_len + 1)
    return tokens[(starts[:, None] + offsets[None, :]).to(tokens.device)].long()


def losses(model: DemoModel, batch: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    ids, targets = batch[:, :-1], batch[:, 1:]
    main_logits, mtp_logits = model(ids, cos, sin)
    v = main_logits.shape[-1]
    main_loss = F.cross_entropy(main_logits.float().reshape(-1, v), targets.reshape(-1))
    mtp_loss = F.cross_entropy(mtp_logits.float().reshape(-1, v), targets[:, 1:].reshape(-1))
    return main_loss, mtp_loss


@torch.no_grad()
def evaluate(model: DemoModel, heldout: torch.Tensor, recipe: Recipe, cos, sin, autocast) -> dict:
    """Held-out main loss, MTP top-1 accuracy against the data, and the MTP draft acceptance under
    greedy decoding: how often the MTP argmax at i equals the main model's argmax at i+1."""
    model.eval()
    n = min(recipe.eval_windows, (heldout.numel() - 1) // (recipe.seq_len + 1))
    windows = heldout[: n * (recipe.seq_len + 1)].view(n, recipe.seq_len + 1).long()
    main_loss = mtp_loss = 0.0
    main_hits = mtp_hits = accepted = total = 0
    for chunk in windows.split(32):
        with autocast:
            ids, targets = chunk[:, :-1], chunk[:, 1:]
            main_logits, mtp_logits = model(ids, cos, sin)
        v = main_logits.shape[-1]
        main_loss += F.cross_entropy(main_logits.float().reshape(-1, v), targets.reshape(-1),
                                     reduction="sum").item()
        mtp_loss += F.cross_entropy(mtp_logits.float().reshape(-1, v), targets[:, 1:].reshape(-1),
                                    reduction="sum").item()
        main_pred = main_logits.argmax(-1)
        mtp_pred = mtp_logits.argmax(-1)
        main_hits += (main_pred == targets).sum().item()
        mtp_hits += (mtp_pred == targets[:, 1:]).sum().item()
        accepted += (mtp_pred == main_pred[:, 1:]).sum().item()
        total += targets[:, 1:].numel()
    model.train()
    main_total = total + windows.shape[0]
    return {
        "heldout_main_loss": main_loss / main_total,
        "heldout_mtp_loss": mtp_loss / total,
        "heldout_main_top1": main_hits / main_total,
        "heldout_mtp_top1": mtp_hits / total,
        "heldout_mtp_greedy_accept": accepted / total,
    }


def hf_state_dict(model: DemoModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Rename to HF Llama names; the MTP layer goes at model.layers.{L} like DeepSeek-V3."""
    out: dict[str, torch.Tensor] = {}
    nl = model.arch.num_hidden_layers
    for name, tensor in model.state_dict().items():
        if name.startswith("mtp.block."):
            hf = f"model.layers.{nl}." + name[len("mtp.block."):]
        elif name.startswith("mtp.shared_head_norm."):
            hf = f"model.layers.{nl}.shared_head.norm." + name.split(".")[-1]
        elif name.startswith("mtp."):
            hf = f"model.layers.{nl}." + name[len("mtp."):]
        else:
            hf = "model." + name
        out[hf] = tensor.detach().to(dtype).contiguous().cpu()
    return out


def hf_config(arch: Arch) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "num_nextn_predict_layers": 1,
        "bos_token_id": None,
        "eos_token_id": 0,
        "torch_dtype": "bfloat16",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="train the bundled demo model")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-seconds", type=float, default=0.0,
                        help="stop early (after an eval) past this wall time; 0 = run all steps")
    for field, default in asdict(Recipe()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args()
    recipe = Recipe(**{f: getattr(args, f) for f in asdict(Recipe())})
    arch = Arch()
    device = torch.device(args.device)
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)

    train = torch.from_numpy(np.load(args.data / "train.npy").astype(np.int32)).to(device)
    heldout = torch.from_numpy(np.load(args.data / "heldout.npy").astype(np.int32)).to(device)
    model = DemoModel(arch).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    cos, sin = rope_cache(arch, recipe.seq_len, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M train tokens {train.numel()} heldout {heldout.numel()}", flush=True)

    best: dict | None = None
    best_state: dict[str, torch.Tensor] | None = None
    history = []
    started = time.time()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        batch = sample_batch(train, recipe, gen)
        with autocast:
            main_loss, mtp_loss = losses(model, batch, cos, sin)
        loss = main_loss + recipe.mtp_loss_weight * mtp_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        last = step == recipe.steps - 1
        if (step + 1) % recipe.eval_every == 0 or last:
            metrics = evaluate(model, heldout, recipe, cos, sin, autocast)
            metrics.update(step=step + 1, train_main_loss=main_loss.item(), train_mtp_loss=mtp_loss.item(),
                           seconds=round(time.time() - started, 1))
            history.append(metrics)
            print(json.dumps(metrics), flush=True)
            if best is None or metrics["heldout_main_loss"] < best["heldout_main_loss"]:
                best = metrics
                best_state = hf_state_dict(model, torch.bfloat16)
            if args.max_seconds and time.time() - started > args.max_seconds:
                print(f"stopping at step {step + 1}: past --max-seconds", flush=True)
                break

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(best_state, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    (args.out / "config.json").write_text(json.dumps(hf_config(arch), indent=2) + "\n")
    (args.out / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}, indent=2) + "\n")
    record = {"arch": asdict(arch), "recipe": asdict(recipe), "max_seconds": args.max_seconds,
              "steps_completed": history[-1]["step"], "params": n_params, "best": best,
              "history": history, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
