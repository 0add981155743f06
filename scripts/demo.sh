#!/usr/bin/env bash
# Set up (idempotent), build the tiny model, start workers with
# --cache-backend tokenlake, send shared-prefix requests and show the pool at work.
# Extra arguments go to `python -m sglang_tokenlake.demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${TOKENLAKE_VENV:-.venv}"
exec "$VENV/bin/python" -m sglang_tokenlake.demo "$@"
