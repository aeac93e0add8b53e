"""A node's shutdown is bounded: SIGTERM drains (up to --drain-timeout), then stops; a stop that has not
finished --stop-timeout seconds after the drain writes every thread's stack to the node's log and
exits with status 1, so a supervisor sees a failure and its cause instead of a process that never
exits. Real node processes; the stuck stop is an engine held by SIGSTOP, which the node's shutdown
waits on (up to 12 s) before it would kill it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pdserve.common.leftovers import pid_alive
from pdserve.common.leftovers import remove_leftovers as remove_dead_owners_leftovers
from pdserve.tests.support.cluster import (
    NodeSpec,
    leftovers,
    remove_leftovers,
    start_nodes,
    wait_until,
)


def test_sigterm_on_an_idle_node_exits_0_and_logs_how_long_the_stop_took(tmp_path: Path) -> None:
    node = start_nodes([NodeSpec("idle", "mixed", ("--stop-timeout", "20"))], tmp_path)["idle"]
    try:
        signalled = time.monotonic()
        node.process.terminate()
        assert node.process.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 20.0  # the watchdog did not end it
        assert "stopped" in node.log_tail() and "after the signal" in node.log_tail(), node.log_tail()
        assert wait_until(lambda: not leftovers(node), 5.0), leftovers(node)
    finally:
        node.process.kill()
        node.process.wait()
        remove_leftovers(node)


def test_a_stop_stuck_past_the_stop_timeout_dumps_every_thread_and_exits_1(tmp_path: Path) -> None:
    flags = ("--drain-timeout", "0", "--stop-timeout", "1")
    node = start_nodes([NodeSpec("stuck", "mixed", flags)], tmp_path)["stuck"]
    engine = node.engine_pid
    try:
        os.kill(engine, signal.SIGSTOP)  # the node's stop now waits on an engine that cannot answer
        signalled = time.monotonic()
        node.process.terminate()
        code = node.process.wait(timeout=30)
        took = time.monotonic() - signalled
        log = node.log_tail(20_000)
        assert code == 1, (code, log)
        assert 1.0 <= took < 8.0, took  # the 1 s budget, not the 12 s the engine shutdown could take
        # faulthandler's dump of every thread: one of them waits in the engine's shutdown
        assert "Thread 0x" in log and "most recent call first" in log, log
        assert "in _wait_or_kill" in log, log
        os.kill(engine, signal.SIGCONT)  # its stdin is closed: the engine sees its node gone and exits
        assert wait_until(lambda: not pid_alive(engine), 15.0), "the engine outlived its node"
        # what a hard exit leaves (the node's record queue) is removed by the next node on this host
        remove_dead_owners_leftovers()
        assert wait_until(lambda: not leftovers(node), 5.0), leftovers(node)
    finally:
        if pid_alive(engine):
            os.kill(engine, signal.SIGCONT)
        node.process.kill()
        node.process.wait()
        remove_leftovers(node)
