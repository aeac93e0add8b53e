"""The cluster spec: the example parses, every malformed field is refused with its name, and what a
host runs (argv, placement, secret) follows the spec."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pdserve.deploy.host import node_argv, router_argv
from pdserve.deploy.spec import SpecError, load_spec, parse_spec
from pdserve.deploy.systemd import render_unit

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "cluster-spec.example.yaml"

BASE = {
    "name": "t",
    "insecure": True,
    "hosts": {
        "r": {"address": "10.0.0.1", "router": {"port": 8000}},
        "p": {"address": "10.0.0.2", "nodes": [{"role": "prefill", "port": 7001, "cpus": "0-1",
                                                "devices": [0, 1], "transport": "zmq"}]},
        "d": {"address": "10.0.0.3", "nodes": [{"role": "decode", "port": 7001, "threads": 2}]},
    },
}


SECURE = {k: v for k, v in BASE.items() if k != "insecure"}


def _parse(data: dict):
    return parse_spec(data, Path("spec.yaml"))


def _with(path: str, value: object) -> dict:
    """BASE with one field set; path like 'hosts.p.nodes.0.role'."""
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[int(key)] if key.isdigit() else target[key]
    target[int(last) if last.isdigit() else last] = value
    return data


def test_the_example_spec_parses() -> None:
    spec = load_spec(EXAMPLE)
    assert [h.name for h in spec.hosts] == ["gateway", "prefill-a", "decode-a"]
    assert spec.registry_target == "http://10.0.0.1:8000"
    assert json.loads(spec.speculative_config)["method"] == "mtp"
    assert [n.node_id for n in spec.host("prefill-a").nodes] == ["demo-prefill-a-prefill-0",
                                                                 "demo-prefill-a-prefill-1"]


@pytest.mark.parametrize(("path", "value", "field"), [
    ("hosts.p.nodes.0.role", "prefil", "hosts.p.nodes[0].role"),
    ("hosts.p.nodes.0.port", 70000, "hosts.p.nodes[0].port"),
    ("hosts.p.nodes.0.cpus", "0-", "hosts.p.nodes[0].cpus"),
    ("hosts.p.nodes.0.devices", ["0"], "hosts.p.nodes[0].devices"),
    ("hosts.p.nodes.0.threads", 0, "hosts.p.nodes[0].threads"),
    ("hosts.p.nodes.0.transport", "rdma", "hosts.p.nodes[0].transport"),
    ("hosts.p.nodes.0.colour", "red", "hosts.p.nodes[0].colour"),
    ("hosts.d.nodes.0.port", None, "hosts.d.nodes[0].port"),
    ("hosts.r.address", "", "hosts.r.address"),
    ("hosts.r.router.port", "8000", "hosts.r.router.port"),
    ("registry", "etcd://x", "registry"),
    ("secret", {"file": "/a", "env": "B"}, "secret"),
    ("speculative_config", {"method": "eagle", "num_speculative_tokens": 1}, "speculative_config"),
    ("drain_timeout_s", -1, "drain_timeout_s"),
    ("engine_stall_timeout_s", 1, "engine_stall_timeout_s"),
    ("engine_stall_timeout_s", "30", "engine_stall_timeout_s"),
    ("replicas", 3, "replicas"),
])
def test_a_malformed_field_is_refused_by_name(path: str, value: object, field: str) -> None:
    with pytest.raises(SpecError, match=re.escape(f"spec.yaml: {field}: ")):
        _parse(_with(path, value))


@pytest.mark.parametrize(("change", "message"), [
    ({"hosts": {"p": BASE["hosts"]["p"], "d": BASE["hosts"]["d"]}}, "no host runs a router"),
    ({"hosts": {**BASE["hosts"], "r2": {"address": "10.0.0.4", "router": {"port": 8000}}}},
     "embedded registry lives in one router"),
    ({"hosts": {"r": BASE["hosts"]["r"], "d": BASE["hosts"]["d"]}}, "decode nodes need at least one prefill"),
    ({"hosts": {**BASE["hosts"], "d": {"address": "10.0.0.3", "nodes": [
        {"role": "decode", "port": 7001}, {"role": "decode", "port": 7001}]}}}, "port 7001 on 10.0.0.3"),
])
def test_cluster_wide_constraints(change: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _parse({**BASE, **change})


def test_a_bad_file_names_itself(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("hosts: [unclosed")
    with pytest.raises(SpecError, match=f"{bad}: not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")


def test_the_secret_comes_from_its_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret"
    secret.write_text("k1\n")
    assert _parse({**SECURE, "secret": {"file": str(secret)}}).read_secret() == "k1"
    monkeypatch.setenv("PDS_TEST_SECRET", "k2")
    assert _parse({**SECURE, "secret": {"env": "PDS_TEST_SECRET"}}).read_secret() == "k2"
    monkeypatch.delenv("PDS_TEST_SECRET")
    with pytest.raises(SpecError, match="PDS_TEST_SECRET is empty or unset"):
        _parse({**SECURE, "secret": {"env": "PDS_TEST_SECRET"}}).read_secret()
    with pytest.raises(SpecError, match="secret.file: cannot read"):
        _parse({**SECURE, "secret": {"file": str(tmp_path / "none")}}).read_secret()
    assert _parse(BASE).read_secret() is None  # insecure: true


def test_argv_follows_the_spec() -> None:
    spec = _parse(BASE)
    router = router_argv(spec, spec.host("r"), "key")
    assert router[router.index("--host") + 1] == "10.0.0.1" and "--api-key-is-cluster-secret" in router
    assert "key" not in router  # the secret's value never reaches a command line
    prefill = node_argv(spec, spec.host("p"), spec.host("p").nodes[0], "key")
    assert prefill[:4] == ["env", "CUDA_VISIBLE_DEVICES=0,1", "taskset", "--cpu-list"] and prefill[4] == "0-1"
    assert prefill[prefill.index("--registry") + 1] == "http://10.0.0.1:8000"
    assert "--registry-api-key-is-cluster-secret" in prefill and "key" not in prefill
    assert prefill[prefill.index("--transport") + 1] == "zmq"
    assert prefill[prefill.index("--node-id") + 1] == "t-p-prefill-0"
    decode = node_argv(spec, spec.host("d"), spec.host("d").nodes[0], None)
    assert decode[0].endswith("python") or "python" in Path(decode[0]).name
    assert decode[decode.index("--threads") + 1] == "2"
    assert decode[decode.index("--engine-stall-timeout") + 1] == "30.0"
    slow = _parse({**BASE, "engine_stall_timeout_s": 90})
    slow_decode = node_argv(slow, slow.host("d"), slow.host("d").nodes[0], None)
    assert slow_decode[slow_decode.index("--engine-stall-timeout") + 1] == "90.0"
    assert "--registry-api-key-is-cluster-secret" not in decode
    redis = _parse({**BASE, "registry": "redis://10.0.0.9:6379/0"})
    argv = node_argv(redis, redis.host("d"), redis.host("d").nodes[0], "key")
    assert argv[argv.index("--registry") + 1] == "redis://10.0.0.9:6379/0"
    assert "--registry-api-key-is-cluster-secret" not in argv


def test_taskset_accepts_the_cpu_list() -> None:
    """The placement wrapper the launcher uses runs here with a spec-style CPU list."""
    assert subprocess.run(["taskset", "--cpu-list", "0", "true"]).returncode == 0


def test_the_systemd_unit_runs_the_host_launcher(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "drain_timeout_s": 15}))
    unit = render_unit(load_spec(path), "p", python="/opt/pdserve/bin/python")
    assert f"ExecStart=/opt/pdserve/bin/python -m pdserve.cli host --spec {path} --host p" in unit
    assert "TimeoutStopSec=40" in unit and "KillMode=mixed" in unit
    if shutil.which("systemd-analyze"):
        unit_file = tmp_path / "pdserve-t-p.service"
        unit_file.write_text(unit.replace("/opt/pdserve/bin/python", shutil.which("python3")))
        result = subprocess.run(["systemd-analyze", "verify", str(unit_file)], capture_output=True, text=True)
        assert str(unit_file) not in result.stderr, result.stderr  # verify names the file in each complaint


def test_children_get_the_secret_by_file_or_variable_name_never_by_value(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("a-cluster-secret-of-enough-length\n")
    by_file = _parse({**SECURE, "secret": {"file": str(secret)}})
    by_env = _parse({**SECURE, "secret": {"env": "PDS_SECRET"}})
    for spec, flag, value in [(by_file, "--cluster-secret-file", str(secret)),
                              (by_env, "--cluster-secret-env", "PDS_SECRET")]:
        for argv in (router_argv(spec, spec.host("r"), None),
                     node_argv(spec, spec.host("d"), spec.host("d").nodes[0], None)):
            assert argv[argv.index(flag) + 1] == value
            assert not any("a-cluster-secret" in arg for arg in argv)
    with pytest.raises(SpecError, match="secret: required"):
        _parse(SECURE)  # on by default: a spec must name a secret or opt out
    with pytest.raises(SpecError, match="insecure"):
        _parse({**BASE, "secret": {"file": str(secret)}})
    no_secret = _parse(BASE)  # the operator's choice, spelled out on every child
    assert "--insecure" in router_argv(no_secret, no_secret.host("r"), None)
    assert "--insecure" in node_argv(no_secret, no_secret.host("d"), no_secret.host("d").nodes[0], None)


def test_up_passes_the_engine_stall_timeout_to_every_node() -> None:
    from pdserve.deploy.cluster import Cluster, ClusterSpec

    argv = Cluster(ClusterSpec(insecure=True, engine_stall_timeout_s=12.5)).node_argv("decode", 0)
    assert argv[argv.index("--engine-stall-timeout") + 1] == "12.5"
    with pytest.raises(ValueError, match="engine_stall_timeout_s"):
        ClusterSpec(insecure=True, engine_stall_timeout_s=1.0)  # the engine reports only every second
