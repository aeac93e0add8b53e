"""Running the router: ``run_router(config)`` for ``pdserve router``, ``BackgroundRouter`` for tests and
in-process use (uvicorn in a thread on an already bound socket, so port 0 works and the URL is known
before the first request)."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
import time
from types import TracebackType

import uvicorn

from pdserve.router.app import HotPaths, RouterState, create_asgi
from pdserve.router.config import RouterConfig
from pdserve.router.registry import Registry, build_registry

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_config(config: RouterConfig, registry: Registry, **kwargs: object) -> uvicorn.Config:
    app = create_asgi(config, registry)
    return uvicorn.Config(app, log_level=config.log_level.lower(), access_log=False, lifespan="on",
                          timeout_graceful_shutdown=5, **kwargs)  # type: ignore[arg-type]


def run_router(config: RouterConfig) -> int:
    """Serve until SIGINT/SIGTERM. Prints the URL (stdout, one line) once the socket is bound."""
    sock = bind_socket(config.host, config.port)
    server = uvicorn.Server(_uvicorn_config(config, build_registry(config.registry), loop="uvloop",
                                            http="httptools"))
    print(f"pdserve router listening on {_url(sock)}", flush=True)
    server.run(sockets=[sock])
    return 0


class BackgroundRouter:
    """The router in a thread of this process: ``with BackgroundRouter(config) as r: r.url``."""

    def __init__(self, config: RouterConfig, registry: Registry | None = None, start_timeout_s: float = 15.0
                 ) -> None:
        self._sock = bind_socket(config.host, config.port)
        self.url = _url(self._sock)
        self._server = uvicorn.Server(_uvicorn_config(config, registry or build_registry(config.registry)))
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
