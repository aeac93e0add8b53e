"""The router's HTTP/2 keepalive against a node's server options (rpc/keepalive.py), on real gRPC
processes: a stopped server fails the client's open stream within the ping interval + timeout, while a
live server that sends nothing for several seconds (a long prefill) keeps it. The options are string
keys gRPC ignores when misspelled, so only a run shows they work."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from pdserve.rpc.keepalive import client_options

PING_INTERVAL_S, PING_TIMEOUT_S = 0.3, 0.7

# A server with the node's options and one streaming method: silent for argv[1] seconds, then a message
# every 50 ms for argv[2] messages.
SERVER = """
import asyncio, sys
import grpc
from pdserve.rpc.keepalive import SERVER_OPTIONS


async def stream(request, context):
    await asyncio.sleep(float(sys.argv[1]))
    for _ in range(int(sys.argv[2])):
        yield b"x"
        await asyncio.sleep(0.05)


async def main():
    server = grpc.aio.server(options=SERVER_OPTIONS)
    handler = grpc.unary_stream_rpc_method_handler(stream, request_deserializer=bytes,
                                                   response_serializer=bytes)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {"S": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[str], int]]:
    silent_s, messages = request.param
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(silent_s), str(messages)],
                               stdout=subprocess.PIPE, text=True)
    try:
        port = int(process.stdout.readline())
        yield process, port
    finally:
        os.kill(process.pid, signal.SIGCONT)
        process.kill()
        process.wait()


async def _read_all(port: int,
                    stop_pid_after: int | None = None) -> tuple[int, float, grpc.StatusCode | None]:
    """Messages read, seconds from the SIGSTOP (or the start) to the end, and the error code if any."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                         options=client_options(PING_INTERVAL_S, PING_TIMEOUT_S)) as channel:
        call = channel.unary_stream("/t.T/S", request_serializer=bytes, response_deserializer=bytes)(b"")
        count, since = 0, time.monotonic()
        try:
            async for _ in call:
                count += 1
                if stop_pid_after is not None and count == 5:
                    os.kill(stop_pid_after, signal.SIGSTOP)
                    since = time.monotonic()
        except grpc.aio.AioRpcError as e:
            return count, time.monotonic() - since, e.code()
        return count, time.monotonic() - since, None


@pytest.mark.parametrize("server", [(0.0, 400)], indirect=True)
def test_a_stopped_server_fails_the_stream_within_ping_interval_and_timeout(
        server: tuple[subprocess.Popen[str], int]) -> None:

    process, port = server
    count, after_s, code = asyncio.run(_read_all(port, stop_pid_after=process.pid))
    assert code is grpc.StatusCode.UNAVAILABLE and count == 5
    assert after_s < PING_INTERVAL_S + PING_TIMEOUT_S + 1.0, f"noticed {after_s:.2f} s after the stop"


@pytest.mark.parametrize("server", [(3.0, 5)], indirect=True)
def test_a_live_server_may_stay_silent_for_seconds(server: tuple[subprocess.Popen[str], int]) -> None:
    """About ten pings arrive while the server sends nothing: its options must not answer them with
    GOAWAY too_many_pings (gRPC's default), which would kill a stream waiting on a long prefill."""

    _, port = server
    count, _, code = asyncio.run(_read_all(port))
    assert (count, code) == (5, None)
