#!/usr/bin/env bash
# Runs the rendered CPU overlay (deploy/k8s/overlays/cpu, as overlays/cpu-podman adapts it) with
# `podman kube play` on the image built by build-image.sh, waits until the router serves a
# completion, prints the time that took, and removes the pods, the secret and the network again
# (also on failure).
#   deploy/container/kube-play.sh            (needs root, podman, kubectl; under a minute)
set -euo pipefail
cd "$(dirname "$0")/../.."
network="pdserve-demo"
key="pdserve-demo-secret"  # the overlay's demo Secret
say() { echo "pdserve kube play: $*"; }

work="$(mktemp -d)"
manifest="$work/pdserve-cpu.yaml"
kubectl kustomize deploy/k8s/overlays/cpu-podman > "$work/rendered.yaml"
# Podman 4.3 stores a Secret of the manifest as YAML but reads a secretKeyRef from a podman secret
# holding the Secret's data as JSON ({key: base64}): that is made here, everything else goes to kube play.
python="${PYTHON:-.venv/bin/python}"
"$python" - "$work/rendered.yaml" "$manifest" "$work/secret.json" <<'PY'
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
secrets = [d for d in docs if d["kind"] == "Secret"]
assert len(secrets) == 1, f"expected one Secret, got {len(secrets)}"
json.dump(secrets[0]["data"], open(sys.argv[3], "w"))
yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"], open(sys.argv[2], "w"))
PY

# netavark leaves its nftables tables behind when the last network goes: the ones this run brought
# are removed again once no container is left.
tables_before="$(nft list tables 2>/dev/null || true)"
cleanup() {
    podman kube down "$manifest" >/dev/null 2>&1 || true
    podman secret rm pdserve-cluster-secret >/dev/null 2>&1 || true
    podman network rm -f "$network" >/dev/null 2>&1 || true
    if [ -z "$(podman ps -aq 2>/dev/null)" ]; then
        for table in "ip nat" "ip filter"; do
            if ! grep -qx "table $table" <<<"$tables_before" && nft list tables 2>/dev/null | grep -qx "table $table"; then
                # shellcheck disable=SC2086 # "ip nat" is two words of the command
                nft delete table $table
            fi
        done
    fi
    rm -rf "$work"
}
trap cleanup EXIT

podman image exists localhost/pdserve:cpu || { echo "no localhost/pdserve:cpu: run deploy/container/build-image.sh" >&2; exit 1; }
podman network exists "$network" || podman network create "$network" >/dev/null
podman secret rm pdserve-cluster-secret >/dev/null 2>&1 || true
podman secret create pdserve-cluster-secret "$work/secret.json" >/dev/null
start=$(date +%s.%N)
say "podman kube play $manifest"
# Without systemd podman cannot run the probes' health checks; it says so on every pod: filtered.
podman kube play --network "$network" "$manifest" >"$work/play.log" 2>&1 || { cat "$work/play.log" >&2; exit 1; }
grep -v -e "systemd connection" -e "syslog" "$work/play.log" || true

router_ip=""
deadline=$(( $(date +%s) + 600 ))
while [ -z "$router_ip" ] && [ "$(date +%s)" -lt "$deadline" ]; do
    router_ip="$(podman inspect --format "{{(index .NetworkSettings.Networks \"$network\").IPAddress}}" \
                 pdserve-router-pod-0-router 2>/dev/null || true)"
    [ -n "$router_ip" ] || sleep 1
done
[ -n "$router_ip" ] || { echo "the router container never got an address" >&2; exit 1; }
say "router at http://$router_ip:8000; waiting for a completion"
body='{"model": "pdserve-demo", "prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0}'
while [ "$(date +%s)" -lt "$deadline" ]; do
    if reply="$(curl -sf --max-time 30 -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
                -d "$body" "http://$router_ip:8000/v1/completions")"; then
        elapsed=$(echo "$(date +%s.%N) - $start" | bc)
        say "first completion after ${elapsed%.*} s: $reply"
        podman pod ps --filter name=pdserve --format '{{.Name}} {{.Status}}'
        exit 0
    fi
    sleep 2
done
echo "no completion within 600 s; the pods' logs:" >&2
for container in pdserve-redis-pod-0-redis pdserve-router-pod-0-router pdserve-prefill-pod-0-node \
                 pdserve-decode-pod-0-node; do
    echo "--- $container" >&2
    podman logs --tail 20 "$container" >&2 || true
done
exit 1
