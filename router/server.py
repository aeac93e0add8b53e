"""Running the router: ``run_router(config)`` for ``pdserve router``, ``BackgroundRouter`` for tests and
in-process use (uvicorn in a thread on an already bound socket, so port 0 works and the URL is known
before the first request)."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from types import FrameType, TracebackType

import uvicorn

from pdserve.common.secret import warn_insecure
from pdserve.router.app import HotPaths, RouterState, create_asgi
from pdserve.router.config import RouterConfig
from pdserve.router.registry import Registry, SharedDirRegistry, build_registry

log = logging.getLogger(__name__)
_SHM_DIR = Path("/dev/shm")
# how often a worker re-reads the shared registry directory (a listing of a few small files): a node's
# first heartbeat reaches the other workers within this
SHARED_DIR_SYNC_S = 0.2


def bind_socket(host: str, port: int, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # inherited by accepted connections (Linux): a response's body goes out right after its headers
    # instead of waiting for the client's delayed ACK (40 ms on a keep-alive connection)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if reuse_port:  # several listening sockets on one port: the kernel spreads connections over them
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _freeze_startup_objects() -> None:
    """Move everything built so far (modules, the app, the tokenizer) out of the garbage collector's
    reach: its older-generation passes then walk only what requests allocate, not the ~100k objects
    of the loaded libraries on every pass."""
    gc.collect()
    gc.freeze()


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_config(config: RouterConfig, registry: Registry, **kwargs: object) -> uvicorn.Config:
    """``create_asgi``'s app for uvicorn."""
    app = create_asgi(config, registry)
    # no proxy_headers: the router reads no client address, and uvicorn's middleware for them would
    # wrap every request
    return uvicorn.Config(app, log_level=config.log_level.lower(), access_log=False, lifespan="on",
                          proxy_headers=False, timeout_graceful_shutdown=5, **kwargs)  # type: ignore[arg-type]


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain in front of its shutdown: the first SIGTERM/SIGINT makes the app
    answer new requests 503 (``RouterState.draining``) while admitted ones finish, for at most
    ``drain_timeout_s``; then uvicorn shuts down. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._drain_timeout_s = drain_timeout_s
        self._drain_deadline: float | None = None

    @property
    def router_state(self) -> RouterState:
        hot_paths = self.config.app.app  # type: ignore[union-attr]
        assert isinstance(hot_paths, HotPaths)
        return hot_paths.state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_deadline is None and not self.should_exit:
            self._drain_deadline = time.monotonic() + self._drain_timeout_s
            self.router_state.draining = True
            log.warning("router draining: %d node requests in flight, %d queued",
                        self.router_state.admission.inflight, self.router_state.admission.queued)
            return
        self.should_exit = True
        self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_deadline is not None and not self.should_exit:
            admission = self.router_state.admission
            if admission.inflight == 0 and admission.queued == 0:
                self.should_exit = True
            elif time.monotonic() >= self._drain_deadline:
                log.warning("router drain timeout (%.1f s): %d node requests cut", self._drain_timeout_s,
                            admission.inflight)
                self.should_exit = True
        return await super().on_tick(counter)


def run_router(config: RouterConfig) -> int:
    """Serve until SIGINT/SIGTERM (then drain). Prints the URL (stdout, one line) once every worker
    listens."""
    if config.cluster_secret is None:
        warn_insecure("the router")
    if config.workers > 1:
        return _run_workers(config)
    sock = bind_socket(config.host, config.port)
    registry = build_registry(config.registry, config.registry_auth())
    server = DrainingServer(_uvicorn_config(config, registry, loop="uvloop", http="httptools"),
                            config.drain_timeout_s)
    _freeze_startup_objects()
    print(f"pdserve router listening on {_url(sock)}", flush=True)
    server.run(sockets=[sock])
    return 0


def _run_workers(config: RouterConfig) -> int:
    # the parent's socket is bound, not listening: it holds the port (port 0 picks one) and takes no
    # connections; each worker listens on its own SO_REUSEPORT socket
    holder = bind_socket(config.host, config.port, reuse_port=True, listen=False)
    port = holder.getsockname()[1]
    shm = _SHM_DIR if _SHM_DIR.is_dir() else None
    shared_dir = Path(tempfile.mkdtemp(prefix="pdserve-registry-", dir=shm))
    context = multiprocessing.get_context("spawn")
    ready = [context.Event() for _ in range(config.workers)]
    workers = [context.Process(target=_serve_worker, args=(config, port, shared_dir, event),
                               name=f"router-worker-{i}", daemon=False) for i, event in enumerate(ready)]
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 60
        while not all(e.is_set() for e in ready):
            if stopping.is_set() or time.monotonic() > deadline or not all(w.is_alive() for w in workers):
                raise RuntimeError("a router worker did not start")
            time.sleep(0.02)
        print(f"pdserve router ({config.workers} workers) listening on {_url(holder)}", flush=True)
        while not stopping.is_set() and all(w.is_alive() for w in workers):
            stopping.wait(0.5)
        return 0 if stopping.is_set() else 1
    finally:
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)  # uvicorn's graceful shutdown
        for worker in workers:
            worker.join(timeout=config.drain_timeout_s + 15)
            if worker.is_alive():
                worker.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(shared_dir, ignore_errors=True)
        holder.close()


def _serve_worker(config: RouterConfig, port: int, shared_dir: Path, ready: EventType) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into one SIGTERM each
    sock = bind_socket(config.host, port, reuse_port=True)
    r = config.registry
    registry = (build_registry(r, config.registry_auth()) if r.is_redis else
                SharedDirRegistry(shared_dir, r.heartbeat_ttl_s, min(r.sync_interval_s, SHARED_DIR_SYNC_S),
                                  config.registry_auth()))
    server = DrainingServer(_uvicorn_config(config, registry, loop="uvloop", http="httptools"),
                            config.drain_timeout_s)

    def report_ready() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.01)
        ready.set()

    threading.Thread(target=report_ready, daemon=True).start()
    _freeze_startup_objects()
    server.run(sockets=[sock])


class BackgroundRouter:
    """The router in a thread of this process: ``with BackgroundRouter(config) as r: r.url``."""

    def __init__(self, config: RouterConfig, registry: Registry | None = None, start_timeout_s: float = 15.0
                 ) -> None:
        self._sock = bind_socket(config.host, config.port)
        self.url = _url(self._sock)
        registry = registry or build_registry(config.registry, config.registry_auth())
        self._server = uvicorn.Server(_uvicorn_config(config, registry))
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._run, name="router", daemon=True)
        self._start_timeout_s = start_timeout_s

    @property
    def state(self) -> RouterState:
        """The app's components (node pool, admission, metrics), for tests and status."""
        hot_paths = self._server.config.app.app  # type: ignore[union-attr]
        assert isinstance(hot_paths, HotPaths)
        return hot_paths.state

    def _run(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def start(self) -> BackgroundRouter:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the router did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
        if self._thread.is_alive():
            print("router thread did not stop within 10 s", file=sys.stderr)

    def __enter__(self) -> BackgroundRouter:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
