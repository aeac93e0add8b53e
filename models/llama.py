"""Llama / Qwen2 decoder in Paddle, on a flattened batch of tokens and the paged KV cache.

Read top to bottom: RMSNorm, rotary embedding, attention, MLP, decoder layer, model, causal-LM
head. Qwen2 is the same model with bias on the q/k/v projections (``config.qkv_bias``).

Projections are fused (``qkv_proj`` = [q | k | v], ``gate_up_proj`` = [gate | up]) so each layer
runs 4 GEMMs instead of 7; the loader concatenates the HF tensors into them. Paddle ``Linear``
weights are ``[in, out]`` (HF stores ``[out, in]``). ``Linear`` is ``nn.Linear`` plus the CPU fast
path of kernels/linear.py, which the loader switches on once the weights are in; ``use_cpu_ops``
likewise puts RMSNorm, attention (RoPE, the KV write, paged attention) and the SwiGLU activation
on pdserve's CPU ops (kernels/csrc/layer_ops.cc). Both paths compute the same function; tests compare them.
"""

from __future__ import annotations

from collections.abc import Sequence

import paddle
from paddle import nn

from pdserve.kernels import cpu_ops
from pdserve.kernels.activation import silu_and_mul, silu_and_mul_cpu
from pdserve.kernels.attention import AttentionMetadata, paged_attention, write_and_attend_cpu, write_kv
from pdserve.kernels.linear import Linear, is_packed
from pdserve.kernels.lm_head import LMHead
from pdserve.kernels.norm import rms_norm, rms_norm_cpu
from pdserve.kernels.rope import apply_rope, rope_cos_sin_cache, split_qkv_rope_cpu
from pdserve.kernels.rows import take_rows
from pdserve.models.config import ModelConfig
from pdserve.models.tensor_parallel import TensorParallel, attention_shard, intermediate_shard

KVCache = tuple[
    paddle.Tensor, paddle.Tensor
]  # (k_cache, v_cache): [num_blocks, kv_heads, block_size, head_dim]


class RMSNorm(nn.Layer):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))
        object.__setattr__(self, "_cpu_op", False)  # set by use_cpu_ops

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self._cpu_op and cpu_ops.takes(x):
            return rms_norm_cpu(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Layer):
    """Holds the cos/sin cache for every position; ``forward`` gathers the rows of a step's tokens."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        cos, sin = rope_cos_sin_cache(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        # Not persistable: derived from the config, never part of a checkpoint.
        self.register_buffer("cos_cache", paddle.to_tensor(cos), persistable=False)  # [P, head_dim]
        self.register_buffer("sin_cache", paddle.to_tensor(sin), persistable=False)
        # The last positions tensor and its rows: the MTP layer runs over the same positions tensor
        # right after the target, and gets the rows without two more gathers. Keyed on the tensor
        # object itself (held, so it cannot be freed and its id reused); callers never write to it.
        # A plain attribute, as the layers' other derived state (Layer.__setattr__ costs per call).
        object.__setattr__(self, "_last", None)

    def forward(self, positions: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """positions: ``[T]`` int64 -> (cos, sin), each ``[T, head_dim]``."""
        if self._last is not None and self._last[0] is positions:
            return self._last[1]
        rows = (
            paddle.index_select(self.cos_cache, positions, axis=0),
            paddle.index_select(self.sin_cache, positions, axis=0),
        )
        object.__setattr__(self, "_last", (positions, rows))
        return rows


class Attention(nn.Layer):
    """This rank's heads (all of them with one rank); ``o_proj``'s partial sums are all-reduced."""

    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        shard = attention_shard(config, tp)
        self.tp = tp
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        qkv_bias = None if config.qkv_bias else False
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias_attr=qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias_attr=False)
        object.__setattr__(self, "_cpu_op", False)  # set by use_cpu_ops

    def forward(
        self,
        x: paddle.Tensor,
        cos: paddle.Tensor,
        sin: paddle.Tensor,
        kv_cache: KVCache,
        attn_meta: AttentionMetadata,
        rows: Sequence[int] | None = None,
    ) -> paddle.Tensor:
        """Writes every row's K/V; returns the output of ``rows`` only (all rows when None)."""
        num_tokens = x.shape[0]
        k_cache, v_cache = kv_cache
        if self._cpu_op and cpu_ops.takes(x) and k_cache.dtype == paddle.float32:
            q, k, v = split_qkv_rope_cpu(self.qkv_proj(x), cos, sin, self.num_heads, self.num_kv_heads)
            out = write_and_attend_cpu(q, k, v, k_cache, v_cache, attn_meta, self.scale)  # [T, H, D]
        else:
            q, k, v = paddle.split(self.qkv_proj(x), [self.q_size, self.kv_size, self.kv_size], axis=-1)
            q = apply_rope(q.reshape([num_tokens, self.num_heads, self.head_dim]), cos, sin)  # [T, H, D]
            k = apply_rope(k.reshape([num_tokens, self.num_kv_heads, self.head_dim]), cos, sin)  # [T, Hkv, D]
            v = v.reshape([num_tokens, self.num_kv_heads, self.head_dim])  # [T, Hkv, D]
            write_kv(k, v, k_cache, v_cache, attn_meta.slot_mapping)
            out = paged_attention(q, k_cache, v_cache, attn_meta, self.scale)  # [T, H, D]
        out = out.reshape([num_tokens, self.q_size])
        out = self.o_proj(out if rows is None else take_rows(out, rows))
        return self.tp.all_reduce(out) if self.tp.size > 1 else out


