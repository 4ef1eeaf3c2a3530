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


def excluded_namespaces(own: str | None) -> tuple[str, ...]:
    """Namespaces a cluster-wide operator refuses to act in: the system ones and its own.

    A pool there could otherwise make the operator act with its cluster-wide rights in
    kube-system (the admission policy refuses such pools too). kopf still watches every
    namespace (its namespace globs need cluster scanning, which is off), so the exclusion is
    the operator's own check: such a pool gets a PolicyViolation condition and nothing else.
    """
    from kiosk_operator.policy import SYSTEM_NAMESPACES

    return (*SYSTEM_NAMESPACES, *([own] if own else []))


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
    scope.add_argument(
        "--all-namespaces",
        "-A",
        action="store_true",
        help="watch every namespace except kube-system, kube-public, kube-node-lease and the operator's own",
    )
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

    from kiosk_operator import handlers, metrics, policy  # noqa: F401  (registers the handlers)

    try:
        admin_policy = policy.current()
    except ValueError as exc:  # json.JSONDecodeError too
        print(f"kiosk-operator: {policy.POLICY_ENV}: {exc}", file=sys.stderr)
        return 2
    if args.all_namespaces:
        scope: dict = {"clusterwide": True}
        policy.exclude_namespaces(excluded_namespaces(own_namespace()))
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
    log = logging.getLogger("kiosk_operator")
    if args.all_namespaces:
        log.info("watching all namespaces but %s", ", ".join(policy.excluded_namespaces()))
    else:
        log.info("watching %s", ", ".join(scope["namespaces"]))
    if not admin_policy.configured:
        log.warning("no admin policy (%s): pool pod fields are not restricted", policy.POLICY_ENV)
    kopf.run(standalone=True, liveness_endpoint=args.liveness or None, **scope)
    return 0


if __name__ == "__main__":
    sys.exit(main())
