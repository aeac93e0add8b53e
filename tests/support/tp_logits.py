"""One rank of a tensor-parallel forward over the demo model, for tests/integration/test_tensor_parallel.py.

``python tp_logits.py RANK SIZE MASTER_PORT OUT.npz``: loads rank RANK's shard, runs a prefill of two
prompts then one decode step each (and the MTP layer over the prefill rows), and rank 0 writes the
logits of every row to OUT.npz. SIZE 1 is the unsharded reference.
"""

from __future__ import annotations

import sys

import numpy as np
import paddle

from pdserve.common.kv_cache import KVCachePool
from pdserve.engine.engine import kv_spec_for_model
from pdserve.kernels.attention import AttentionMetadata
from pdserve.models.loader import default_model_dir, load_model
from pdserve.models.tensor_parallel import TensorParallel, join_ranks

BLOCK_SIZE = 16
PROMPTS = [[(7 * i + 3) % 8000 + 1 for i in range(37)], [(11 * i + 5) % 8000 + 1 for i in range(20)]]
TABLES = [[0, 1, 2], [3, 4]]


@paddle.no_grad()
def main(rank: int, size: int, master_port: int, out: str) -> None:
    tp = TensorParallel(rank, size)
    join_ranks(tp, master_port)
    model = load_model(default_model_dir(), tp=tp)
    spec = kv_spec_for_model(model.config, 8, BLOCK_SIZE, tp=tp)
    pool = KVCachePool.allocate(spec)
    caches = pool.caches
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in PROMPTS])
    pos = np.concatenate([np.arange(len(p), dtype=np.int64) for p in PROMPTS])
    lens = [len(p) for p in PROMPTS]
    meta = AttentionMetadata.build(TABLES, lens, lens, BLOCK_SIZE)
    positions = paddle.to_tensor(pos)
    hidden = model(paddle.to_tensor(ids), positions, caches, meta)  # [T, hidden]
    prefill = model.compute_logits(hidden)
    # The MTP layer over the prefill rows, each paired with the next prompt token (its own KV layer).
    next_ids = np.roll(ids, -1)
    mtp = model.compute_logits(model.mtp(next_ids, positions, hidden, caches[-1], meta))
    # One decode step per prompt: its greedy token at the next position.
    last_rows = np.cumsum(lens) - 1
    step_ids = prefill.numpy()[last_rows].argmax(axis=-1).astype(np.int64)
    step_meta = AttentionMetadata.build(TABLES, [1, 1], [n + 1 for n in lens], BLOCK_SIZE)
    decode = model.compute_logits(model(paddle.to_tensor(step_ids), paddle.to_tensor(np.asarray(lens)),
                                        caches, step_meta))
    if rank == 0:
        np.savez(out, prefill=prefill.numpy(), mtp=mtp.numpy(), decode=decode.numpy(),
                 kv_heads=np.asarray(spec.num_kv_heads))
    pool.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
