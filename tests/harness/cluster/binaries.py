"""The control plane's binaries: built from Go modules by tools/cluster/build.sh into the cache.

``${KIOSK_CACHE:-~/.cache/kiosk-operator}/bin/<name>-<version>``; the versions are pinned in
build.sh (single source of truth).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from .errors import ClusterError

# The harness is installed editable (tests/pyproject.toml): this is the checkout's root.
REPO_ROOT = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO_ROOT / "tools" / "cluster" / "build.sh"

K8S_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
CLUSTER_BINARIES = ("etcd",) + K8S_BINARIES + ("kwok",)
NODE_BINARIES = ("kubelet", "kube-proxy")  # the real node (harness.cluster.realnode)
ALL_BINARIES = CLUSTER_BINARIES + NODE_BINARIES + ("helm",)


def cache_dir() -> Path:
    return Path(os.environ.get("KIOSK_CACHE") or Path.home() / ".cache" / "kiosk-operator")


def state_file() -> Path:
    """Where `cluster up` records the detached cluster (see harness.cluster.cli)."""
    return cache_dir() / "cluster-state.json"


@lru_cache(maxsize=1)
def binary_versions() -> dict[str, str]:
    """name -> version, as pinned in tools/cluster/build.sh."""
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--print-versions"], check=True, capture_output=True, text=True
    ).stdout
    return dict(line.split("=", 1) for line in out.split() if "=" in line)


def binary_path(name: str) -> Path:
    """Path of a cached binary (may not exist yet; see ensure_binaries)."""
    versions = binary_versions()
    if name not in versions:
        raise KeyError(f"unknown binary {name!r}; known: {sorted(versions)}")
    return cache_dir() / "bin" / f"{name}-{versions[name]}"


def ensure_binaries(names: Iterable[str] = ALL_BINARIES) -> dict[str, Path]:
    """Build any missing binaries (runs tools/cluster/build.sh; cold: tens of minutes)."""
    names = list(names)
    missing = [n for n in names if not os.access(binary_path(n), os.X_OK)]
    if missing:
        print(f"[cluster] building missing binaries: {' '.join(missing)}", file=sys.stderr, flush=True)
        proc = subprocess.run(["bash", str(BUILD_SCRIPT), *missing])
        if proc.returncode != 0:
            raise ClusterError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}")
        still = [n for n in missing if not os.access(binary_path(n), os.X_OK)]
        if still:
            raise ClusterError(f"build finished but binaries are still missing: {still}")
    return {n: binary_path(n) for n in names}
