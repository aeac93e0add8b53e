"""Real PD nodes for integration and chaos tests: start `pdserve prefill|decode|mixed` processes, drive
them over gRPC, and check on shutdown that they exited cleanly and left no SysV queue or /dev/shm pool.

Nodes start in parallel (each loads Paddle and the demo model: seconds apiece on a small machine) and
report their addresses on the READY line. A node's engine process, output queue key and shared pool
name are read from /proc while it runs, so the leak checks look at exactly this node's resources and
are not confused by other processes on the host.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import sysv_ipc

from pdserve.common.leftovers import pid_alive  # zombie-aware: an unreaped child counts as gone
from pdserve.common.tokens import SampledTokens
from pdserve.engine.protocol import decode_config
from pdserve.models.loader import default_model_dir
from pdserve.models.tokenizer import Tokenizer
from pdserve.node.server import READY_PREFIX
from pdserve.rpc import node_pb2 as pb
from pdserve.rpc import node_pb2_grpc
from pdserve.rpc.auth import auth_metadata
from pdserve.rpc.convert import tokens_from_proto
from pdserve.tests.support.secret import TEST_SECRET, secret_flags

STARTUP_TIMEOUT_S = 150.0  # several nodes loading Paddle at once on two shared cores
EXIT_TIMEOUT_S = 20.0
RPC_TIMEOUT_S = 60.0
SHM_DIR = Path("/dev/shm")
SHM_POOL_PREFIX = "pdserve-kv-"
LOGPROB_TOL = 1e-5  # the bound on the first token's logprob and top-k, PD versus mixed


@dataclass(frozen=True)
class NodeSpec:
    name: str  # the test's handle for the node (also its --node-id)
    role: str
    flags: tuple[str, ...] = ()
    netns: str | None = None  # run inside this network namespace (`ip netns exec` keeps the pid)


@dataclass
class Node:
    spec: NodeSpec
    process: subprocess.Popen[str]
    log_path: Path
    info: dict = field(default_factory=dict)
    queue_key: int | None = None  # the SysV record queue the node server owns
    pool_name: str | None = None  # the engine's shared KV pool under /dev/shm (prefill/decode only)
    channel: grpc.Channel | None = None
    expect_clean_exit: bool = True  # chaos tests kill nodes on purpose and set this to False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def engine_pid(self) -> int:
        return int(self.info["pid"])

    @property
    def metrics_port(self) -> int:
        """The Prometheus port the node bound (started with `--metrics-port 0`: the OS picked it, so no
        other process can take it between a test's choice and the node's bind)."""
        return int(self.info["metrics"].rsplit(":", 1)[1])

    @property
    def stub(self) -> node_pb2_grpc.NodeStub:
        return node_pb2_grpc.NodeStub(self.channel)

    def target(self) -> pb.PrefillTarget:
        return pb.PrefillTarget(node_id=self.info["node_id"], grpc_address=self.info["grpc"],
                                data_address=self.info["data"])

    def stats(self) -> pb.NodeStats:
        return self.stub.Stats(pb.StatsRequest(), timeout=5.0)

    def all_blocks_free(self) -> bool:
        stats = self.stats()
        return stats.free_blocks == stats.total_blocks

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


@dataclass(frozen=True)
class Result:
    token_ids: list[int]
    chunks: list[pb.GenerateChunk]

    @property
    def finish_reason(self) -> str:
        return self.chunks[-1].finish_reason if self.chunks else ""

    @property
    def tokens(self) -> SampledTokens:
        """Every chunk's tokens with their logprobs, as one record."""
        return SampledTokens.concat([tokens_from_proto(c.tokens) for c in self.chunks if c.tokens.token_ids])


def assert_same_first_token(pd: Result, mixed: Result) -> None:
    """The first token (sampled on the prefill node) equals the mixed node's: id, rank, top-k."""
    a, b = pd.tokens.head(1), mixed.tokens.head(1)
    assert a.token_ids == b.token_ids
    assert a.ranks == b.ranks
    assert a.logprobs == pytest.approx(b.logprobs, abs=LOGPROB_TOL)
    assert a.top_ids == b.top_ids
    assert a.top_logprobs == pytest.approx(b.top_logprobs, abs=LOGPROB_TOL)


