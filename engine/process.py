"""The engine process: a busy loop of take tasks -> step -> emit outputs.

Started by `EngineClient` as ``python -m pdserve.engine.process CONFIG_JSON``. Tasks arrive as frames on
stdin (read by one I/O thread, so the loop itself never blocks on a pipe); per-step outputs leave over
the SysV output queue; control events (ready, rejected, failed) leave as frames on stdout. The loop
ends on a Shutdown task, on stdin closing (the node server is gone), or when the output queue's
reader is gone — in every case the KV pool and the queue writer are released.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import msgspec
import numpy as np

from pdserve.common.kv_cache import KVCachePool
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine import LLMEngine, RequestOutput, kv_spec_for
from pdserve.engine.model_runner import TokenInfo
from pdserve.engine.output_codec import SlotEvent, SlotOutput, StepOutput
from pdserve.engine.output_queue import OutputQueueAddress, OutputQueueWriter, ReaderGoneError
from pdserve.engine.protocol import (
    PROMPT_LOGPROBS_PART,
    AbortRequest,
    AddPrefillRequest,
    AddRequest,
    EngineEvent,
    EngineFailed,
    EngineReady,
    EngineStats,
    EngineTask,
    KVReserved,
    PrefillDone,
    PrefillProgress,
    PromptLogprobs,
    ProtocolError,
    ReleaseRequest,
    RemoteKVReady,
    RequestRejected,
    ReserveRequest,
    Shutdown,
    decode_task,
    encode_event,
    read_frame,
    write_frame,
)
from pdserve.engine.request import RequestStatus
from pdserve.engine.scheduler import AdmissionError, CapacityError

log = logging.getLogger("pdserve.engine")

STATS_MIN_INTERVAL_S = 0.05
IDLE_WAIT_S = 0.05  # an idle engine still reports load changes (e.g. an abort) this quickly
STATS_MAX_INTERVAL_S = 1.0


@dataclass(frozen=True)
class EngineProcessConfig:
    model_dir: str
    engine: EngineConfig
    output_queue: OutputQueueAddress
    dtype: str = "float32"
    shared_kv_pool: bool = False  # put the KV pool in /dev/shm so a same-host peer can write into it
    eos_token_ids: tuple[int, ...] = ()
    log_level: str = "WARNING"


def encode_config(config: EngineProcessConfig) -> str:
    return msgspec.json.encode(config).decode()


def decode_config(text: str) -> EngineProcessConfig:
    return msgspec.json.decode(text.encode(), type=EngineProcessConfig)


class TaskInbox:
    """Frames from a pipe, decoded by a reader thread; the engine loop polls without blocking."""

    def __init__(self, stream: BinaryIO) -> None:
        self._tasks: queue.SimpleQueue[EngineTask | ProtocolError] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._read, args=(stream,), name="task-inbox", daemon=True)
        self._thread.start()

    def _read(self, stream: BinaryIO) -> None:
        while True:
            try:
                payload = read_frame(stream)
            except ProtocolError as exc:  # framing is lost: there is no way to find the next frame
                log.error("task stream broken, stopping: %s", exc)
                payload = None
            if payload is None:  # the node server closed our stdin (or broke it): it is gone
                self._tasks.put(Shutdown())
                return
            try:
                self._tasks.put(decode_task(payload))
            except ProtocolError as exc:  # one bad frame; the next one is still readable
                self._tasks.put(exc)

    def take(self, wait_s: float) -> list[EngineTask | ProtocolError]:
        """Every queued task; waits up to wait_s for the first one when none is queued."""
        items = []
        try:
            items.append(self._tasks.get(timeout=wait_s) if wait_s > 0 else self._tasks.get_nowait())
            while True:
                items.append(self._tasks.get_nowait())
        except queue.Empty:
            pass
        return items


class EventWriter:
    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def send(self, event: EngineEvent) -> None:
        write_frame(self._stream, encode_event(event))


def to_step_output(step: int, outputs: list[RequestOutput]) -> StepOutput:
    return StepOutput(step=step, is_draft=False, slots=tuple(_slot(o) for o in outputs))


def prompt_logprobs_parts(seq_id: int, infos: Sequence[TokenInfo],
                          part_size: int = PROMPT_LOGPROBS_PART) -> list[PromptLogprobs]:
    """A request's prompt logprobs (positions 1 .. n-1) as events of at most part_size positions; at
    least one, so a one-token prompt still tells the reader that nothing more is coming."""
    starts = range(0, len(infos), part_size) or range(1)
    return [
        PromptLogprobs(
            seq_id=seq_id, first_position=1 + start, logprobs=[i.logprob for i in part],
            ranks=[i.rank for i in part], top_ids=[list(i.top_ids) for i in part],
            top_logprobs=[list(i.top_logprobs) for i in part], last=start == starts[-1])
        for start in starts for part in [infos[start:start + part_size]]
    ]


_EVENT_FOR_STATUS = {
    RequestStatus.RUNNING: SlotEvent.TOKENS,
    RequestStatus.PREEMPTED: SlotEvent.PREEMPTED,
    RequestStatus.FINISHED_STOPPED: SlotEvent.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH: SlotEvent.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED: SlotEvent.ABORTED,
    RequestStatus.FINISHED_ERROR: SlotEvent.ERROR,
}


def _slot(output: RequestOutput) -> SlotOutput:
    event = _EVENT_FOR_STATUS[output.status]
    if not output.new_token_ids:
        return SlotOutput.marker(output.seq_id, event)
    n = len(output.new_token_ids)
    infos = output.infos
    k = len(infos[0].top_ids) if infos else 0
    return SlotOutput(
        seq_id=output.seq_id,
        event=event,
        token_ids=np.asarray(output.new_token_ids, dtype=np.uint32),
        logprobs=np.asarray([i.logprob for i in infos] if infos else [0.0] * n, dtype=np.float32),
        ranks=np.asarray([i.rank for i in infos] if infos else [0] * n, dtype=np.uint32),
        topk_ids=np.asarray([i.top_ids for i in infos], dtype=np.uint32).reshape(n, k),
        topk_logprobs=np.asarray([i.top_logprobs for i in infos], dtype=np.float32).reshape(n, k),
        num_accepted_drafts=output.num_accepted_drafts,
    )


class EngineLoop:
    """Ties the engine to its channels: take tasks, step, emit. No socket work happens here."""

    def __init__(self, engine: LLMEngine, inbox: TaskInbox, writer: OutputQueueWriter, events: EventWriter):
        self.engine = engine
        self.inbox = inbox
        self.writer = writer
        self.events = events
        self._request_ids: dict[int, str] = {}  # seq_id -> request_id of live requests
        self._prompt_logprobs_due: set[int] = set()  # asked for prompt logprobs, first token not out yet
        self._last_stats: EngineStats | None = None
        self._last_stats_at = 0.0

    def run(self) -> None:
        while True:
            idle = not self.engine.has_schedulable_work()
            for task in self.inbox.take(wait_s=IDLE_WAIT_S if idle else 0.0):
                if isinstance(task, Shutdown):
                    return
                self._apply(task)
            self._report_stats()
            if not self.engine.has_schedulable_work():
                continue
            self._emit(self.engine.step())
            for request in self.engine.take_prefill_progress():
                self.events.send(PrefillProgress(request.seq_id, request.num_computed_tokens,
                                                 list(request.block_table)))

    def _emit(self, outputs: list[RequestOutput]) -> None:
        """Token outputs go over the SysV queue; a prefill node's first token goes out as PrefillDone."""
        slots = []
        for output in outputs:
            if output.status is RequestStatus.FINISHED_PREFILLED:
                self.events.send(self._prefill_done(output))
                continue
            if output.new_token_ids and output.seq_id in self._prompt_logprobs_due:
                self._send_prompt_logprobs(output)  # before the slot: the bridge relies on this order
            slots.append(output)
            if output.finished:
                self._request_ids.pop(output.seq_id, None)
                self._prompt_logprobs_due.discard(output.seq_id)
        if slots:
            self.writer.send(to_step_output(self.engine.steps, slots))

    def _send_prompt_logprobs(self, output: RequestOutput) -> None:
        self._prompt_logprobs_due.discard(output.seq_id)
        for part in prompt_logprobs_parts(output.seq_id, output.prompt_logprobs):
            self.events.send(part)

    def _prefill_done(self, output: RequestOutput) -> PrefillDone:
        request = self.engine.held(output.request_id)
        info = output.infos[0]
        return PrefillDone(
            seq_id=output.seq_id, num_prompt_tokens=request.num_prompt_tokens,
            block_ids=list(request.block_table), token_id=output.new_token_ids[0], logprob=info.logprob,
            rank=info.rank, top_ids=list(info.top_ids), top_logprobs=list(info.top_logprobs),
            draft_token_ids=list(output.draft_token_ids),
        )

    def _report_stats(self) -> None:
        """Load for the node server's Stats RPC: sent when it changes, at most every 50 ms, and once
        a second regardless (so a reader can tell a quiet engine from a stuck one)."""
        now = time.monotonic()
        if now - self._last_stats_at < STATS_MIN_INTERVAL_S:
            return
        stats = self.engine.stats()
        if stats == self._last_stats and now - self._last_stats_at < STATS_MAX_INTERVAL_S:
            return
        self.events.send(stats)
        self._last_stats, self._last_stats_at = stats, now

    def _apply(self, task: EngineTask | ProtocolError) -> None:
        if isinstance(task, ProtocolError):
            log.error("dropped a malformed task frame: %s", task)
            return
        handler = {
            AddRequest: self._add, AddPrefillRequest: self._add, ReserveRequest: self._reserve,
            AbortRequest: self._abort, ReleaseRequest: self._release, RemoteKVReady: self._kv_ready,
        }[type(task)]
        handler(task)

    def _admit(self, task: AddRequest | AddPrefillRequest | ReserveRequest,
               admit: Callable[[], object]) -> bool:
        if task.seq_id in self._request_ids:
            self.events.send(RequestRejected(task.seq_id, f"seq_id {task.seq_id} is already live"))
            return False
        try:
            admit()
        except (AdmissionError, ValueError) as exc:
            self.events.send(RequestRejected(task.seq_id, str(exc), retryable=isinstance(exc, CapacityError)))
            return False
        self._request_ids[task.seq_id] = task.request_id
        return True

    def _add(self, task: AddRequest | AddPrefillRequest) -> None:
        prefill_only = isinstance(task, AddPrefillRequest)
        add = self.engine.add_prefill_request if prefill_only else self.engine.add_request
        admitted = self._admit(task, lambda: add(task.request_id, task.prompt_token_ids, task.sampling,
                                                 task.seq_id))
        if admitted and not prefill_only and task.sampling.prompt_logprobs is not None:
            self._prompt_logprobs_due.add(task.seq_id)

    def _reserve(self, task: ReserveRequest) -> None:
        reserved: list = []

        def admit() -> None:
            reserved.append(self.engine.reserve(task.request_id, task.prompt_token_ids, task.sampling,
                                                task.seq_id, task.num_extra_tokens))

        if self._admit(task, admit):
            self.events.send(KVReserved(task.seq_id, list(reserved[0].block_table)))

    def _abort(self, task: AbortRequest) -> None:
        request_id = self._request_ids.pop(task.seq_id, None)
        self._prompt_logprobs_due.discard(task.seq_id)
        if request_id is None:
            return
        # release(): a prefilled request whose KV hand-over was abandoned still holds its blocks.
        if self.engine.abort(request_id) or self.engine.release(request_id):
            marker = RequestOutput(request_id, task.seq_id, (), (), RequestStatus.FINISHED_ABORTED)
            self.writer.send(to_step_output(self.engine.steps, [marker]))

    def _release(self, task: ReleaseRequest) -> None:
        request_id = self._request_ids.pop(task.seq_id, None)
        if request_id is not None:
            self.engine.release(request_id)

    def _kv_ready(self, task: RemoteKVReady) -> None:
        request_id = self._request_ids.get(task.seq_id)
        output = None if request_id is None else self.engine.on_remote_kv(
            request_id, task.first_token_id, task.draft_token_ids)
        if output is not None and output.finished:
            # The node server already streamed the first token (from the peer): only the end is news.
            marker = RequestOutput(output.request_id, output.seq_id, (), (), output.status)
            self._emit([marker])


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


