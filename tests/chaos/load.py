"""Client load for chaos scenarios: N concurrent streams through the router with the official `openai`
client, one outcome record per request, and the table row each scenario reports.

A stream sends its next request as soon as the last one ends, so the load stays at N while a fault
lasts. Each record keeps absolute monotonic times, so a scenario measures error latency from its own
fault (not from the request's start) and recovery from the moment the fault ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import openai

HUNG_S = 30.0  # a request silent this long (no headers, no chunk, no end) is hung: the client gives up
LONGEST_S = 180.0  # and one that streams but has not ended after this long
MODEL = "pdserve-demo"
# Statuses a client may retry by contract: 429 (come back later), 503 (the cluster could not serve it now).
RETRYABLE_STATUSES = frozenset({429, 503})
for _name in ("httpx", "httpx2"):  # one INFO line per request (openai's client) would drown the table
    logging.getLogger(_name).setLevel(logging.WARNING)


@dataclass
class Outcome:
    """One request: when it started and ended, and how it ended."""

    started: float
    ended: float = 0.0
    kind: str = "hung"  # ok | failed | hung (silent for hung_s, or not ended after LONGEST_S)
    status: int = 0  # HTTP status (or the error event's code); 0 when the connection failed
    error: str = ""
    first_token: float | None = None
    max_gap_s: float = 0.0  # the longest silence of the stream once it was admitted (headers or a chunk)
    text: str = ""

    @property
    def latency_s(self) -> float:
        return self.ended - self.started

    @property
    def retryable(self) -> bool:
        return self.kind == "failed" and self.status in RETRYABLE_STATUSES


@dataclass
class RequestShape:
    prompt: str
    max_tokens: int = 24
    temperature: float = 0.0


class Load:
    """`streams` concurrent request loops against `url`, on an event loop of their own thread."""

    def __init__(self, url: str, streams: int, shape: RequestShape, hung_s: float = HUNG_S,
                 api_key: str = "chaos") -> None:
        self.url, self.streams, self.shape, self.hung_s, self.api_key = url, streams, shape, hung_s, api_key
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop_sending(self) -> None:
        """No new requests from now on; those in flight go on."""
        self._stop.set()

    def stop(self) -> list[Outcome]:
        """Stop sending; wait for the requests in flight (each bounded by LONGEST_S)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=LONGEST_S + 15.0)
        return self.outcomes

    def wait_for(self, count: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while sum(o.kind == "ok" for o in self.outcomes) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    async def _run(self) -> None:
        client = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0,
                                    timeout=self.hung_s + 5.0)
        async with client:
            await asyncio.gather(*(self._loop(client) for _ in range(self.streams)))

    async def _loop(self, client: openai.AsyncOpenAI) -> None:
        while not self._stop.is_set():
            outcome = await one_request(client, self.shape, self.hung_s)
            self.outcomes.append(outcome)


async def one_request(client: openai.AsyncOpenAI, shape: RequestShape, hung_s: float = HUNG_S) -> Outcome:
    outcome = Outcome(started=time.monotonic())
    try:
        await asyncio.wait_for(_stream(client, shape, outcome, hung_s), LONGEST_S)
        outcome.kind = "ok"
    except TimeoutError:
        outcome.kind, outcome.error = "hung", f"silent for {hung_s} s or not done after {LONGEST_S} s"
    except openai.APIStatusError as exc:
        outcome.kind, outcome.status, outcome.error = "failed", exc.status_code, str(exc)[:300]
    except openai.APIError as exc:  # an error event inside the stream, or the connection failing
        outcome.kind, outcome.error = "failed", str(exc)[:300]
        body = exc.body if isinstance(exc.body, dict) else {}
        outcome.status = int(body.get("code") or 0) if str(body.get("code") or "").isdigit() else 0
    outcome.ended = time.monotonic()
    return outcome


