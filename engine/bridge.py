"""The asyncio side of an engine process, for node servers.

One reader thread blocks on the SysV output queue and the control pipe, and hands each slot output to
the asyncio queue of its request; the event loop never blocks on the engine. A request's seq_id is
released only after the engine's last event for it (finish, abort or rejection), so a late marker can
never reach a newer request that reused the id.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field

from pdserve.engine.client import EngineClient, EngineError
from pdserve.engine.output_codec import SlotOutput
from pdserve.engine.protocol import (
    EngineFailed,
    EngineReady,
    EngineStats,
    KVReserved,
    PrefillDone,
    PrefillProgress,
    RequestRejected,
)
from pdserve.engine.sampling_params import SamplingParams

log = logging.getLogger("pdserve.engine.bridge")

POLL_S = 0.02


@dataclass(frozen=True)
class EngineGone:
    """Delivered to every live request when the engine process dies."""

    message: str


BridgeItem = SlotOutput | RequestRejected | EngineGone | KVReserved | PrefillProgress | PrefillDone


@dataclass
class RequestHandle:
    request_id: str
    seq_id: int
    prompt_len: int
    items: asyncio.Queue[BridgeItem] = field(default_factory=asyncio.Queue)


class EngineBridge:
    def __init__(self, client: EngineClient) -> None:
        self.client = client
        self.stats: EngineStats | None = None
        self.ready: EngineReady | None = None
        self.failure: str | None = None
        self._handles: dict[int, RequestHandle] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> EngineReady:
        self._loop = asyncio.get_running_loop()
        self.ready = await self._loop.run_in_executor(None, self.client.start)
        self._thread = threading.Thread(target=self._pump, name="engine-bridge", daemon=True)
        self._thread.start()
        return self.ready

    @property
    def alive(self) -> bool:
        return self.failure is None and self.client.alive()

    @property
    def num_live(self) -> int:
        return len(self._handles)

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               mode: str = "generate", num_extra_tokens: int = 0) -> RequestHandle:
        """Start a request in the engine (modes: EngineClient.submit); its outputs and lifecycle
        events arrive on the handle's queue."""
        if not self.alive:
            raise EngineError(self.failure or "engine process is not running")
        with self._lock:
            seq_id = self.client.submit(request_id, prompt_token_ids, params, mode, num_extra_tokens)
            handle = RequestHandle(request_id, seq_id, len(prompt_token_ids))
            self._handles[seq_id] = handle
        return handle

    def kv_ready(self, handle: RequestHandle, first_token_id: int, draft_token_ids: list[int]) -> None:
        self.client.kv_ready(handle.seq_id, first_token_id, draft_token_ids)

    def release_prefilled(self, handle: RequestHandle) -> None:
        """Prefill node: free the request's blocks; the handle gets nothing more."""
        with self._lock:
            self._handles.pop(handle.seq_id, None)
        try:
            self.client.release_prefilled(handle.seq_id)
        except EngineError:
            pass  # the engine is gone, and its blocks with it

    def abort(self, handle: RequestHandle) -> None:
        """Ask the engine to stop the request; its ABORTED marker (or finish) releases the seq_id."""
        try:
            self.client.abort(handle.seq_id)
        except EngineError:
            pass  # the engine is gone: its requests are gone with it

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self.client.close()

    # -- the reader thread ---------------------------------------------------------------------------

    def _pump(self) -> None:
        while not self._stopping.is_set():
            try:
                self._handle_events()
                step = self.client.receive(timeout_s=POLL_S)
            except EngineError as exc:
                self._fail(str(exc))
                return
            for slot in step.slots if step else ():
                self._deliver(slot.seq_id, slot, final=slot.event.is_terminal)

    def _handle_events(self) -> None:
        for event in self.client.events():
            if isinstance(event, EngineStats):
                self.stats = event
            elif isinstance(event, RequestRejected):
                self._deliver(event.seq_id, event, final=True)
            elif isinstance(event, (KVReserved, PrefillProgress, PrefillDone)):
                self._deliver(event.seq_id, event, final=False)
            elif isinstance(event, EngineFailed):
                raise EngineError(f"engine failed: {event.message}")

    def _deliver(self, seq_id: int, item: BridgeItem, final: bool) -> None:
        with self._lock:
            handle = self._handles.pop(seq_id, None) if final else self._handles.get(seq_id)
            if final:
                self.client.release(seq_id)
        if handle is None:
            log.debug("output for unknown seq_id %d dropped", seq_id)
            return
        self._loop.call_soon_threadsafe(handle.items.put_nowait, item)

    def _fail(self, message: str) -> None:
        log.error("engine lost: %s", message)
        self.failure = message
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            self._loop.call_soon_threadsafe(handle.items.put_nowait, EngineGone(message))
