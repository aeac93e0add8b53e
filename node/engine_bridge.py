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
import time
from dataclasses import dataclass, field

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.output_codec import SlotOutput
from pdserve.engine.protocol import (
    EngineFailed,
    EngineReady,
    EngineStats,
    KVReserved,
    PrefillDone,
    PrefillProgress,
    PromptLogprobs,
    RequestRejected,
)
from pdserve.node.engine_client import EngineClient, EngineError

log = logging.getLogger("pdserve.node.engine_bridge")

POLL_S = 0.02
# The engine writes a request's PromptLogprobs to its control pipe before the first token to the SysV
# queue, so they are at most a pipe read behind; this bound only guards against a broken engine.
PROMPT_LOGPROBS_WAIT_S = 2.0


@dataclass(frozen=True)
class EngineGone:
    """Delivered to every live request when the engine process dies."""

    message: str


BridgeItem = (SlotOutput | RequestRejected | EngineGone | KVReserved | PrefillProgress | PrefillDone
              | PromptLogprobs)


@dataclass
class RequestHandle:
    request_id: str
    seq_id: int
    prompt_len: int
    items: asyncio.Queue[BridgeItem] = field(default_factory=asyncio.Queue)
    # Asked for prompt logprobs and their last part has not arrived: its first token slot waits for it.
    awaits_prompt_logprobs: bool = False


class EngineBridge:
    def __init__(self, client: EngineClient, prompt_logprobs_wait_s: float = PROMPT_LOGPROBS_WAIT_S) -> None:
        self.client = client
        self._prompt_logprobs_wait_s = prompt_logprobs_wait_s
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
            awaits = mode == "generate" and params.prompt_logprobs is not None
            handle = RequestHandle(request_id, seq_id, len(prompt_token_ids), awaits_prompt_logprobs=awaits)
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
                for slot in step.slots if step else ():
                    if slot.num_tokens:
                        self._wait_for_prompt_logprobs(slot.seq_id)
                    self._deliver(slot.seq_id, slot, final=slot.event.is_terminal)
            except EngineError as exc:
                self._fail(str(exc))
                return

    def _wait_for_prompt_logprobs(self, seq_id: int) -> None:
        """Hand a request its prompt logprobs before its first token, whichever channel was read first."""
        deadline = time.monotonic() + self._prompt_logprobs_wait_s
        while self._awaits_prompt_logprobs(seq_id):
            if time.monotonic() > deadline:
                log.error("seq_id %d: first token without prompt logprobs after %.1f s; sending it without",
                          seq_id, self._prompt_logprobs_wait_s)
                handle = self._handles.get(seq_id)
                if handle is not None:
                    handle.awaits_prompt_logprobs = False
                return
            time.sleep(0.0005)
            self._handle_events()

    def _awaits_prompt_logprobs(self, seq_id: int) -> bool:
        handle = self._handles.get(seq_id)
        return handle is not None and handle.awaits_prompt_logprobs

    def _handle_events(self) -> None:
        for event in self.client.events():
            if isinstance(event, EngineStats):
                self.stats = event
            elif isinstance(event, RequestRejected):
                self._deliver(event.seq_id, event, final=True)
            elif isinstance(event, (KVReserved, PrefillProgress, PrefillDone)):
                self._deliver(event.seq_id, event, final=False)
            elif isinstance(event, PromptLogprobs):
                handle = self._handles.get(event.seq_id)
                if handle is not None and event.last:
                    handle.awaits_prompt_logprobs = False
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