async def _stream(client: openai.AsyncOpenAI, shape: RequestShape, outcome: Outcome, hung_s: float) -> None:
    create = client.completions.create(model=MODEL, prompt=shape.prompt, max_tokens=shape.max_tokens,
                                       temperature=shape.temperature, stream=True)
    stream = await asyncio.wait_for(create, hung_s)
    last = time.monotonic()  # admitted: the response headers arrived
    chunks = aiter(stream)
    while True:
        try:
            chunk = await asyncio.wait_for(anext(chunks), hung_s)
        except StopAsyncIteration:
            break
        now = time.monotonic()
        outcome.max_gap_s = max(outcome.max_gap_s, now - last)
        last = now
        if outcome.first_token is None:
            outcome.first_token = now
        outcome.text += "".join(choice.text for choice in chunk.choices)
    outcome.max_gap_s = max(outcome.max_gap_s, time.monotonic() - last)


class _ClientProcess:
    """Client work in a process of its own, for work whose client-side cost would otherwise hold the
    GIL of the test process's client that measures latency, and be measured as the cluster's
    slowness: a 4 MB prompt's JSON encoding, or 128 SSE streams read while another burst is timed.
    Outcome times are CLOCK_MONOTONIC, the same in every process."""

    def __init__(self, mode: str, url: str, count: int, shape: RequestShape,
                 cpus: set[int] | None = None, nice: int = 0) -> None:
        argv = [sys.executable, "-m", "pdserve.tests.chaos.load", mode, url, str(count)]

        def place() -> None:  # in the child, before it runs: its CPUs and its scheduling priority
            if cpus is not None:
                os.sched_setaffinity(0, cpus)
            if nice:
                os.nice(nice)

        self._process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         preexec_fn=place)
        assert self._process.stdin is not None and self._process.stdout is not None
        # the shape on stdin: a 4 MB prompt is beyond what one argv string may hold
        self._process.stdin.write(json.dumps(dataclasses.asdict(shape)) + "\n")
        self._process.stdin.flush()
        if self._process.stdout.readline().strip() != "ready":  # imported and about to send
            raise RuntimeError(f"the client process ({mode}) did not start")

    def _outcomes(self, stdin: str = "") -> list[Outcome]:
        out, _ = self._process.communicate(stdin, timeout=LONGEST_S + 30.0)
        return [Outcome(**record) for record in json.loads(out)]


class ProcessLoad(_ClientProcess):
    """A Load in a process of its own; stop() as Load's."""

    def __init__(self, url: str, streams: int, shape: RequestShape, nice: int = 0) -> None:
        super().__init__("load", url, streams, shape, nice=nice)

    def stop(self) -> list[Outcome]:
        return self._outcomes("stop\n")


class ProcessBurst(_ClientProcess):
    """wire_burst in a process of its own, sent once it is ready; result() waits for its outcomes."""

    def __init__(self, url: str, count: int, shape: RequestShape, cpus: set[int] | None = None,
                 nice: int = 0) -> None:
        super().__init__("burst", url, count, shape, cpus, nice)

    def result(self) -> list[Outcome]:
        return self._outcomes()


def _serve_client_process(mode: str, url: str, count: int) -> None:
    """The child of _ClientProcess: the shape from stdin's first line; a load runs until the next line."""
    shape = RequestShape(**json.loads(sys.stdin.readline()))
    print("ready", flush=True)
    if mode == "burst":
        outcomes = wire_burst(url, count, shape)
    else:
        with Load(url, count, shape) as load:
            sys.stdin.readline()
            outcomes = load.stop()
    print(json.dumps([dataclasses.asdict(o) for o in outcomes]), flush=True)


def slowest(outcomes: list[Outcome]) -> float:
    return max((o.latency_s for o in outcomes), default=0.0)


def recovery(outcomes: list[Outcome], since: float) -> float | None:
    """From `since` to the end of the first request started after it that succeeded."""
    ends = [o.ended for o in outcomes if o.started >= since and o.kind == "ok"]
    return min(ends) - since if ends else None


def non_retryable(outcomes: list[Outcome]) -> list[str]:
    return [f"{o.status} {o.error[:120]}" for o in outcomes if o.kind == "failed" and not o.retryable]


# -- the row each scenario reports ----------------------------------------------------------------------

