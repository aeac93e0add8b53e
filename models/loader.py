"""Build a ``LlamaForCausalLM`` (plus its MTP module) from an HF model directory.

Each model parameter is described by a ``WeightSpec``: the HF tensors it is made of (several for
the fused ``qkv_proj`` / ``gate_up_proj``), their expected shapes, and whether it is a Linear
weight (HF ``[out, in]`` -> Paddle ``[in, out]``). Every expected tensor is checked to exist before
anything is read, then tensors are read and copied in one parameter at a time.

Under tensor parallelism a source may be cut: a rank reads only its slice of the HF tensor (its
heads' rows of q/k/v, its columns of o_proj, its part of the MLP's intermediate dimension; see
models/tensor_parallel.py), so each rank loads its own shard from the same checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle

from pdserve.kernels.linear import pack_linears
from pdserve.models.checkpoint import CheckpointError, CheckpointReader
from pdserve.models.config import ModelConfig
from pdserve.models.llama import DecoderLayer, LlamaForCausalLM, use_cpu_ops
from pdserve.models.mtp import MTPModule
from pdserve.models.tensor_parallel import TensorParallel, attention_shard, intermediate_shard

MODEL_DTYPES = ("float32", "float16", "bfloat16")
# Tensors some checkpoints carry that pdserve recomputes (RoPE frequencies come from the config).
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


def default_model_dir() -> Path:
    """The bundled demo model (config.json, model.safetensors, tokenizer files)."""
    return Path(__file__).resolve().parent / "demo"


Cut = tuple[int, int, int]  # (HF axis, start, stop): the slice of a source tensor this rank holds


@dataclass(frozen=True)
class WeightSpec:
    param: paddle.Tensor
    # (HF name, expected HF shape, cut or None for the whole tensor), concatenated on axis 0 after cutting
    sources: tuple[tuple[str, tuple[int, ...], Cut | None], ...]
    transpose: bool  # a Linear weight: HF [out, in] -> Paddle [in, out]


def _linear(param: paddle.Tensor, names: list[str], out_sizes: list[int], in_size: int,
            cuts: list[Cut | None] | None = None) -> WeightSpec:
    cuts = cuts or [None] * len(names)
    sources = tuple((n, (o, in_size), cut) for n, o, cut in zip(names, out_sizes, cuts, strict=True))
    return WeightSpec(param, sources, True)


def _vector(param: paddle.Tensor, names: list[str], sizes: list[int],
            cuts: list[Cut | None] | None = None) -> WeightSpec:
    cuts = cuts or [None] * len(names)
    sources = tuple((n, (s,), cut) for n, s, cut in zip(names, sizes, cuts, strict=True))
    return WeightSpec(param, sources, False)


def _rows(start: int, size: int, full: int) -> Cut | None:
    return None if size == full else (0, start, start + size)


def _decoder_layer_specs(layer: DecoderLayer, prefix: str, c: ModelConfig,
                         tp: TensorParallel) -> list[WeightSpec]:
    """Specs for one decoder layer stored under ``prefix`` (e.g. ``model.layers.3.``), cut to ``tp.rank``'s
    shard: q/k/v and gate/up by output rows, o_proj and down_proj by input columns."""
    attn, mlp = layer.self_attn, layer.mlp
    d = c.head_dim
    q_full, kv_full = c.num_attention_heads * d, c.num_key_value_heads * d
    shard = attention_shard(c, tp)
    q_cut = _rows(shard.q_start * d, attn.q_size, q_full)
    kv_cut = _rows(shard.kv_start * d, attn.kv_size, kv_full)
    i_start, i_size = intermediate_shard(c, tp)
    i_cut = _rows(i_start, i_size, c.intermediate_size)

    def columns(cut: Cut | None) -> Cut | None:
        return None if cut is None else (1, cut[1], cut[2])

    qkv = [f"{prefix}self_attn.{p}_proj" for p in "qkv"]
    specs = [
        _vector(layer.input_layernorm.weight, [f"{prefix}input_layernorm.weight"], [c.hidden_size]),
        _vector(
            layer.post_attention_layernorm.weight,
            [f"{prefix}post_attention_layernorm.weight"],
            [c.hidden_size],
        ),
        _linear(attn.qkv_proj.weight, [f"{n}.weight" for n in qkv], [q_full, kv_full, kv_full], c.hidden_size,
                [q_cut, kv_cut, kv_cut]),
        _linear(attn.o_proj.weight, [f"{prefix}self_attn.o_proj.weight"], [c.hidden_size], q_full,
                [columns(q_cut)]),
        _linear(
            mlp.gate_up_proj.weight,
            [f"{prefix}mlp.gate_proj.weight", f"{prefix}mlp.up_proj.weight"],
            [c.intermediate_size, c.intermediate_size],
            c.hidden_size,
            [i_cut, i_cut],
        ),
        _linear(
            mlp.down_proj.weight, [f"{prefix}mlp.down_proj.weight"], [c.hidden_size], c.intermediate_size,
            [columns(i_cut)],
        ),
    ]
    if c.qkv_bias:
        specs.append(_vector(attn.qkv_proj.bias, [f"{n}.bias" for n in qkv], [q_full, kv_full, kv_full],
                             [q_cut, kv_cut, kv_cut]))
    return specs


def _main_specs(model: LlamaForCausalLM, tp: TensorParallel) -> list[WeightSpec]:
    c = model.config
    specs = [
        WeightSpec(
            model.embed_tokens.weight,
            (("model.embed_tokens.weight", (c.vocab_size, c.hidden_size), None),),
            False,
        ),
        _vector(model.model.norm.weight, ["model.norm.weight"], [c.hidden_size]),
    ]
    if model.lm_head is not None:
        specs.append(_linear(model.lm_head.weight, ["lm_head.weight"], [c.vocab_size], c.hidden_size))
    for i, layer in enumerate(model.model.layers):
        specs += _decoder_layer_specs(layer, f"model.layers.{i}.", c, tp)
    return specs


def _mtp_specs(mtp: MTPModule, c: ModelConfig, tp: TensorParallel) -> list[WeightSpec]:
    prefix = f"model.layers.{c.num_hidden_layers}."  # DeepSeek-V3 stores MTP after the decoder layers
    return [
        _vector(mtp.enorm.weight, [f"{prefix}enorm.weight"], [c.hidden_size]),
        _vector(mtp.hnorm.weight, [f"{prefix}hnorm.weight"], [c.hidden_size]),
        _linear(mtp.eh_proj.weight, [f"{prefix}eh_proj.weight"], [c.hidden_size], 2 * c.hidden_size),
        _vector(mtp.shared_head.norm.weight, [f"{prefix}shared_head.norm.weight"], [c.hidden_size]),
        *_decoder_layer_specs(mtp.layer, prefix, c, tp),
    ]


def _shared_duplicates(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensors a checkpoint may carry again for weights pdserve shares: (name -> expected shape).

    They are never read (the main model's copy is used) but a wrong shape still means the wrong
    checkpoint. A tied model's ``lm_head.weight`` is the embedding saved twice.
    """
    vocab_by_hidden = (c.vocab_size, c.hidden_size)
    duplicates = {"lm_head.weight": vocab_by_hidden} if c.tie_word_embeddings else {}
    if c.num_nextn_predict_layers:
        prefix = f"model.layers.{c.num_hidden_layers}."
        duplicates[f"{prefix}embed_tokens.weight"] = vocab_by_hidden
        duplicates[f"{prefix}shared_head.head.weight"] = vocab_by_hidden
    return duplicates


