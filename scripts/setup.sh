#!/usr/bin/env bash
# Everything a fresh machine needs: a virtual environment with SGLang 0.5.23 and
# this package (editable, with test/bench extras), then the patch installer
# (SGLang version check, CPU stand-in for sgl_kernel on hosts without CUDA).
# Safe to run again. TOKENLAKE_VENV picks another environment folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TOKENLAKE_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 \
        || "$VENV/bin/python" -m pip install -q --upgrade pip
fi
echo "== installing sglang-tokenlake and its dependencies (first run: ~4 min, ~11 GB)"
# pip's and setuptools' notices go to a log that is shown only when the install fails.
LOG="$VENV/setup-pip.log"
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test,bench,dev]" \
        >"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "== pip install failed (log: $LOG)" >&2
    exit 1
fi
"$VENV/bin/tokenlake-install-patch"
