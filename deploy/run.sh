#!/usr/bin/env bash
# Sets up .venv (deploy/setup.sh) and runs pdserve on the bundled demo model, CPU.
# With no arguments it runs the local cluster (pdserve up); any arguments go to the `pdserve` command.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
if [ $# -eq 0 ]; then
    set -- up
fi
exec .venv/bin/pdserve "$@"
