"""`pdserve host --spec FILE --host NAME`: start one host's part of a cluster spec.

On each host of the spec, one command starts that host's router (where listed) and nodes, every
socket bound to the host's address, and drains them on SIGTERM or Ctrl-C: the router and decode/mixed
nodes first, then prefill nodes (Cluster.stop), each draining for the spec's drain_timeout_s and
SIGKILLed 10 s after that. Hosts may start in any order: nodes keep retrying registration until the
registry answers. If any process of the host exits, the launcher stops the others and exits 1, so a supervisor
(systemd, Kubernetes) restarts the host as a whole.

Process handling (start, the ready line, PR_SET_PDEATHSIG, ordered stop) is deploy/cluster.py's.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass, field

from pdserve.deploy.cluster import Cluster, ClusterError, Member
from pdserve.deploy.spec import ClusterFile, HostSpec, NodeSpec

DRAIN_EXIT_MARGIN_S = 10.0  # beyond the processes' own drain timeout, before SIGKILL


@dataclass(frozen=True)
class LaunchSettings:
    """What Cluster's waits read from their spec: the start deadline and the router's API keys."""

    startup_timeout_s: float
    api_keys: tuple[str, ...] = field(default=(), repr=False)


def router_argv(spec: ClusterFile, host: HostSpec, secret: str | None) -> list[str]:
    argv = [sys.executable, "-m", "pdserve.cli", "--log-level", spec.log_level, "router",
            "--host", host.address, "--port", str(host.router.port), "--model-name", spec.model_name,
            "--registry", spec.registry, "--drain-timeout", str(spec.drain_timeout_s)]
    argv += ["--model", spec.model] if spec.model else []
    argv += ["--api-key-is-cluster-secret"] if secret else []
    return argv + secret_flags(spec)


def secret_flags(spec: ClusterFile) -> list[str]:
    """How a child finds the cluster secret: the spec's file or variable name, never its value."""
    if spec.secret is None:  # the spec said insecure: true
        return ["--insecure"]
    if spec.secret.file is not None:
        return ["--cluster-secret-file", spec.secret.file]
    return ["--cluster-secret-env", spec.secret.env or ""]


def node_argv(spec: ClusterFile, host: HostSpec, node: NodeSpec, secret: str | None) -> list[str]:
    argv = [sys.executable, "-m", "pdserve.cli", "--log-level", spec.log_level, node.role,
            "--node-id", node.node_id, "--host", host.address, "--port", str(node.port),
            "--data-port", str(node.data_port), "--model-name", spec.model_name,
            "--registry", spec.registry_target, "--threads", str(node.threads),
            "--num-blocks", str(node.num_blocks), "--max-num-seqs", str(node.max_num_seqs),
            "--transport", node.transport, "--drain-timeout", str(spec.drain_timeout_s),
            "--engine-stall-timeout", str(spec.engine_stall_timeout_s)]
    argv += ["--metrics-port", str(node.metrics_port)] if node.metrics_port is not None else []
    argv += ["--model", spec.model] if spec.model else []
    argv += ["--speculative-config", spec.speculative_config] if spec.speculative_config else []
    if secret and spec.registry == "embedded":
        argv += ["--registry-api-key-is-cluster-secret"]
    argv += secret_flags(spec)
    # Placement wraps the command; env and taskset exec it, so the launcher's pid is the node's.
    if node.cpus is not None:
        argv = ["taskset", "--cpu-list", node.cpus, *argv]
    if node.devices:
        argv = ["env", f"CUDA_VISIBLE_DEVICES={','.join(map(str, node.devices))}", *argv]
    return argv


class HostLauncher(Cluster):
    """One host's router and nodes, started and stopped with Cluster's process handling."""

    def __init__(self, spec: ClusterFile, host_name: str, out=sys.stderr) -> None:
        self.cluster_spec = spec
        self.host = spec.host(host_name)
        self.secret = spec.read_secret()
        super().__init__(LaunchSettings(spec.startup_timeout_s, (self.secret,) if self.secret else ()), out)

    def start(self) -> None:
        spec, host = self.cluster_spec, self.host
        try:
            if host.router is not None:
                self._start_member(Member("router", router_argv(spec, host, self.secret), "router"),
                                   wait_ready=False)
                self._wait_http(f"http://{host.address}:{host.router.port}/health", want_ok=False)
            nodes = [Member(node.node_id, node_argv(spec, host, node, self.secret), node.role)
                     for node in host.nodes]
            for member in nodes:
                self._start_member(member, wait_ready=False)
            for member in nodes:
                self._wait_ready(member)
        except BaseException:
            self.stop(self.cluster_spec.drain_timeout_s + DRAIN_EXIT_MARGIN_S)
            raise

    def say(self, text: str) -> None:
        print(f"[pdserve host {self.host.name}] {text}", file=self._out, flush=True)


def run_host(spec: ClusterFile, host_name: str) -> int:
    launcher = HostLauncher(spec, host_name)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        launcher.start()
    except ClusterError as exc:
        print(f"pdserve host {host_name}: {exc}", file=sys.stderr)
        return 1
    host = launcher.host
    where = f"; router at http://{host.address}:{host.router.port}/v1" if host.router else ""
    print(f"pdserve host {host.name} is up: {len(host.nodes)} node(s){where}", flush=True)
    code = 0
    try:
        while not stop.wait(0.5):
            dead = [m for m in launcher.members if m.process.poll() is not None]
            if dead:
                print(f"pdserve host {host.name}: {dead[0].name} exited with code "
                      f"{dead[0].process.returncode}; stopping the host", file=sys.stderr)
                code = 1
                break
    finally:
        launcher.stop(spec.drain_timeout_s + DRAIN_EXIT_MARGIN_S)
    print(f"pdserve host {host.name}: stopped", file=sys.stderr)
    return code
