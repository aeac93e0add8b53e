"""`pdserve up`: a router plus prefill, decode and mixed nodes on this machine, one process each.

The launcher starts the router, then the nodes (each registers with the router's embedded registry
or with Redis), waits until the router reports a usable P/D pair or mixed node, and prints the URL.

While it runs it supervises its children (``Supervisor``): a child that exits is logged with its exit
code or signal, what it left (KV pool, record queue) is removed, and it is started again after an
exponential backoff (reset once it stayed up ``restart_reset_s``); after ``max_rapid_restarts``
failures without such a stable run it is given up (a crash loop, reported as one; a given-up router
stops the cluster). The other nodes serve meanwhile.

Ctrl-C / SIGTERM drains (``Cluster.stop``): the router and the decode/mixed nodes get SIGTERM together
(the router answers new requests 503 and waits for its in-flight ones; the nodes stop admitting and
finish theirs), then the prefill nodes, which serve the decode nodes' last prefills until those are
gone; each gets ``drain_timeout_s`` (+ a margin) before SIGKILL. A second Ctrl-C / SIGTERM forwards a
second SIGTERM, on which every child stops at once. Children also get PR_SET_PDEATHSIG, so even a
`kill -9` of the launcher leaves no orphans.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from pdserve.common.leftovers import remove_leftovers
from pdserve.common.secret import ClusterSecret
from pdserve.engine.protocol import STATS_MAX_INTERVAL_S

READY_PREFIX = "PDSERVE_READY "
PR_SET_PDEATHSIG = 1
FORCED_STOP_S = 5.0  # after a second signal: how long children get to stop before SIGKILL


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
    drain_timeout_s: float = 30.0  # SIGTERM: what in-flight requests get to finish, router and nodes
    engine_stall_timeout_s: float = 30.0  # a node kills its engine when it is silent this long
    restart_backoff_s: float = 1.0  # first restart delay of a child that exited; doubled per failure
    restart_max_backoff_s: float = 30.0
    restart_reset_s: float = 60.0  # a child up this long is stable again: its failure count resets
    max_rapid_restarts: int = 5  # failures without a stable run before the child is given up
    log_level: str = "WARNING"
    cluster_secret_file: str | None = None  # None: a fresh secret in the run directory
    insecure: bool = False  # no cluster secret at all: internal traffic unauthenticated

    def __post_init__(self) -> None:
        if self.insecure and self.cluster_secret_file is not None:
            raise ValueError("cluster_secret_file and insecure are mutually exclusive")
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
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0 (got {self.drain_timeout_s})")
        if not STATS_MAX_INTERVAL_S < self.engine_stall_timeout_s <= 3600:
            raise ValueError(f"engine_stall_timeout_s must be in ({STATS_MAX_INTERVAL_S}, 3600] "
                             f"(got {self.engine_stall_timeout_s})")
        if not 0 < self.restart_backoff_s <= self.restart_max_backoff_s:
            raise ValueError("restart_backoff_s must be > 0 and <= restart_max_backoff_s "
                             f"(got {self.restart_backoff_s}, {self.restart_max_backoff_s})")
        if self.restart_reset_s <= 0 or self.max_rapid_restarts < 0:
            raise ValueError("restart_reset_s must be > 0 and max_rapid_restarts >= 0")
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
    role: str = ""  # "router", "prefill", "decode", "mixed" ("" : unknown, stopped with the first group)
    process: subprocess.Popen[str] | None = None
    ready: dict | None = None
    started_at: float = 0.0  # time.monotonic() of the last start
    failures: int = 0  # exits since the last stable run
    restarts: int = 0
    restart_at: float | None = None  # when a dead member starts again
    given_up: bool = False


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the launcher dies, however it dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Cluster:
    def __init__(self, spec: ClusterSpec, out=sys.stderr) -> None:
        self.spec = spec
        self.members: list[Member] = []
        self._out = out
        self._forced = threading.Event()
        self._forced_at = 0.0
        self._run_dir: Path | None = None  # holds a generated secret; removed on stop

    def secret_flags(self) -> list[str]:
        """How children find the cluster secret: a file path, never the secret itself."""
        s = self.spec
        if s.insecure:
            return ["--insecure"]
        if s.cluster_secret_file is not None:
            return ["--cluster-secret-file", s.cluster_secret_file]
        if self._run_dir is None:
            self._run_dir = Path(tempfile.mkdtemp(prefix="pdserve-up-"))  # mode 0700
            ClusterSecret.generate().write(self._run_dir / "cluster.secret")
            self.say(f"generated a cluster secret in {self._run_dir / 'cluster.secret'}")
        return ["--cluster-secret-file", str(self._run_dir / "cluster.secret")]

    # -- commands --------------------------------------------------------------------------------

    def router_argv(self) -> list[str]:
        s = self.spec
        argv = [sys.executable, "-m", "pdserve.cli", "--log-level", s.log_level, "router", "--host", s.host,
                "--port", str(s.port), "--model-name", s.model_name, "--registry", s.registry]
        argv += ["--model", s.model] if s.model else []
        argv += ["--tool-call-parser", s.tool_call_parser] if s.tool_call_parser else []
        argv += ["--drain-timeout", str(s.drain_timeout_s)]
        for key in s.api_keys:
            argv += ["--api-key", key]
        return argv + self.secret_flags()

    def node_argv(self, role: str, index: int) -> list[str]:
        s = self.spec
        argv = [sys.executable, "-m", "pdserve.cli", "--log-level", s.log_level, role,
                "--node-id", f"{role}-{index}", "--host", s.host, "--model-name", s.model_name,
                "--registry", s.registry_target, "--threads", str(s.threads_per_node),
                "--num-blocks", str(s.num_blocks), "--drain-timeout", str(s.drain_timeout_s),
                "--engine-stall-timeout", str(s.engine_stall_timeout_s)]
        if s.tensor_parallel_size_of(role) > 1:
            argv += ["--tensor-parallel-size", str(s.tensor_parallel_size_of(role))]
        argv += ["--model", s.model] if s.model else []
        argv += ["--speculative-config", s.speculative_config] if s.speculative_config else []
        if s.api_keys and s.registry == "embedded":
            argv += ["--registry-api-key", s.api_keys[0]]
        return argv + self.secret_flags()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start everything and wait until the router is healthy; raises ClusterError (after
        stopping whatever started) if any part fails."""
        try:
            self._start_member(Member("router", self.router_argv(), "router"), wait_ready=False)
            self._wait_http(f"{self.spec.url}/health", want_ok=False)
            nodes = [Member(f"{role}-{i}", self.node_argv(role, i), role)
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
        self.say(f"starting {member.name}")
        # A session of its own: Ctrl-C in the terminal reaches only the launcher, which then stops
        # the nodes and the router in order (a terminal's SIGINT goes to the whole process group).
        self._spawn(member)
        self.members.append(member)
        if wait_ready:
            self._wait_ready(member)

    def _spawn(self, member: Member) -> None:
        member.process = subprocess.Popen(member.argv, stdout=subprocess.PIPE, text=True,
                                          preexec_fn=_die_with_parent, start_new_session=True)
        member.started_at = time.monotonic()

    def restart(self, member: Member) -> None:
        """Start a dead member again; its ready line is reported when it comes (without waiting)."""
        self._spawn(member)
        member.restarts += 1
        member.restart_at = None
        threading.Thread(target=self._report_ready, args=(member, member.process), daemon=True).start()

    def _report_ready(self, member: Member, process: subprocess.Popen[str]) -> None:
        for line in process.stdout:
            if line.startswith(READY_PREFIX):
                member.ready = json.loads(line[len(READY_PREFIX):])
                self.say(f"{member.name} is serving again (restart {member.restarts})")

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
                self.say(f"{member.name} ready at {member.ready.get('grpc')}")
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

    def stop(self, timeout_s: float | None = None) -> None:
        """Drain: the router and decode/mixed nodes first, then the prefill nodes (which serve the
        others' last prefills), each group given ``timeout_s`` (default: the spec's drain timeout, plus
        a margin to exit) before SIGKILL. ``force_stop`` during it shortens every wait."""
        drain_s = timeout_s if timeout_s is not None else getattr(self.spec, "drain_timeout_s", 20.0) + 10.0
        live = [m for m in self.members if m.process is not None]
        groups = ([m for m in live if m.role != "prefill"], [m for m in live if m.role == "prefill"])
        for group in groups:
            for member in group:
                if member.process.poll() is None:
                    member.process.terminate()
            deadline = time.monotonic() + drain_s
            for member in group:
                while member.process.poll() is None:
                    if self._forced.is_set():
                        deadline = min(deadline, self._forced_at + FORCED_STOP_S)
                    if time.monotonic() > deadline:
                        self.say(f"{member.name} did not stop in time; killing it")
                        member.process.kill()
                        member.process.wait()
                        break
                    time.sleep(0.05)
        removed = remove_leftovers()  # what a SIGKILLed child left
        if removed.pools or removed.queues:
            self.say(f"removed {len(removed.pools)} KV pool(s) and {len(removed.queues)} record queue(s)")
        self.members = []
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None

    def force_stop(self) -> None:
        """A second Ctrl-C / SIGTERM: every child gets a second SIGTERM (they stop at once) and the
        drain waits at most FORCED_STOP_S more."""
        self._forced_at = time.monotonic()
        self._forced.set()
        for member in self.members:
            if member.process is not None and member.process.poll() is None:
                member.process.terminate()

    def say(self, text: str) -> None:
        print(f"[pdserve up] {text}", file=self._out, flush=True)


def _drain(stream) -> None:
    """Keep reading a child's stdout so it never blocks on a full pipe."""
    for _ in stream:
        pass


def describe_exit(code: int) -> str:
    """Popen's returncode in words: 'code 1' or 'signal SIGKILL'."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


class Supervisor:
    """Restarts the cluster's children that exit, with backoff; gives a crash-looping one up."""

    def __init__(self, cluster: Cluster, spec: ClusterSpec) -> None:
        self._cluster = cluster
        self._spec = spec

    def backoff_s(self, failures: int) -> float:
        return min(self._spec.restart_max_backoff_s, self._spec.restart_backoff_s * 2 ** (failures - 1))

    def check(self, now: float) -> Member | None:
        """One pass over the children; returns a given-up router (the cluster cannot serve without it)."""
        for member in self._cluster.members:
            if member.given_up:
                continue
            code = member.process.poll()
            if code is None:
                if member.failures and now - member.started_at >= self._spec.restart_reset_s:
                    member.failures = 0  # stable again
                continue
            if member.restart_at is None:
                self._on_exit(member, code, now)
                if member.given_up and member.role == "router":
                    return member
            elif now >= member.restart_at:
                self._cluster.say(f"restarting {member.name}")
                self._cluster.restart(member)
        return None

    def _on_exit(self, member: Member, code: int, now: float) -> None:
        removed = remove_leftovers()  # a node killed with its engine cannot remove its pool or queue
        up_s = now - member.started_at
        member.failures = 1 if up_s >= self._spec.restart_reset_s else member.failures + 1
        self._cluster.say(f"{member.name} exited ({describe_exit(code)}) after {up_s:.1f} s; removed "
                          f"{len(removed.pools)} KV pool(s) and {len(removed.queues)} record queue(s)")
        if member.failures > self._spec.max_rapid_restarts:
            member.given_up = True
            self._cluster.say(f"{member.name} is crash-looping ({member.failures} exits, none up "
                               f"{self._spec.restart_reset_s:.0f} s); giving it up")
            return
        delay = self.backoff_s(member.failures)
        member.restart_at = now + delay
        self._cluster.say(f"{member.name} restarts in {delay:.1f} s (failure {member.failures} of at most "
                           f"{self._spec.max_rapid_restarts})")


def run_cluster(spec: ClusterSpec) -> int:
    cluster = Cluster(spec)
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        if stop.is_set():
            cluster.force_stop()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        cluster.start()
    except ClusterError as exc:
        print(f"pdserve up: {exc}", file=sys.stderr)
        return 1
    print(f"pdserve is up: {spec.url}/v1  (model {spec.model_name!r}; Ctrl-C stops it)", flush=True)
    supervisor = Supervisor(cluster, spec)
    code = 0
    try:
        while not stop.wait(0.5):
            lost = supervisor.check(time.monotonic())
            if lost is not None:
                print("pdserve up: the router cannot be kept running; stopping the cluster", file=sys.stderr)
                code = 1
                break
    finally:
        cluster.say("draining: new requests get 503, in-flight ones finish")
        cluster.stop()
    print("pdserve up: stopped", file=sys.stderr)
    return code
