#!/usr/bin/env bash
# Build the local test-cluster binaries from Go modules (through the Go module
# proxy) into a cache outside the repo:
#
#   ${KIOSK_CACHE:-$HOME/.cache/kiosk-operator}/bin/<name>-<version>
#
# Idempotent: binaries that already exist are skipped, so a warm run takes
# well under a second. A lock (flock) keeps two builds from running at once.
#
# Usage: tools/cluster/build.sh [name ...]   (default: all)
#   names: etcd kube-apiserver kube-controller-manager kube-scheduler kubectl
#          kubelet kube-proxy kwok helm
set -euo pipefail

K8S_VERSION=v1.35.4
ETCD_VERSION=v3.6.6
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0
# The Kubernetes version helm assumes without a cluster (`helm template`, `helm lint`): helm's own
# release build sets it from its k8s.io/client-go module (v0.37 -> 1.37); a plain `go install`
# would leave helm's fallback, 1.20, which our chart's kubeVersion (>= 1.25) refuses.
HELM_KUBE_MINOR=37
HELM_TAG="$HELM_VERSION-k8s1.$HELM_KUBE_MINOR"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${KIOSK_CACHE:-$HOME/.cache/kiosk-operator}"
BIN="$CACHE/bin"
mkdir -p "$BIN"

if [[ "${1:-}" == "--print-versions" ]]; then
  # Consumed by tests/harness/cluster/binaries.py (binary_path) to find cache entries.
  echo "etcd=$ETCD_VERSION"
  for n in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
    echo "$n=$K8S_VERSION"
  done
  echo "kwok=$KWOK_VERSION"
  echo "helm=$HELM_TAG"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  export PATH="$PATH:/usr/local/go/bin"
fi
command -v go >/dev/null || { echo "build.sh: go not found (need Go >= 1.26)" >&2; exit 1; }

export CGO_ENABLED=0
export GOTOOLCHAIN=local
export GOFLAGS="-buildvcs=false"

# Serialise builds (a second caller waits, then finds everything built).
exec 9>"$CACHE/build.lock"
if ! flock -n 9; then
  echo "build.sh: another build holds $CACHE/build.lock; waiting..."
  flock 9
fi

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

want() {  # want <name>: true if <name> was requested (or nothing was)
  [[ ${#REQUESTED[@]} -eq 0 ]] && return 0
  local n; for n in "${REQUESTED[@]}"; do [[ "$n" == "$1" ]] && return 0; done
  return 1
}
REQUESTED=("$@")

# build_in_module <module-dir> <package> <name> <version> <ldflags...>
build_in_module() {
  local dir=$1 pkg=$2 name=$3 version=$4 ldx=$5
  local out="$BIN/$name-$version"
  if [[ -x "$out" ]]; then log "$name $version: cached ($out)"; return 0; fi
  want "$name" || return 0
  log "$name $version: building $pkg ..."
  local t0=$SECONDS
  (cd "$dir" && go build -trimpath -ldflags "-s -w $ldx" -o "$out.tmp.$$" "$pkg")
  mv -f "$out.tmp.$$" "$out"
  log "$name $version: done in $((SECONDS - t0))s -> $out"
}

# go_install <module-pkg> <name> <version> <ldflags> [cache tag, default: version]
go_install() {
  local pkg=$1 name=$2 version=$3 ldx=$4 tag=${5:-$3}
  local out="$BIN/$name-$tag"
  if [[ -x "$out" ]]; then log "$name $version: cached ($out)"; return 0; fi
  want "$name" || return 0
  log "$name $version: go install $pkg@$version ..."
  local t0=$SECONDS tmp
  tmp="$(mktemp -d "$BIN/.gobin.XXXXXX")"
  GOBIN="$tmp" go install -trimpath -ldflags "-s -w $ldx" "$pkg@$version"
  mv -f "$tmp/$(basename "$pkg")" "$out"
  rmdir "$tmp"
  log "$name $version: done in $((SECONDS - t0))s -> $out"
}

T0=$SECONDS
log "cache: $BIN  (go: $(go version | awk '{print $3}'))"

build_in_module "$HERE/etcd" . etcd "$ETCD_VERSION" ""

k8s_major=${K8S_VERSION#v}; k8s_major=${k8s_major%%.*}
k8s_minor=${K8S_VERSION#v*.}; k8s_minor=${k8s_minor%%.*}
K8S_LDX=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  K8S_LDX+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=$k8s_major -X $p.gitMinor=$k8s_minor"
  K8S_LDX+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
for name in kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet kube-proxy; do
  build_in_module "$HERE/k8s" "k8s.io/kubernetes/cmd/$name" "$name" "$K8S_VERSION" "$K8S_LDX"
done

go_install sigs.k8s.io/kwok/cmd/kwok kwok "$KWOK_VERSION" \
  "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
HELM_LDX="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  HELM_LDX+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$HELM_KUBE_MINOR"
done
go_install helm.sh/helm/v3/cmd/helm helm "$HELM_VERSION" "$HELM_LDX" "$HELM_TAG"

log "all binaries ready in $((SECONDS - T0))s"
