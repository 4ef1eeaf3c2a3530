"""ConsumerPools from the Kubernetes API, when a kubeconfig is at hand (optional)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kiosk_protocol.crd import GROUP, PLURAL, VERSION


@dataclass(frozen=True)
class PoolRow:
    name: str
    queues: str
    mode: str
    desired: str
    workers: str
    pending: str
    in_flight: str
    ready: str


def pool_row(obj: Mapping[str, Any]) -> PoolRow:
    """One table row from a ConsumerPool object (tolerates missing status: not reconciled yet)."""
    meta = obj.get("metadata", {})
    spec = obj.get("spec", {}) or {}
    status = obj.get("status", {}) or {}
    queues = spec.get("queues") or spec.get("queue") or []
    if isinstance(queues, str):
        queues = [queues]
    scaling = spec.get("scaling", {}) or {}
    conditions = status.get("conditions", []) or []
    ready = next((c.get("status", "") for c in conditions if c.get("type") == "Ready"), "")

    def field(*names: str) -> str:
        for name in names:
            if status.get(name) is not None:
                return str(status[name])
        return "-"

    return PoolRow(
        name=f"{meta.get('namespace', '')}/{meta.get('name', '')}",
        queues=",".join(str(q) for q in queues),
        mode=str(scaling.get("mode", spec.get("mode", "")) or ""),
        desired=field("desired", "desiredWorkers"),
        workers=field("workers", "replicas"),
        pending=field("pending"),
        in_flight=field("inFlight", "in_flight"),
        ready=ready or "-",
    )


#: Where a pod finds its own namespace (in-cluster configuration).
_SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def context_namespace(config: Any, context: str | None = None) -> str:
    """The namespace of the kubeconfig context (the active one unless named), else ``default``."""
    try:
        contexts, active = config.list_kube_config_contexts()
    except Exception:  # noqa: BLE001 - no kubeconfig: in-cluster, or nothing
        try:
            with open(_SA_NAMESPACE, encoding="utf-8") as fh:
                return fh.read().strip() or "default"
        except OSError:
            return "default"
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"


def list_pools(
    namespace: str | None = None, context: str | None = None, all_namespaces: bool = False, timeout: float = 5.0
) -> tuple[tuple[PoolRow, ...] | None, str]:
    """(rows, note): rows is None when Kubernetes is not available, note says why.

    Pools of one namespace (``namespace``, else the kubeconfig context's, like kubectl), or of
    all namespaces with ``all_namespaces`` (needs a ClusterRole).
    """
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError:
        return None, "kubernetes package not installed"
    try:
        try:
            config.load_kube_config(context=context)
        except (ConfigException, FileNotFoundError, TypeError):
            if context:
                return None, f"no kubeconfig context {context!r}"
            config.load_incluster_config()
    except Exception:  # noqa: BLE001 - no cluster configured is a normal case
        return None, "no kubeconfig"
    ns = "" if all_namespaces else namespace or context_namespace(config, context)
    where = f"namespace {ns}" if ns else "all namespaces"
    try:
        api = client.CustomObjectsApi()
        if not ns:
            found = api.list_cluster_custom_object(GROUP, VERSION, PLURAL, _request_timeout=timeout)
        else:
            found = api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, _request_timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - an unreachable cluster must not break `kiosk status`
        status = getattr(exc, "status", None)
        if status == 404:
            return None, "ConsumerPool CRD not installed"
        if status == 403:
            return None, f"not allowed to list ConsumerPools in {where}"
        return None, f"Kubernetes API unreachable: {type(exc).__name__}"
    rows = tuple(pool_row(item) for item in found.get("items", []))
    return tuple(sorted(rows, key=lambda r: r.name)), ""


def pool_queues(rows: tuple[PoolRow, ...] | None) -> list[str]:
    return [q for row in rows or () for q in row.queues.split(",") if q]