@dataclass
class Row:
    scenario: str
    bound: str
    sent: int = 0
    ok: int = 0
    failed: int = 0
    hung: int = 0
    error_p50_s: float | None = None
    error_max_s: float | None = None
    recovery_s: float | None = None
    leaked: int = 0  # /dev/shm pools and SysV queues of dead owners, after the scenario
    figure: str = ""  # the scenario's own figure (TTFT ratio, shm delta, 429 latency, ...)
    verdict: str = "pass"  # pass, or FAIL: the first line of the failed bound

    def count(self, outcomes: Iterable[Outcome], fault_at: float | None = None) -> None:
        """Add outcomes; error latency counts from `fault_at` for requests already running then."""
        outcomes = list(outcomes)
        self.sent += len(outcomes)
        self.ok += sum(o.kind == "ok" for o in outcomes)
        self.failed += sum(o.kind == "failed" for o in outcomes)
        self.hung += sum(o.kind == "hung" for o in outcomes)
        latencies = [o.ended - max(o.started, fault_at or o.started) for o in outcomes if o.kind == "failed"]
        if latencies:
            self.error_p50_s = statistics.median(latencies)
            self.error_max_s = max(latencies)


@dataclass
class ChaosTable:
    rows: list[Row] = field(default_factory=list)

    HEADER = ("| scenario | bound | sent | ok | failed | hung | error p50 / max (s) | recovery (s) "
              "| leaked | figure | verdict |")

    def markdown(self) -> str:
        return "\n".join([self.HEADER, "|" + "---|" * 11, *map(self.markdown_row, self.rows)])

    @staticmethod
    def markdown_row(r: Row) -> str:
        errors = "-" if r.error_p50_s is None else f"{r.error_p50_s:.2f} / {r.error_max_s:.2f}"
        recovery = "-" if r.recovery_s is None else f"{r.recovery_s:.2f}"
        cells = (r.scenario, r.bound, r.sent, r.ok, r.failed, r.hung, errors, recovery, r.leaked, r.figure,
                 r.verdict[:120])
        return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def wire_burst(url: str, count: int, shape: RequestShape, hung_s: float = HUNG_S) -> list[Outcome]:
    """`count` streaming requests sent at once over raw HTTP/1.1 connections, each sent once.

    What a client library hides is measured here: every connection is opened first, so `started` is
    when a request's bytes were written and a refusal's latency is the router's answer time, not the
    client's connection setup; and the stream's silence counts every byte the router sends (its SSE
    keepalive comments included), which is what "never silent" means on the wire.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = (f'{{"model": "{MODEL}", "prompt": {json.dumps(shape.prompt)}, "max_tokens": {shape.max_tokens}, '
            f'"temperature": {shape.temperature}, "stream": true}}').encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer chaos\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, go: asyncio.Event) -> Outcome:
        await go.wait()
        writer.write(head + body)
        outcome = Outcome(started=time.monotonic())
        received, last = b"", outcome.started
        try:
            while True:
                data = await asyncio.wait_for(reader.read(65536), hung_s)
                now = time.monotonic()
                if received:  # silence is counted once the answer began (the headers came)
                    outcome.max_gap_s = max(outcome.max_gap_s, now - last)
                last = now
                if not data:
                    break
                received += data
                if outcome.first_token is None and b'"text"' in data:
                    outcome.first_token = now
        except TimeoutError:
            outcome.kind, outcome.error = "hung", f"silent for {hung_s} s"
            outcome.ended = time.monotonic()
            return outcome
        finally:
            writer.close()
        outcome.ended = last
        status_line = received.split(b"\r\n", 1)[0].split()
        outcome.status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
        done = outcome.status == 200 and b"data: [DONE]" in received and b'"error"' not in received
        outcome.kind = "ok" if done else "failed"
        if not done:
            outcome.error = received.split(b"\r\n\r\n", 1)[-1][:300].decode(errors="replace")
        return outcome

    async def run() -> list[Outcome]:
        connections = await asyncio.gather(*(asyncio.open_connection(host, int(port)) for _ in range(count)))
        go = asyncio.Event()
        tasks = [asyncio.create_task(one(r, w, go)) for r, w in connections]
        await asyncio.sleep(0.1)  # every task waits on `go`: the requests leave together
        go.set()
        return list(await asyncio.gather(*tasks))

    return asyncio.run(run())


if __name__ == "__main__":
    _serve_client_process(sys.argv[1], sys.argv[2], int(sys.argv[3]))
