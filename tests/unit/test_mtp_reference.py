"""pdserve's MTPModule against a float64 NumPy implementation written from the DeepSeek-V3 equations.

Reference (DeepSeek-V3 report, section 2.2, with the main model's final-normed hidden ``h_i``):
    h'_i    = M [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)]
    h^mtp   = TRM(h'_{0..i})          # one transformer block, causal, RoPE at position i
    P_{i+2} = OutHead(RMSNorm(h^mtp_i))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from pdserve.models.config import ModelConfig
from pdserve.models.loader import default_model_dir, load_model
from pdserve.tests.unit.model_fixtures import (
    PagedSequences,
    add_mtp_layer,
    make_kv_caches,
    save_tiny_hf_model,
)

BLOCK_SIZE = 4

# ---- float64 NumPy reference -------------------------------------------------------------------


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """x [T, H, D]; rotate pairs (d, d + D/2) by angle pos * theta^(-2d/D)."""
    d = x.shape[-1]
    angles = positions[:, None] * theta ** (-np.arange(0, d, 2) / d)  # [T, D/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(x: np.ndarray, w: dict[str, np.ndarray], p: str, c: ModelConfig) -> np.ndarray:
    t, hd = x.shape[0], c.head_dim
    positions = np.arange(t, dtype=np.float64)
    q = rope((x @ w[p + "q_proj.weight"].T).reshape(t, c.num_attention_heads, hd), positions, c.rope_theta)
    k = rope((x @ w[p + "k_proj.weight"].T).reshape(t, c.num_key_value_heads, hd), positions, c.rope_theta)
    v = (x @ w[p + "v_proj.weight"].T).reshape(t, c.num_key_value_heads, hd)
    group = c.num_attention_heads // c.num_key_value_heads
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # query head h uses kv head h // group
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", probs, v).reshape(t, -1) @ w[p + "o_proj.weight"].T


def block(x: np.ndarray, w: dict[str, np.ndarray], p: str, c: ModelConfig) -> np.ndarray:
    x = x + attention(rms_norm(x, w[p + "input_layernorm.weight"], c.rms_norm_eps), w, p + "self_attn.", c)
    h = rms_norm(x, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
    gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
    return x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T


def reference_logits(
    tokens: list[int], next_token: int, w: dict[str, np.ndarray], c: ModelConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(main logits [T, V] predicting t_{i+1}, MTP logits [T, V] predicting t_{i+2}) for one sequence;
    the MTP row i sees t_{i+1} = tokens[i + 1], and ``next_token`` after the last one."""
    emb = w["model.embed_tokens.weight"]
    head = w.get("lm_head.weight", emb)
    x = emb[tokens]
    for i in range(c.num_hidden_layers):
        x = block(x, w, f"model.layers.{i}.", c)
    hidden = rms_norm(x, w["model.norm.weight"], c.rms_norm_eps)
    p = f"model.layers.{c.num_hidden_layers}."
    e = rms_norm(emb[tokens[1:] + [next_token]], w[p + "enorm.weight"], c.rms_norm_eps)
    h = (
        np.concatenate([e, rms_norm(hidden, w[p + "hnorm.weight"], c.rms_norm_eps)], axis=-1)
        @ w[p + "eh_proj.weight"].T
    )
    mtp_hidden = rms_norm(block(h, w, p, c), w[p + "shared_head.norm.weight"], c.rms_norm_eps)
    return hidden @ head.T, mtp_hidden @ head.T


# ---- the tiny MTP checkpoint -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mtp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("tiny_mtp")
    save_tiny_hf_model(model_dir, "llama", seed=5, tie_word_embeddings=False)
    add_mtp_layer(model_dir, seed=6)
    return model_dir


