"""The asyncio side of an engine process, for node servers.

One reader thread blocks on the engine's record stream and hands each request's records to that
request's asyncio queue, or, for a request started with an `on_item` callback, to that callback on the
reader thread itself (a prefill node queues its KV pushes from there without a turn of the event
loop; a decode node likewise sends its PrefillTask from an `on_reserved` callback as its engine's
reservation lands); the event loop never blocks on the engine. Requests are named by their
request id, the node's one id for them: a request stays in the bridge's one map until the engine's
last record for it (its finish, or its rejection), so a late record can never reach a newer request
that reuses the id, and a request id the engine still knows is refused.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.common.sampling_params import SamplingParams
from pdserve.common.tokens import SampledTokens
from pdserve.engine.protocol import (
    EngineFailed,
    EngineReady,
    EngineStats,
    KVReserved,
    PrefillProgress,
    ProtocolError,
    RequestOutput,
    RequestRejected,
    StepOutputs,
)
from pdserve.node.engine_client import EngineClient, EngineError
from pdserve.node.engine_stream import EngineExited, StreamClosed

log = logging.getLogger("pdserve.node.bridge")


class RequestIdInUse(EngineError):
    """The engine still has a request by this id (its last record has not arrived yet)."""


@dataclass(frozen=True)
class EngineGone:
    """Delivered to every live request when the engine process dies or its stream breaks."""

    message: str


BridgeItem = RequestOutput | RequestRejected | KVReserved | PrefillProgress | EngineGone


ItemCallback = Callable[[BridgeItem], None]
ReservedCallback = Callable[[KVReserved], None]


@dataclass
class RequestHandle:
    request_id: str
    prompt_len: int
    items: asyncio.Queue[BridgeItem] = field(default_factory=asyncio.Queue)
    # When set, the request's items go here, on the reader thread, instead of to `items`: it must
    # neither block nor raise (every other request's records wait behind it).
    on_item: ItemCallback | None = None
    # When set, called on the reader thread with the request's KVReserved before `items` gets it; the
    # same rules apply.
    on_reserved: ReservedCallback | None = None


class EngineBridge:
    def __init__(self, client: EngineClient) -> None:
        self.client = client
        self.stats: EngineStats | None = None
        self.ready: EngineReady | None = None
        self.failure: str | None = None
        self._handles: dict[str, RequestHandle] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.lost: asyncio.Event | None = None  # set once the engine is gone (not when we stopped it)
        # Called on the reader thread with every stats record (prometheus gauges are thread-safe).
        self.on_stats: Callable[[EngineStats], None] | None = None

    async def start(self) -> EngineReady:
        self._loop = asyncio.get_running_loop()
        self.lost = asyncio.Event()
        self.ready = await self._loop.run_in_executor(None, self.client.start)
        self._thread = threading.Thread(target=self._read, name="engine-records", daemon=True)
        self._thread.start()
        return self.ready

    @property
    def alive(self) -> bool:
        return self.failure is None and self.client.alive()

    @property
    def num_live(self) -> int:
        return len(self._handles)

    # -- one call per task kind; each returns (or takes) the request's handle ------------------------

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Prefill and decode here: RequestOutputs (or a RequestRejected) arrive on the handle."""
        return self._start(request_id, prompt_token_ids,
                           lambda: self.client.generate(request_id, prompt_token_ids, params))

    def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                on_item: ItemCallback | None = None) -> RequestHandle:
        """Prefill node: PrefillProgress per chunk, then the FINISHED_PREFILLED output (first token);
        to `on_item` on the reader thread when given (see RequestHandle.on_item)."""
        return self._start(request_id, prompt_token_ids,
                           lambda: self.client.prefill(request_id, prompt_token_ids, params), on_item)

    def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                num_extra_tokens: int, on_reserved: ReservedCallback | None = None) -> RequestHandle:
        """Decode node: KVReserved (or RequestRejected), then after `kv_ready` the request's outputs;
        `on_reserved` sees the KVReserved first, on the reader thread (see RequestHandle.on_reserved)."""
        def send() -> None:
            self.client.reserve(request_id, prompt_token_ids, params, num_extra_tokens)

        return self._start(request_id, prompt_token_ids, send, on_reserved=on_reserved)

    def kv_ready(self, handle: RequestHandle, first: SampledTokens, draft_token_ids: list[int]) -> None:
        self.client.kv_ready(handle.request_id, first, draft_token_ids)

    def release_prefilled(self, handle: RequestHandle) -> None:
        """Prefill node: free the request's blocks; the handle gets nothing more."""
        with self._lock:
            if self._handles.get(handle.request_id) is handle:
                del self._handles[handle.request_id]
        try:
            self.client.release(handle.request_id)
        except EngineError:
            pass  # the engine is gone, and its blocks with it

    def abort(self, handle: RequestHandle) -> None:
        """Ask the engine to stop the request; its FINISHED_ABORTED output (or finish) ends the handle."""
        try:
            self.client.abort(handle.request_id)
        except EngineError:
            pass  # the engine is gone: its requests are gone with it

    def _start(self, request_id: str, prompt_token_ids: list[int], send: Callable[[], None],
               on_item: ItemCallback | None = None,
               on_reserved: ReservedCallback | None = None) -> RequestHandle:
        if not self.alive:
            raise EngineError(self.failure or "engine process is not running")
        with self._lock:
            if request_id in self._handles:
                raise RequestIdInUse(f"request id {request_id!r} is still in use on this node")
            handle = RequestHandle(request_id, len(prompt_token_ids), on_item=on_item,
                                   on_reserved=on_reserved)
            self._handles[request_id] = handle
        try:
            send()
        except EngineError:
            with self._lock:
                self._handles.pop(request_id, None)
            raise
        return handle

    def close(self) -> None:
        self._stopping = True
        self.client.close()  # the engine exits, the reaper's notice ends the reader
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    # -- the reader thread ---------------------------------------------------------------------------

    def _read(self) -> None:
        engine_failure = ""
        while True:
            try:
                record = self.client.receive()
            except StreamClosed:
                self._fail("the engine's record stream was closed")
                return
            except ProtocolError as exc:
                self._fail(f"the engine's record stream broke: {exc}")
                return
            if isinstance(record, StepOutputs):
                # Progress first: a prefill node pushes a request's last KV before its first token.
                for progress in record.progress:
                    self._deliver(progress.request_id, progress, final=False)
                for output in record.outputs:
                    self._deliver(output.request_id, output, final=output.finished)
            elif isinstance(record, EngineStats):
                self.stats = record
                if self.on_stats is not None:
                    self.on_stats(record)
            elif isinstance(record, KVReserved):
                self._reserved(record)
            elif isinstance(record, RequestRejected):
                self._deliver(record.request_id, record, final=True)
            elif isinstance(record, EngineFailed):
                engine_failure = record.message  # the process exits next; its exit notice follows
            elif isinstance(record, EngineExited):
                why = (self.client.stalled or (f"engine failed: {engine_failure}" if engine_failure
                                               else f"engine process exited with code {record.returncode}"))
                self._fail(why)
                return
            else:
                log.warning("unexpected engine record %s ignored", type(record).__name__)

    def _reserved(self, record: KVReserved) -> None:
        with self._lock:
            handle = self._handles.get(record.request_id)
        if handle is not None and handle.on_reserved is not None:
            handle.on_reserved(record)
        self._deliver(record.request_id, record, final=False)

    def _deliver(self, request_id: str, item: BridgeItem, final: bool) -> None:
        with self._lock:
            handle = self._handles.pop(request_id, None) if final else self._handles.get(request_id)
        if handle is None:
            log.debug("record for unknown request %r dropped", request_id)
            return
        self._hand(handle, item)

    def _hand(self, handle: RequestHandle, item: BridgeItem) -> None:
        if handle.on_item is not None:
            handle.on_item(item)
        else:
            self._loop.call_soon_threadsafe(handle.items.put_nowait, item)

    def _fail(self, message: str) -> None:
        if self._stopping:
            message = "node server stopping"  # an engine we stopped is no failure
        else:
            log.error("engine lost: %s", message)
            self.failure = message
            self._loop.call_soon_threadsafe(self.lost.set)
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            self._hand(handle, EngineGone(message))
