#!/usr/bin/env python3
"""CLI for the local test cluster: up | down | status | build [names...].

Same as `python -m harness.cluster` (the harness package, tests/harness/cluster/cli.py;
installed by `make venv`). `up` starts a detached cluster, writes
${KIOSK_CACHE:-~/.cache/kiosk-operator}/cluster-state.json and prints `export KUBECONFIG=...`
on stdout, so: eval "$(python tools/cluster/cluster.py up)".
"""

import sys

from harness.cluster import main

if __name__ == "__main__":
    sys.exit(main())
