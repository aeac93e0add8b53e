"""The engine process: a busy loop of take tasks -> step -> emit records.

Started by `EngineClient` as ``python -m pdserve.engine.process CONFIG_JSON``. Tasks arrive as frames
on stdin, which the loop reads itself (waiting in select() only when it has nothing to step);
everything the engine reports (ready, stats, rejections, KV reserved, each step's outputs with its
prefill progress, a fatal failure) leaves in order as records on the one SysV record stream
(engine/protocol.py). The loop ends on a Shutdown task, on stdin closing (the node server is gone),
or when the stream's reader is gone; in every case the KV pool and the stream writer are released.

With tensor parallelism the node starts one such process per rank (``config.ranks``): each loads its
shard, and rank 0 alone reads tasks and writes records, sharing each turn's tasks with the others
(engine/ranks.py).
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pdserve.common.kv_cache import KVCachePool
from pdserve.engine.engine import LLMEngine, kv_spec_for
from pdserve.engine.grammar import GrammarCompiler
from pdserve.engine.output_stream import ReaderGoneError, RecordWriter
from pdserve.engine.protocol import (
    FRAME_LENGTH,
    MAX_FRAME_BYTES,
    STATS_MAX_INTERVAL_S,
    AbortTask,
    EngineFailed,
    EngineProcessConfig,
    EngineReady,
    EngineRecord,
    EngineStats,
    EngineTask,
    GenerateTask,
    KVReserved,
    PrefillProgress,
    PrefillTask,
    ProtocolError,
    ReleaseTask,
    RemoteKVReadyTask,
    RequestOutput,
    RequestRejected,
    ReserveTask,
    ShutdownTask,
    StepOutputs,
    decode_config,
    decode_task,
)
from pdserve.engine.ranks import FollowerInbox, LeaderInbox, NoRecords, engine_state, share_pool_names
from pdserve.engine.request import RequestStatus
from pdserve.engine.scheduler import AdmissionError, CapacityError
from pdserve.models.tensor_parallel import TensorParallel, join_ranks

log = logging.getLogger("pdserve.engine")

STATS_MIN_INTERVAL_S = 0.05
IDLE_WAIT_S = 0.05  # an idle engine still reports load changes (e.g. an abort) this quickly


class TaskInbox:
    """Task frames from the node server's pipe, read by the engine loop itself: when idle it blocks in
    select() until a frame arrives (or wait_s passes), when busy it takes what is there without
    waiting. No reader thread, so a task reaches the loop without a thread hand-off."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        os.set_blocking(fd, False)
        self._buffer = bytearray()
        self._closed = False

    def take(self, wait_s: float) -> list[EngineTask | ProtocolError]:
        """Every complete task frame available, waiting up to wait_s for the first when none is. A
        closed or broken pipe (the node server is gone, or framing is lost) yields ShutdownTask."""
        if self._closed:
            return [ShutdownTask()]
        items = self._frames()
        if not items and wait_s > 0 and select.select([self._fd], [], [], wait_s)[0]:
            self._fill()
            items = self._frames()
        elif not items:
            self._fill()
            items = self._frames()
        if self._closed:
            items.append(ShutdownTask())
        return items

    def _fill(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 1 << 20)
            except BlockingIOError:
                return
            if not data:  # the node server closed our stdin: it is gone
                self._closed = True
                return
            self._buffer += data

    def _frames(self) -> list[EngineTask | ProtocolError]:
        items: list[EngineTask | ProtocolError] = []
        while len(self._buffer) >= FRAME_LENGTH.size:
            (length,) = FRAME_LENGTH.unpack_from(self._buffer)
            if length > MAX_FRAME_BYTES:  # framing is lost: there is no way to find the next frame
                log.error("task stream broken, stopping: a %d-byte frame", length)
                self._closed = True
                self._buffer.clear()
                break
            end = FRAME_LENGTH.size + length
            if len(self._buffer) < end:
                break
            payload = bytes(self._buffer[FRAME_LENGTH.size:end])
            del self._buffer[:end]
            try:
                items.append(decode_task(payload))
            except ProtocolError as exc:  # one bad frame; the next one is still readable
                items.append(exc)
        return items


class Inbox(Protocol):
    def take(self, wait_s: float) -> list[EngineTask | ProtocolError]: ...


