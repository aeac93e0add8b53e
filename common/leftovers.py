"""What a killed node leaves behind, found by its owner's pid and removed.

A node's engine owns its KV pool (`/dev/shm/pdserve-kv-<pid>-<id>`) and its node server owns the
SysV record queue, which it marks with an empty file `/dev/shm/pdserve-queue-<pid>-<key>` for as long
as the queue lives. Both ends clean up after each other when one of them dies (engine/output_stream.py,
node/engine_client.py), but kill -9 of both leaves the pool file and the queue behind. Whoever starts
next on the host (a node server, `pdserve up`) calls `remove_leftovers`, which removes the pools and
queues whose owner pid is dead. Names of live owners, and anything not named by pdserve, are never
touched.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import sysv_ipc

SHM_DIR = Path("/dev/shm")
POOL_PREFIX = "pdserve-kv-"
QUEUE_MARKER_PREFIX = "pdserve-queue-"
_POOL = re.compile(rf"{POOL_PREFIX}(\d+)-[0-9a-f]+")
_QUEUE_MARKER = re.compile(rf"{QUEUE_MARKER_PREFIX}(\d+)-(\d+)")


def pool_name(owner_pid: int, unique: str) -> str:
    return f"{POOL_PREFIX}{owner_pid}-{unique}"


def queue_marker(owner_pid: int, key: int, shm_dir: Path = SHM_DIR) -> Path:
    return shm_dir / f"{QUEUE_MARKER_PREFIX}{owner_pid}-{key}"


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie (a killed, not yet reaped owner is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs here (or the process just vanished; the next kill(0) says so)
    # The command name in parentheses may contain spaces; the state is the first field after it.
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


@dataclass(frozen=True)
class Removed:
    pools: tuple[str, ...]
    queues: tuple[int, ...]


def remove_leftovers(shm_dir: Path = SHM_DIR) -> Removed:
    """Remove KV pools and record queues whose owner process is gone; returns what was removed."""
    pools, queues = [], []
    for path in sorted(shm_dir.glob(f"{POOL_PREFIX}*")):
        match = _POOL.fullmatch(path.name)
        if match and not pid_alive(int(match[1])):
            path.unlink(missing_ok=True)
            pools.append(path.name)
    for path in sorted(shm_dir.glob(f"{QUEUE_MARKER_PREFIX}*")):
        match = _QUEUE_MARKER.fullmatch(path.name)
        if match and not pid_alive(int(match[1])):
            try:
                sysv_ipc.MessageQueue(int(match[2])).remove()
                queues.append(int(match[2]))
            except sysv_ipc.ExistentialError:
                pass  # its engine removed it already
            path.unlink(missing_ok=True)
    return Removed(tuple(pools), tuple(queues))
