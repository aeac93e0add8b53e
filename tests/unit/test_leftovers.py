"""What a kill -9 of a node (server and engine) leaves, removed by the next node on the host: pools
and record queues of dead owners only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import sysv_ipc

from pdserve.common.kv_cache import KVCachePool, KVCacheSpec
from pdserve.common.leftovers import pool_name, queue_marker, remove_leftovers
from pdserve.node.engine_stream import RecordReader
from pdserve.tests.support.cluster import queue_exists

SPEC = KVCacheSpec(num_layers=1, num_blocks=2, block_size=4, num_kv_heads=1, head_dim=4)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_pools_and_queues_of_dead_owners_go_and_live_ones_stay(tmp_path: Path) -> None:
    dead = dead_pid()
    orphan_pool = tmp_path / pool_name(dead, "ab12")
    orphan_pool.write_bytes(b"\0" * 64)
    orphan_queue = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600)
    queue_marker(dead, orphan_queue.key, tmp_path).touch()
    live_pool = tmp_path / pool_name(os.getpid(), "cd34")
    live_pool.write_bytes(b"\0" * 64)
    live_queue = sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, mode=0o600)
    queue_marker(os.getpid(), live_queue.key, tmp_path).touch()
    strangers = [tmp_path / "pdserve-kv-notapid-ab", tmp_path / "someone-elses-file"]
    for path in strangers:
        path.write_bytes(b"x")
    try:
        removed = remove_leftovers(tmp_path)
        assert removed.pools == (orphan_pool.name,) and removed.queues == (orphan_queue.key,)
        assert not orphan_pool.exists() and not queue_exists(orphan_queue.key)
        assert not queue_marker(dead, orphan_queue.key, tmp_path).exists()
        assert live_pool.exists() and queue_exists(live_queue.key)
        assert all(path.exists() for path in strangers)
        assert remove_leftovers(tmp_path).pools == ()  # idempotent
    finally:
        live_queue.remove()
        if queue_exists(orphan_queue.key):
            orphan_queue.remove()


def test_a_node_names_its_pool_and_marks_its_queue_by_its_pid() -> None:
    pool = KVCachePool.create_shared(SPEC)
    with RecordReader() as reader:
        marker = queue_marker(os.getpid(), reader.address.key)
        try:
            assert pool.shm_name.startswith(f"pdserve-kv-{os.getpid()}-") and marker.exists()
            assert remove_leftovers().queues == ()  # ours: alive
        finally:
            pool.close()
    assert not marker.exists()  # a clean close leaves nothing to remove
