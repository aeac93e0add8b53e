"""The prefill node: takes PrefillTasks from decode nodes, prefills, and pushes the KV into the decode
node's reserved blocks chunk by chunk while prefill continues; the FirstToken (token id, raw logprob,
rank, top-k) travels in the header of the request's last KV chunk.

A task is checked (signature, draining, transport) and handed to the engine on the inbox thread that
received it, so the prefill starts without waiting for a turn of the event loop; the loop then owns
the job (its progress, pushes, lease, abort). The inbox thread and the loop share only the set of
live request ids, under a lock, so a duplicate task never reaches the engine.

Every send (KV chunks, FirstToken, Abort acks) to a decode peer goes through that peer's own thread:
ZMQ sockets belong to one thread, a memcpy of a large chunk must not stall the event loop (gRPC,
other requests), and a dead peer delays only its own requests. The engine's records of a task go from
the bridge's reader thread straight to that thread (prefill_node/kv_push.py), which pushes each
computed span and then the FirstToken; the loop waits for the outcome and then frees the blocks.

Liveness: our connection to each decode peer runs heartbeats (transfer/channel.py). When it goes down
(the decode node was killed, or is cut off), every job for that peer is aborted at once and its
blocks freed (nobody is left to take its KV), and the peer is listed in NodeStats'
unreachable_peer_addresses until the connection is back, so the router avoids the pair. A task from
a peer whose connection is down (it was just healed) waits for the connection to come back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from pdserve.common.kv_cache import KVCacheSpec
from pdserve.node.engine_bridge import RequestHandle
from pdserve.node.engine_client import EngineError
from pdserve.node.server import NodeConfig, NodeServer
from pdserve.prefill_node.kv_push import KVPush, PrefillFailed
from pdserve.rpc import node_pb2 as pb
from pdserve.transfer.auth import MessageVerifier
from pdserve.transfer.channel import Inbox, TransferError
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.endpoint import InboxDispatcher, Malformed
from pdserve.transfer.head_shards import KVRankPools
from pdserve.transfer.messages import (
    MAX_MESSAGE_BYTES,
    Abort,
    ErrorCode,
    FirstToken,
    LeaseRenewal,
    PrefillTask,
)
from pdserve.transfer.peers import PeerSenders
from pdserve.transfer.transport import check_compatible, choose_transport, local_host_id

log = logging.getLogger("pdserve.prefill")

POOL_SWEEP_S = 2.0  # how often pools of exited decode peers are looked for and unmapped
PEER_FORGET_S = 60.0  # a decode peer down this long is closed


@dataclass(frozen=True)
class TaskStart:
    """What the inbox thread did with a genuine task: the engine request it started and the push its
    records drive, or why it could not start one."""

    received_at: float
    handle: RequestHandle | None = None
    push: KVPush | None = None
    failure: PrefillFailed | None = None


@dataclass
class PrefillJob:
    task: PrefillTask
    deadline: float  # lease: dropped unless renewed (monotonic seconds)
    handle: RequestHandle | None = None
    push: KVPush | None = None
    aborted: bool = False
    runner: asyncio.Task | None = field(default=None, repr=False)


class PrefillNodeServer(NodeServer):
    def __init__(self, config: NodeConfig, transfer: TransferConfig | None = None) -> None:
        super().__init__(config)
        self.transfer = transfer or config.transfer_config()
        self.kv_spec: KVCacheSpec | None = None  # the engine reports it when ready
        self.jobs: dict[str, PrefillJob] = {}
        self.pool: KVRankPools | None = None  # the engine ranks' pools (one without tensor parallelism)
        self._inbox: Inbox | None = None
        # one thread per decode peer (KV, FirstToken, acks); liveness events from their connections
        self._peers = PeerSenders(self.transfer, self._from_watch_thread)
        self._host_id = local_host_id()
        self._loop: asyncio.AbstractEventLoop | None = None
        secret = config.cluster_secret
        self._verifier = MessageVerifier(secret) if secret is not None else None  # the inbox thread's
        self._unreachable: set[str] = set()  # data addresses of decode peers whose connection is down
        # Request ids of tasks started and not yet ended: the inbox thread starts tasks, the loop ends them.
        self._live_ids: set[str] = set()
        self._live_ids_lock = threading.Lock()

    @property
    def inflight(self) -> int:
        """Prefill jobs (a job outlives its engine request until its KV and first token are sent)."""
        return max(len(self.jobs), self.bridge.num_live)

    # -- data plane ------------------------------------------------------------------------------------

    async def start_data_plane(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.kv_spec, names = self.engine_kv_pools()
        self.pool = KVRankPools.attach(self.kv_spec, names).prefault()
        dispatcher = InboxDispatcher(self._from_inbox_thread, receiver=None)
        self._inbox = Inbox(self.transfer, dispatcher, MAX_MESSAGE_BYTES).start()
        host = self.transfer.advertise_host or self.transfer.bind_host
        self.data_address = f"tcp://{host}:{self._inbox.port}"
        self._loop.create_task(self._expire_leases())
        self._loop.create_task(self._unmap_dead_pools())

    async def stop_data_plane(self) -> None:
        for job in list(self.jobs.values()):
            self._abort_job(job, "prefill node stopping")
        if self._inbox is not None:
            self._inbox.close()
        await self._peers.close()
        if self.pool is not None:
            self.pool.close()

    def _from_watch_thread(self, address: str, up: bool) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_liveness, address, up)
        except RuntimeError:  # the loop is closed: the node is shutting down
            pass

    def node_stats(self) -> pb.NodeStats:
        stats = super().node_stats()
        stats.unreachable_peer_addresses.extend(sorted(self._unreachable))
        return stats

    def _on_liveness(self, address: str, up: bool) -> None:
        if up:
            if address in self._unreachable:
                log.info("decode peer %s is reachable again", address)
            self._unreachable.discard(address)
            return
        self._unreachable.add(address)
        jobs = [j for j in self.jobs.values() if j.task.kv_target.address == address and not j.aborted]
        log.warning("decode peer %s is unreachable (data-plane connection down); aborting %d jobs",
                    address, len(jobs))
        for job in jobs:
            self.metrics.kv_failures.labels(reason="peer_unreachable").inc()
            self._abort_job(job, f"decode peer {address} is unreachable")

    def _from_inbox_thread(self, event) -> None:
        """Checks signatures here, on the inbox thread: nothing unverified reaches the event loop. A
        genuine task also goes to the engine from here, so its prefill does not wait for a turn of the
        event loop (one more thread wake-up before the engine's); the loop takes over the job next."""
        if self._verifier is not None and isinstance(event, (PrefillTask, LeaseRenewal, Abort)):
            reject = self._verifier.check(event)
            if reject is not None:
                self.metrics.auth_rejections.labels(channel="data_plane", reason=reject).inc()
                log.warning("refused a %s for %r: %s", type(event).__name__, event.request_id, reject)
                return
        if isinstance(event, PrefillTask):
            self._loop.call_soon_threadsafe(self._accept, event, self._start(event))
            return
        self._loop.call_soon_threadsafe(self._on_message, event)

    def _start(self, task: PrefillTask) -> TaskStart | None:
        """On the inbox thread: submit the task to the engine; None for a duplicate of a live task."""
        received_at = time.monotonic()
        with self._live_ids_lock:
            if task.request_id in self._live_ids:
                return None
            self._live_ids.add(task.request_id)
        try:
            if self.draining:
                raise PrefillFailed(ErrorCode.OVERLOADED, f"prefill node {self.config.node_id} is draining")
            push = KVPush(task, self._transport_for(task), self.kv_spec, self.pool, self._peers, self.metrics,
                          received_at)
            return TaskStart(received_at, self._submit(task, push), push)
        except PrefillFailed as exc:
            return TaskStart(received_at, failure=exc)

    def _on_message(self, message) -> None:
        if isinstance(message, Abort):
            job = self.jobs.get(message.request_id)
            if job is not None:
                self._abort_job(job, message.reason or "aborted by the decode node")
                self._send_soon(job.task, Abort(message.request_id, "abort confirmed"))
        elif isinstance(message, LeaseRenewal):
            job = self.jobs.get(message.request_id)
            if job is not None:
                job.deadline = time.monotonic() + message.lease_ms / 1000
            elif self._peers.knows(message.reply_to):  # only peers that sent tasks: no reflection
                self._tell_unknown(message)
        elif isinstance(message, Malformed):
            self.metrics.kv_failures.labels(reason="malformed").inc()
            log.warning("dropped a malformed data-plane message: %s", message.reason)
        else:
            log.warning("prefill node ignores %s", type(message).__name__)

    def _accept(self, task: PrefillTask, start: TaskStart | None) -> None:
        if start is None:
            log.warning("duplicate PrefillTask %s ignored", task.request_id)
            return
        job = PrefillJob(task, deadline=start.received_at + task.lease_ms / 1000, handle=start.handle,
                         push=start.push)
        self.jobs[task.request_id] = job
        self._peers.heard_from(task.kv_target.address)
        job.runner = self._loop.create_task(self._run(job, start))

    # -- one request -----------------------------------------------------------------------------------

    async def _run(self, job: PrefillJob, start: TaskStart) -> None:
        task = job.task
        try:
            if start.failure is not None:
                raise start.failure
            await asyncio.wrap_future(job.push.outcome)
            self.metrics.outcome("prefilled")
        except PrefillFailed as exc:
            self._fail(job, exc.code, str(exc))
        except TransferError as exc:
            self.metrics.kv_failures.labels(reason="send").inc()
            self._fail(job, ErrorCode.KV_TRANSFER_FAILED, str(exc))
        finally:
            if job.handle is not None:
                self.bridge.release_prefilled(job.handle)
            self.jobs.pop(task.request_id, None)
            with self._live_ids_lock:
                self._live_ids.discard(task.request_id)

    def _submit(self, task: PrefillTask, push: KVPush) -> RequestHandle:
        try:
            return self.bridge.prefill(task.request_id, list(task.prompt_token_ids), task.sampling,
                                       on_item=push.on_item)
        except EngineError as exc:
            raise PrefillFailed(ErrorCode.PREFILL_FAILED, str(exc)) from exc

    # -- failures and leases ---------------------------------------------------------------------------

    def _abort_job(self, job: PrefillJob, reason: str) -> None:
        job.aborted = True
        if job.handle is not None:
            self.bridge.abort(job.handle)
            job.push.stop(reason)  # ends the runner's wait behind any copy already under way
        elif job.runner is not None:
            job.runner.cancel()

    def _fail(self, job: PrefillJob, code: ErrorCode, message: str) -> None:
        self.metrics.outcome("error")
        log.info("prefill of %s failed: %s", job.task.request_id, message)
        if code is not ErrorCode.ABORTED:
            error = FirstToken(job.task.request_id, error_code=code, error_message=message[:1000])
            self._send_soon(job.task, error)

    async def _unmap_dead_pools(self) -> None:
        """A decode peer that exited or restarted leaves its old pool mapped here until its peer is
        retired: look for pools whose file is gone every POOL_SWEEP_S."""
        while True:
            await asyncio.sleep(POOL_SWEEP_S)
            for address in self._peers.retire_stale():
                log.info("decode peer %s's KV pool is gone; unmapped it", address)
            for address in self._peers.retire_down(PEER_FORGET_S):
                self._unreachable.discard(address)
                log.info("decode peer %s was down for %.0f s; closed its connection", address, PEER_FORGET_S)

    async def _expire_leases(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for job in [j for j in self.jobs.values() if j.deadline < now and not j.aborted]:
                log.warning("lease of %s expired; dropping it", job.task.request_id)
                self._abort_job(job, "lease expired")
                self._send_soon(job.task, FirstToken(job.task.request_id, error_code=ErrorCode.LEASE_EXPIRED,
                                                     error_message="prefill lease expired"))

    # -- sending -----------------------------------------------------------------------------------------

    def _tell_unknown(self, renewal: LeaseRenewal) -> None:
        log.warning("renewal for %r, which this node holds no task for: telling %s", renewal.request_id,
                    renewal.reply_to)
        self.metrics.kv_failures.labels(reason="unknown_task").inc()
        answer = FirstToken(renewal.request_id, error_code=ErrorCode.UNKNOWN_TASK,
                            error_message="the prefill node holds no task for this request: the task or "
                                          "its first token was lost with a closed connection")

        async def send() -> None:
            try:
                await self._peers.send(renewal.reply_to, answer)
            except TransferError as exc:
                log.warning("could not tell %s: %s", renewal.reply_to, exc)

        self._loop.create_task(send())

    def _send_soon(self, task: PrefillTask, message) -> None:
        """Fire and forget (errors, abort acks): a peer that does not take it is logged, not awaited."""
        async def send() -> None:
            try:
                await self._peers.send(task.kv_target.address, message)
            except TransferError as exc:
                log.warning("could not tell %s: %s", task.decode_node_id, exc)

        self._loop.create_task(send())

    def _transport_for(self, task: PrefillTask) -> str:
        try:
            kind = choose_transport(self.transfer.transport, task.kv_target, self._host_id)
            check_compatible(self.kv_spec, task.kv_target.layout)
        except TransferError as exc:
            raise PrefillFailed(ErrorCode.INVALID_TASK, str(exc)) from exc
        return kind

