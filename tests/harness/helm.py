"""The harness's helm binary (built by tools/cluster/build.sh), run with a throwaway home."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from harness.cluster import binary_path


def helm(*args: str, kubeconfig: Path | None = None, check: bool = True,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The harness's helm binary with a throwaway home (no repository config of the machine)."""
    home = Path("/tmp/kiosk-helm")
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}
    if kubeconfig:
        env["KUBECONFIG"] = str(kubeconfig)
    proc = subprocess.run([str(binary_path("helm")), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc
