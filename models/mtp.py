"""DeepSeek-V3 multi-token prediction (MTP) module (DeepSeek-V3 report, section 2.2).

For the main model's final-normed hidden state ``h_i`` at position ``i`` and the next token
``t_{i+1}``:

    h'_i      = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)])      # concat order as DeepSeek-V3 stores eh_proj
    h_i^mtp   = Block(h'_i)          # causal attention over the MTP layer's own KV cache, RoPE position i
    logits_i  = head(shared_head.norm(h_i^mtp))                 # predicts t_{i+2}

The embedding and the LM head are the main model's (shared, not copied); ``forward`` returns the
state after ``shared_head.norm`` and the caller takes logits with the main model's
``compute_logits``.

``eh_proj`` is linear, so its token half depends on the token alone: ``fold_token_projection``
(called by the loader with the CPU fast path) tabulates ``enorm(emb(v)) @ W_token`` for every token
v once, and ``forward`` then reads a row and projects only the hidden half. Same function, rounded
differently; a table lookup instead of an embedding lookup, a norm, a concat and half a GEMM per step.
On pdserve's CPU ops hnorm, the hidden half's projection and the table rows' add are one op call
(``mtp_input_cpu``; the token ids arrive as host integers and go in as its attribute). Otherwise the
rows are added into the projection's fresh output in place, through a zero-copy NumPy view.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import paddle
from paddle import nn

from pdserve.kernels import cpu_ops
from pdserve.kernels.attention import AttentionMetadata
from pdserve.kernels.linear import Linear, mtp_input_cpu
from pdserve.models.config import ModelConfig
from pdserve.models.llama import DecoderLayer, KVCache, RMSNorm, RotaryEmbedding
from pdserve.models.tensor_parallel import TensorParallel


class SharedHead(nn.Layer):
    """Only the norm: the head matrix is the main model's (DeepSeek-V3 names it ``shared_head``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(nn.Layer):
    def __init__(self, config: ModelConfig, embed_tokens: nn.Embedding, rotary_emb: RotaryEmbedding,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        # Shared with the main model. Kept out of this layer's sublayers so the parameters are owned,
        # loaded and cast once, by the main model.
        object.__setattr__(self, "_embed_tokens", embed_tokens)
        object.__setattr__(self, "_rotary_emb", rotary_emb)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, bias_attr=False)
        self.layer = DecoderLayer(config, tp or TensorParallel())  # sharded as the main model's layers
        self.shared_head = SharedHead(config)
        # Set by fold_token_projection: [vocab, hidden] token halves (float32 on CPU) and the hidden
        # half's projection.
        object.__setattr__(self, "_token_rows", None)
        object.__setattr__(self, "_hidden_proj", None)

    @paddle.no_grad()
    def fold_token_projection(self) -> None:
        """Tabulate eh_proj's token half for the whole vocabulary (the weights must be final)."""
        hidden_size = self.eh_proj.weight.shape[1]
        token_half, hidden_half = self.eh_proj.weight[:hidden_size], self.eh_proj.weight[hidden_size:]
        hidden_proj = Linear(hidden_size, hidden_size, bias_attr=False)
        hidden_proj.weight.set_value(hidden_half)
        hidden_proj.pack()
        table = paddle.matmul(self.enorm(self._embed_tokens.weight), token_half)  # [V, hidden]
        rows = np.ascontiguousarray(table.numpy(), dtype=np.float32)
        object.__setattr__(self, "_token_rows", paddle.to_tensor(rows, place=paddle.CPUPlace()))
        object.__setattr__(self, "_hidden_proj", hidden_proj)
        self.eh_proj.unpack()  # the folded forward does not call it; its weight stays for state_dict

    def forward(
        self,
        next_token_ids: np.ndarray,
        positions: paddle.Tensor,
        target_hidden: paddle.Tensor,
        kv_cache: KVCache,
        attn_meta: AttentionMetadata,
        rows: Sequence[int] | None = None,
    ) -> paddle.Tensor:
        """next_token_ids: ``[T]`` int64 on the host; positions: ``[T]`` int64; target_hidden:
        ``[T, hidden]`` (the main model's final-normed state at the same positions) -> ``[T, hidden]``
        after ``shared_head.norm``, or ``[len(rows), hidden]`` for the given rows only (the K/V of
        all T rows is written either way)."""
        fused = self._token_rows is not None and self._hidden_proj._packed is not None and self.hnorm._cpu_op
        if fused and cpu_ops.takes(target_hidden):  # folded, on pdserve's ops: one call
            x = mtp_input_cpu(target_hidden, self.hnorm.weight, self._hidden_proj._packed, self._token_rows,
                              next_token_ids.tolist(), self.hnorm.eps)
        elif self._token_rows is not None:  # folded: the token half is a table row
            x = self._hidden_proj(self.hnorm(target_hidden))  # a new CPU tensor: ours to add into
            view = np.from_dlpack(x)  # zero-copy
            view += np.from_dlpack(self._token_rows)[next_token_ids]  # the same sum either way round
        else:
            ids = paddle.to_tensor(next_token_ids, place=target_hidden.place)
            embeds = self.enorm(self._embed_tokens(ids))  # [T, hidden]
            x = self.eh_proj(paddle.concat([embeds, self.hnorm(target_hidden)], axis=-1))  # [T, 2h] -> [T, h]
        cos, sin = self._rotary_emb(positions)
        x = self.layer(x, cos, sin, kv_cache, attn_meta, rows)
        return self.shared_head.norm(x)