def run_main_then_mtp(
    model_dir: Path, prompts: list[list[int]], decode_tokens: list[int], mtp_tokens: list[list[int]],
    cpu_fast_path: bool,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """pdserve, two steps through the paged caches (prefill, then one decode token per sequence);
    after each main step the MTP module runs on the same rows. Returns per-sequence
    (main logits, MTP logits) over all positions."""
    model = load_model(model_dir, cpu_fast_path=cpu_fast_path)
    c = model.config
    seqs = PagedSequences(len(prompts), blocks_per_seq=6, block_size=BLOCK_SIZE, seed=3)
    caches = make_kv_caches(c, c.num_hidden_layers + 1, seqs.num_blocks, BLOCK_SIZE)
    main = [[] for _ in prompts]
    mtp = [[] for _ in prompts]
    for step, new_tokens in enumerate([prompts, [[t] for t in decode_tokens]]):
        input_ids, positions, meta = seqs.step(new_tokens)
        hidden = model(input_ids, positions, caches, meta)
        # the MTP input at row i is the token after it: the rest of the prompt, then the decoded one
        next_ids = [tok for i, t in enumerate(new_tokens) for tok in mtp_tokens[i][step]]
        mtp_hidden = model.mtp(np.asarray(next_ids, np.int64), positions, hidden, caches[-1], meta)
        lens = np.cumsum([len(t) for t in new_tokens])[:-1]
        for i, (a, b) in enumerate(
            zip(
                np.split(model.compute_logits(hidden).numpy(), lens),
                np.split(model.compute_logits(mtp_hidden).numpy(), lens),
                strict=True,
            )
        ):
            main[i].append(a)
            mtp[i].append(b)
    return [np.concatenate(m) for m in main], [np.concatenate(m) for m in mtp]


def check_against_reference(
    model_dir: Path, prompts: list[list[int]], atol: float, cpu_fast_path: bool
) -> None:
    c = ModelConfig.from_dir(model_dir)
    assert c.rope_scaling is None, "the NumPy reference implements unscaled RoPE only"
    decode_tokens = [(7 * i + 11) % c.vocab_size for i in range(len(prompts))]
    last_tokens = [(13 * i + 5) % c.vocab_size for i in range(len(prompts))]
    # step 0 (prefill) feeds t_1..t_{n-1} plus the decoded token; step 1 feeds the token after it
    mtp_tokens = [[p[1:] + [d], [e]] for p, d, e in zip(prompts, decode_tokens, last_tokens, strict=True)]
    main, mtp = run_main_then_mtp(model_dir, prompts, decode_tokens, mtp_tokens, cpu_fast_path)
    weights = {k: v.double().numpy() for k, v in load_file(next(model_dir.glob("*.safetensors"))).items()}
    for i, prompt in enumerate(prompts):
        ref_main, ref_mtp = reference_logits(prompt + [decode_tokens[i]], last_tokens[i], weights, c)
        assert ref_mtp.std() > 0.3, "reference logits too small for the tolerance to mean anything"
        np.testing.assert_allclose(main[i], ref_main, atol=atol, rtol=0)
        np.testing.assert_allclose(mtp[i], ref_mtp, atol=atol, rtol=0)


# The fast path packs the projections and folds MTP's token projection into a table; both must match.
FAST_PATH = pytest.mark.parametrize("cpu_fast_path", [True, False], ids=["fast-path", "reference-ops"])


@FAST_PATH
def test_mtp_matches_numpy_reference(tiny_mtp_dir: Path, cpu_fast_path: bool) -> None:
    check_against_reference(tiny_mtp_dir, [[5, 17, 99, 3, 42, 8, 120, 64, 1], [1, 2, 3]], 1e-4, cpu_fast_path)


def test_mtp_loaded_with_shared_embedding(tiny_mtp_dir: Path) -> None:
    model = load_model(tiny_mtp_dir)
    assert model.mtp is not None
    assert model.mtp._embed_tokens is model.embed_tokens  # shared, not a copy
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(id(p) for p in model.parameters()))
    assert not any("embed_tokens" in n for n in names if n.startswith("mtp."))


@FAST_PATH
def test_bundled_demo_mtp_matches_numpy_reference(cpu_fast_path: bool) -> None:
    model_dir = default_model_dir()
    if not (model_dir / "model.safetensors").is_file():
        pytest.skip(
            f"demo weights {model_dir / 'model.safetensors'} are absent (trained separately; "
            "the lead adds them before CI)"
        )
    prompts = [[3, 500, 1200, 7, 4000, 42, 9, 8000], [1, 77, 78]]
    check_against_reference(model_dir, prompts, 1e-4, cpu_fast_path)


@FAST_PATH
@pytest.mark.parametrize("rows", [[8], [3, 10], [0, 4, 11]], ids=["one", "two", "three"])
def test_mtp_on_some_rows_gives_those_rows_bits_and_writes_every_rows_kv(
    tiny_mtp_dir: Path, cpu_fast_path: bool, rows: list[int]
) -> None:
    # The proposer asks for the drafting rows only: their outputs must be what the full call gives
    # them (the same bits on pdserve's ops, which compute each row alone; Paddle's matmul may round
    # differently for another number of rows), and the MTP K/V of every row is written all the same.
    model = load_model(tiny_mtp_dir, cpu_fast_path=cpu_fast_path)
    c = model.config
    prompts = [[5, 17, 99, 3, 42, 8, 120, 64, 1], [1, 2, 3]]
    next_ids = np.asarray([17, 99, 3, 42, 8, 120, 64, 1, 33, 2, 3, 9], np.int64)
    results = []
    for selected in (None, rows):
        seqs = PagedSequences(len(prompts), blocks_per_seq=6, block_size=BLOCK_SIZE, seed=3)
        caches = make_kv_caches(c, c.num_hidden_layers + 1, seqs.num_blocks, BLOCK_SIZE)
        input_ids, positions, meta = seqs.step(prompts)
        hidden = model(input_ids, positions, caches, meta)
        out = model.mtp(next_ids, positions, hidden, caches[-1], meta, selected)
        results.append((out.numpy(), caches[-1][0].numpy(), caches[-1][1].numpy()))
    (full, k_full, v_full), (some, k_some, v_some) = results
    assert some.shape == (len(rows), c.hidden_size)
    if cpu_fast_path:
        np.testing.assert_array_equal(some, full[rows])
    else:
        np.testing.assert_allclose(some, full[rows], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(k_some, k_full)
    np.testing.assert_array_equal(v_some, v_full)
    assert np.abs(k_full).sum() > 0
