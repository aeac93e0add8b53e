"""The packed CPU linear op (kernels/csrc/packed_linear.cc) against a float64 reference and nn.Linear."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref

import numpy as np
import paddle
import pytest
from paddle import nn

from pdserve.kernels import cpu_ops
from pdserve.kernels.linear import Linear, is_packed, pack_linears, pack_weight, packed_matmul
from pdserve.models.llama import lm_head_of
from pdserve.models.loader import default_model_dir, load_model


def test_the_ops_load_on_this_machine() -> None:
    # CI runs on x86-64 with AVX2: the fast path must be what the other tests exercise, not skipped.
    usable, why = cpu_ops.cpu_supported()
    assert usable, why
    assert cpu_ops.load()
    assert cpu_ops.library_path().exists()


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 40])
@pytest.mark.parametrize(("k", "n"), [(32, 16), (96, 48), (256, 512)])
def test_equals_a_float64_matmul(m: int, k: int, n: int) -> None:
    rng = np.random.default_rng(m * 1000 + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    got = packed_matmul(paddle.to_tensor(x), pack_weight(w)).numpy()
    expected = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@pytest.mark.parametrize("n", [1536, 13 * 16])  # 13 strips: a pass of 8 or 4 strips leaves some over
def test_a_row_is_the_same_bits_alone_or_in_any_batch(n: int) -> None:
    # Groups of 1, 2-6 and 7-8 rows take different numbers of strips per pass: the sums must not care.
    rng = np.random.default_rng(0)
    w = pack_weight(rng.standard_normal((256, n)).astype(np.float32))
    x = rng.standard_normal((19, 256)).astype(np.float32)
    whole = packed_matmul(paddle.to_tensor(x), w).numpy()
    row_sets = (slice(0, 1), slice(1, 3), slice(4, 7), slice(3, 9), slice(2, 9), slice(5, 19), slice(18, 19))
    for rows in row_sets:
        part = packed_matmul(paddle.to_tensor(x[rows]), w).numpy()
        assert np.array_equal(part, whole[rows])


def test_non_contiguous_input_is_read_correctly() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    x = paddle.to_tensor(rng.standard_normal((64, 6)).astype(np.float32)).t()  # a transposed view
    got = packed_matmul(x, pack_weight(w)).numpy()
    np.testing.assert_allclose(got, x.numpy() @ w, rtol=1e-5, atol=1e-4)


def test_wrong_shapes_raise_instead_of_reading_out_of_bounds() -> None:
    packed = pack_weight(np.ones((32, 16), dtype=np.float32))
    with pytest.raises((OSError, ValueError), match="packed_linear takes x"):
        packed_matmul(paddle.ones([2, 33]), packed)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_nn_linear(bias: bool) -> None:
    paddle.seed(3)
    reference = nn.Linear(48, 80, bias_attr=None if bias else False)
    layer = Linear(48, 80, bias_attr=None if bias else False)
    layer.set_state_dict(reference.state_dict())
    assert layer.pack()
    x = paddle.randn([6, 48])
    np.testing.assert_allclose(layer(x).numpy(), reference(x).numpy(), rtol=1e-5, atol=1e-5)


def test_layers_the_op_cannot_serve_run_paddles_matmul() -> None:
    layer = Linear(16, 24)  # 24 columns: not whole 16-column strips
    assert not layer.pack()
    x = paddle.randn([3, 16])
    np.testing.assert_allclose(layer(x).numpy(), nn.functional.linear(x, layer.weight, layer.bias).numpy(),
                               rtol=1e-6)
    assert Linear(16, 32)(paddle.randn([2, 16])).shape == [2, 32]  # never packed: the plain op
    assert layer(paddle.randn([2, 3, 16])).shape == [2, 3, 24]  # 3-D input: the plain op


@pytest.mark.parametrize(("dtype", "shape", "taken"), [
    ("float32", [3, 16], True), ("float32", [1, 16], True), ("float64", [3, 16], False),
    ("float16", [3, 16], False), ("bfloat16", [3, 16], False), ("float32", [2, 3, 16], False),
    ("float32", [16], False),
])
def test_the_ops_take_only_2d_float32_cpu_activations(dtype: str, shape: list[int], taken: bool) -> None:
    assert cpu_ops.takes(paddle.zeros(shape, dtype)) is taken
    if dtype == "float32" and len(shape) > 1:  # taken or not (3-D), a packed layer gives nn.Linear's result
        layer = Linear(16, 32)
        assert layer.pack()
        x = paddle.randn(shape)
        reference = nn.functional.linear(x, layer.weight, layer.bias)
        np.testing.assert_allclose(layer(x).numpy(), reference.numpy(), rtol=1e-5, atol=1e-5)


def test_the_loader_packs_the_demo_model_and_the_head_follows() -> None:
    packed = load_model(default_model_dir())
    plain = load_model(default_model_dir(), cpu_fast_path=False)
    assert is_packed(packed) and not is_packed(plain)
    # Folded MTP: its hidden half runs packed, eh_proj itself is never called and keeps no copy.
    assert packed.mtp._hidden_proj._packed is not None and packed.mtp.eh_proj._packed is None
    assert pack_linears(packed) == 6 * 4 + 1 + 4  # 6 layers, eh_proj and the MTP layer's 4
    assert lm_head_of(packed)._packed is not None and lm_head_of(plain)._packed is None
    assert lm_head_of(packed) is lm_head_of(packed)  # one per model, shared by runner and proposer
    hidden = paddle.randn([5, packed.config.hidden_size])
    np.testing.assert_allclose(lm_head_of(packed)(hidden).numpy(), plain.compute_logits(hidden).numpy(),
                               rtol=1e-4, atol=1e-4)


def test_the_shared_head_does_not_keep_its_model_alive() -> None:
    model = load_model(default_model_dir())
    lm_head_of(model)
    dead = weakref.ref(model)
    del model
    gc.collect()
    assert dead() is None


def test_a_cold_cache_builds_once_and_later_processes_only_load(tmp_path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    code = ("from pdserve.kernels import cpu_ops; import sys; "
            "print(cpu_ops.load(), cpu_ops.library_path())")
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr
    loaded, path = first.stdout.split()
    assert loaded == "True" and path.startswith(str(tmp_path))
    stamp = os.stat(path).st_mtime_ns
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert second.stdout.split()[0] == "True"
    assert os.stat(path).st_mtime_ns == stamp  # not rebuilt
    assert "Compiling" not in first.stdout + second.stdout  # the compiler's chatter stays in the child


def test_a_failed_build_is_not_retried_by_each_process_but_on_request(tmp_path) -> None:
    fixed = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    broken = {**fixed, "CC": "/bin/false", "CXX": "/bin/false"}  # a toolchain that cannot compile

    def python(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=240)

    code = "from pdserve.kernels import cpu_ops; print(cpu_ops.load(), cpu_ops.failure_path())"
    first = python(broken, "-c", code)
    loaded, marker = first.stdout.split()
    assert loaded == "False" and os.path.exists(marker), first.stderr
    second = python(broken, "-c", code)
    assert second.stdout.split()[0] == "False"
    assert "an earlier build failed" in second.stderr and "python -m pdserve.kernels.cpu_ops" in second.stderr
    retry = python(fixed, "-m", "pdserve.kernels.cpu_ops")
    assert retry.returncode == 0 and not os.path.exists(marker), retry.stderr
    assert python(fixed, "-c", code).stdout.split()[0] == "True"


def _strips(w: np.ndarray) -> paddle.Tensor:
    """The op's layout of w in float32, whatever pack_weight would choose."""
    k, n = w.shape
    return paddle.to_tensor(np.ascontiguousarray(w.reshape(k, n // 16, 16).transpose(1, 0, 2)))


def test_bfloat16_exact_weights_are_stored_in_half_the_bytes_with_the_same_results() -> None:
    rng = np.random.default_rng(5)
    w = rng.standard_normal((256, 512)).astype(np.float32)
    w_bf16 = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)  # every value exactly a bfloat16
    packed = pack_weight(w_bf16)
    assert packed.dtype == paddle.bfloat16
    for m in (1, 6, 13):
        x = paddle.to_tensor(rng.standard_normal((m, 256)).astype(np.float32))
        assert np.array_equal(packed_matmul(x, packed).numpy(), packed_matmul(x, _strips(w_bf16)).numpy())


def test_weights_that_are_not_bfloat16_stay_float32() -> None:
    w = np.random.default_rng(6).standard_normal((32, 48)).astype(np.float32)
    assert pack_weight(w).dtype == paddle.float32


def test_the_demo_models_bf16_checkpoint_is_packed_as_bfloat16() -> None:
    model = load_model(default_model_dir())
    assert model.model.layers[0].mlp.gate_up_proj._packed.dtype == paddle.bfloat16
    assert lm_head_of(model)._packed.dtype == paddle.bfloat16
