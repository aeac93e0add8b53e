"""`pdserve up` removes what a node killed with its engine leaves behind (its KV pool, its record
queue), as soon as it notices the node is gone."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from pdserve.common.leftovers import POOL_PREFIX, QUEUE_MARKER_PREFIX, pid_alive
from pdserve.tests.support.cluster import pdserve_up

SHM = Path("/dev/shm")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        found += [int(c) for c in children]
    return found


def _owned(pid: int, prefix: str) -> list[Path]:
    return [p for p in SHM.glob(f"{prefix}{pid}-*")]


def test_up_removes_the_pool_and_queue_of_a_node_killed_with_its_engine() -> None:
    flags = ("--prefill", "1", "--decode", "1", "--num-blocks", "64", "--threads-per-node", "1")
    with pdserve_up(*flags) as (up, _url):
        decode = next(pid for pid in _children(up.pid)
                      if b"decode" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"))
        (engine,) = _children(decode)
        pool, marker = _owned(engine, POOL_PREFIX), _owned(decode, QUEUE_MARKER_PREFIX)
        assert len(pool) == 1 and len(marker) == 1
        os.kill(engine, signal.SIGKILL)
        os.kill(decode, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pool[0].exists() or marker[0].exists():
            assert time.monotonic() < deadline, "pdserve up left the killed node's pool or queue"
            time.sleep(0.1)
        assert not pid_alive(engine) and up.poll() is None  # the cluster itself keeps running
    log = up.stderr.read()
    assert re.search(r"decode-0 exited \(signal SIGKILL\) after [\d.]+ s; removed 1 KV pool\(s\) and 1 "
                     r"record queue\(s\)", log), log[-2000:]
