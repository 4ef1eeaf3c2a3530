#!/usr/bin/env bash
# Build KEDA's operator and metrics adapter from the pinned wrapper module in
# this directory (through the Go module proxy) into the cache outside the repo:
#
#   ${KIOSK_CACHE:-$HOME/.cache/kiosk-operator}/bin/keda-{operator,adapter}-<version>
#
# Only `make bench` calls this (the side-by-side KEDA benchmark); `make test`
# never does: a cold build takes ~15 min and ~3 GB of memory on 2 cores.
# Idempotent (a warm run is instant); a lock of its own (flock) keeps two KEDA
# builds from running at once without holding up tools/cluster/build.sh.
#
# Usage: tools/keda/build.sh [--print-versions]
set -euo pipefail

KEDA_VERSION=v2.21.0

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${KIOSK_CACHE:-$HOME/.cache/kiosk-operator}"
BIN="$CACHE/bin"
mkdir -p "$BIN"

if [[ "${1:-}" == "--print-versions" ]]; then
  # Consumed by tests/harness/keda.py to find the cache entries.
  echo "keda-operator=$KEDA_VERSION"
  echo "keda-adapter=$KEDA_VERSION"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  export PATH="$PATH:/usr/local/go/bin"
fi
command -v go >/dev/null || { echo "keda/build.sh: go not found (need Go >= 1.26)" >&2; exit 1; }

export CGO_ENABLED=0
export GOTOOLCHAIN=local
export GOFLAGS="-buildvcs=false"

exec 9>"$CACHE/keda-build.lock"
if ! flock -n 9; then
  echo "keda/build.sh: another build holds $CACHE/keda-build.lock; waiting..."
  flock 9
fi

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

LDX="-X github.com/kedacore/keda/v2/version.Version=${KEDA_VERSION#v} -X github.com/kedacore/keda/v2/version.GitCommit=$KEDA_VERSION"

build() {  # build <cmd> <name>
  local out="$BIN/$2-$KEDA_VERSION"
  if [[ -x "$out" ]]; then log "$2 $KEDA_VERSION: cached ($out)"; return 0; fi
  log "$2 $KEDA_VERSION: building github.com/kedacore/keda/v2/cmd/$1 ..."
  local t0=$SECONDS
  (cd "$HERE" && go build -trimpath -ldflags "-s -w $LDX" -o "$out.tmp.$$" "github.com/kedacore/keda/v2/cmd/$1")
  mv -f "$out.tmp.$$" "$out"
  log "$2 $KEDA_VERSION: done in $((SECONDS - t0))s -> $out"
}

build operator keda-operator
build adapter keda-adapter