def sampling(max_tokens: int = 16, temperature: float = 0.0, **extra: object) -> pb.SamplingParams:
    """proto3 defaults are zeros: top_p and repetition_penalty must be set to their neutral 1."""
    return pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=1.0,
                             repetition_penalty=1.0, **extra)


def generate(node: Node, request_id: str, prompt_ids: Sequence[int], params: pb.SamplingParams,
             prefill: Node | pb.PrefillTarget | None = None, timeout_s: float = RPC_TIMEOUT_S) -> Result:
    target = prefill.target() if isinstance(prefill, Node) else prefill
    request = pb.GenerateRequest(request_id=request_id, prompt_token_ids=list(prompt_ids), sampling=params,
                                 prefill=target)
    chunks = list(node.stub.Generate(request, timeout=timeout_s))
    return Result([t for c in chunks for t in c.tokens.token_ids], chunks)


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORT_FLOOR = 10000
_port_picker = random.Random()


def free_port(address: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (bound and released): for 'unreachable peer' cases and for
    flags that need a number up front. It is drawn below the kernel's ephemeral range: a port from that
    range (what binding port 0 gives) can be taken by any outgoing connection, or any server binding
    port 0, between this choice and the bind of the process it is meant for."""
    ceiling = _ephemeral_low()
    for _ in range(200):
        port = _port_picker.randrange(_PORT_FLOOR, ceiling) if ceiling > _PORT_FLOOR + 100 else 0
        with socket.socket() as sock:
            try:
                sock.bind((address, port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError(f"no free port on {address}")


def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir())


# -- starting and stopping ------------------------------------------------------------------------------

def start_nodes(specs: Iterable[NodeSpec], log_dir: Path) -> dict[str, Node]:
    """Start every node at once, wait for each READY line; on any failure stop what started and raise."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes: dict[str, Node] = {}
    try:
        for spec in specs:
            secret = () if {"--insecure", "--cluster-secret-file", "--cluster-secret-env"} & set(spec.flags) \
                else secret_flags()
            log_path = log_dir / f"{spec.name}.log"
            with log_path.open("w") as log:
                argv = [sys.executable, "-m", "pdserve.cli", spec.role, "--threads", "1",
                        "--node-id", spec.name, *secret, *spec.flags]
                if spec.netns is not None:
                    argv = ["ip", "netns", "exec", spec.netns, *argv]
                process = subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, env=env)
            nodes[spec.name] = Node(spec, process, log_path)
        _await_ready(list(nodes.values()))
    except BaseException:
        stop_nodes(nodes.values(), check=False)
        raise
    return nodes


def _await_ready(nodes: list[Node]) -> None:
    selector = selectors.DefaultSelector()
    for node in nodes:
        selector.register(node.process.stdout, selectors.EVENT_READ, node)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    waiting = len(nodes)
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"nodes not ready after {STARTUP_TIMEOUT_S} s: "
                               f"{[n.name for n in nodes if not n.info]}")
        for key, _ in selector.select(min(left, 1.0)):
            node: Node = key.data
            line = node.process.stdout.readline()
            if not line:
                raise RuntimeError(f"node {node.name} exited before READY (rc {node.process.poll()}):\n"
                                   f"{node.log_tail()}")
            if line.startswith(READY_PREFIX):
                node.info = json.loads(line[len(READY_PREFIX):])
                _inspect_engine(node)
                node.channel = grpc.intercept_channel(grpc.insecure_channel(node.info["grpc"]),
                                                      WithMetadata(auth_metadata(TEST_SECRET)))
                selector.unregister(node.process.stdout)
                waiting -= 1
    selector.close()


def _inspect_engine(node: Node) -> None:
    """Find this node's record queue (in the engine's command line) and its shared pool (in its maps)."""
    pid = node.engine_pid
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    node.queue_key = decode_config(argv[argv.index(b"pdserve.engine.process") + 1].decode()).records.key
    if node.spec.role != "mixed":
        maps = Path(f"/proc/{pid}/maps").read_text()
        marker = f"/dev/shm/{SHM_POOL_PREFIX}"
        names = {line.rsplit("/", 1)[1] for line in maps.splitlines() if marker in line}
        if len(names) != 1:
            raise RuntimeError(f"node {node.name}: expected one shared KV pool mapped, found {names}")
        node.pool_name = names.pop()


class WithMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds metadata (the test cluster's node credential) to every call of a sync channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout, (*(details.metadata or ()), *self._metadata),
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request)


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


def queue_exists(key: int) -> bool:
    try:
        sysv_ipc.MessageQueue(key)  # attach only: never creates
    except sysv_ipc.ExistentialError:
        return False
    return True


def leftovers(node: Node) -> list[str]:
    """What of this node outlives it: its engine process, its SysV queue, its /dev/shm pool."""
    left = []
    if pid_alive(node.engine_pid):
        left.append(f"engine process {node.engine_pid}")
    if node.queue_key is not None and queue_exists(node.queue_key):
        left.append(f"SysV queue {node.queue_key:#x}")
    if node.pool_name is not None and (SHM_DIR / node.pool_name).exists():
        left.append(f"/dev/shm/{node.pool_name}")
    return left


def remove_leftovers(node: Node) -> None:
    """Last-resort cleanup so a failing test does not leak into the host."""
    if pid_alive(node.engine_pid):
        os.kill(node.engine_pid, signal.SIGKILL)
    if node.queue_key is not None and queue_exists(node.queue_key):
        sysv_ipc.MessageQueue(node.queue_key).remove()
    if node.pool_name is not None:
        (SHM_DIR / node.pool_name).unlink(missing_ok=True)


def stop_nodes(nodes: Iterable[Node], check: bool = True) -> None:
    """SIGTERM every node, then (with `check`) fail on a bad exit code or on anything left behind."""
    nodes = list(nodes)
    for node in nodes:
        if node.channel is not None:
            node.channel.close()
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGCONT)  # a chaos test may have left it stopped
            node.process.terminate()
    problems = []
    for node in nodes:
        try:
            rc = node.process.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            node.process.kill()
            rc = node.process.wait()
            problems.append(f"{node.name}: did not exit within {EXIT_TIMEOUT_S} s of SIGTERM")
        node.process.stdout.close()
        if node.expect_clean_exit and rc != 0:
            problems.append(f"{node.name}: exit code {rc}\n{node.log_tail()}")
    for node in nodes:
        if node.info and not wait_until(lambda n=node: not leftovers(n), 5.0, 0.1):
            problems.append(f"{node.name} left behind: {leftovers(node)}")
            remove_leftovers(node)
    if check and problems:
        raise AssertionError("node shutdown problems:\n" + "\n".join(problems))


def scrape_metric(port: int, name: str, labels: dict[str, str]) -> float:
    """One sample from a node's Prometheus endpoint (0.0 when the series does not exist yet)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5.0).read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if not labels and line.startswith(name + " "):  # a series without labels
            return float(line.rsplit(" ", 1)[1])
        if line.startswith(name + "{"):
            series, value = line.rsplit(" ", 1)
            got = ",".join(sorted(series[len(name) + 1:-1].split(",")))
            if got == wanted:
                return float(value)
    return 0.0


@contextlib.contextmanager
def pdserve_up(*flags: str, startup_timeout_s: float = 240.0) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`pdserve up FLAGS` on a free port: yields the process and the router's URL once it is up, and
    stops it with SIGINT afterwards, asserting a clean exit (its stderr stays readable)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--port", str(port), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while "pdserve is up" not in (line := proc.stdout.readline()):
            if not line and proc.poll() is not None:
                raise RuntimeError(f"pdserve up exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"pdserve up not up after {startup_timeout_s} s")
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, f"pdserve up exited {code}"


def offline_reference(prompts: Sequence[str], max_tokens: int) -> dict[str, dict]:
    """`pdserve generate --json` of each prompt (greedy, top-2 logprobs, no speculation): the single
    engine's output that served completions are compared with. Keyed by prompt."""
    argv = [sys.executable, "-m", "pdserve.cli", "generate", "--json", "--max-tokens", str(max_tokens),
            "--logprobs", "2", "--threads", "1"]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=True).stdout
    return {row["prompt"]: row for row in map(json.loads, out.splitlines())}
