"""The pool's worker Deployment: render it, put back the fields we own, and scale it busy-aware.

Nothing is created or changed for a pool the admin policy refuses (``refusals``), and a
``<pool>-worker`` Deployment the pool does not own is never replaced or scaled. A refused pool's
own worker Deployment is scaled to 0 and kept (``stand_down``).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from kubernetes.client.rest import ApiException

from kiosk_operator import manifests, policy
from kiosk_operator.drift import deployment_drift
from kiosk_operator.kube import Kube
from kiosk_operator.spec import PoolSpec
from kiosk_operator.status import Event

log = logging.getLogger("kiosk_operator")

#: pod-deletion-cost of workers holding an item / idle ones: the ReplicaSet removes idle pods first.
BUSY_COST = 100_000
IDLE_COST = -100_000


class Refused(kopf.PermanentError):
    """The operator will not act for this pool: the message names the field (one line per reason)."""


def secret_refusals(kube: Kube, ns: str, spec: PoolSpec, pol: policy.Policy) -> list[str]:
    """Secrets the pool names that exist but have not opted in with policy.SECRET_LABEL.

    The operator reads spec.redis.passwordSecretRef itself: that one is checked under any
    policy. Under a configured policy the Secrets worker pods are given (credentialsSecretRef,
    tlsSecretRef) are checked too. A missing Secret is not refused here (it is SecretMissing).
    """
    names = []
    if spec.redis.password_secret_ref:
        names.append(("spec.redis.passwordSecretRef", spec.redis.password_secret_ref.name))
    if pol.configured and spec.storage.credentials_secret_ref:
        names.append(("spec.storage.credentialsSecretRef", spec.storage.credentials_secret_ref))
    if pol.configured and spec.redis.tls_secret_ref:
        names.append(("spec.redis.tlsSecretRef", spec.redis.tls_secret_ref.name))
    out = []
    for field, name in names:
        try:
            secret = kube.read_secret(ns, name)
        except LookupError:
            continue
        if not policy.secret_allowed(secret):
            out.append(f'{field}: Secret {name!r} is not labelled {policy.SECRET_LABEL}="true"')
    return out


def refusals(kube: Kube, pool: dict[str, Any], spec: PoolSpec) -> list[str]:
    """Why the operator must not act for this pool under the admin policy; [] when it may."""
    ns = pool["metadata"]["namespace"]
    if ns in policy.excluded_namespaces():
        return [f"metadata.namespace: this operator does not act in namespace {ns!r} (system or its own)"]
    pol = policy.current()
    return policy.violations(pol, spec, ns) + secret_refusals(kube, ns, spec, pol)


def stand_down(kube: Kube, pool: dict[str, Any], reason: str) -> list[Event]:
    """Scale the refused pool's own worker Deployment to 0; one Warning Event when it had replicas.

    A pool refused after its workers started (the policy was tightened, a Secret lost its label)
    must not keep running them. The Deployment is kept, not deleted, so that once the refusal is
    lifted the next cycle scales it back. A Deployment the pool does not own is never touched, nor
    anything in a namespace the operator does not act in. Called every refused cycle, so a hand
    scale-up is undone too.
    """
    meta = pool["metadata"]
    ns, name = meta["namespace"], manifests.deployment_name(meta["name"])
    if ns in policy.excluded_namespaces():
        return []
    have = kube.get_deployment(ns, name)
    if have is None or not policy.owned_by(have, pool):
        return []
    replicas = int(have.get("spec", {}).get("replicas") or 0)
    if replicas == 0:
        return []
    kube.scale_deployment(ns, name, 0)
    log.warning("pool %s/%s refused by the admin policy: Deployment %s scaled from %d to 0", ns, meta["name"], name,
                replicas)
    message = f"worker Deployment {name} scaled from {replicas} to 0 (kept) while the policy refuses the pool: {reason}"
    return [Event("Warning", "DeploymentScaledDown", message)]


def check_owned(have: dict[str, Any] | None, pool: dict[str, Any]) -> None:
    """Refused when ``have`` (the live ``<pool>-worker``) exists and the pool does not own it."""
    if have is not None and not policy.owned_by(have, pool):
        name = have["metadata"]["name"]
        raise Refused(f"Deployment {name!r} exists and is not owned by ConsumerPool {pool['metadata']['name']!r}")


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
    refused = refusals(kube, pool, spec)
    if refused:
        raise Refused("; ".join(refused))
    if have is ...:
        have = kube.get_deployment(ns, name)
    check_owned(have, pool)
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
            have = kube.get_deployment(ns, name)
            check_owned(have, pool)
            return "unchanged", have or {}
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
