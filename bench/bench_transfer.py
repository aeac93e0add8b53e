"""KV transfer throughput: same-host (shm) and ZMQ transports against this machine's memcpy and loopback TCP.

Run: ``OMP_NUM_THREADS=1 python bench/bench_transfer.py`` (a script, not a test).

One request's KV (every layer, K and V, all its blocks) moves from a prefill pool into a decode
node's reserved blocks through the real code path: `KVChunker` -> `ShmKVSender` / `ZmqKVSender` ->
the decode node's `KVEndpoint` (inbox thread, `KVReceiver` checks, write into its /dev/shm pool). A
transfer is timed from the send until the decode side reports the request's KV complete. Both
sides run in this process (the inbox on its own thread, as in a node server); libzmq's I/O thread
and numpy copies run outside the GIL.

Ceilings, measured in the same run and interleaved with the transfers (one round of every case per
repeat, so load from other jobs on this shared machine hits all alike):
- memcpy: ``np.copyto`` of a same-size, already-touched buffer (the ceiling for shm, one copy);
- TCP: a plain loopback socket, ``sendall`` on one thread into ``recv_into`` a preallocated buffer
  on another (the ceiling for ZMQ, which moves the same bytes over the same kind of socket and then
  copies them once more, frame by frame, into the pool).

Block ids are either consecutive on both sides (a fresh free list; ZMQ frames are then zero-copy
views of the pool) or fragmented (random ids on both sides; ZMQ gathers each frame first). The
copy-strategy table times only the pool-to-pool copy the shm sender does, three ways.

"zmq curve" is the zmq case with CURVE on (keys derived from a cluster secret, as every node runs
by default): its column over "zmq" is what encryption and authentication cost on the KV path.
"""

from __future__ import annotations

import argparse
import queue
import socket
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pdserve.common.kv_cache import KVCachePool, KVCacheSpec
from pdserve.common.secret import ClusterSecret
from pdserve.transfer.block_copy import COPY_STRATEGIES
from pdserve.transfer.channel import Outbox
from pdserve.transfer.config import CurveKeys, TransferConfig
from pdserve.transfer.endpoint import KVEndpoint
from pdserve.transfer.receiver import ChunkResult
from pdserve.transfer.transport import KVChunker, KVSender, open_kv_sender

MIB = 1 << 20
# 16 layers x (K, V) x 4 KV heads x 16 tokens x 128 head_dim x fp32 = 1 MiB per block.
SPEC_ARGS = dict(num_layers=16, block_size=16, num_kv_heads=4, head_dim=128)
OUT_DIR = Path("bench_out")
RATIOS = {"shm": "memcpy", "shm fragmented": "memcpy", "zmq": "tcp", "zmq fragmented": "tcp",
          "zmq curve": "zmq"}
BENCH_SECRET = ClusterSecret(b"bench-transfer-cluster-secret")


class TcpLoopback:
    """A connected loopback socket pair; `transfer(buf)` times sendall -> recv_into of every byte."""

    def __init__(self, max_bytes: int) -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            self._send = socket.create_connection(server.getsockname())
            self._recv, _ = server.accept()
        self._sink = bytearray(max_bytes)
        self._asks: queue.Queue[int] = queue.Queue()
        self._done = threading.Event()
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        view = memoryview(self._sink)
        while (nbytes := self._asks.get()) > 0:
            got = 0
            while got < nbytes:
                got += self._recv.recv_into(view[got:nbytes])
            self._done.set()

    def transfer(self, data: np.ndarray) -> float:
        self._done.clear()
        self._asks.put(data.nbytes)
        start = time.perf_counter()
        self._send.sendall(memoryview(data).cast("B"))
        self._done.wait()
        return time.perf_counter() - start

    def close(self) -> None:
        self._asks.put(0)
        self._send.close()
        self._recv.close()


class TransferRig:
    """A prefill pool and a decode endpoint; `transfer` moves one request's KV and times it."""

    def __init__(self, spec: KVCacheSpec, curve: CurveKeys | None = None) -> None:
        self.spec = spec
        self.src = KVCachePool.allocate(spec)
        self.src.array[...] = 1.5  # touch every page: untouched pages read as the shared zero page
        self.dst = KVCachePool.create_shared(spec)
        self.dst.array[...] = 0.0
        self.events: queue.Queue[object] = queue.Queue()
        config = TransferConfig(send_timeout_s=60.0, curve=curve)
        self.endpoint = KVEndpoint(self.dst, config, self.events.put).start()
        self.outbox = Outbox(self.endpoint.address, config)
        self.senders: dict[str, KVSender] = {
            kind: open_kv_sender(kind, self.outbox, self.endpoint.target(), spec) for kind in ("shm", "zmq")}
        self._count = 0

    def transfer(self, kind: str, src_ids: list[int], dst_ids: list[int]) -> float:
        self._count += 1
        request_id = f"bench-{self._count}"
        num_tokens = len(dst_ids) * self.spec.block_size
        self.endpoint.reservations.reserve(request_id, dst_ids, num_tokens, lease_s=600.0)
        chunker = KVChunker(request_id, dst_ids, num_tokens, self.spec.num_layers, self.spec.block_size)
        start = time.perf_counter()
        delivery = self.senders[kind].send_chunk(chunker.next_chunk(src_ids, num_tokens), self.src)
        result = self.events.get(timeout=60.0)
        elapsed = time.perf_counter() - start
        delivery.wait(60.0)
        self.endpoint.reservations.release(request_id)
        if not (isinstance(result, ChunkResult) and result.complete):
            raise RuntimeError(f"transfer {request_id} failed: {result}")
        return elapsed

    def close(self) -> None:
        for sender in self.senders.values():
            sender.close()
        self.outbox.close()
        self.endpoint.close()
        self.dst.close()


