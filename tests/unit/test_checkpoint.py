"""CheckpointReader (own safetensors parser), ModelConfig validation and the loader's checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file
from safetensors.torch import save_file as save_torch

from pdserve.models.checkpoint import CheckpointError, CheckpointReader
from pdserve.models.config import ConfigError, ModelConfig
from pdserve.models.loader import load_model
from pdserve.tests.unit.model_fixtures import TINY_DIMS, add_mtp_layer

# ---- CheckpointReader --------------------------------------------------------------------------


def write_sharded(model_dir: Path, shards: dict[str, dict[str, np.ndarray]]) -> None:
    weight_map = {}
    for file_name, tensors in shards.items():
        save_numpy(tensors, model_dir / file_name)
        weight_map.update(dict.fromkeys(tensors, file_name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_index_reads_every_tensor(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shards = {
        "model-00001-of-00002.safetensors": {
            "a": rng.standard_normal((3, 5)).astype(np.float32),
            "b": rng.standard_normal(7).astype(np.float16),
        },
        "model-00002-of-00002.safetensors": {
            "c": rng.standard_normal((2, 2, 2)),  # float64
            "scalar": np.array(1.5, np.float32),
        },
    }
    write_sharded(tmp_path, shards)
    reader = CheckpointReader(tmp_path)
    assert reader.names() == ["a", "b", "c", "scalar"]
    for tensors in shards.values():
        for name, expected in tensors.items():
            assert reader.shape(name) == expected.shape
            got = reader.read(name)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, expected.astype(np.float32))
    assert reader.read("c", dtype="float64").dtype == np.float64
    np.testing.assert_array_equal(
        reader.read("c", dtype="float64"), shards["model-00002-of-00002.safetensors"]["c"]
    )


def test_reader_matches_safetensors_library(tiny_qwen2) -> None:
    reader = CheckpointReader(tiny_qwen2.model_dir)
    expected: dict[str, torch.Tensor] = {}
    for shard in tiny_qwen2.model_dir.glob("model-*.safetensors"):
        expected.update(load_file(shard))
    assert reader.names() == sorted(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(reader.read(name), tensor.float().numpy())


def test_bf16_conversion_is_exact(tmp_path: Path) -> None:
    special = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), 1e-40, 3.0e38, 1 / 3])
    values = torch.cat([special, torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 100])
    bf16 = values.to(torch.bfloat16)
    save_torch({"w": bf16.reshape(-1, 1)}, tmp_path / "model.safetensors")
    got = CheckpointReader(tmp_path).read("w").reshape(-1)
    expected = bf16.float().numpy()
    assert (
        got.view(np.uint32).tolist() == expected.view(np.uint32).tolist()
    )  # bit-exact, signed zero included
    nan = torch.tensor([float("nan")], dtype=torch.bfloat16)
    save_torch({"w": nan}, tmp_path / "model.safetensors")
    assert np.isnan(CheckpointReader(tmp_path).read("w")).all()


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    save_numpy({"present": np.zeros(2, np.float32)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="'model.absent.weight'"):
        CheckpointReader(tmp_path).read("model.absent.weight")


def test_shard_listed_in_index_but_absent_is_named(tmp_path: Path) -> None:
    write_sharded(tmp_path, {"part-1.safetensors": {"a": np.zeros(2, np.float32)}})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["b"] = "part-2.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="part-2.safetensors"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("keep_bytes", [4, 8 + 10, -3], ids=["in_length", "in_header", "in_data"])
def test_truncated_file_is_named(tmp_path: Path, keep_bytes: int) -> None:
    save_numpy({"w": np.arange(64, dtype=np.float32)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:keep_bytes])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        CheckpointReader(tmp_path)


def test_unknown_dtype_is_named(tmp_path: Path) -> None:
    save_numpy({"ids": np.arange(4, dtype=np.int32)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'ids'.*'I32'"):
        CheckpointReader(tmp_path)


def test_no_checkpoint_in_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model.safetensors"):
        CheckpointReader(tmp_path)


# ---- ModelConfig -------------------------------------------------------------------------------

BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    **TINY_DIMS,
}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"architectures": ["MistralForCausalLM"]}, "architectures"),
        ({"architectures": None}, "architectures"),
        ({"num_attention_heads": 5}, "num_attention_heads"),  # does not divide hidden 64
        ({"num_key_value_heads": 3}, "num_key_value_heads"),  # does not divide 4 heads
        ({"vocab_size": None}, "vocab_size"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_scaling"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),  # no original length
        ({"num_nextn_predict_layers": 2}, "num_nextn_predict_layers"),
        ({"eos_token_id": 500}, "eos_token_id"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_config_errors_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict({**BASE_CONFIG, **change})


def test_config_defaults_and_variants() -> None:
    c = ModelConfig.from_dict({**BASE_CONFIG, "num_key_value_heads": None, "eos_token_id": [2, 7]})
    assert (c.num_key_value_heads, c.head_dim, c.eos_token_id) == (4, 16, (2, 7))
    assert not c.qkv_bias and c.num_nextn_predict_layers == 0 and c.rope_scaling is None
    qwen = ModelConfig.from_dict({**BASE_CONFIG, "architectures": ["Qwen2ForCausalLM"], "eos_token_id": 3})
    assert qwen.qkv_bias and qwen.eos_token_id == (3,)
    legacy = ModelConfig.from_dict({**BASE_CONFIG, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert legacy.rope_scaling is not None and legacy.rope_scaling.factor == 4.0
    new_style = ModelConfig.from_dict(
        {**BASE_CONFIG, "rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}
    )
    assert new_style.rope_theta == 500.0 and new_style.rope_scaling is None


# ---- loader checks -----------------------------------------------------------------------------


@pytest.fixture
def llama_copy(tiny_llama, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_llama.model_dir, tmp_path / "model"))


def rewrite(model_dir: Path, edit) -> None:
    tensors = load_file(model_dir / "model.safetensors")
    edit(tensors)
    save_torch(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def test_loader_reports_missing_tensors_by_name(llama_copy: Path) -> None:
    rewrite(llama_copy, lambda t: (t.pop("model.layers.1.mlp.up_proj.weight"), t.pop("model.norm.weight")))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.norm\.weight"):
        load_model(llama_copy)


def test_loader_reports_wrong_shape(llama_copy: Path) -> None:
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite(llama_copy, lambda t: t.update({name: torch.zeros(16, 64)}))
    with pytest.raises(CheckpointError, match=rf"'{name}'.*expected shape \[32, 64\], found \[16, 64\]"):
        load_model(llama_copy)


def test_loader_rejects_unknown_architecture(llama_copy: Path) -> None:
    config = json.loads((llama_copy / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="architectures.*GPT2LMHeadModel"):
        load_model(llama_copy)


def test_loader_rejects_tensors_the_config_does_not_describe(llama_copy: Path) -> None:
    rewrite(llama_copy, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(96, 64)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        load_model(llama_copy)


def test_loader_checks_shape_of_ignored_duplicate_shared_weights(llama_copy: Path) -> None:
    config = json.loads((llama_copy / "config.json").read_text())
    config["tie_word_embeddings"] = False  # add_mtp_layer duplicates lm_head like DeepSeek-V3
    (llama_copy / "config.json").write_text(json.dumps(config))
    rewrite(llama_copy, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    add_mtp_layer(llama_copy, seed=0)
    assert load_model(llama_copy).mtp is not None  # duplicates of the right shape are accepted
    rewrite(llama_copy, lambda t: t.update({"model.layers.2.shared_head.head.weight": torch.zeros(64, 64)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.shared_head\.head\.weight.*\[128, 64\]"):
        load_model(llama_copy)


def test_loader_casts_parameters_to_requested_dtype(tiny_llama) -> None:
    model = load_model(tiny_llama.model_dir, dtype="bfloat16")
    weight = model.model.layers[0].mlp.down_proj.weight
    assert weight.dtype == paddle.bfloat16
    hf_weight = tiny_llama.hf_model.model.layers[0].mlp.down_proj.weight.detach()
    expected = hf_weight.to(torch.bfloat16).float().numpy().T  # Paddle Linear weight is [in, out]
    np.testing.assert_array_equal(weight.astype("float32").numpy(), expected)
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_llama.model_dir, dtype="int8")
