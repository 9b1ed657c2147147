#!/usr/bin/env bash
# The whole test suite on this machine's CPU (the full quickstart demo is `-m slow`, not included).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
exec python -m pytest -m "not slow" "$@"
