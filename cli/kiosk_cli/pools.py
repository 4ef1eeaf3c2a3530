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


def list_pools(timeout: float = 5.0) -> tuple[tuple[PoolRow, ...] | None, str]:
    """(rows, note): rows is None when Kubernetes is not available, note says why."""
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError:
        return None, "kubernetes package not installed"
    try:
        try:
            config.load_kube_config()
        except (ConfigException, FileNotFoundError, TypeError):
            config.load_incluster_config()
    except Exception:  # noqa: BLE001 - no cluster configured is a normal case
        return None, "no kubeconfig"
    try:
        api = client.CustomObjectsApi()
        found = api.list_cluster_custom_object(GROUP, VERSION, PLURAL, _request_timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - an unreachable cluster must not break `kiosk status`
        status = getattr(exc, "status", None)
        if status == 404:
            return None, "ConsumerPool CRD not installed"
        if status == 403:
            return None, "not allowed to list ConsumerPools"
        return None, f"Kubernetes API unreachable: {type(exc).__name__}"
    rows = tuple(pool_row(item) for item in found.get("items", []))
    return tuple(sorted(rows, key=lambda r: r.name)), ""


def pool_queues(rows: tuple[PoolRow, ...] | None) -> list[str]:
    return [q for row in rows or () for q in row.queues.split(",") if q]
