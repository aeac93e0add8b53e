#!/usr/bin/env bash
# Sets up .venv (deploy/setup.sh) and runs pdserve on the bundled demo model, CPU.
# With no arguments it runs the local cluster (pdserve up); any arguments go to the `pdserve` command.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
# Paddle warns on every import when ccache (a compiler cache) is missing; only the op build, which
# setup.sh has done, would use it. The filter matches that one message.
export PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:No ccache found"
if [ $# -eq 0 ]; then
    set -- up
    echo "pdserve: starting a router, 1 prefill node and 1 decode node on the bundled demo model"
fi
exec .venv/bin/pdserve "$@"
