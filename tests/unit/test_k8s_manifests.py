"""The Kubernetes manifests (deploy/k8s): every overlay renders with `kubectl kustomize`, every object
validates against the Kubernetes schema (strict: an unknown field fails), and the objects say what
the deployment needs: probes on the health endpoints, resource requests, a grace period, the
cluster secret from the Secret, the speculative config from the ConfigMap, GPUs only in the GPU overlay.
overlays/cpu-podman is what deploy/container/kube-play.sh plays.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "cpu-podman")
KUBERNETES_VERSION = "1.30.0"  # the oldest version pdserve's manifests target (gRPC probes are GA since 1.27)


def _render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the manifests (the project's machines ship it)"
    result = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, _render(request.param)


def _by(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def test_every_object_validates_against_the_schema(rendered: tuple[str, list[dict]]) -> None:
    overlay, objects = rendered
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "Deployment", "Deployment", "Secret",
                     "Service", "Service"], kinds
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_a_broken_object(rendered: tuple[str, list[dict]]) -> None:
    broken = json.loads(json.dumps(_by(rendered[1], "Deployment", "pdserve-decode")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_nodes_have_probes_requests_and_a_grace_period(rendered: tuple[str, list[dict]]) -> None:
    overlay, objects = rendered
    for role in ("prefill", "decode"):
        deployment = _by(objects, "Deployment", f"pdserve-{role}")
        pod = deployment["spec"]["template"]["spec"]
        node = pod["containers"][0]
        script = node["args"][0]
        assert node["command"] == ["/bin/sh", "-c"] and script.startswith(f"exec pdserve {role} ")
        assert node["readinessProbe"]["grpc"]["port"] == 7001  # the node's standard gRPC health service
        assert node["startupProbe"]["grpc"]["port"] == 7001
        assert node["livenessProbe"]["tcpSocket"]["port"] == 7001
        assert {"cpu", "memory"} <= set(node["resources"]["requests"])
        assert pod["terminationGracePeriodSeconds"] == 30
        env = {e["name"]: e for e in node["env"]}
        assert env["SPECULATIVE_CONFIG"]["valueFrom"]["configMapKeyRef"]["name"] == "pdserve-config"
        assert '--speculative-config "$SPECULATIVE_CONFIG"' in script
        assert '--host "${POD_IP:-$(hostname -i)}"' in script
        assert "--cluster-secret-env CLUSTER_SECRET" in script  # the name, never the value
        assert env["CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "pdserve-cluster-secret"
        if overlay != "cpu-podman":  # podman offers no status.podIP: the hostname's address stands in
            assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            assert {"name": "dshm", "mountPath": "/dev/shm"} in node["volumeMounts"]
        gpus = node["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert gpus == (1 if overlay == "gpu" else None)
    router = _by(objects, "Deployment", "pdserve-router")["spec"]["template"]["spec"]["containers"][0]
    assert router["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "--api-key-is-cluster-secret" in router["args"][0]
    assert "--cluster-secret-env CLUSTER_SECRET" in router["args"][0]
    secret_env = next(e for e in router["env"] if e["name"] == "CLUSTER_SECRET")
    assert secret_env["valueFrom"]["secretKeyRef"]["name"] == "pdserve-cluster-secret"
    config = _by(objects, "ConfigMap", "pdserve-config")["data"]
    assert json.loads(config["speculative-config"])["method"] == "mtp"
    redis_host = "pdserve-redis-pod-0" if overlay == "cpu-podman" else "pdserve-redis"
    assert config["registry"] == f"redis://{redis_host}:6379/0"
    assert _by(objects, "Service", "pdserve-redis")["spec"]["ports"][0]["port"] == 6379


@pytest.mark.parametrize("overlay", ["cpu", "cpu-podman"])
def test_the_cpu_overlays_run_the_local_image(overlay: str) -> None:
    objects = _render(overlay)
    images = {c["image"] for o in objects if o["kind"] == "Deployment"
              for c in o["spec"]["template"]["spec"]["containers"]}
    assert images == {"localhost/pdserve:cpu"}
    decode = _by(objects, "Deployment", "pdserve-decode")["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in decode["env"]}["NUM_BLOCKS"] == "256"
