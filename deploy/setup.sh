#!/usr/bin/env bash
# Creates .venv in the repository and installs pdserve into it (editable).
#   deploy/setup.sh          runtime dependencies (paddlepaddle CPU wheel by default)
#   deploy/setup.sh --test   plus the test extras and the system packages the tests use
# Idempotent: a stamp of pyproject.toml skips pip when nothing changed, a stamp of the op sources
# skips the op build. It prints one line per step; the tools' own output goes to .venv/setup.log
# and is shown (its last lines) only when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "pdserve: $*"; }
log=".venv/setup.log"
# Runs a step with its output in the log; on failure shows the log's tail and stops.
quiet() {
    if ! "$@" >>"$log" 2>&1; then
        echo "pdserve: failed: $*" >&2
        tail -n 30 "$log" >&2
        echo "pdserve: the whole output is in $log" >&2
        exit 1
    fi
}

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
: >"$log"

extras=""
if [ "${1:-}" = "--test" ]; then
    extras="[test]"
    if [ "$(id -u)" = 0 ]; then sudo_cmd=""; else sudo_cmd="sudo"; fi
    # redis-server: registry tests run a real one; iproute2: the multi-host tests' network namespaces;
    # nftables: the chaos suite's partitions and packet loss (this kernel has no netem)
    missing=""
    command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
    command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
    command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing="$missing nftables"
    if [ -n "$missing" ]; then
        say "installing$missing (apt)"
        quiet $sudo_cmd apt-get update -qq
        # shellcheck disable=SC2086 # one word per package
        quiet $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
    fi
    command -v kubectl >/dev/null 2>&1 \
        || say "kubectl not found: the Kubernetes manifest test (kubectl kustomize) will fail"
fi

stamp=".venv/.pdserve-installed${extras}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing pdserve${extras} and its dependencies into .venv (the first time takes a few minutes)"
    quiet .venv/bin/python -m pip install --upgrade pip
    quiet .venv/bin/python -m pip install -e ".${extras}"
    echo "$want" > "$stamp"
fi

# pdserve's CPU ops (kernels/csrc) are compiled once per machine into ~/.cache/pdserve/ops; doing
# it here keeps the ~20 s build out of the first engine start. A failure only means Paddle's ops.
ops_stamp=".venv/.pdserve-ops"
ops_want="$(cat kernels/csrc/*.cc "$stamp" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$ops_stamp" ] || [ "$(cat "$ops_stamp")" != "$ops_want" ]; then
    say "building pdserve's CPU ops (once per machine, about 20 s)"
    if OMP_NUM_THREADS=1 .venv/bin/python -m pdserve.kernels.cpu_ops >>"$log" 2>&1; then
        echo "$ops_want" > "$ops_stamp"
    else
        say "CPU ops not built (see $log); Paddle's own ops will run"
    fi
fi