class MLP(nn.Layer):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` over this rank's slice of the intermediate size;
    ``down_proj``'s partial sums are all-reduced."""

    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        _, intermediate = intermediate_shard(config, tp)
        self.tp = tp
        self.gate_up_proj = Linear(config.hidden_size, 2 * intermediate, bias_attr=False)
        self.down_proj = Linear(intermediate, config.hidden_size, bias_attr=False)
        object.__setattr__(self, "_cpu_op", False)  # set by use_cpu_ops

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        gate_up = self.gate_up_proj(x)
        if self._cpu_op and cpu_ops.takes(gate_up):
            out = self.down_proj(silu_and_mul_cpu(gate_up))
        else:
            out = self.down_proj(silu_and_mul(gate_up))
        return self.tp.all_reduce(out) if self.tp.size > 1 else out


class DecoderLayer(nn.Layer):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    With ``rows``, every row's K/V is still written but only those rows go on past attention (the
    MTP layer drafts from one row per request and needs the others' K/V alone). On pdserve's CPU
    ops a row's output is the same bits either way (each op computes a row on its own); Paddle's
    matmul may round a row differently beside another number of rows.
    """

    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)

    def forward(
        self,
        x: paddle.Tensor,
        cos: paddle.Tensor,
        sin: paddle.Tensor,
        kv_cache: KVCache,
        attn_meta: AttentionMetadata,
        rows: Sequence[int] | None = None,
    ) -> paddle.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, attn_meta, rows)
        x = (x if rows is None else take_rows(x, rows)) + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Layer):
    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config)
        self.layers = nn.LayerList([DecoderLayer(config, tp) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: paddle.Tensor,
        positions: paddle.Tensor,
        kv_caches: list[KVCache],
        attn_meta: AttentionMetadata,
    ) -> paddle.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary_emb(positions)  # gathered once per step, shared by all layers
        for layer, kv_cache in zip(self.layers, kv_caches, strict=False):
            x = layer(x, cos, sin, kv_cache, attn_meta)
        return self.norm(x)


class LlamaForCausalLM(nn.Layer):
    """The decoder plus LM head; ``mtp`` is the DeepSeek-V3 MTP module or None (set by the loader).
    With ``tp.size > 1`` it holds rank ``tp.rank``'s shard (models/tensor_parallel.py)."""

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp or TensorParallel()
        self.model = LlamaModel(config, self.tp)
        # Tied: the head is the embedding matrix itself, so no separate parameter exists.
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias_attr=False)
        )
        self.mtp: nn.Layer | None = None

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def rotary_emb(self) -> RotaryEmbedding:
        return self.model.rotary_emb

    def forward(
        self,
        input_ids: paddle.Tensor,
        positions: paddle.Tensor,
        kv_caches: list[KVCache],
        attn_meta: AttentionMetadata,
    ) -> paddle.Tensor:
        """input_ids, positions: ``[T]`` int64 -> final-normed hidden states ``[T, hidden]``.

        ``kv_caches`` has one pair per decoder layer (an extra trailing pair for MTP is ignored here).
        """
        if len(kv_caches) < self.config.num_hidden_layers:
            raise ValueError(f"need {self.config.num_hidden_layers} kv cache pairs, got {len(kv_caches)}")
        return self.model(input_ids, positions, kv_caches, attn_meta)

    def compute_logits(self, hidden: paddle.Tensor) -> paddle.Tensor:
        """hidden ``[N, hidden]`` -> logits ``[N, vocab]`` float32."""
        if self.lm_head is None:
            logits = paddle.matmul(hidden, self.model.embed_tokens.weight, transpose_y=True)
        else:
            logits = self.lm_head(hidden)
        return logits.astype("float32")


def use_cpu_ops(model: nn.Layer) -> int:
    """Put the model's RMSNorms, attentions and MLP activations on pdserve's CPU ops (when they
    load); returns how many layers took them. Activations of other dtypes or places still run the
    Paddle ops."""
    if not cpu_ops.load():
        return 0
    layers = [m for m in model.sublayers(include_self=True) if isinstance(m, (RMSNorm, Attention, MLP))]
    for layer in layers:
        object.__setattr__(layer, "_cpu_op", True)
    return len(layers)


def lm_head_of(model: LlamaForCausalLM) -> LMHead:
    """The model's head (the tied embedding, or the untied ``lm_head``) with the CPU fast path.

    One per model: the runner and the MTP proposer share it (and its packed copy of the weights).
    It is kept on the model itself (a plain attribute, not a sublayer), so it lives and dies with
    the model; a cache keyed weakly by the model would be kept alive by ``reference``, the model's
    own bound method.
    """
    head = getattr(model, "_fast_lm_head", None)
    if head is None:
        packed = is_packed(model)
        if model.lm_head is None:
            head = LMHead(model.embed_tokens.weight, True, model.compute_logits, packed)
        else:
            head = LMHead(model.lm_head.weight, False, model.compute_logits, packed)
        object.__setattr__(model, "_fast_lm_head", head)
    return head
