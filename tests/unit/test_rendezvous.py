"""The tensor-parallel rendezvous store: Paddle's own store client works against it, it listens on
loopback only, refuses what breaks its protocol, and is gone once its parent closes it or dies."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time

import pytest

from pdserve.models.rendezvous import LoopbackRendezvousStore, RendezvousProcess, wait_until_listening
from pdserve.tests.support.cluster import free_port
from pdserve.tests.support.listeners import tcp_listeners


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        return True
    except OSError:
        return False


def test_paddles_store_client_rendezvous_through_it() -> None:
    from paddle.base import core

    port = free_port()
    store = RendezvousProcess(port)
    try:
        first = core.TCPStore("127.0.0.1", port, False, 2, 30)
        second = core.TCPStore("127.0.0.1", port, False, 2, 30)
        first.set("addr/0", "tcp://a")
        assert second.get("addr/0") == b"tcp://a"
        assert first.add("count", 2) == 2 and second.add("count", 3) == 5
        second.wait("addr/0")
    finally:
        store.close()
    assert not _listening(port)


def test_it_listens_on_loopback_only() -> None:
    port = free_port()
    with pytest.raises(ValueError, match="loopback"):
        LoopbackRendezvousStore(port, host="0.0.0.0")
    store = RendezvousProcess(port)
    try:
        listeners = tcp_listeners([store.pid])
        assert listeners == [("127.0.0.1", port)]
    finally:
        store.close()


def test_a_malformed_frame_drops_that_connection_only() -> None:
    from paddle.base import core

    port = free_port()
    store = RendezvousProcess(port)
    try:
        with socket.create_connection(("127.0.0.1", port)) as bad:
            bad.sendall(struct.pack("<I", 99) + struct.pack("<Q", 1) + b"k")
            bad.settimeout(5.0)
            assert bad.recv(16) == b""  # closed by the store
        with socket.create_connection(("127.0.0.1", port)) as huge:
            huge.sendall(struct.pack("<I", 3) + struct.pack("<Q", 1 << 40))  # a key of a terabyte
            huge.settimeout(5.0)
            assert huge.recv(16) == b""
        client = core.TCPStore("127.0.0.1", port, False, 1, 30)
        client.set("still", "serving")
        assert client.get("still") == b"serving"
    finally:
        store.close()


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"could not listen on 127.0.0.1:{port}"):
            RendezvousProcess(port)


def test_the_store_dies_with_its_parent() -> None:
    """A rank 0 killed mid-join leaves no store behind: the store's stdin closes and it exits."""
    port = free_port()
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from pdserve.models.rendezvous import RendezvousProcess\n"
         f"store = RendezvousProcess({port})\n"
         "print(store.pid, flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE,
    )
    try:
        store_pid = int(parent.stdout.readline())  # type: ignore[union-attr]
        wait_until_listening(port, timeout_s=10.0)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5.0
        while _alive(store_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(store_pid)
        assert not _listening(port)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()  # type: ignore[union-attr]


def _alive(pid: int) -> bool:
    from pathlib import Path

    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_waiting_for_a_store_that_never_comes_times_out() -> None:
    with pytest.raises(TimeoutError, match="is rank 0 running"):
        wait_until_listening(free_port(), timeout_s=0.3)
