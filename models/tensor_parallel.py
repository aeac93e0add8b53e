"""Tensor parallelism (Megatron-style) for the Llama family: which slice of each weight a rank holds.

With ``size`` ranks, rank ``r`` holds:

- attention: query heads ``[r * H/N, (r + 1) * H/N)`` and the KV heads they read. When N does not
  exceed the KV heads, each rank owns ``Hkv/N`` KV heads; when N exceeds them, ``N / Hkv`` ranks share
  (replicate) one KV head, as vLLM does. ``qkv_proj`` is column-parallel (its rows of q, k and v);
  ``o_proj`` is row-parallel (the matching input columns), its partial sums all-reduced.
- MLP: ``gate_up_proj`` column-parallel (``I/N`` of gate and of up), ``down_proj`` row-parallel and
  all-reduced.
- embedding, norms, the MTP layer's ``eh_proj`` and the LM head: replicated. The head is replicated
  rather than vocabulary-parallel because every rank then holds the same logits (the hidden state
  after an all-reduce is the same bits on every rank) and samples the same tokens with the same
  seeds, so no rank waits on a gather of the logits before it can take its next step; a small
  vocabulary (the demo model's 8192 x 256) costs 8 MB per rank for it.

Each step thus costs two all-reduces of ``[tokens, hidden]`` per decoder layer (the MTP layer
included). ``size == 1`` is the plain model: no slicing and no collective call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdserve.common.kv_cache import kv_head_range
from pdserve.models.config import ModelConfig

if TYPE_CHECKING:  # the node server checks shardability without loading Paddle
    import paddle


class ShardingError(ValueError):
    """The model cannot be split over this many ranks; the message says which dimension."""


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among the ranks of one engine."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ShardingError(f"tensor parallel size must be >= 1 (got {self.size})")
        if not 0 <= self.rank < self.size:
            raise ShardingError(f"tensor parallel rank must be in [0, {self.size}) (got {self.rank})")

    def all_reduce(self, x: paddle.Tensor) -> paddle.Tensor:
        """Sum ``x`` over the ranks in place (Paddle's collective, default group); one rank: a no-op."""
        if self.size > 1:
            from paddle import distributed

            distributed.all_reduce(x)
        return x


@dataclass(frozen=True)
class AttentionShard:
    """One rank's heads: query heads ``[q_start, q_start + num_heads)`` and KV heads
    ``[kv_start, kv_start + num_kv_heads)`` of the checkpoint."""

    num_heads: int
    num_kv_heads: int
    q_start: int
    kv_start: int


def attention_shard(config: ModelConfig, tp: TensorParallel) -> AttentionShard:
    heads, kv_heads, n = config.num_attention_heads, config.num_key_value_heads, tp.size
    if heads % n:
        raise ShardingError(f"{heads} attention heads do not split over {n} ranks")
    local_heads = heads // n
    try:
        kv_start, kv_stop = kv_head_range(kv_heads, tp.rank, n)
    except ValueError as exc:
        raise ShardingError(str(exc)) from exc
    return AttentionShard(local_heads, kv_stop - kv_start, tp.rank * local_heads, kv_start)


def intermediate_shard(config: ModelConfig, tp: TensorParallel) -> tuple[int, int]:
    """(start, size) of this rank's slice of the MLP's intermediate dimension."""
    if config.intermediate_size % tp.size:
        raise ShardingError(f"intermediate_size {config.intermediate_size} does not split "
                            f"over {tp.size} ranks")
    size = config.intermediate_size // tp.size
    return tp.rank * size, size


def check_shardable(config: ModelConfig, size: int) -> None:
    """Raise ShardingError if the model cannot run on ``size`` ranks (checked before any rank starts)."""
    tp = TensorParallel(0, size)
    attention_shard(config, tp)
    intermediate_shard(config, tp)


def join_ranks(tp: TensorParallel, master_port: int) -> None:
    """Join this process to its engine's other ranks: Paddle's gloo process group (CPU). Blocks until
    every rank has joined. The ranks meet at a key-value store that rank 0 serves on
    ``127.0.0.1:master_port`` from a child process (``models/rendezvous.py`` says why it is not
    Paddle's own store master, which binds every interface) and stops once all ranks have passed a
    barrier, so no rendezvous port outlives the join; the ranks' gloo pair connections stay on the
    loopback interface (``GLOO_SOCKET_IFNAME``), as all ranks of a node run on one host.

    Paddle keeps one global store per process, made by the first ``create_or_get_global_tcp_store``
    call and reused by ``init_parallel_env``; that call makes the store's master, and so a listener on
    ``0.0.0.0``, when ``PADDLE_TRAINER_ID`` is 0. It is therefore made here first with a non-zero
    trainer id, a client of the loopback store on every rank, before the real id is set.

    ``PADDLE_DISTRI_BACKEND=gloo`` is what makes Paddle 3.3's ``init_parallel_env`` build the global
    process group on a CPU build: left at ``auto`` it initialises a gloo context but no group, and the
    first collective fails with "The global group is not initialized"."""
    import os

    if tp.size == 1:
        return
    from paddle import distributed
    from paddle.base import core

    from pdserve.models.rendezvous import RendezvousProcess, wait_until_listening

    endpoint = f"127.0.0.1:{master_port}"
    store = RendezvousProcess(master_port) if tp.rank == 0 else None
    try:
        if store is None:
            wait_until_listening(master_port)
        os.environ.update(
            PADDLE_DISTRI_BACKEND="gloo", PADDLE_TRAINER_ID=str(tp.size), PADDLE_TRAINERS_NUM=str(tp.size),
            PADDLE_MASTER=endpoint, PADDLE_TRAINER_ENDPOINTS=",".join([endpoint] * tp.size),
            PADDLE_CURRENT_ENDPOINT=endpoint, GLOO_SOCKET_IFNAME="lo",
        )
        core.create_or_get_global_tcp_store()  # a client: the trainer id above is not 0
        os.environ["PADDLE_TRAINER_ID"] = str(tp.rank)
        distributed.init_parallel_env()
        distributed.barrier()  # every rank is past its last use of the store
    finally:
        if store is not None:
            store.close()
