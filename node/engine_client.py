"""The node-server side of one engine process: starts it, sends it tasks, reads its one record stream.

`EngineClient` owns the engine's two streams: tasks go in as frames on its stdin, records come back on
the SysV record stream (`RecordReader`). One call per task kind; every request is named by its
request id, the node's one id for it. Reading is left to the caller (`receive`, which blocks): the
node server's `EngineBridge` runs it on one thread, the offline path in a plain loop. A reaper thread
waits for the process to exit and then wakes that reader (`notify_exit`), so a dead engine is noticed
without anyone polling.

With ``tensor_parallel_size`` N > 1 the engine is N rank processes (engine/ranks.py): rank 0 takes the
tasks and writes the one record stream, exactly as a single engine does, and the others take their
inputs from rank 0. They live and die together: when any rank exits, the client kills the others
before the reader sees EngineExited, so a node never runs on a partial set of ranks.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from pdserve.common.kv_cache import SHM_DIR
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.tokens import SampledTokens
from pdserve.engine.config import EngineConfig
from pdserve.engine.protocol import (
    STATS_MAX_INTERVAL_S,
    AbortTask,
    EngineFailed,
    EngineProcessConfig,
    EngineReady,
    EngineRecord,
    EngineTask,
    GenerateTask,
    PrefillTask,
    RankPlacement,
    ReleaseTask,
    RemoteKVReadyTask,
    ReserveTask,
    ShutdownTask,
    StreamAddress,
    encode_config,
    encode_task,
    write_frame,
)
from pdserve.models.config import ModelConfig
from pdserve.models.tensor_parallel import ShardingError, check_shardable
from pdserve.node.engine_stream import EngineExited, RecordReader

log = logging.getLogger("pdserve.node.engine")

DTYPES = ("float32", "bfloat16", "float16")
STALL_CHECK_INTERVAL_S = 0.25
WATCHDOG_PAUSE_S = 1.0  # a stall check this much later than planned means the node itself was paused


class EngineError(RuntimeError):
    """The engine process failed to start, died, or reported a fatal error."""


@dataclass(frozen=True)
class EngineClientConfig:
    model_dir: str
    engine: EngineConfig
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"
    shared_kv_pool: bool = False
    omp_num_threads: int = 1  # each engine rank's share of the host's cores (PADDLE_CPU.md)
    startup_timeout_s: float = 120.0  # loading the model; an engine not ready by then is killed
    # A running engine writes a record at least every STATS_MAX_INTERVAL_S between steps; one silent
    # this long (stopped, hung in a step, a rank stuck in a collective) is killed, as if it had died.
    # It must exceed the longest legitimate step.
    stall_timeout_s: float = 30.0
    log_level: str = "WARNING"
    tensor_parallel_size: int = 1  # engine rank processes, each with omp_num_threads threads

    def __post_init__(self) -> None:
        if self.omp_num_threads < 1:
            raise ValueError(f"omp_num_threads must be >= 1 (got {self.omp_num_threads})")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1 (got {self.tensor_parallel_size})")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0 (got {self.startup_timeout_s})")
        if not STATS_MAX_INTERVAL_S < self.stall_timeout_s <= 3600:
            raise ValueError(f"stall_timeout_s must be in ({STATS_MAX_INTERVAL_S}, 3600]: a running engine "
                             f"reports every {STATS_MAX_INTERVAL_S} s (got {self.stall_timeout_s})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES} (got {self.dtype!r})")


class EngineClient:
    def __init__(self, config: EngineClientConfig) -> None:
        self.config = config
        self.ready: EngineReady | None = None
        self._records: RecordReader | None = None
        self._process: subprocess.Popen[bytes] | None = None  # rank 0: tasks go to its stdin
        self._ranks: list[subprocess.Popen[bytes]] = []  # every rank, rank 0 first
        self._closing = False
        self._exit_lock = threading.Lock()
        self._first_returncode: int | None = None
        self._write_lock = threading.Lock()
        self._last_record_at = time.monotonic()
        self._watching = threading.Event()  # cleared by close(): the stall watchdog ends
        self.stalled: str | None = None  # why the stall watchdog killed the engine

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> EngineReady:
        """Start the engine process (every rank) and wait for its ready record (or its failure)."""
        size = self.config.tensor_parallel_size
        if size > 1:
            try:
                check_shardable(ModelConfig.from_dir(self.config.model_dir), size)
            except ShardingError as exc:
                raise EngineError(f"--tensor-parallel-size {size}: {exc}") from exc
        self._records = RecordReader()
        port = _free_loopback_port() if size > 1 else 0
        ranks = [None] if size == 1 else [RankPlacement(rank, size, port) for rank in range(size)]
        env = dict(os.environ, OMP_NUM_THREADS=str(self.config.omp_num_threads))
        processes = []
        for placement in ranks:
            process_config = EngineProcessConfig(
                model_dir=self.config.model_dir, engine=self.config.engine, records=self._records.address,
                dtype=self.config.dtype, shared_kv_pool=self.config.shared_kv_pool,
                eos_token_ids=self.config.eos_token_ids, log_level=self.config.log_level, ranks=placement,
            )
            leader = placement is None or placement.rank == 0
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "pdserve.engine.process", encode_config(process_config)],
                stdin=subprocess.PIPE if leader else subprocess.DEVNULL, env=env,
            ))
        self._process, self._ranks = processes[0], processes
        for process in processes:
            threading.Thread(target=self._reap, args=(process, processes, self._records),
                             name="engine-reaper", daemon=True).start()
        # A stuck start (a hung load, a stopped process) ends as a kill, which the reaper reports.
        watchdog = threading.Timer(self.config.startup_timeout_s, self._kill_all)
        watchdog.daemon = True
        watchdog.start()
        try:
            self.ready = self._wait_ready()
        except BaseException:
            self.close()
            raise
        finally:
            watchdog.cancel()
        self._watching.set()
        threading.Thread(target=self._watch_for_stall, name="engine-stall-watchdog", daemon=True).start()
        return self.ready

    def _watch_for_stall(self) -> None:
        """Kill an engine whose record stream has been silent for stall_timeout_s: its requests then
        fail as a dead engine's do (the reaper reports the exit), instead of waiting on it forever."""
        timeout_s = self.config.stall_timeout_s
        checked_at = time.monotonic()
        while self._watching.is_set() and self.alive():
            now = time.monotonic()
            if now - checked_at > STALL_CHECK_INTERVAL_S + WATCHDOG_PAUSE_S:
                # This thread did not run either (the whole node was stopped, or the host paused): the
                # engine's silence it did not watch is not held against it.
                self._last_record_at = max(self._last_record_at, now)
            checked_at = now
            silent_s = now - self._last_record_at
            if silent_s >= timeout_s:
                self.stalled = (f"engine stalled: no record for {silent_s:.1f} s (a running engine reports "
                                f"every {STATS_MAX_INTERVAL_S} s); killed")
                log.error("%s (pids %s)", self.stalled, self.rank_pids)
                self._kill_all()
                return
            time.sleep(min(timeout_s - silent_s, STALL_CHECK_INTERVAL_S))

    def _wait_ready(self) -> EngineReady:
        """The first record is ready or failed (a model that cannot load); a process that dies before
        either, or is killed for taking longer than startup_timeout_s, shows up as EngineExited."""
        record = self.receive()
        if isinstance(record, EngineReady):
            return record
        if isinstance(record, EngineFailed):
            raise EngineError(f"engine failed to start: {record.message}")
        if isinstance(record, EngineExited):
            raise EngineError(f"engine process exited with code {record.returncode} before it was ready "
                              f"(killed after {self.config.startup_timeout_s} s if it hung)")
        raise EngineError(f"engine sent {type(record).__name__} before it was ready")

    def _reap(self, process: subprocess.Popen[bytes], ranks: list[subprocess.Popen[bytes]],
              records: RecordReader) -> None:
        """Wait for one rank; when it exits, so does the whole engine: the other ranks are killed (a
        rank that exits while the others run has broken their collective), and the reader learns of
        the exit once every rank is gone."""
        returncode = process.wait()
        with self._exit_lock:  # the first rank to exit says why the engine ended
            self._first_returncode = returncode if self._first_returncode is None else self._first_returncode
        if not self._closing:
            for other in ranks:
                if other is not process and other.poll() is None:
                    log.error("engine rank pid %d exited with code %s: stopping pid %d",
                              process.pid, returncode, other.pid)
                    other.kill()
        if process is ranks[0]:
            for other in ranks[1:]:
                other.wait()
            records.notify_exit(self._first_returncode)

    def _kill_all(self) -> None:
        for process in self._ranks:
            process.kill()

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def records_address(self) -> StreamAddress:
        """The record stream's queue (the engine's rank 0 is its only writer)."""
        if self._records is None:
            raise EngineError("engine client is not started")
        return self._records.address

    @property
    def rank_pids(self) -> list[int]:
        """Every engine rank's pid, rank 0 first."""
        return [p.pid for p in self._ranks]

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the engine (Shutdown, then SIGTERM, then SIGKILL; every rank) and remove the record stream."""
        process, ranks = self._process, self._ranks
        self._closing = True
        self._watching.clear()  # a shutdown that takes a while is no stall
        self._process = None
        if process is not None:
            try:
                self._send(process, ShutdownTask())  # rank 0 passes it on to the other ranks
                process.stdin.close()
            except (OSError, ValueError, EngineError):
                pass  # already gone: nothing to tell
            for rank in ranks:
                _wait_or_kill(rank, timeout_s)
            self._remove_orphaned_kv_pool()
        if self._records is not None:
            self._records.close()

    def _remove_orphaned_kv_pool(self) -> None:
        """An engine that died (kill -9) could not remove its shared KV pool; its file is ours to remove
        now that the process is gone (a peer that still maps it keeps its mapping)."""
        names = [self.ready.kv_pool_name, *self.ready.rank_kv_pool_names] if self.ready else []
        for name in names:
            if name:
                (SHM_DIR / name).unlink(missing_ok=True)

    def __enter__(self) -> EngineClient:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- tasks ---------------------------------------------------------------------------------------

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Prefill and decode the request here."""
        self._send(self._require_process(), GenerateTask(request_id, prompt_token_ids, params))

    def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Prefill node: the first token, then hold the KV for the transfer agent until `release`."""
        self._send(self._require_process(), PrefillTask(request_id, prompt_token_ids, params))

    def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                num_extra_tokens: int) -> None:
        """Decode node: blocks for KV a prefill node will write, plus num_extra_tokens for the first
        token and drafts (answered by KVReserved or RequestRejected)."""
        self._send(self._require_process(),
                   ReserveTask(request_id, prompt_token_ids, params, num_extra_tokens))

    def kv_ready(self, request_id: str, first: SampledTokens, draft_token_ids: list[int]) -> None:
        """Decode node: the reserved blocks hold the prompt's KV; decode on from the peer's token."""
        self._send(self._require_process(), RemoteKVReadyTask(request_id, first, draft_token_ids))

    def release(self, request_id: str) -> None:
        """Prefill node: the request's KV is handed over (or never will be): free its blocks."""
        self._send(self._require_process(), ReleaseTask(request_id))

    def abort(self, request_id: str) -> None:
        self._send(self._require_process(), AbortTask(request_id))

    # -- records -------------------------------------------------------------------------------------

    def receive(self) -> EngineRecord | EngineExited:
        """The next record; blocks until one arrives. EngineExited once the process is gone (every
        record it wrote comes first). Raises ProtocolError if the stream breaks or is closed."""
        if self._records is None:
            raise EngineError("engine client is not started")
        record = self._records.receive()
        self._last_record_at = time.monotonic()
        return record

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            raise EngineError("engine process is not running")
        return self._process

    def _send(self, process: subprocess.Popen[bytes], task: EngineTask) -> None:
        with self._write_lock:
            try:
                write_frame(process.stdin, encode_task(task))
            except (BrokenPipeError, ValueError) as exc:
                raise EngineError("engine process is not accepting tasks") from exc


def _free_loopback_port() -> int:
    """A port for rank 0's rendezvous store, free now (the store binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_or_kill(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    try:
        process.wait(timeout=timeout_s)
        return
    except subprocess.TimeoutExpired:
        process.terminate()
    try:
        process.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

