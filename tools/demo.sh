#!/usr/bin/env bash
# `make demo`: the whole pipeline locally (no cluster, no cloud account).
# Sets up the venv and redis-server if missing, then runs tools/demo.py, which makes
# synthetic images, submits them, runs the pool in local mode (scale up, drain, back to zero)
# and prints where the results are.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import kiosk_operator, kiosk_worker, kopf, grpc, skimage, harness" 2>/dev/null; then
    echo "== setting up $VENV"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -e ".[worker,operator,cli]"
    "$VENV/bin/pip" install --quiet --no-deps -e tests  # harness.procs (stopping the demo's redis-server)
fi

if ! command -v redis-server >/dev/null 2>&1; then
    echo "== installing redis-server"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
    # Debian starts a system service on 6379; the demo uses its own port and data directory.
fi

exec "$VENV/bin/python" tools/demo.py "$@"