def _check_names(
    reader: CheckpointReader, specs: list[WeightSpec], duplicates: dict[str, tuple[int, ...]]
) -> None:
    expected = {name for spec in specs for name, _, _ in spec.sources}
    missing = sorted(expected - set(reader.names()))
    if missing:
        raise CheckpointError(
            f"{len(missing)} tensor(s) missing from {reader.model_dir}: {', '.join(missing)}"
        )
    unexpected = sorted(
        n for n in set(reader.names()) - expected - set(duplicates) if not n.endswith(_DERIVED_SUFFIXES)
    )
    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} tensor(s) in {reader.model_dir} that the config does not "
            f"describe: {', '.join(unexpected)}"
        )
    for name, shape in duplicates.items():
        _check_shape(reader, name, shape)


def _check_shape(reader: CheckpointReader, name: str, expected: tuple[int, ...]) -> None:
    if name in reader and reader.shape(name) != expected:
        raise CheckpointError(
            f"tensor {name!r}: expected shape {list(expected)}, found {list(reader.shape(name))}"
        )


def _load_weight(reader: CheckpointReader, spec: WeightSpec, dtype: str) -> None:
    parts: list[np.ndarray] = []
    for name, shape, cut in spec.sources:
        _check_shape(reader, name, shape)
        value = reader.read(name)
        if cut is not None:
            axis, start, stop = cut
            value = value[start:stop] if axis == 0 else value[:, start:stop]
        parts.append(value)
    value = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    if spec.transpose:
        value = np.ascontiguousarray(value.T)
    tensor = paddle.to_tensor(value)
    spec.param.set_value(tensor if dtype == "float32" else tensor.astype(dtype))


def load_model(model_dir: str | Path, dtype: str = "float32", cpu_fast_path: bool = True,
               tp: TensorParallel | None = None) -> LlamaForCausalLM:
    """The model in eval mode with ``.config`` and ``.mtp`` (None without MTP layers).

    ``dtype`` is the parameter dtype: float32 on CPU (Paddle's CPU matmul has no bf16/fp16 kernels),
    bfloat16/float16 on devices that support them. RMSNorm and logits are computed in float32.
    ``cpu_fast_path`` packs float32 CPU projections for kernels/linear.py (a second copy of those
    weights), puts norms, attention and SwiGLU on pdserve's CPU ops (``use_cpu_ops``) and folds the MTP
    layer's token projection into a table (``MTPModule.fold_token_projection``, one more
    [vocab, hidden] copy); False keeps the reference ops everywhere (for comparisons).
    ``tp`` loads rank ``tp.rank``'s shard of ``tp.size`` (models/tensor_parallel.py); default: the whole
    model.
    """
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype must be one of {MODEL_DTYPES}, got {dtype!r}")
    config = ModelConfig.from_dir(model_dir)
    reader = CheckpointReader(model_dir)
    tp = tp or TensorParallel()
    model = LlamaForCausalLM(config, tp)
    if config.num_nextn_predict_layers:
        model.mtp = MTPModule(config, model.embed_tokens, model.rotary_emb, tp)
    if dtype != "float32":
        model.to(dtype=dtype)  # before the specs take references to the parameters
    specs = _main_specs(model, tp) + (_mtp_specs(model.mtp, config, tp) if model.mtp is not None else [])
    _check_names(reader, specs, _shared_duplicates(config))
    for spec in specs:
        _load_weight(reader, spec, dtype)
    for param in model.parameters():
        param.stop_gradient = True  # inference only: autograd never records the forward
    if cpu_fast_path:
        pack_linears(model)
        use_cpu_ops(model)
        if model.mtp is not None:
            model.mtp.fold_token_projection()
    model.eval()
    return model
