"""The pool's worker Deployment: render it, put back the fields we own, and scale it busy-aware."""

from __future__ import annotations

import logging
from typing import Any

import kopf
from kubernetes.client.rest import ApiException

from kiosk_operator import manifests
from kiosk_operator.drift import deployment_drift
from kiosk_operator.kube import Kube
from kiosk_operator.spec import PoolSpec

log = logging.getLogger("kiosk_operator")

#: pod-deletion-cost of workers holding an item / idle ones: the ReplicaSet removes idle pods first.
BUSY_COST = 100_000
IDLE_COST = -100_000


def render_deployment(pool: dict[str, Any], spec: PoolSpec, replicas: int) -> dict[str, Any]:
    meta = pool["metadata"]
    body = manifests.build_deployment(meta["name"], meta["namespace"], spec, replicas)
    kopf.adopt(body, owner=pool)
    return body


def ensure_deployment(
    kube: Kube, pool: dict[str, Any], spec: PoolSpec, logger: Any = log, have: Any = ...
) -> tuple[str, dict]:
    """Create the worker Deployment, or put back every field we own; replicas are left alone.

    ``have`` is the live Deployment when the caller already has it (a watch event), else read.
    Returns (what happened: created|updated|unchanged, the live Deployment).
    """
    meta = pool["metadata"]
    ns, name = meta["namespace"], manifests.deployment_name(meta["name"])
    if have is ...:
        have = kube.get_deployment(ns, name)
    if have is None:
        status = pool.get("status") or {}
        replicas = max(
            spec.scaling.min_workers, min(int(status.get("desired") or 0), spec.scaling.max_workers)
        )
        try:
            created = kube.create_deployment(render_deployment(pool, spec, replicas))
        except ApiException as exc:
            if exc.status != 409:  # created concurrently (create handler vs scaling loop): fine
                raise
            return "unchanged", kube.get_deployment(ns, name) or {}
        logger.info("created Deployment %s/%s with %d replicas", ns, name, replicas)
        return "created", created
    want = render_deployment(pool, spec, int(have.get("spec", {}).get("replicas") or 0))
    drift = deployment_drift(want, have)
    if not drift:
        return "unchanged", have
    want["metadata"]["resourceVersion"] = have["metadata"]["resourceVersion"]
    # Keep annotations others rely on (e.g. deployment.kubernetes.io/revision).
    want["metadata"]["annotations"] = have["metadata"].get("annotations") or {}
    updated = kube.replace_deployment(want)
    logger.info("updated Deployment %s/%s (%s)", ns, name, ", ".join(drift[:5]))
    return "updated", updated


def set_deletion_costs(kube: Kube, ns: str, pods: list[dict[str, Any]], busy: frozenset[str]) -> int:
    """Busy workers get a high pod-deletion-cost, idle ones a low one; returns pods patched."""
    patched = 0
    for pod in pods:
        meta = pod["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        cost = BUSY_COST if meta["name"] in busy else IDLE_COST
        current = (meta.get("annotations") or {}).get(manifests.DELETION_COST_ANNOTATION)
        if current != str(cost):
            kube.patch_pod(ns, meta["name"], manifests.deletion_cost_patch(cost))
            patched += 1
    return patched


def scale_deployment(kube: Kube, ns: str, pool_name: str, current: int, replicas: int, busy: frozenset[str]) -> None:
    """Scale the worker Deployment; on the way down, idle pods are marked to go first."""
    if replicas < current:
        set_deletion_costs(kube, ns, kube.list_pods(ns, manifests.label_selector(pool_name)), busy)
    if replicas != current:
        kube.scale_deployment(ns, manifests.deployment_name(pool_name), replicas)
