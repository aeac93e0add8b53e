#!/usr/bin/env bash
# Sets up .venv with the test extras (deploy/setup.sh --test) and runs the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh --test
# Two cores: each test process gets one thread; integration tests size their own processes.
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q "$@"
