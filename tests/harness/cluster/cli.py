"""CLI for a detached local cluster: up | down | status | build [names...].

``python -m harness.cluster up`` (or tools/cluster/cluster.py up, or ``make cluster-up``)
starts a detached cluster, records it in ``${KIOSK_CACHE:-~/.cache/kiosk-operator}/cluster-state.json``
and prints ``export KUBECONFIG=...`` on stdout, so: eval "$(python -m harness.cluster up)".
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence

from .binaries import ALL_BINARIES, binary_path, cache_dir, ensure_binaries, state_file
from .local import LocalCluster


def _cmd_up(args: argparse.Namespace) -> int:
    sf = state_file()
    if sf.exists():
        try:
            existing = LocalCluster.from_state()
            if existing.alive():
                print(f"# cluster already running (state {sf})", file=sys.stderr)
                print(f"export KUBECONFIG={existing.kubeconfig}")
                return 0
        except (OSError, ValueError, KeyError):
            pass
        _cmd_down(args, quiet=True)
    workdir = cache_dir() / "cluster"
    if workdir.exists():
        shutil.rmtree(workdir)
    c = LocalCluster(nodes=args.nodes, job_pod_duration=args.job_pod_duration, workdir=workdir,
                     keep_workdir=True, detached=True, real_node=args.real_node)
    t0 = time.monotonic()
    c.start()
    sf.parent.mkdir(parents=True, exist_ok=True)
    sf.write_text(json.dumps(c.state(), indent=2) + "\n")
    real = " and the real node" if c.real_node is not None else ""
    print(f"# cluster up in {time.monotonic() - t0:.1f}s: {c.server}, {args.nodes} kwok nodes{real}, "
          f"logs in {c.log_dir}, state {sf}", file=sys.stderr)
    print(f"export KUBECONFIG={c.kubeconfig}")
    return 0


def _cmd_down(args: argparse.Namespace, quiet: bool = False) -> int:
    sf = state_file()
    if not sf.exists():
        if not quiet:
            print("# no cluster state; nothing to stop", file=sys.stderr)
        return 0
    c = LocalCluster.from_state(json.loads(sf.read_text()), owned=True)
    c.keep_workdir = False
    c.stop()
    sf.unlink()
    if not quiet:
        print("# cluster stopped", file=sys.stderr)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    sf = state_file()
    if not sf.exists():
        print("down")
        return 1
    c = LocalCluster.from_state()
    for p in c.procs + (c.real_node.procs if c.real_node is not None else []):
        print(f"{p.name:<25} pid {p.pid:<8} {'running' if p.alive() else 'DEAD'}  log {p.log}")
    print(f"export KUBECONFIG={c.kubeconfig}")
    return 0 if c.alive() else 1


def _cmd_build(args: argparse.Namespace) -> int:
    ensure_binaries(args.names or ALL_BINARIES)
    for n in args.names or ALL_BINARIES:
        print(binary_path(n))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.cluster", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a detached cluster; prints export KUBECONFIG=...")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--job-pod-duration", type=float, default=1.0, help="seconds before Job pods succeed")
    up.add_argument("--real-node", action="store_true",
                    help="also start the real kubelet + containerd node (harness.cluster.realnode)")
    sub.add_parser("down", help="stop the detached cluster")
    sub.add_parser("status", help="show the detached cluster's processes")
    b = sub.add_parser("build", help="build missing binaries and print their paths")
    b.add_argument("names", nargs="*")
    args = ap.parse_args(argv)
    return {"up": _cmd_up, "down": _cmd_down, "status": _cmd_status, "build": _cmd_build}[args.cmd](args)
