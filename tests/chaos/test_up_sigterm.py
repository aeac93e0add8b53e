"""SIGTERM to `pdserve up` (router, one prefill and one decode node on this host) while 16 streams run:
every request in flight when the signal came completes, the launcher exits 0, and none of its
processes, KV pools or record queues outlives it. Adds its row to the chaos table (conftest.py)."""

from __future__ import annotations

import signal
import time

from pdserve.common.leftovers import pid_alive
from pdserve.tests.chaos.fabric import dead_owner_leftovers, descendants
from pdserve.tests.chaos.load import Load, RequestShape
from pdserve.tests.support.cluster import pdserve_up

SHAPE = RequestShape("def fibonacci(n):\n    if n < 2:\n        return n\n", max_tokens=32)
STREAMS = 16


def test_sigterm_pdserve_up_under_load(report) -> None:
    bound = "100% of in-flight complete, exit 0, no orphans or leftovers"
    with report("SIGTERM pdserve up (1P1D) under load", bound) as row:
        flags = ("--prefill", "1", "--decode", "1", "--threads-per-node", "1", "--num-blocks", "512")
        with pdserve_up(*flags) as (proc, url):
            load = Load(url, STREAMS, SHAPE).__enter__()
            try:
                assert load.wait_for(STREAMS, 90.0), [o.error for o in load.outcomes][:3]
                children = descendants(proc.pid)
                leftovers_before = set(dead_owner_leftovers())
                # the clients stop first: a request they start just before the signal could reach the
                # router after it, and be refused as new (503) while the test counts it as in flight
                load.stop_sending()
                time.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                code = proc.wait(timeout=90)
                row.recovery_s = time.monotonic() - signalled  # how long the drain took
            finally:
                outcomes = load.stop()
        in_flight = [o for o in outcomes if o.started < signalled]
        row.count(in_flight, fault_at=signalled)
        orphans = [pid for pid in children if pid_alive(pid)]
        new_leftovers = sorted(set(dead_owner_leftovers()) - leftovers_before)
        row.figure = f"{len(in_flight) - sum(o.ended < signalled for o in in_flight)} in flight at the signal"
        assert code == 0, f"pdserve up exited {code}"
        assert row.failed == row.hung == 0, [o.error for o in in_flight if o.kind != "ok"][:3]
        assert orphans == [] and new_leftovers == [], (orphans, new_leftovers)
