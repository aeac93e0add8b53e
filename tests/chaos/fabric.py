"""A PD cluster spread over network namespaces, and the faults the chaos suite injects into it.

The router and a Redis registry run on the host (on the bridge's address); every node runs in a
namespace of its own and moves KV over ZMQ (`--transport zmq`: namespaces share /dev/shm, and the
suite means "another host"). Faults act on exactly one node's processes, found by the pids the node
reported (node server) and its engine pid, never by process name; network faults are nftables rules
inside a namespace, dropping both directions of traffic to one peer (all of it for a partition, a
random share for loss). `ChaosCluster.close` removes processes, rules, namespaces and the bridge,
also after a partial start.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.common.leftovers import POOL_PREFIX, QUEUE_MARKER_PREFIX, SHM_DIR, pid_alive
from pdserve.rpc.registry import NODES_PATH
from pdserve.tests.integration.netns import HostNetwork
from pdserve.tests.support.cluster import Node, NodeSpec, free_port, start_nodes, stop_nodes, wait_until

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
NFT = shutil.which("nft") or "/usr/sbin/nft"
ROUTER_START_S = 120.0
ROUTER_NICE = -10  # the router's priority while it has a CPU of its own (router_on_its_own_core)
_OWNER = re.compile(rf"(?:{POOL_PREFIX}|{QUEUE_MARKER_PREFIX})(\d+)-(\w+)")


class RedisProcess:
    """redis-server on one address and port; kill and start again on the same port."""

    def __init__(self, address: str, workdir: Path) -> None:
        self.address, self.port, self.workdir = address, free_port(address), workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.address}:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            # protected mode refuses clients from other addresses (the nodes' namespaces) without a password
            [REDIS_SERVER, "--port", str(self.port), "--bind", self.address, "--protected-mode", "no",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(self._pong, 10.0, 0.05):
            raise RuntimeError("redis-server did not start")

    def _pong(self) -> bool:
        try:
            with socket.create_connection((self.address, self.port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class RouterProcess:
    """`pdserve router` on the host side of the bridge, its log kept for the ejections it reports."""

    def __init__(self, address: str, registry: str, log_path: Path, flags: tuple[str, ...] = (),
                 log_level: str = "WARNING") -> None:
        self.address, self.port, self.log_path = address, free_port(address), log_path
        argv = [sys.executable, "-m", "pdserve.cli", "--log-level", log_level, "router", "--host", address,
                "--port", str(self.port), "--registry", registry, *flags]
        with log_path.open("w") as log:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def usable_nodes(self) -> dict[str, int]:
        """The router's /health view: usable nodes per role ({} while it does not answer)."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2.0) as reply:
                return json.loads(reply.read()).get("usable_nodes", {})
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            counts = re.search(r"usable nodes (\{[^}]*\})", text)
            return parse_counts(counts.group(1)) if counts else {}
        except OSError:
            return {}

    def wait_usable(self, prefill: int, decode: int, timeout_s: float = ROUTER_START_S) -> bool:
        def enough() -> bool:
            counts = self.usable_nodes()
            return counts.get("prefill", 0) >= prefill and counts.get("decode", 0) >= decode
        return wait_until(enough, timeout_s, 0.2)

    def unreachable_peers(self, node_id: str) -> list[str] | None:
        """The data addresses `node_id` last reported it cannot reach, as the router routes by them
        (None while the router does not list the node)."""
        with urllib.request.urlopen(self.url + NODES_PATH, timeout=5.0) as reply:
            nodes = json.loads(reply.read())["nodes"]
        return next((n["unreachable_peer_addresses"] for n in nodes if n["node_id"] == node_id), None)

    def inflight(self, node_id: str) -> float:
        """Requests the router has on a node now (its pdserve_router_node_inflight gauge)."""
        text = urllib.request.urlopen(self.url + "/metrics", timeout=5.0).read().decode()
        series = rf'^pdserve_router_node_inflight\{{[^}}]*node_id="{node_id}"[^}}]*\}} (\S+)$'
        found = re.search(series, text, re.M)
        return float(found.group(1)) if found else 0.0

    def ejections(self) -> list[str]:
        """Node ids the router took out of rotation, in order (one per ejection)."""
        return re.findall(r"node (\S+) ejected", self.log_path.read_text(errors="replace"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def parse_counts(text: str) -> dict[str, int]:
    """The usable-node counts in the router's 503 text, e.g. {'prefill': 1, 'decode': 2}."""
    return {k: int(v) for k, v in re.findall(r"'(\w+)': (\d+)", text)}


@dataclass
class ChaosCluster:
    """Nodes in namespaces (one per node), the router and Redis on the host."""

    net: HostNetwork
    workdir: Path
    node_flags: tuple[str, ...]
    redis: RedisProcess | None = None
    router: RouterProcess | None = None
    nodes: dict[str, Node] = field(default_factory=dict)
    _rules: set[tuple[str, str]] = field(default_factory=set)
    _starts: itertools.count = field(default_factory=itertools.count)

    @classmethod
    def create(cls, workdir: Path, prefill: list[str], decode: list[str], node_flags: tuple[str, ...] = (),
               router_flags: tuple[str, ...] = (), router_log_level: str = "WARNING") -> ChaosCluster:
        cluster = cls(HostNetwork.create([*prefill, *decode]), workdir, node_flags)
        try:
            bridge = cluster.bridge_address
            cluster.redis = RedisProcess(bridge, workdir)
            cluster.redis.start()
            cluster.router = RouterProcess(bridge, cluster.redis.url, workdir / "router.log", router_flags,
                                           router_log_level)
            cluster.start([(name, "prefill") for name in prefill] + [(name, "decode") for name in decode])
            if not cluster.router.wait_usable(len(prefill), len(decode)):
                raise RuntimeError(f"router never saw every node: {cluster.router.usable_nodes()}\n"
                                   + cluster.router.log_path.read_text()[-3000:])
        except BaseException:
            cluster.close()
            raise
        return cluster

    @property
    def bridge_address(self) -> str:
        return f"{self.net.prefix}254"

    def spec(self, name: str, role: str, transport: str = "zmq") -> NodeSpec:
        flags = ("--host", self.net.addresses[name], "--transport", transport, "--registry", self.redis.url,
                 *self.node_flags)
        return NodeSpec(name, role, flags, netns=self.net.namespaces[name])

    def start(self, members: list[tuple[str, str]], transport: str = "zmq") -> None:
        """Start nodes (name, role) in their namespaces, in parallel; each must reach READY."""
        log_dir = self.workdir / f"start{next(self._starts)}"
        log_dir.mkdir()
        specs = [self.spec(name, role, transport) for name, role in members]
        retired = [self.nodes.pop(name) for name, _ in members if name in self.nodes]
        stop_nodes(retired, check=False)  # killed earlier: reap them before their id starts again
        self.nodes.update(start_nodes(specs, log_dir))

    def stop_node(self, name: str, timeout_s: float = 75.0) -> int:
        """SIGTERM one node and wait: its exit code. The default wait is past the node's own bound (a
        30 s drain, then a 30 s stop, after which it dumps its threads and exits 1). A node still
        running after `timeout_s` is killed (a lingering one would hold its node id against the
        scenarios after) and fails with its log."""
        node = self.nodes.pop(name)
        node.process.terminate()
        try:
            return node.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not exit within {timeout_s:.0f} s of SIGTERM; its log ends:\n"
                                 f"{node.log_tail()}") from None
        finally:
            stop_nodes([node], check=False)

    # -- placement ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def router_on_its_own_core(self) -> Iterator[set[int]]:
        """For the block, the router runs on CPU 0 and every other process of the cluster (this one
        and its clients too) on the other CPUs, as a router host has CPUs of its own: on a 2-core
        machine the nodes' engines would otherwise take the router's CPU, and their load would be timed
        as the router's. Yields the CPUs for client processes started in the block; every affinity is
        restored after, and the router runs at a higher priority meanwhile. With one CPU it changes
        nothing."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            yield set(cpus)
            return
        router_cpu, others = {cpus[0]}, set(cpus[1:])
        placed = {self.router.process.pid: router_cpu, os.getpid(): others}
        if self.redis is not None and self.redis.process is not None:
            placed[self.redis.process.pid] = others
        for node in self.nodes.values():
            for pid in {node.process.pid, node.engine_pid, *descendants(node.process.pid)}:
                placed[pid] = others
        for pid, where in placed.items():
            pin(pid, where)
        # and ahead of whatever else the machine runs there (another job's processes are not ours to pin)
        prioritize(self.router.process.pid, ROUTER_NICE)
        try:
            yield others
        finally:
            prioritize(self.router.process.pid, 0)
            for pid in [*placed, *descendants(os.getpid())]:
                pin(pid, set(cpus))

    # -- faults --------------------------------------------------------------------------------------

    def kill9(self, pid: int) -> float:
        os.kill(pid, signal.SIGKILL)
        return time.monotonic()

    @contextlib.contextmanager
    def stopped(self, *pids: int) -> Iterator[float]:
        """SIGSTOP the processes for the block; SIGCONT them however it ends."""
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield time.monotonic()
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    @contextlib.contextmanager
    def partitioned(self, a: str, b: str, loss_percent: int = 100) -> Iterator[float]:
        """Drop traffic between hosts a and b both ways (all of it, or `loss_percent` at random), with
        rules in a's namespace: its input from b and its output to b."""
        table = f"pdchaos_{b}".replace("-", "_")
        match = f"ip saddr {self.net.addresses[b]}"
        out_match = f"ip daddr {self.net.addresses[b]}"
        sample = "" if loss_percent >= 100 else f"numgen random mod 100 < {loss_percent} "
        ruleset = (f"table inet {table} {{\n"
                   f"  chain input {{ type filter hook input priority 0; policy accept; "
                   f"{match} {sample}drop; }}\n"
                   f"  chain output {{ type filter hook output priority 0; policy accept; "
                   f"{out_match} {sample}drop; }}\n}}\n")
        self._nft(a, ["-f", "-"], ruleset)
        self._rules.add((a, table))
        try:
            yield time.monotonic()
        finally:
            self._nft(a, ["delete", "table", "inet", table])
            self._rules.discard((a, table))

    @contextlib.contextmanager
    def router_cut_off(self, name: str) -> Iterator[float]:
        """Drop the traffic between the router and node `name` both ways (its gRPC port, in the node's
        namespace); the node still reaches Redis and its peers."""
        node = self.nodes[name]
        table = "pdchaos_router"
        port = node.info["grpc"].rsplit(":", 1)[1]
        router = self.bridge_address
        ruleset = (f"table inet {table} {{\n"
                   f"  chain input {{ type filter hook input priority 0; policy accept; "
                   f"ip saddr {router} tcp dport {port} drop; }}\n"
                   f"  chain output {{ type filter hook output priority 0; policy accept; "
                   f"ip daddr {router} tcp sport {port} drop; }}\n}}\n")
        self._nft(name, ["-f", "-"], ruleset)
        self._rules.add((name, table))
        try:
            yield time.monotonic()
        finally:
            self._nft(name, ["delete", "table", "inet", table])
            self._rules.discard((name, table))

    def _nft(self, host: str, args: list[str], stdin: str | None = None) -> None:
        subprocess.run(self.net.exec_argv(host, [NFT, *args]), input=stdin, text=True, check=True,
                       capture_output=True)

    # -- teardown ------------------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop everything; the problems found on the way (bad exits, leftovers), for the caller to assert."""
        problems: list[str] = []
        for host, table in list(self._rules):
            with contextlib.suppress(subprocess.CalledProcessError):
                self._nft(host, ["delete", "table", "inet", table])
        try:
            stop_nodes(self.nodes.values())
        except AssertionError as exc:
            problems.append(str(exc))
        if self.router is not None:
            self.router.stop()
        if self.redis is not None:
            self.redis.kill()
        self.net.close()
        problems += [f"network left behind: {x}" for x in self.net.leftovers()]
        return problems


def dead_owner_leftovers() -> list[str]:
    """KV pools and SysV queue markers under /dev/shm whose owner process is gone (what a kill leaks)."""
    found = []
    for path in SHM_DIR.glob("pdserve-*"):
        match = _OWNER.fullmatch(path.name)
        if match and not pid_alive(int(match[1])):
            found.append(path.name)
    return sorted(found)


def shm_used_bytes() -> int:
    """Bytes in use on /dev/shm (tmpfs counts files that are deleted but still mapped)."""
    stat = os.statvfs(SHM_DIR)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def prioritize(pid: int, nice: int) -> None:
    """Every thread of ``pid`` at scheduling priority ``nice`` (setpriority acts on one thread)."""
    for task in Path(f"/proc/{pid}/task").glob("[0-9]*"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.setpriority(os.PRIO_PROCESS, int(task.name), nice)


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` on ``cpus`` (sched_setaffinity acts on one thread); gone ones are skipped."""
    for task in Path(f"/proc/{pid}/task").glob("[0-9]*"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(int(task.name), cpus)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return [p for p in found if pid_alive(p)]


def shm_mapped_bytes(nodes: list[Node]) -> int:
    """Shared memory these nodes' processes map from /dev/shm (deleted files included)."""
    total = 0
    for node in nodes:
        for pid in {node.process.pid, node.engine_pid, *descendants(node.process.pid)}:
            try:
                maps = Path(f"/proc/{pid}/maps").read_text()
            except OSError:
                continue
            for line in maps.splitlines():
                if "/dev/shm/" in line:
                    start, end = (int(x, 16) for x in line.split()[0].split("-"))
                    total += end - start
    return total


def node_gone(node: Node) -> bool:
    return not (pid_alive(node.process.pid) or pid_alive(node.engine_pid))
