"""`kiosk-operator`: run the kopf operator (or local mode with --local)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def own_namespace() -> str | None:
    """The namespace to watch by default: POD_NAMESPACE (downward API), else the pod's SA namespace."""
    ns = os.environ.get("POD_NAMESPACE") or os.environ.get("KIOSK_NAMESPACE")
    if ns:
        return ns
    if SA_NAMESPACE_FILE.exists():
        return SA_NAMESPACE_FILE.read_text().strip() or None
    return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiosk-operator", description=__doc__)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="namespace to watch (repeatable; default: the operator's own namespace)",
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("METRICS_PORT", "8000")),
        help="Prometheus /metrics port (0 disables; default 8000)",
    )
    p.add_argument(
        "--liveness",
        default=os.environ.get("LIVENESS_ENDPOINT", ""),
        help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz",
    )
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.add_argument("--local", action="store_true", help="run pools locally as processes (no Kubernetes)")
    p.add_argument(
        "-f", "--file", dest="files", action="append", default=[], help="ConsumerPool YAML (--local)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--local" in argv:  # local mode has its own options (kiosk_operator.local)
        try:
            local = importlib.import_module("kiosk_operator.local")
        except ModuleNotFoundError:
            print("kiosk-operator: local mode is not available in this build", file=sys.stderr)
            return 2
        return int(local.main(argv) or 0)
    args = parser().parse_args(argv)

    import kopf

    from kiosk_operator import handlers, metrics  # noqa: F401  (registers the handlers)

    if args.all_namespaces:
        scope = {"clusterwide": True}
    else:
        namespaces = args.namespace or ([own_namespace()] if own_namespace() else [])
        if not namespaces:
            print(
                "kiosk-operator: no namespace to watch: pass --namespace NS or --all-namespaces "
                "(or set POD_NAMESPACE)",
                file=sys.stderr,
            )
            return 2
        scope = {"namespaces": namespaces}
    kopf.configure(
        verbose=args.verbose, log_format=kopf.LogFormat.JSON if args.log_json else kopf.LogFormat.PLAIN
    )
    try:
        metrics.serve(args.metrics_port)
    except OSError as exc:
        print(f"kiosk-operator: cannot serve metrics on port {args.metrics_port}: {exc.strerror}", file=sys.stderr)
        return 2
    logging.getLogger("kiosk_operator").info(
        "watching %s", "all namespaces" if args.all_namespaces else ", ".join(scope["namespaces"])
    )
    kopf.run(standalone=True, liveness_endpoint=args.liveness or None, **scope)
    return 0


if __name__ == "__main__":
    sys.exit(main())