class RecordSink(Protocol):
    def send(self, record: EngineRecord) -> None: ...


class EngineLoop:
    """Ties the engine to its channels: take tasks, step, emit. No socket work happens here."""

    def __init__(self, engine: LLMEngine, inbox: Inbox, records: RecordSink):
        self.engine = engine
        self.inbox = inbox
        self.records = records
        self._last_stats: EngineStats | None = None
        self._last_stats_at = 0.0

    def run(self) -> None:
        while True:
            idle = not self.engine.has_schedulable_work()
            for task in self.inbox.take(wait_s=IDLE_WAIT_S if idle else 0.0):
                if isinstance(task, ShutdownTask):
                    return
                self._apply(task)
            self._report_stats()
            if not self.engine.has_schedulable_work():
                continue
            outputs = self.engine.step()
            progress = [PrefillProgress(r.request_id, r.num_computed_tokens, list(r.block_table))
                        for r in self.engine.take_prefill_progress()]
            self._emit(outputs, progress)

    def _emit(self, outputs: list[RequestOutput], progress: list[PrefillProgress] | None = None) -> None:
        if outputs or progress:
            self.records.send(StepOutputs(self.engine.steps, outputs, progress or []))

    def _report_stats(self) -> None:
        """Load for the node server's Stats RPC: sent when it changes, at most every 50 ms, and once
        a second regardless (so a reader can tell a quiet engine from a stuck one)."""
        now = time.monotonic()
        if now - self._last_stats_at < STATS_MIN_INTERVAL_S:
            return
        stats = self.engine.stats()
        if stats == self._last_stats and now - self._last_stats_at < STATS_MAX_INTERVAL_S:
            return
        self.records.send(stats)
        self._last_stats, self._last_stats_at = stats, now

    def _apply(self, task: EngineTask | ProtocolError) -> None:
        if isinstance(task, ProtocolError):
            log.error("dropped a malformed task frame: %s", task)
            return
        handler = {
            GenerateTask: self._add, PrefillTask: self._add, ReserveTask: self._reserve,
            AbortTask: self._abort, ReleaseTask: self._release, RemoteKVReadyTask: self._kv_ready,
        }[type(task)]
        handler(task)

    def _admit(self, task: GenerateTask | PrefillTask | ReserveTask, admit: Callable[[], object]) -> bool:
        try:
            admit()
        except (AdmissionError, ValueError) as exc:
            self.records.send(RequestRejected(task.request_id, str(exc),
                                              retryable=isinstance(exc, CapacityError)))
            return False
        return True

    def _add(self, task: GenerateTask | PrefillTask) -> None:
        add = self.engine.add_prefill_request if isinstance(task, PrefillTask) else self.engine.add_request
        self._admit(task, lambda: add(task.request_id, task.prompt_token_ids, task.sampling))

    def _reserve(self, task: ReserveTask) -> None:
        reserved: list = []

        def admit() -> None:
            reserved.append(self.engine.reserve(task.request_id, task.prompt_token_ids, task.sampling,
                                                task.num_extra_tokens))

        if self._admit(task, admit):
            self.records.send(KVReserved(task.request_id, list(reserved[0].block_table)))

    def _abort(self, task: AbortTask) -> None:
        # release(): a prefilled request whose KV hand-over was abandoned still holds its blocks.
        if self.engine.abort(task.request_id) or self.engine.release(task.request_id):
            self._emit([RequestOutput(task.request_id, RequestStatus.FINISHED_ABORTED)])

    def _release(self, task: ReleaseTask) -> None:
        self.engine.release(task.request_id)

    def _kv_ready(self, task: RemoteKVReadyTask) -> None:
        output = self.engine.on_remote_kv(task.request_id, task.first, task.draft_token_ids)
        if output is not None:  # the peer's first token is this request's first output, emitted here
            self._emit([output])


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit hosts


def tune_malloc() -> None:
    """Keep step-sized temporaries (a batch's gathered KV is several MB) on the heap.

    By default glibc serves every allocation above 128 KiB with a fresh mmap until a larger block
    has been freed, so the KV gather of a batch-32 decode step page-faults its whole buffer on
    every call (about 3x slower attention, bench/bench_attention.py --cold-malloc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, 4 * MMAP_THRESHOLD_MAX)


class UnsupportedDtypeError(ValueError):
    """The requested --dtype cannot run on this engine's device."""


