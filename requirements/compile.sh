#!/usr/bin/env bash
# Regenerate requirements/lock.txt from pyproject.toml: every extra, every transitive package
# pinned `==` with the hashes of all its distributions, one universal resolution for Python 3.11
# (markers say where a pin applies). uv keeps the pins already in the lock unless asked:
#   bash requirements/compile.sh                       # after editing pyproject.toml
#   bash requirements/compile.sh --upgrade-package X   # move one package
#   bash requirements/compile.sh --upgrade             # move everything within the ranges
# uv comes from the test extra (UV overrides). tests/packaging/test_lock.py checks the result.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
uv="${UV:-$root/.venv/bin/uv}"
cd "$root"
"$uv" pip compile pyproject.toml --all-extras --universal --python-version 3.11 \
    --generate-hashes --no-emit-package kiosk-operator \
    --custom-compile-command "bash requirements/compile.sh" \
    --quiet -o requirements/lock.txt "$@"
