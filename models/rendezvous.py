"""The key-value store the tensor-parallel ranks meet at, served on loopback only.

Paddle's own ``TCPStore`` master (built by ``init_parallel_env`` in rank 0) binds ``0.0.0.0`` with no
way to choose the address: both of its servers in Paddle 3.3 hard-code it (``tcp_listen("", ...)``
and ``uv_ip4_addr("0.0.0.0", ...)`` in ``paddle/phi/core/distributed/store``), and no Python store
can stand in for it (``core.Store`` has no overridable methods). So rank 0 starts this store, on
``127.0.0.1``, speaking the protocol of Paddle's store client, and every rank, rank 0 included,
joins through an ordinary ``core.TCPStore`` client. The store runs in a child process of rank 0
(``python -m pdserve.models.rendezvous PORT``), not a thread: Paddle's client blocks in C++ holding
the GIL, so a thread of rank 0 could never answer it. The child prints ``ready`` once it listens
and serves until its stdin closes, which rank 0 does once every rank has passed a barrier on the new
group, and which also happens when rank 0 dies: no rendezvous port outlives the join.

The wire (little-endian, as Paddle's client writes it): a ``uint32`` command, a key (``uint64``
length + bytes), then per command: ADD an ``int64`` (reply: the new ``int64``), SET a value
(``uint64`` length + bytes, no reply), GET (reply: the value; waits for the key as Paddle's client
asks WAIT first), CHECK (reply: ``int32`` READY or NOT_READY), WAIT (reply ``int32`` STOP_WAIT once
the key exists). A malformed frame closes that one connection.
"""

from __future__ import annotations

import selectors
import socket
import struct
import subprocess
import sys
import threading
import time

ADD, GET, CHECK, SET, WAIT = range(5)
STOP_WAIT, READY, NOT_READY = 1, 2, 3
MAX_KEY_BYTES = 16 * 1024
MAX_VALUE_BYTES = 16 * 1024 * 1024


class _Incomplete(Exception):
    """The buffered bytes end mid-frame; wait for more."""


class _Malformed(Exception):
    """The frame breaks the protocol; the connection is dropped."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Incomplete
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def i64(self) -> int:
        return struct.unpack("<q", self.take(8))[0]

    def blob(self, limit: int) -> bytes:
        size = struct.unpack("<Q", self.take(8))[0]
        if size > limit:
            raise _Malformed(f"{size} bytes exceed the limit of {limit}")
        return self.take(size)


class LoopbackRendezvousStore:
    """A Paddle-compatible TCP store on ``127.0.0.1:port``, served by a daemon thread until closed."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        if not host.startswith("127."):
            raise ValueError(f"the rendezvous store serves loopback only (got {host!r})")
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(64)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self.address: tuple[str, int] = self._listener.getsockname()
        self._values: dict[bytes, bytes] = {}
        self._waiting: dict[bytes, list[socket.socket]] = {}
        self._buffers: dict[socket.socket, bytes] = {}
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="tp-rendezvous", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close every socket (the listener first); idempotent."""
        if self._stopping:
            return
        self._stopping = True
        self._wake_w.send(b"x")
        self._thread.join(timeout=5.0)
        self._wake_w.close()

    def _serve(self) -> None:
        try:
            while not self._stopping:
                for key, _ in self._selector.select():
                    sock = key.fileobj
                    if sock is self._listener:
                        self._accept()
                    elif sock is not self._wake_r:
                        self._receive(sock)  # type: ignore[arg-type]
        finally:
            for key in list(self._selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            self._selector.close()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(True)
        self._buffers[conn] = b""
        self._selector.register(conn, selectors.EVENT_READ)

    def _drop(self, conn: socket.socket) -> None:
        self._selector.unregister(conn)
        self._buffers.pop(conn, None)
        for waiters in self._waiting.values():
            if conn in waiters:
                waiters.remove(conn)
        conn.close()

    def _receive(self, conn: socket.socket) -> None:
        try:
            chunk = conn.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        buffered = self._buffers[conn] + chunk
        reader = _Reader(buffered)
        try:
            while True:
                start = reader.pos
                try:
                    self._command(conn, reader)
                except _Incomplete:
                    reader.pos = start
                    break
        except (_Malformed, OSError, ValueError):
            self._drop(conn)
            return
        self._buffers[conn] = buffered[reader.pos:]

    def _command(self, conn: socket.socket, reader: _Reader) -> None:
        """Run one complete frame (raising _Incomplete before any effect if it is not all here)."""
        command = reader.u32()
        key = reader.blob(MAX_KEY_BYTES)
        if command == ADD:
            delta = reader.i64()
            total = int(self._values.get(key, b"0")) + delta
            self._values[key] = str(total).encode()
            conn.sendall(struct.pack("<q", total))
            self._notify(key)
        elif command == SET:
            self._values[key] = reader.blob(MAX_VALUE_BYTES)
            self._notify(key)
        elif command == GET:
            value = self._values.get(key, b"")
            conn.sendall(struct.pack("<Q", len(value)) + value)
        elif command == CHECK:
            conn.sendall(struct.pack("<i", READY if key in self._values else NOT_READY))
        elif command == WAIT:
            if key in self._values:
                conn.sendall(struct.pack("<i", STOP_WAIT))
            else:
                self._waiting.setdefault(key, []).append(conn)
        else:
            raise _Malformed(f"unknown store command {command}")

    def _notify(self, key: bytes) -> None:
        for conn in self._waiting.pop(key, []):
            try:
                conn.sendall(struct.pack("<i", STOP_WAIT))
            except OSError:
                self._drop(conn)


class RendezvousProcess:
    """The store in a child process of the caller, listening on ``127.0.0.1:port`` once constructed."""

    def __init__(self, port: int, start_timeout_s: float = 30.0) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "pdserve.models.rendezvous", str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        timer = threading.Timer(start_timeout_s, self._process.kill)
        timer.start()
        try:
            line = self._process.stdout.readline()  # type: ignore[union-attr]
        finally:
            timer.cancel()
        if line != b"ready\n":
            self._process.kill()
            detail = self._process.stderr.read().decode(errors="replace").strip()  # type: ignore[union-attr]
            self.close()
            raise RuntimeError(f"the rendezvous store could not listen on 127.0.0.1:{port}: "
                               f"{detail or 'it exited before it was ready'}")

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self) -> None:
        """Stop the store (closing its stdin) and reap it; idempotent."""
        if self._process.stdin is not None and not self._process.stdin.closed:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        for stream in (self._process.stdout, self._process.stderr):
            if stream is not None:
                stream.close()


def wait_until_listening(port: int, timeout_s: float = 300.0) -> None:
    """Return once the store on ``127.0.0.1:port`` accepts connections. Ranks other than 0 call this
    before Paddle's client connects: that client sleeps 3 s after a refused connection, which would
    otherwise be paid on nearly every join, as the store starts in the same moments as the ranks."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no rendezvous store listened on 127.0.0.1:{port} "
                                   f"within {timeout_s:.0f} s (is rank 0 running?)") from None
            time.sleep(0.02)


def main(argv: list[str]) -> int:
    store = LoopbackRendezvousStore(int(argv[0]))
    try:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        while sys.stdin.buffer.read(4096):  # serve until the parent closes the pipe or dies
            pass
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