def build_engine(config: EngineProcessConfig) -> tuple[LLMEngine, KVCachePool]:
    from pdserve.models.loader import load_model  # imported here: paddle is heavy and only the child needs it

    model = load_model(config.model_dir, config.dtype)
    spec = kv_spec_for(model, config.engine)
    pool = KVCachePool.create_shared(spec) if config.shared_kv_pool else KVCachePool.allocate(spec)
    return LLMEngine(model, config.engine, pool, config.eos_token_ids), pool


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = decode_config(argv[0])
    logging.basicConfig(level=config.log_level, format="%(asctime)s engine %(levelname)s %(message)s")
    events, tasks = _claim_pipes()
    # The node server owns this process's lifetime (Shutdown, or stdin closing). A Ctrl-C meant for
    # the node server also reaches us through the terminal's process group; it must not kill the loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_malloc()
    pool = writer = None
    try:
        engine, pool = build_engine(config)
        writer = OutputQueueWriter(config.output_queue)
        events.send(EngineReady(pid=os.getpid(), kv_spec=pool.spec, kv_pool_name=pool.shm_name))
        EngineLoop(engine, TaskInbox(tasks), writer, events).run()
    except ReaderGoneError:
        log.warning("output queue reader is gone; engine stopping")
    except BrokenPipeError:  # the control pipe's reader is the node server: it is gone
        log.warning("node server closed the control pipe; engine stopping")
    except Exception as exc:  # the process is about to exit: report why, then let the traceback print
        _try_send(events, EngineFailed(f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        if pool is not None:
            pool.close()
        if writer is not None:
            writer.release()  # a node server killed -9 cannot remove its queue; we do
    return 0


def _claim_pipes() -> tuple[EventWriter, BinaryIO]:
    """Take stdout for control frames and stdin for task frames.

    Anything else in this process that prints (a library at import or exit) must not corrupt the
    control stream, so the frames get a private duplicate of fd 1 and fd 1 itself is pointed at
    stderr. Tasks are read unbuffered: a daemon thread blocked inside a buffered reader's lock makes
    interpreter shutdown abort."""
    control = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    tasks = os.fdopen(os.dup(sys.stdin.fileno()), "rb", buffering=0)
    return EventWriter(control), tasks


def _try_send(events: EventWriter, event: EngineEvent) -> None:
    try:
        events.send(event)
    except OSError:
        log.warning("could not report %s: the node server closed our stdout", type(event).__name__)


if __name__ == "__main__":
    sys.exit(main())
