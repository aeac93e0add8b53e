"""`pdserve up`: a router plus prefill, decode and mixed nodes on this machine, one process each.

The launcher starts the router, then the nodes (each registers with the router's embedded registry
or with Redis), waits until the router reports a usable P/D pair or mixed node, prints the URL, and
on Ctrl-C / SIGTERM stops every process it started: nodes first (they deregister and remove their
SysV queues and shared memory), then the router. Children also get PR_SET_PDEATHSIG, so even a
`kill -9` of the launcher leaves no orphans.
"""

from __future__ import annotations

import ctypes
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from pdserve.common.leftovers import remove_leftovers

READY_PREFIX = "PDSERVE_READY "
PR_SET_PDEATHSIG = 1


class ClusterError(RuntimeError):
    """A process of the cluster failed to start or the cluster never became healthy."""


@dataclass(frozen=True)
class ClusterSpec:
    host: str = "127.0.0.1"
    port: int = 8000
    prefill: int = 1
    decode: int = 1
    mixed: int = 0
    model: str | None = None  # None: the bundled demo model
    model_name: str = "pdserve-demo"
    speculative_config: str | None = None  # FastDeploy JSON, given to every node
    tool_call_parser: str | None = None  # the router's --tool-call-parser (None: tools are refused)
    registry: str = "embedded"  # or redis://host:port/db
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    threads_per_node: int = 1  # OMP threads of each engine process (each rank's, with tensor parallelism)
    tensor_parallel_size: int = 1  # engine ranks per node, unless a role overrides it
    prefill_tensor_parallel_size: int | None = None
    decode_tensor_parallel_size: int | None = None
    num_blocks: int = 1024
    startup_timeout_s: float = 180.0
    log_level: str = "WARNING"

    def __post_init__(self) -> None:
        for name in ("prefill", "decode", "mixed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.decode + self.mixed == 0:
            raise ValueError("the cluster needs at least one decode or mixed node")
        if self.decode and not self.prefill:
            raise ValueError("decode nodes need at least one prefill node (--prefill)")
        if not (self.registry == "embedded" or self.registry.startswith(("redis://", "rediss://"))):
            raise ValueError(f"registry must be 'embedded' or a redis:// URL (got {self.registry!r})")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in [1, 65535] (got {self.port})")
        for role in ("prefill", "decode", "mixed"):
            if self.tensor_parallel_size_of(role) < 1:
                raise ValueError(f"{role} tensor parallel size must be >= 1 "
                                 f"(got {self.tensor_parallel_size_of(role)})")

    def tensor_parallel_size_of(self, role: str) -> int:
        override = {"prefill": self.prefill_tensor_parallel_size,
                    "decode": self.decode_tensor_parallel_size}.get(role)
        return self.tensor_parallel_size if override is None else override

    @classmethod
    def from_yaml(cls, path: Path, **overrides: object) -> ClusterSpec:
        data = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        if "api_keys" in data:
            data["api_keys"] = tuple(data["api_keys"])
        return cls(**data)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def registry_target(self) -> str:
        return self.url if self.registry == "embedded" else self.registry


@dataclass
class Member:
    name: str
    argv: list[str]
    process: subprocess.Popen[str] | None = None
    ready: dict | None = None


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the launcher dies, however it dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Cluster:
    def __init__(self, spec: ClusterSpec, out=sys.stderr) -> None:
        self.spec = spec
        self.members: list[Member] = []
        self._out = out

    # -- commands --------------------------------------------------------------------------------

    def router_argv(self) -> list[str]:
        s = self.spec
        argv = [sys.executable, "-m", "pdserve.cli", "--log-level", s.log_level, "router", "--host", s.host,
                "--port", str(s.port), "--model-name", s.model_name, "--registry", s.registry]
        argv += ["--model", s.model] if s.model else []
        argv += ["--tool-call-parser", s.tool_call_parser] if s.tool_call_parser else []
        for key in s.api_keys:
            argv += ["--api-key", key]
        return argv

    def node_argv(self, role: str, index: int) -> list[str]:
        s = self.spec
        argv = [sys.executable, "-m", "pdserve.cli", "--log-level", s.log_level, role,
                "--node-id", f"{role}-{index}", "--host", s.host, "--model-name", s.model_name,
                "--registry", s.registry_target, "--threads", str(s.threads_per_node),
                "--num-blocks", str(s.num_blocks)]
        if s.tensor_parallel_size_of(role) > 1:
            argv += ["--tensor-parallel-size", str(s.tensor_parallel_size_of(role))]
        argv += ["--model", s.model] if s.model else []
        argv += ["--speculative-config", s.speculative_config] if s.speculative_config else []
        if s.api_keys and s.registry == "embedded":
            argv += ["--registry-api-key", s.api_keys[0]]
        return argv

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start everything and wait until the router is healthy; raises ClusterError (after
        stopping whatever started) if any part fails."""
        try:
            self._start_member(Member("router", self.router_argv()), wait_ready=False)
            self._wait_http(f"{self.spec.url}/health", want_ok=False)
            nodes = [Member(f"{role}-{i}", self.node_argv(role, i))
                     for role in ("prefill", "decode", "mixed") for i in range(getattr(self.spec, role))]
            for member in nodes:
                self._start_member(member, wait_ready=False)
            for member in nodes:
                self._wait_ready(member)
            self._wait_http(f"{self.spec.url}/health", want_ok=True)
        except BaseException:
            self.stop()
            raise

    def _start_member(self, member: Member, wait_ready: bool) -> None:
        self._say(f"starting {member.name}")
        # A session of its own: Ctrl-C in the terminal reaches only the launcher, which then stops
        # the nodes and the router in order (a terminal's SIGINT goes to the whole process group).
        member.process = subprocess.Popen(member.argv, stdout=subprocess.PIPE, text=True,
                                          preexec_fn=_die_with_parent, start_new_session=True)
        self.members.append(member)
        if wait_ready:
            self._wait_ready(member)

    def _wait_ready(self, member: Member) -> None:
        """Nodes print one PDSERVE_READY line with their addresses when they serve."""
        deadline = time.monotonic() + self.spec.startup_timeout_s
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(member.process.stdout.readline()), daemon=True)
        reader.start()
        while time.monotonic() < deadline:
            reader.join(timeout=0.2)
            if lines:
                line = lines[0]
                if not line.startswith(READY_PREFIX):
                    raise ClusterError(f"{member.name} did not start (exit {member.process.poll()})")
                member.ready = json.loads(line[len(READY_PREFIX):])
                self._say(f"{member.name} ready at {member.ready.get('grpc')}")
                threading.Thread(target=_drain, args=(member.process.stdout,), daemon=True).start()
                return
            if member.process.poll() is not None:
                raise ClusterError(f"{member.name} exited with code {member.process.returncode}")
        raise ClusterError(f"{member.name} not ready after {self.spec.startup_timeout_s} s")

    def _wait_http(self, url: str, want_ok: bool) -> None:
        deadline = time.monotonic() + self.spec.startup_timeout_s
        headers = {"Authorization": f"Bearer {self.spec.api_keys[0]}"} if self.spec.api_keys else {}
        while time.monotonic() < deadline:
            for member in self.members:
                if member.process.poll() is not None:
                    raise ClusterError(f"{member.name} exited with code {member.process.returncode}")
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError:
                if not want_ok:
                    return  # the router answers; it is just not healthy yet
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise ClusterError(f"{url} not {'healthy' if want_ok else 'answering'} after "
                           f"{self.spec.startup_timeout_s} s")

    def stop(self, timeout_s: float = 20.0) -> None:
        """Nodes first (they deregister and clean up), then the router; SIGKILL what lingers."""
        nodes = [m for m in self.members if m.name != "router" and m.process]
        routers = [m for m in self.members if m.name == "router" and m.process]
        for group in (nodes, routers):
            for member in group:
                if member.process.poll() is None:
                    member.process.terminate()
            deadline = time.monotonic() + timeout_s
            for member in group:
                try:
                    member.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._say(f"{member.name} did not stop in time; killing it")
                    member.process.kill()
                    member.process.wait()
        self.members = []

    def _say(self, text: str) -> None:
        print(f"[pdserve up] {text}", file=self._out, flush=True)


def _drain(stream) -> None:
    """Keep reading a child's stdout so it never blocks on a full pipe."""
    for _ in stream:
        pass


def run_cluster(spec: ClusterSpec) -> int:
    cluster = Cluster(spec)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cluster.start()
    except ClusterError as exc:
        print(f"pdserve up: {exc}", file=sys.stderr)
        return 1
    print(f"pdserve is up: {spec.url}/v1  (model {spec.model_name!r}; Ctrl-C stops it)", flush=True)
    reported: set[str] = set()
    try:
        while not stop.wait(0.5):
            dead = [m for m in cluster.members if m.process.poll() is not None]
            if any(m.name == "router" for m in dead):
                print("pdserve up: the router exited; stopping the cluster", file=sys.stderr)
                break
            for member in (m for m in dead if m.name not in reported):
                reported.add(member.name)
                # A node killed with its engine cannot remove its KV pool or record queue: we do.
                removed = remove_leftovers()
                print(f"pdserve up: {member.name} exited with code {member.process.returncode}; removed "
                      f"{len(removed.pools)} KV pool(s) and {len(removed.queues)} record queue(s) it left",
                      file=sys.stderr, flush=True)
    finally:
        cluster.stop()
    print("pdserve up: stopped", file=sys.stderr)
    return 0


