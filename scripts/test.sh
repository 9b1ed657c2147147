#!/usr/bin/env bash
# The whole test suite on this machine's CPU (the full quickstart demo is `-m slow`, not included).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
# Two workers (pytest-xdist): nnU-Net's commands spend much of their time in single-threaded start-up, so a
# second worker fills the other core; tests/conftest.py keeps the tests that share fixtures on one worker.
# OpenMP threads wait passively, giving the core to the other worker instead of spinning on it.
# LKM_TEST_WORKERS=0 runs the tests in this one process.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec python -m pytest -m "not slow" -n "${LKM_TEST_WORKERS:-2}" --dist loadgroup "$@"
