#!/usr/bin/env bash
# Runs the rendered CPU overlay (deploy/k8s/overlays/cpu) with `podman kube play` on the image built by
# build-image.sh, waits until the router serves a completion, prints the time that took, and removes
# the pods, the secret and the network again (also on failure).
#   deploy/container/kube-play.sh            (needs root, podman, kubectl; about 2 minutes)
set -euo pipefail
cd "$(dirname "$0")/../.."
network="pdserve-demo"
key="pdserve-demo-secret"  # the overlay's demo Secret
say() { echo "pdserve kube play: $*"; }

work="$(mktemp -d)"
manifest="$work/pdserve-cpu.yaml"
kubectl kustomize deploy/k8s/overlays/cpu > "$manifest"

cleanup() {
    podman kube down "$manifest" >/dev/null 2>&1 || true
    podman secret rm pdserve-cluster-secret >/dev/null 2>&1 || true
    podman network rm -f "$network" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
cleanup_first() { podman kube down "$manifest" >/dev/null 2>&1 || true; }
cleanup_first

podman image exists localhost/pdserve:cpu || { echo "no localhost/pdserve:cpu: run deploy/container/build-image.sh" >&2; exit 1; }
podman network exists "$network" || podman network create "$network" >/dev/null
start=$(date +%s.%N)
say "podman kube play $manifest"
podman kube play --network "$network" "$manifest"

router_ip=""
deadline=$(( $(date +%s) + 600 ))
while [ -z "$router_ip" ] && [ "$(date +%s)" -lt "$deadline" ]; do
    router_ip="$(podman inspect --format "{{(index .NetworkSettings.Networks \"$network\").IPAddress}}" \
                 pdserve-router-pod-router 2>/dev/null || true)"
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
for pod in redis router prefill decode; do
    podman logs --tail 20 "pdserve-$pod-pod-$( [ $pod = redis ] && echo redis || { [ $pod = router ] && echo router || echo node; } )" >&2 || true
done
exit 1
