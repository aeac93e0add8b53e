"""The paged KV cache pool: every layer's K and V blocks in one buffer, optionally in shared memory.

Layout of the buffer: ``[num_layers, 2 (K, V), num_blocks, num_kv_heads, block_size, head_dim]``, so
each layer's K (and V) is one contiguous ``[num_blocks, num_kv_heads, block_size, head_dim]`` array
(docs/architecture.md explains the heads-before-positions choice). Paddle tensors view the buffer
zero-copy through DLPack: a write by a peer process that maps the same file is visible to the model
without a copy, which is what the same-host PD transfer relies on.

Shared memory is a file under ``/dev/shm`` (a tmpfs) mapped with numpy. We manage the file ourselves
instead of ``multiprocessing.shared_memory`` because, on Python 3.11, every process that attaches
registers the segment with its resource tracker and unlinks it on exit — the peer would delete the
owner's pool.
"""

from __future__ import annotations

import os
import uuid
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec
import numpy as np

from pdserve.common.leftovers import SHM_DIR, pool_name

if TYPE_CHECKING:
    import paddle



Positive = Annotated[int, msgspec.Meta(ge=1, lt=2**31)]
KVDType = Literal["float32", "float16", "bfloat16"]


class KVCacheSpec(msgspec.Struct, frozen=True):
    """A pool's geometry. The engine derives it from the model (engine.kv_spec_for) and reports it in
    its ready record; a prefill node checks a decode node's copy of it before writing a byte."""

    num_layers: Positive  # decoder layers plus MTP layers; the MTP layer is always last
    num_blocks: Positive
    block_size: Positive
    num_kv_heads: Positive
    head_dim: Positive
    dtype: KVDType = "float32"

    def __post_init__(self) -> None:
        # msgspec checks the annotations when decoding; direct construction is checked here.
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVCacheSpec.{name} must be >= 1 (got {getattr(self, name)})")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"KVCacheSpec.dtype must be float32, float16 or bfloat16 (got {self.dtype})")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """One block of one layer's K or V: [num_kv_heads, block_size, head_dim]."""
        return (self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across every layer, K and V: what a request pays per block."""
        return self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_dim * self.itemsize

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_block * self.num_blocks

    def numpy_dtype(self) -> np.dtype:
        # numpy has no bfloat16: such a pool is stored as raw uint16 and viewed as bf16 by paddle.
        return np.dtype({"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[self.dtype])


class KVCachePool:
    """Owns (or maps) the KV buffer and exposes per-layer ``(k_cache, v_cache)`` paddle views."""

    def __init__(self, spec: KVCacheSpec, array: np.ndarray, shm_path: Path | None, owner: bool):
        self.spec = spec
        self.array = array  # [layers, 2, blocks, heads, block_size, head_dim]
        self.shm_path = shm_path
        self._owner = owner

    @cached_property
    def caches(self) -> list[tuple[paddle.Tensor, paddle.Tensor]]:
        """Per-layer ``(k_cache, v_cache)`` paddle views; built on first use, so a node server that
        maps the pool only to copy blocks never imports paddle."""
        return [(_paddle_view(self.array[layer, 0], self.spec.dtype),
                 _paddle_view(self.array[layer, 1], self.spec.dtype))
                for layer in range(self.spec.num_layers)]

    @classmethod
    def allocate(cls, spec: KVCacheSpec) -> KVCachePool:
        """A private pool in this process's memory."""
        return cls(spec, np.zeros(spec.shape, dtype=spec.numpy_dtype()), None, owner=True)

    @classmethod
    def create_shared(cls, spec: KVCacheSpec, name: str | None = None) -> KVCachePool:
        """A pool in a new /dev/shm file that peers on this host can `attach` to by name."""
        name = name or pool_name(os.getpid(), uuid.uuid4().hex)  # the pid: see common/leftovers.py
        path = SHM_DIR / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, spec.total_bytes)
        finally:
            os.close(fd)
        array = np.memmap(path, dtype=spec.numpy_dtype(), mode="r+", shape=spec.shape)
        return cls(spec, array, path, owner=True)

    @classmethod
    def attach(cls, spec: KVCacheSpec, name: str) -> KVCachePool:
        """Map a peer's shared pool. The size must match the spec exactly: a mismatch means the two
        processes disagree about the layout, and writing would corrupt the owner's cache."""
        path = SHM_DIR / name
        size = path.stat().st_size
        if size != spec.total_bytes:
            raise ValueError(f"shared KV pool {name} has {size} bytes, the spec needs {spec.total_bytes}")
        array = np.memmap(path, dtype=spec.numpy_dtype(), mode="r+", shape=spec.shape)
        return cls(spec, array, path, owner=False)

    @property
    def shm_name(self) -> str | None:
        return self.shm_path.name if self.shm_path else None

    def close(self) -> None:
        """Drop the mapping; the owner of a shared pool also removes its file."""
        # The mapping itself goes with the last reference: unmapping now could pull memory from
        # under a paddle view (or a zero-copy frame) that is still alive.
        self.caches = []
        if self._owner and self.shm_path is not None:
            self.shm_path.unlink(missing_ok=True)
        self.shm_path = None

    def unmap(self) -> None:
        """Close a peer's pool and unmap it now, for a holder that keeps no view of it beyond its own
        calls (the same-host KV sender): its memory must not wait for the garbage collector."""
        self.close()
        if isinstance(self.array, np.memmap) and self.array._mmap is not None:
            self.array._mmap.close()
        self.array = np.empty((0,), dtype=self.spec.numpy_dtype())


def _paddle_view(array: np.ndarray, dtype: str) -> paddle.Tensor:
    import paddle  # only the engine process views the pool as tensors

    tensor = paddle.from_dlpack(array.__dlpack__())
    if dtype == "bfloat16":
        tensor = tensor.view(paddle.bfloat16)
    return tensor


def kv_head_range(num_kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """The KV heads ``[start, stop)`` that rank ``rank`` of ``size`` tensor-parallel ranks holds: an
    even split when ``size`` divides the heads, one head shared by ``size / num_kv_heads`` consecutive
    ranks when ``size`` exceeds them. Here, not in models/, because the data plane maps heads between
    nodes of different TP sizes with the same rule."""
    if not 0 <= rank < size:
        raise ValueError(f"rank must be in [0, {size}) (got {rank})")
    if size <= num_kv_heads:
        if num_kv_heads % size:
            raise ValueError(f"{num_kv_heads} KV heads do not split over {size} ranks")
        per_rank = num_kv_heads // size
        return rank * per_rank, (rank + 1) * per_rank
    if size % num_kv_heads:
        raise ValueError(f"{size} ranks do not share {num_kv_heads} KV heads evenly")
    head = rank // (size // num_kv_heads)
    return head, head + 1
