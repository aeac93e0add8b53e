"""Three hosts as network namespaces (router, prefill, decode; each its own address on a bridge), started
only through `pdserve host --spec FILE --host NAME` from one cluster spec, KV over ZMQ between them.

Checks: the completions through the router equal the mixed engine's (`pdserve generate`, greedy,
tokens and logprobs), the KV went over ZMQ, the prefill node runs on the CPUs the spec gives it, the
cluster secret from the spec guards the router, `pdserve status` reports every node serving and
registered, and SIGTERM to each launcher stops its host cleanly (exit 0, no process or shared-memory
pool left). The namespaces and the bridge are deleted however the test ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from openai import AuthenticationError, OpenAI

from pdserve.tests.integration.netns import HostNetwork
from pdserve.tests.support.cluster import offline_reference

PROMPTS = ["def fibonacci(n):", "class Stack:"]
MAX_TOKENS = 16
LOGPROB_TOL = 1e-4
STARTUP_TIMEOUT_S = 240
SECRET = "s3cret-multihost"
SPECULATIVE = {"method": "mtp", "num_speculative_tokens": 1, "num_model_steps": 1}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")


@dataclass
class MultiHost:
    net: HostNetwork
    spec_path: Path
    launchers: dict[str, subprocess.Popen[str]]

    @property
    def router_url(self) -> str:
        return f"http://{self.net.addresses['router']}:8000"


def _spec(net: HostNetwork, secret_file: Path) -> dict:
    a = net.addresses
    return {
        "name": "nstest",
        "registry": "embedded",
        "secret": {"file": str(secret_file)},
        "speculative_config": SPECULATIVE,
        "drain_timeout_s": 20,
        "startup_timeout_s": STARTUP_TIMEOUT_S,
        "hosts": {
            "router": {"address": a["router"], "router": {"port": 8000}},
            "prefill": {"address": a["prefill"], "nodes": [
                {"role": "prefill", "port": 7001, "data_port": 7002, "metrics_port": 9100, "threads": 1,
                 "cpus": "0", "transport": "zmq", "num_blocks": 256}]},
            "decode": {"address": a["decode"], "nodes": [
                {"role": "decode", "port": 7001, "data_port": 7002, "threads": 1, "num_blocks": 256}]},
        },
    }


def _wait_up(name: str, proc: subprocess.Popen[str], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "is up" in line:
            return
        if not line and proc.poll() is not None:
            break
    pytest.fail(f"host {name} did not come up (exit {proc.poll()}): {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiHost]:
    tmp = tmp_path_factory.mktemp("multihost")
    secret_file = tmp / "secret"
    secret_file.write_text(SECRET + "\n")
    net = HostNetwork.create(["router", "prefill", "decode"])
    launchers: dict[str, subprocess.Popen[str]] = {}
    try:
        spec_path = tmp / "cluster.yaml"
        spec_path.write_text(yaml.safe_dump(_spec(net, secret_file)))
        # Nodes first: they keep retrying registration until the router answers (any start order works).
        for host in ("decode", "prefill", "router"):
            log = tmp / f"{host}.log"
            argv = net.exec_argv(host, [sys.executable, "-m", "pdserve.cli", "host", "--spec", str(spec_path),
                                        "--host", host])
            launchers[host] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        for host, proc in launchers.items():
            _wait_up(host, proc, tmp / f"{host}.log")
        yield MultiHost(net, spec_path, launchers)
    finally:
        for proc in launchers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        net.close()
    assert net.leftovers() == []


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    """The mixed engine's greedy output, without speculation."""
    return offline_reference(PROMPTS, MAX_TOKENS)


def _client(url: str, key: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url}/health never became ready")


def test_completions_across_hosts_equal_the_mixed_engine(cluster: MultiHost,
                                                         reference: dict[str, dict]) -> None:
    _wait_healthy(cluster.router_url)
    client = _client(cluster.router_url, SECRET)
    for prompt in PROMPTS:
        response = client.completions.create(model="pdserve-demo", prompt=prompt, max_tokens=MAX_TOKENS,
                                             temperature=0, logprobs=2)
        choice = response.choices[0]
        assert choice.text == reference[prompt]["text"]
        assert choice.logprobs.token_logprobs == pytest.approx(reference[prompt]["logprobs"], abs=LOGPROB_TOL)
        assert response.usage.completion_tokens == len(reference[prompt]["token_ids"])
    with pytest.raises(AuthenticationError):
        _client(cluster.router_url, "wrong").completions.create(model="pdserve-demo", prompt="x",
                                                                max_tokens=1)


def test_kv_went_over_zmq(cluster: MultiHost) -> None:
    _wait_healthy(cluster.router_url)
    _client(cluster.router_url, SECRET).completions.create(model="pdserve-demo", prompt="import os",
                                                           max_tokens=2, temperature=0)
    url = f"http://{cluster.net.addresses['prefill']}:9100/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    pattern = r'^pdserve_kv_transfer_bytes_total\{direction="out",transport="zmq"\} (\S+)$'
    sent = re.search(pattern, text, re.M)
    assert sent is not None and float(sent.group(1)) > 0, text
    assert not re.search(r'transport="shm"\} [1-9]', text)


def test_status_lists_every_node_healthy(cluster: MultiHost) -> None:
    _wait_healthy(cluster.router_url)
    result = subprocess.run([sys.executable, "-m", "pdserve.cli", "status", "--spec", str(cluster.spec_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[1]: line for line in result.stdout.splitlines()[1:]}
    assert set(rows) == {"router", "nstest-prefill-prefill-0", "nstest-decode-decode-0"}
    assert "ready" in rows["router"]
    for node in ("nstest-prefill-prefill-0", "nstest-decode-decode-0"):
        assert " SERVING " in rows[node] and " yes " in rows[node], result.stdout


def test_the_spec_pins_the_prefill_node_to_its_cpus(cluster: MultiHost) -> None:
    pids = _descendants({cluster.launchers["prefill"].pid})
    assert len(pids) >= 2, "expected the node server and its engine process"
    for pid in pids:
        allowed = re.search(r"^Cpus_allowed_list:\s*(\S+)$", Path(f"/proc/{pid}/status").read_text(), re.M)
        assert allowed.group(1) == "0", f"process {pid} may run on CPUs {allowed.group(1)}"


def test_each_host_stops_cleanly(cluster: MultiHost) -> None:
    pools_before = {p.name for p in Path("/dev/shm").glob("pdserve-kv-*")}
    node_pids = _node_pids(cluster)
    assert len(node_pids) >= 4, "expected a node server and an engine process per node"
    for host in ("prefill", "decode", "router"):  # any order: each launcher stops only its own host
        proc = cluster.launchers[host]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, f"host {host} did not stop cleanly"
    alive = [pid for pid in node_pids if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    assert alive == [], f"processes left behind: {alive}"
    pools_after = {p.name for p in Path("/dev/shm").glob("pdserve-kv-*")}
    assert not (pools_after & pools_before - _pools_of_others()), "a node left its KV pool in /dev/shm"


def _node_pids(cluster: MultiHost) -> list[int]:
    """Every descendant of the three launchers (node servers and their engine processes)."""
    return _descendants({proc.pid for proc in cluster.launchers.values()})


def _descendants(roots: set[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _pools_of_others() -> set[str]:
    """Pools some other live process maps (another test run on the machine): not ours to judge."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(re.findall(r"/dev/shm/(pdserve-kv-\S+)", maps.read_text()))
        except OSError:
            continue
    return mapped