def check_dtype_runs_here(dtype: str) -> None:
    """Refuse a dtype the device cannot compute in, before loading: Paddle's CPU kernels have no
    bfloat16/float16 matmul (PADDLE_CPU.md), so such a model would load and then fail its first step."""
    import paddle

    if dtype != "float32" and not paddle.device.is_compiled_with_cuda():
        raise UnsupportedDtypeError(f"--dtype {dtype} does not run on the CPU (Paddle's CPU kernels have no "
                                    f"{dtype} matmul); use --dtype float32, or a GPU build of Paddle")


def build_engine(config: EngineProcessConfig, tp: TensorParallel) -> tuple[LLMEngine, KVCachePool]:
    from pdserve.models.loader import load_model  # imported here: paddle is heavy and only the child needs it

    check_dtype_runs_here(config.dtype)
    model = load_model(config.model_dir, config.dtype, tp=tp)
    spec = kv_spec_for(model, config.engine)
    pool = KVCachePool.create_shared(spec) if config.shared_kv_pool else KVCachePool.allocate(spec)
    # Structured output needs the model's tokenizer.json; a checkpoint without one serves no grammars
    # (such requests are rejected with the reason).
    grammars = (GrammarCompiler.for_model(config.model_dir, config.eos_token_ids, model.config.vocab_size)
                if (Path(config.model_dir) / "tokenizer.json").is_file() else None)
    return LLMEngine(model, config.engine, pool, config.eos_token_ids, grammars=grammars), pool


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = decode_config(argv[0])
    logging.basicConfig(level=config.log_level, format="%(asctime)s engine %(levelname)s %(message)s")
    tasks = _claim_stdin()
    # The node server owns this process's lifetime (Shutdown, or stdin closing). A Ctrl-C meant for
    # the node server also reaches us through the terminal's process group; it must not kill the loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_malloc()
    pool = None
    placement = config.ranks
    tp = TensorParallel() if placement is None else TensorParallel(placement.rank, placement.size)
    # First: a failure to load the model is reported on it. Only rank 0 writes the stream.
    records: RecordWriter | NoRecords = RecordWriter(config.records) if tp.rank == 0 else NoRecords()
    try:
        if placement is not None:
            join_ranks(tp, placement.rendezvous_port)
        engine, pool = build_engine(config, tp)
        names = [pool.shm_name] if placement is None else share_pool_names(pool.shm_name, tp.size)
        records.send(EngineReady(pid=os.getpid(), kv_spec=pool.spec, kv_pool_name=pool.shm_name,
                                 rank_kv_pool_names=[name for name in names[1:] if name is not None]))
        EngineLoop(engine, _inbox(tasks, tp, engine), records).run()
    except ReaderGoneError:
        log.warning("the record stream's reader is gone; engine stopping")
    except UnsupportedDtypeError as exc:  # a configuration the node reports; no traceback to read
        _try_send(records, EngineFailed(str(exc)))
        return 2
    except Exception as exc:  # the process is about to exit: report why, then let the traceback print
        _try_send(records, EngineFailed(f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        if pool is not None:
            pool.close()
        records.release()  # a node server killed -9 cannot remove its queue; we do
    return 0


def _inbox(fd: int, tp: TensorParallel, engine: LLMEngine) -> Inbox:
    """Rank 0 (or the only rank) reads the task pipe; under tensor parallelism it shares each turn's
    tasks with the other ranks, which take them from it instead of a pipe."""
    if tp.size == 1:
        return TaskInbox(fd)

    def state() -> tuple[int, int, int]:
        return engine_state(engine)

    return LeaderInbox(TaskInbox(fd), state) if tp.rank == 0 else FollowerInbox(state)


def _claim_stdin() -> int:
    """Take stdin (a private duplicate of it) for task frames, and point fd 1 at stderr so nothing
    printed by a library lands on a pipe the node server reads."""
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return os.dup(sys.stdin.fileno())


def _try_send(records: RecordSink, record: EngineFailed) -> None:
    try:
        records.send(record)
    except (ReaderGoneError, ProtocolError):
        log.warning("could not report %s: the node server is gone", type(record).__name__)


if __name__ == "__main__":
    sys.exit(main())
