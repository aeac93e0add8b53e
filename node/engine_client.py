"""The node-server side of one engine process: starts it, feeds it tasks, reads its outputs.

`EngineClient` owns the engine's three channels — the task pipe (stdin), the control pipe (stdout) and
the SysV output queue — and the seq_id space of live requests. Reading is left to the caller
(`receive` / `events`), so an asyncio server can run it in a thread and the offline path can call it
in a plain loop.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from pdserve.common.kv_cache import SHM_DIR
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.output_codec import StepOutput
from pdserve.engine.output_queue import OutputQueueReader
from pdserve.engine.process import EngineProcessConfig, encode_config
from pdserve.engine.protocol import (
    AbortRequest,
    AddPrefillRequest,
    AddRequest,
    EngineEvent,
    EngineFailed,
    EngineReady,
    ProtocolError,
    ReleaseRequest,
    RemoteKVReady,
    ReserveRequest,
    Shutdown,
    decode_event,
    encode_task,
    read_frame,
    write_frame,
)

log = logging.getLogger("pdserve.node.engine_client")

MAX_SEQ_ID = 0xFFFF_FFFF


class EngineError(RuntimeError):
    """The engine process failed to start, died, or reported a fatal error."""


@dataclass(frozen=True)
class EngineClientConfig:
    model_dir: str
    engine: EngineConfig
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"
    shared_kv_pool: bool = False
    omp_num_threads: int = 1  # the engine's share of the host's cores (PADDLE_CPU.md)
    startup_timeout_s: float = 120.0
    log_level: str = "WARNING"

    def __post_init__(self) -> None:
        if self.omp_num_threads < 1:
            raise ValueError(f"omp_num_threads must be >= 1 (got {self.omp_num_threads})")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0 (got {self.startup_timeout_s})")


class EngineClient:
    def __init__(self, config: EngineClientConfig) -> None:
        self.config = config
        self.ready: EngineReady | None = None
        self._outputs: OutputQueueReader | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._events: queue.SimpleQueue[EngineEvent] = queue.SimpleQueue()
        self._write_lock = threading.Lock()
        self._live_seq_ids: set[int] = set()
        self._next_seq_id = 0

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> EngineReady:
        self._outputs = OutputQueueReader()
        process_config = EngineProcessConfig(
            model_dir=self.config.model_dir, engine=self.config.engine, output_queue=self._outputs.address,
            dtype=self.config.dtype, shared_kv_pool=self.config.shared_kv_pool,
            eos_token_ids=self.config.eos_token_ids, log_level=self.config.log_level,
        )
        env = dict(os.environ, OMP_NUM_THREADS=str(self.config.omp_num_threads))
        self._process = subprocess.Popen(
            [sys.executable, "-m", "pdserve.engine.process", encode_config(process_config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        threading.Thread(target=self._read_events, name="engine-events", daemon=True).start()
        try:
            self.ready = self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self.ready

    def _wait_ready(self) -> EngineReady:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            try:
                event = self._events.get(timeout=0.1)
            except queue.Empty:
                if self._process.poll() is not None:
                    raise EngineError(f"engine process exited with code {self._process.returncode} "
                                      "before it was ready") from None
                continue
            if isinstance(event, EngineReady):
                return event
            if isinstance(event, EngineFailed):
                raise EngineError(f"engine failed to start: {event.message}")
        raise EngineError(f"engine not ready after {self.config.startup_timeout_s} s")

    def _read_events(self) -> None:
        stream = self._process.stdout
        while True:
            try:
                payload = read_frame(stream)
                if payload is None:
                    return
                self._events.put(decode_event(payload))
            except (ProtocolError, OSError, ValueError) as exc:
                log.error("engine control stream broken: %s", exc)
                return

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the engine (Shutdown, then SIGTERM, then SIGKILL) and remove the output queue."""
        process, self._process = self._process, None
        if process is not None:
            try:
                self._send(process, encode_task(Shutdown()))
                process.stdin.close()
            except (OSError, ValueError, EngineError):
                pass  # already gone: nothing to tell
            _wait_or_kill(process, timeout_s)
            process.stdout.close()
            self._remove_orphaned_kv_pool()
        if self._outputs is not None:
            self._outputs.close()
            self._outputs = None

    def _remove_orphaned_kv_pool(self) -> None:
        """An engine that died (kill -9) could not remove its shared KV pool; its file is ours to remove
        now that the process is gone (a peer that still maps it keeps its mapping)."""
        name = self.ready.kv_pool_name if self.ready else None
        if name:
            (SHM_DIR / name).unlink(missing_ok=True)

    def __enter__(self) -> EngineClient:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------------

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               mode: str = "generate", num_extra_tokens: int = 0) -> int:
        """Send a request to the engine; returns its seq_id (the id its outputs carry).

        mode: "generate" (prefill + decode here), "prefill" (prefill node: first token, then hold the
        KV for the transfer agent), "reserve" (decode node: blocks for KV a prefill node will write,
        plus num_extra_tokens for the first token and drafts)."""
        seq_id = self._allocate_seq_id()
        if mode == "generate":
            task = AddRequest(seq_id, request_id, prompt_token_ids, params)
        elif mode == "prefill":
            task = AddPrefillRequest(seq_id, request_id, prompt_token_ids, params)
        elif mode == "reserve":
            task = ReserveRequest(seq_id, request_id, prompt_token_ids, params, num_extra_tokens)
        else:
            self._live_seq_ids.discard(seq_id)
            raise ValueError(f"unknown submit mode {mode!r}")
        self._send(self._require_process(), encode_task(task))
        return seq_id

    def kv_ready(self, seq_id: int, first_token_id: int, draft_token_ids: list[int]) -> None:
        """Decode node: the reserved blocks hold the prompt's KV; decode on from the peer's token."""
        task = RemoteKVReady(seq_id, first_token_id, draft_token_ids)
        self._send(self._require_process(), encode_task(task))

    def release_prefilled(self, seq_id: int) -> None:
        """Prefill node: the request's KV is handed over; free its blocks and forget the seq_id."""
        if seq_id in self._live_seq_ids:
            self._send(self._require_process(), encode_task(ReleaseRequest(seq_id)))
            self._live_seq_ids.discard(seq_id)

    def abort(self, seq_id: int) -> None:
        if seq_id in self._live_seq_ids:
            self._send(self._require_process(), encode_task(AbortRequest(seq_id)))

    def release(self, seq_id: int) -> None:
        """The request behind seq_id is over (finished, aborted or rejected): its id may be reused."""
        self._live_seq_ids.discard(seq_id)

    def receive(self, timeout_s: float) -> StepOutput | None:
        """The next step's outputs, or None after timeout_s. Raises EngineError if the engine died."""
        if self._outputs is None:
            raise EngineError("engine client is not started")
        step = self._outputs.receive(timeout=timeout_s)
        if step is None and not self.alive():
            raise EngineError("engine process is gone")
        return step

    def events(self) -> list[EngineEvent]:
        """Control events received so far (rejections, a fatal failure)."""
        items = []
        while True:
            try:
                items.append(self._events.get_nowait())
            except queue.Empty:
                return items

    def _allocate_seq_id(self) -> int:
        for _ in range(len(self._live_seq_ids) + 1):
            seq_id = self._next_seq_id
            self._next_seq_id = (self._next_seq_id + 1) % (MAX_SEQ_ID + 1)
            if seq_id not in self._live_seq_ids:
                self._live_seq_ids.add(seq_id)
                return seq_id
        raise EngineError("no free seq_id")  # unreachable below 2**32 live requests

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            raise EngineError("engine process is not running")
        return self._process

    def _send(self, process: subprocess.Popen[bytes], payload: bytes) -> None:
        with self._write_lock:
            try:
                write_frame(process.stdin, payload)
            except (BrokenPipeError, ValueError) as exc:
                raise EngineError("engine process is not accepting tasks") from exc


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