def block_ids(n: int, num_blocks: int, fragmented: bool,
              rng: np.random.Generator) -> tuple[list[int], list[int]]:
    if not fragmented:
        return list(range(n)), list(range(n))
    src, dst = rng.permutation(num_blocks)[:n], rng.permutation(num_blocks)[:n]
    return [int(x) for x in src], [int(x) for x in dst]


def measure_size(rig: TransferRig, curve_rig: TransferRig, tcp: TcpLoopback, nblocks: int, repeats: int,
                 rng: np.random.Generator) -> dict[str, float]:
    """Median GB/s of every case for one request size, the cases interleaved within each repeat, and
    the ratios to the ceilings as medians of per-repeat ratios (each transport runs right after its
    ceiling, so the two see the same load)."""
    nbytes = nblocks * rig.spec.bytes_per_block
    copy_src = np.full(nbytes // 4, 2.0, np.float32)
    copy_dst = np.zeros_like(copy_src)
    contiguous = block_ids(nblocks, rig.spec.num_blocks, False, rng)
    fragmented = block_ids(nblocks, rig.spec.num_blocks, True, rng)
    everything = slice(0, rig.spec.num_layers)
    cases: dict[str, Callable[[], float]] = {
        "memcpy": lambda: _timed(lambda: np.copyto(copy_dst, copy_src)),
        "shm": lambda: rig.transfer("shm", *contiguous),
        "shm fragmented": lambda: rig.transfer("shm", *fragmented),
        "tcp": lambda: tcp.transfer(copy_src),
        "zmq": lambda: rig.transfer("zmq", *contiguous),
        "zmq fragmented": lambda: rig.transfer("zmq", *fragmented),
        "zmq curve": lambda: curve_rig.transfer("zmq", *contiguous),
    }
    for name, copy in COPY_STRATEGIES.items():
        cases[f"copy {name} fragmented"] = (
            lambda copy=copy: _timed(lambda: copy(rig.src.array, fragmented[0], rig.dst.array, fragmented[1],
                                                  everything)))
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for case in cases.values():  # warm-up: first touches, socket buffers, allocator
        case()
    for _ in range(repeats):
        for name, case in cases.items():
            seconds[name].append(case())
    gbps = {name: nbytes / statistics.median(values) / 1e9 for name, values in seconds.items()}
    for transport, ceiling in RATIOS.items():
        gbps[f"{transport}/{ceiling}"] = statistics.median(
            c / t for c, t in zip(seconds[ceiling], seconds[transport], strict=True))
    return gbps


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def repeats_for(mib: int) -> int:
    return max(9, min(40, 512 // mib))


def write_outputs(rows: list[tuple[int, dict[str, float]]]) -> None:
    OUT_DIR.mkdir(exist_ok=True)
    names = list(rows[0][1])
    lines = ["| KV MiB | " + " | ".join(n if "/" in n else f"{n} GB/s" for n in names) + " |",
             "| --- " * (len(names) + 1) + "|"]
    for mib, gbps in rows:
        lines.append(f"| {mib} | " + " | ".join(f"{gbps[n]:.2f}" for n in names) + " |")
    (OUT_DIR / "bench_transfer.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    sizes = [mib for mib, _ in rows]
    for name in ("memcpy", "shm", "shm fragmented", "tcp", "zmq", "zmq fragmented", "zmq curve"):
        style = "--" if name in ("memcpy", "tcp") else "-"
        ax.plot(sizes, [gbps[name] for _, gbps in rows], style, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV of one request (MiB)")
    ax.set_ylabel("GB/s (median)")
    ax.set_title("KV transfer throughput vs memcpy and loopback TCP")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.savefig(OUT_DIR / "bench_transfer.png", dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=0, help="0: 512 / size, between 9 and 40")
    args = parser.parse_args()
    max_blocks = max(args.sizes_mib)
    spec = KVCacheSpec(num_blocks=max_blocks + max_blocks // 2, **SPEC_ARGS)
    assert spec.bytes_per_block == MIB
    rng = np.random.default_rng(0)
    rig, tcp = TransferRig(spec), TcpLoopback(max_blocks * MIB)
    curve_rig = TransferRig(spec, CurveKeys.from_cluster_secret(BENCH_SECRET))
    rows: list[tuple[int, dict[str, float]]] = []
    try:
        for mib in args.sizes_mib:
            rows.append((mib, measure_size(rig, curve_rig, tcp, mib, args.repeats or repeats_for(mib), rng)))
    finally:
        rig.close()
        curve_rig.close()
        tcp.close()
    names = list(rows[0][1])
    print("median GB/s per case; a/b columns: median over repeats of a's throughput / b's, side by side")
    widths = {n: max(len(n), 6) + 2 for n in names}
    print(f"{'KV MiB':>7}" + "".join(f"{n:>{widths[n]}}" for n in names))
    for mib, gbps in rows:
        print(f"{mib:>7}" + "".join(f"{gbps[n]:>{widths[n]}.2f}" for n in names))
    write_outputs(rows)
    print(f"wrote {OUT_DIR / 'bench_transfer.md'} and {OUT_DIR / 'bench_transfer.png'}")


if __name__ == "__main__":
    main()
