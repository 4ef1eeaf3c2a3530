#!/usr/bin/env python3
"""CLI for the local test cluster: up | down | status | build [names...].

Thin wrapper around tests/harness/cluster.py (same as `cd tests && python -m harness.cluster`).
`up` starts a detached cluster, writes ${KIOSK_CACHE:-~/.cache/kiosk-operator}/cluster-state.json
and prints `export KUBECONFIG=...` on stdout, so: eval "$(python tools/cluster/cluster.py up)".
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from harness.cluster import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
