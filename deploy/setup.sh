#!/usr/bin/env bash
# Creates .venv in the repository and installs pdserve into it (editable).
#   deploy/setup.sh          runtime dependencies (paddlepaddle CPU wheel by default)
#   deploy/setup.sh --test   plus the test extras and the system packages the tests use
# Idempotent: a stamp of pyproject.toml skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [ "${1:-}" = "--test" ]; then
    extras="[test]"
    if ! command -v redis-server >/dev/null 2>&1; then
        echo "installing redis-server (registry tests run a real one)"
        if [ "$(id -u)" = 0 ]; then sudo_cmd=""; else sudo_cmd="sudo"; fi
        $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq redis-server >/dev/null
    fi
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $($python --version)"
    "$python" -m venv .venv
fi

stamp=".venv/.pdserve-installed${extras}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing pdserve${extras} into .venv (first run downloads paddlepaddle${extras:+ and torch})"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".${extras}"
    echo "$want" > "$stamp"
fi

# pdserve's CPU ops (kernels/csrc) are compiled once per machine into ~/.cache/pdserve/ops; doing
# it here keeps the ~20 s build out of the first engine start. A failure only means Paddle's ops.
OMP_NUM_THREADS=1 .venv/bin/python -m pdserve.kernels.cpu_ops || echo "pdserve CPU ops not built; Paddle's own ops will run"
