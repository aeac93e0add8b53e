"""What signing and checking a PrefillTask costs, by prompt length (`transfer/auth.py`).

Run: ``OMP_NUM_THREADS=1 python bench/bench_auth.py`` (a script, not a test).

A decode node signs each task as it sends it (one msgpack encode and one HMAC-SHA256 over the whole
message); the prefill node checks it on its inbox thread (one more encode, one HMAC, a nonce lookup).
Both are linear in the prompt: the table gives the median microseconds per task and per 1k tokens.
"""

from __future__ import annotations

import statistics
import time

from pdserve.common.kv_cache import KVCacheSpec
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.secret import ClusterSecret
from pdserve.transfer.auth import MessageSigner, MessageVerifier
from pdserve.transfer.messages import KVTarget, PrefillTask

SECRET = ClusterSecret(b"bench-auth-cluster-secret-0001")
BLOCK_SIZE = 16


def task(num_tokens: int, index: int) -> PrefillTask:
    num_blocks = -(-num_tokens // BLOCK_SIZE)
    spec = KVCacheSpec(num_layers=16, num_blocks=num_blocks + 8, block_size=BLOCK_SIZE, num_kv_heads=4,
                       head_dim=128)
    target = KVTarget("tcp://10.0.0.2:7002", "host", spec, shm_name="pdserve-kv-1-x")
    return PrefillTask(request_id=f"r{index}", prompt_token_ids=tuple(range(100, 100 + num_tokens)),
                       sampling=SamplingParams(), block_ids=tuple(range(num_blocks)),
                       decode_node_id="decode-0", kv_target=target, lease_ms=10_000)


def main() -> None:
    signer, verifier = MessageSigner(SECRET), MessageVerifier(SECRET)
    print(f"{'tokens':>8} {'sign us':>9} {'check us':>9} {'sign+check us/1k tok':>21}")
    for num_tokens in (128, 1024, 8192, 32768):
        repeats = max(20, 20_000 // num_tokens)
        tasks = [task(num_tokens, i) for i in range(repeats)]
        sign_s, check_s = [], []
        for t in tasks:
            start = time.perf_counter()
            signed = signer.sign(t)
            sign_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert verifier.check(signed) is None
            check_s.append(time.perf_counter() - start)
        sign_us, check_us = statistics.median(sign_s) * 1e6, statistics.median(check_s) * 1e6
        per_1k = (sign_us + check_us) * 1000 / num_tokens
        print(f"{num_tokens:>8} {sign_us:>9.1f} {check_us:>9.1f} {per_1k:>21.1f}")


if __name__ == "__main__":
    main()
