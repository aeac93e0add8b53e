"""Tensor parallelism: N rank processes joined by Paddle's gloo collective compute what one process does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pdserve.tests.support.cluster import free_port

WORKER = Path(__file__).resolve().parents[1] / "support" / "tp_logits.py"
REPO = Path(__file__).resolve().parents[2]


def _run_ranks(size: int, out: Path, timeout_s: float = 240.0) -> dict[str, np.ndarray]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(size), str(port), str(out)],
                              env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for r in range(size)]
    try:
        for rank in ranks:
            _, err = rank.communicate(timeout=timeout_s)
            assert rank.returncode == 0, err.decode()[-3000:]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    with np.load(out) as data:
        return dict(data)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    return _run_ranks(1, tmp_path_factory.mktemp("tp1") / "logits.npz")


def _assert_same_logits(sharded: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    for name in ("prefill", "mtp", "decode"):
        np.testing.assert_allclose(sharded[name], reference[name], atol=1e-4, rtol=0, err_msg=name)
        assert (sharded[name].argmax(-1) == reference[name].argmax(-1)).all(), name


def test_two_ranks_compute_the_logits_of_one(reference: dict[str, np.ndarray], tmp_path: Path) -> None:
    sharded = _run_ranks(2, tmp_path / "logits.npz")
    assert int(sharded["kv_heads"]) == int(reference["kv_heads"]) // 2  # each rank holds half the KV heads
    _assert_same_logits(sharded, reference)


@pytest.mark.slow
def test_more_ranks_than_kv_heads_replicate_them(reference: dict[str, np.ndarray], tmp_path: Path) -> None:
    sharded = _run_ranks(8, tmp_path / "logits.npz", timeout_s=280.0)  # 8 ranks share the demo's 4 KV heads
    assert int(sharded["kv_heads"]) == 1
    _assert_same_logits(sharded, reference)
