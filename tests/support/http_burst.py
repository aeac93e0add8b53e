"""Many HTTP requests at once over raw sockets, for admission tests: each connection is opened first
and its request sent in one write, so what is measured is the server's answer, not TCP setup or an
HTTP client library's own CPU time (which would queue later requests behind earlier ones here)."""

from __future__ import annotations

import json
import selectors
import socket
import time


def burst(url: str, count: int, body: dict[str, object]) -> list[dict[str, object]]:
    """``count`` POSTs of ``body`` to /v1/completions at once: per request its status, time to its
    first byte, the longest silence, keepalive comments seen, whether ``data: [DONE]`` came, and its
    Retry-After header."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
    socks = [socket.create_connection((host, int(port))) for _ in range(count)]
    selector = selectors.DefaultSelector()
    state: dict[socket.socket, dict[str, object]] = {}
    for sock in socks:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for sock in socks:
        sock.sendall(request)
        now = time.monotonic()
        state[sock] = {"sent": now, "last": now, "data": b"", "max_silence_s": 0.0}
        selector.register(sock, selectors.EVENT_READ)
    open_socks = len(socks)
    deadline = time.monotonic() + 60
    while open_socks and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1):
            sock, entry = key.fileobj, state[key.fileobj]
            chunk = sock.recv(65536)
            now = time.monotonic()
            entry.setdefault("answered_s", now - entry["sent"])
            entry["max_silence_s"] = max(entry["max_silence_s"], now - entry["last"])
            entry["last"] = now
            entry["data"] += chunk
            if not chunk:
                selector.unregister(sock)
                sock.close()
                open_socks -= 1
    results = []
    for entry in state.values():
        data: bytes = entry["data"]
        head = data.split(b"\r\n\r\n", 1)[0].decode()
        headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:])
        results.append({"status": int(head.split()[1]), "answered_s": entry["answered_s"],
                        "max_silence_s": entry["max_silence_s"], "keepalives": data.count(b": keepalive"),
                        "done": b"data: [DONE]" in data, "retry_after": headers.get("retry-after")})
    return results
