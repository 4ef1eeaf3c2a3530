"""One pool's reconciliation, outside kopf: ensure its Deployment, and one scaling cycle.

A cycle measures depth, reclaims the items of gone workers (kiosk_operator.reclaim),
then scales: Deployment replicas, or worker Jobs in Job mode (kiosk_operator.jobmode).
Synchronous and explicit about its inputs (Kube, Redis clients, the pool object, the
pool's in-memory state, the clock) so that kopf handlers stay thin and other run modes
(local mode) can reuse the pieces. Decisions come from kiosk_operator.scaling.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf
import redis
from kubernetes.client.rest import ApiException

from kiosk_operator import jobmode, manifests, metrics, reclaim
from kiosk_operator.depth import HEARTBEAT_SLACK, Measurement, RedisClients, TLSMaterial, measure, tls_material
from kiosk_operator.drift import deployment_drift
from kiosk_operator.kube import Kube
from kiosk_operator.scaling import DOWN, desired_workers
from kiosk_operator.spec import PoolSpec, SpecError, parse_spec

log = logging.getLogger("kiosk_operator")

BUSY_COST = 100_000
IDLE_COST = -100_000
MAX_REDIS_BACKOFF = 30.0
#: Seconds between reclaim passes of a pool (the first pass runs at the first cycle).
RECLAIM_EVERY = 5.0


@dataclass
class PoolState:
    """What one pool's loop remembers between cycles (in memory; lastActiveTime also in status)."""

    last_active: float | None = None
    last_scale_time: str | None = None
    redis_failures: int = 0
    status: dict[str, Any] = field(default_factory=dict)
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)
    model_server_replicas: int | None = None
    mode: str | None = None
    last_reclaim: float | None = None
    reclaimed: int | None = None


@dataclass
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class CycleResult:
    interval: float
    events: list[Event] = field(default_factory=list)


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC).timestamp()
    except ValueError:
        return None


def set_condition(
    state: PoolState, ctype: str, ok: bool | None, reason: str, message: str, now: float
) -> None:
    """Update a condition; lastTransitionTime changes only when the status does."""
    status = "Unknown" if ok is None else "True" if ok else "False"
    old = state.conditions.get(ctype)
    since = old["lastTransitionTime"] if old and old["status"] == status else iso(now)
    state.conditions[ctype] = {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message[:1000],
        "lastTransitionTime": since,
    }


# --- the worker Deployment --------------------------------------------------------------------


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


# --- one scaling cycle ------------------------------------------------------------------------


def _redis_password(kube: Kube, ns: str, spec: PoolSpec) -> str:
    ref = spec.redis.password_secret_ref
    return kube.secret_value(ns, ref.name, ref.key) if ref else ""


def _redis_tls(kube: Kube, ns: str, spec: PoolSpec) -> TLSMaterial | None:
    """The CA (and client certificate) of spec.redis.tlsSecretRef; LookupError when missing."""
    ref = spec.redis.tls_secret_ref
    return tls_material(kube.read_secret(ns, ref.name), ref) if ref else None


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


def scale_model_server(
    kube: Kube, ns: str, spec: PoolSpec, active: bool, state: PoolState, events: list[Event]
) -> None:
    dep = spec.model_server.deployment
    if dep is None:
        return
    want = dep.replicas if active else 0
    if state.model_server_replicas == want:
        return  # already applied; read again only when the pool turns active or idle
    have = kube.get_deployment(ns, dep.name)
    if have is None:
        if "model-server-missing" not in state.warned:
            state.warned.add("model-server-missing")
            events.append(
                Event("Warning", "ModelServerMissing", f"model-server Deployment {dep.name} not found")
            )
        return
    state.warned.discard("model-server-missing")
    state.model_server_replicas = want
    if int(have.get("spec", {}).get("replicas") or 0) != want:
        kube.scale_deployment(ns, dep.name, want)
        events.append(
            Event("Normal", "ModelServerScaled", f"model-server Deployment {dep.name} scaled to {want}")
        )


def scaling_cycle(
    kube: Kube,
    clients: RedisClients,
    pool: dict[str, Any],
    state: PoolState,
    now: Callable[[], float] = time.time,
    logger: Any = log,
    replicas_of: Callable[[str, str], tuple[int, int] | None] | None = None,
) -> CycleResult:
    """Measure depth, decide, patch replicas/costs/model server, write status. Never raises for Redis.

    ``replicas_of(namespace, deployment)`` -> (spec replicas, pods) answers from a watch cache (None: unknown, then the
    Deployment is read from the API), so an idle cycle costs Redis round trips only.
    """
    meta = pool["metadata"]
    ns, name = meta["namespace"], meta["name"]
    started = time.perf_counter()
    labels = (ns, name)
    events: list[Event] = []
    t = now()
    try:
        spec = parse_spec(pool.get("spec"))
    except SpecError as exc:
        set_condition(state, "Ready", False, "InvalidSpec", str(exc), t)
        set_condition(state, "ScalingActive", False, "InvalidSpec", str(exc), t)
        if "invalid-spec" not in state.warned:
            state.warned.add("invalid-spec")
            events.append(Event("Warning", "InvalidSpec", str(exc)))
        write_status(kube, ns, name, state, {"observedGeneration": meta.get("generation")})
        return CycleResult(5.0, events)
    state.warned.discard("invalid-spec")
    interval = spec.scaling.polling_interval_seconds
    if state.last_active is None:
        state.last_active = parse_iso((pool.get("status") or {}).get("lastActiveTime"))

    # 1. Measure.
    try:
        password = _redis_password(kube, ns, spec)
        client = clients.get(spec.redis, password, _redis_tls(kube, ns, spec))
        ttl = spec.worker.heartbeat_interval_seconds * 3 + HEARTBEAT_SLACK
        m: Measurement = measure(client, spec.queues, t, heartbeat_ttl=ttl)
        if reclaim_step(kube, client, pool, spec, m, state, events, t, logger):
            m = measure(client, spec.queues, t, heartbeat_ttl=ttl)  # reclaimed items are pending again
    except (redis.RedisError, OSError, LookupError) as exc:
        state.redis_failures += 1
        metrics.REDIS_ERRORS.labels(*labels).inc()
        reason = "SecretMissing" if isinstance(exc, LookupError) else "RedisUnreachable"
        message = f"{reason}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        set_condition(state, "RedisReachable", False, reason, message, t)
        set_condition(state, "ScalingActive", False, reason, "keeping the current worker count", t)
        set_condition(state, "Ready", False, reason, message, t)
        if state.redis_failures == 1:
            events.append(Event("Warning", reason, message))
            logger.warning("pool %s/%s: %s", ns, name, message)
        write_status(kube, ns, name, state, {"observedGeneration": meta.get("generation")})
        backoff = min(MAX_REDIS_BACKOFF, interval * 2 ** min(state.redis_failures, 10))
        return CycleResult(backoff, events)
    if state.redis_failures:
        events.append(
            Event(
                "Normal",
                "RedisReachable",
                f"Redis reachable again after {state.redis_failures} failed attempts",
            )
        )
        state.redis_failures = 0
    set_condition(
        state, "RedisReachable", True, "Measured", f"{m.pending} pending, {m.in_flight} in flight", t
    )

    if spec.scaling.mode != "Deployment":
        # Other modes (Job) have their own cycle; it returns extra status fields.
        extra = MODE_CYCLES.get(spec.scaling.mode, _no_cycle)(kube, pool, spec, m, state, events, t)
        state.mode = spec.scaling.mode
        fields = _status_fields(m, meta, state)
        fields.update(extra or {})
        write_status(kube, ns, name, state, fields)
        metrics.RECONCILE_SECONDS.labels(*labels).observe(time.perf_counter() - started)
        return CycleResult(interval, events)
    state.mode = spec.scaling.mode

    # 2. Decide.
    dep_name = manifests.deployment_name(name)
    cached = replicas_of(ns, dep_name) if replicas_of else None
    if cached is not None:
        current, workers = cached
    else:
        dep = kube.get_deployment(ns, dep_name)
        if dep is None:
            action, dep = ensure_deployment(kube, pool, spec, logger, have=None)
            if action == "created":
                events.append(Event("Normal", "DeploymentCreated", f"worker Deployment {dep_name} created"))
        current = int(dep.get("spec", {}).get("replicas") or 0)
        workers = int((dep.get("status") or {}).get("replicas") or 0)
    service = (m.mean_service_seconds, m.service_samples) if m.mean_service_seconds else None
    decision = desired_workers(
        m.depth, current, spec.scaling, state.last_active, t, busy=len(m.busy_workers), service=service
    )
    state.last_active = decision.last_active
    replicas = decision.replicas

    # 3. Act: idle pods go first, busy ones are never the ones removed.
    if decision.direction == DOWN:
        pods = kube.list_pods(ns, manifests.label_selector(name))
        set_deletion_costs(kube, ns, pods, m.busy_workers)
        busy_pods = sum(
            1
            for p in pods
            if p["metadata"]["name"] in m.busy_workers and not p["metadata"].get("deletionTimestamp")
        )
        replicas = max(replicas, min(busy_pods, current))
    if replicas != current:
        kube.scale_deployment(ns, dep_name, replicas)
        state.last_scale_time = iso(t)
        direction = "up" if replicas > current else "down"
        metrics.SCALE_EVENTS.labels(*labels, direction).inc()
        events.append(
            Event(
                "Normal",
                "ScaledUp" if direction == "up" else "ScaledDown",
                f"workers {current} -> {replicas}: {decision.reason}",
            )
        )
        logger.info("pool %s/%s: workers %d -> %d (%s)", ns, name, current, replicas, decision.reason)
    scale_model_server(kube, ns, spec, replicas > 0, state, events)

    # 4. Report.
    metrics.QUEUE_PENDING.labels(*labels).set(m.pending)
    metrics.QUEUE_IN_FLIGHT.labels(*labels).set(m.in_flight)
    metrics.WORKERS_DESIRED.labels(*labels).set(replicas)
    metrics.WORKERS_CURRENT.labels(*labels).set(workers)
    metrics.WORKERS_BUSY.labels(*labels).set(len(m.busy_workers))
    set_condition(
        state, "ScalingActive", True, "Scaling" if replicas != current else "Stable", decision.reason, t
    )
    set_condition(state, "Ready", True, "DeploymentReady", f"worker Deployment {dep_name}", t)
    fields = _status_fields(m, meta, state)
    fields.update(workers=workers, desired=replicas, selector=manifests.label_selector(name))
    write_status(kube, ns, name, state, fields)
    metrics.RECONCILE_SECONDS.labels(*labels).observe(time.perf_counter() - started)
    return CycleResult(interval, events)


def _status_fields(m: Measurement, meta: dict[str, Any], state: PoolState) -> dict[str, Any]:
    fields = {
        "pending": m.pending,
        "inFlight": m.in_flight,
        "busy": len(m.busy_workers),
        "lastActiveTime": iso(state.last_active) if state.last_active else None,
        "observedGeneration": meta.get("generation"),
    }
    if state.reclaimed is not None:
        fields["reclaimed"] = state.reclaimed
    return fields


# --- reclaim (the Kiosk janitor, built in) ----------------------------------------------------


def reclaim_step(
    kube: Kube,
    client: redis.Redis,
    pool: dict[str, Any],
    spec: PoolSpec,
    m: Measurement,
    state: PoolState,
    events: list[Event],
    now: float,
    logger: Any = log,
) -> bool:
    """Give the items of gone workers back to their queues; True when anything moved.

    Runs every RECLAIM_EVERY seconds. A worker is gone when its heartbeat expired and its
    pod is missing or terminated (reclaim.kube_pod_alive), so a slow heartbeat alone never
    takes an item away from a live worker. Redis errors propagate (the caller's Redis path).
    """
    if not spec.reclaim.enabled:
        return False
    if state.last_reclaim is not None and now - state.last_reclaim < RECLAIM_EVERY:
        return False
    state.last_reclaim = now
    meta = pool["metadata"]
    ns, name = meta["namespace"], meta["name"]
    if state.reclaimed is None:
        state.reclaimed = int((pool.get("status") or {}).get("reclaimed") or 0)
    report = reclaim.reclaim_queues(
        client,
        spec.queues,
        reclaim.kube_pod_alive(kube.core, ns),
        ttl=spec.worker.heartbeat_interval_seconds * 3 + HEARTBEAT_SLACK,
        now=now,
        legacy=spec.reclaim.legacy_processing_lists,
        workers=m.workers,
    )
    if not report.moved:
        return False
    state.reclaimed += report.requeued
    if report.requeued:
        metrics.RECLAIMED.labels(ns, name, "requeued").inc(report.requeued)
    if report.dropped:
        metrics.RECLAIMED.labels(ns, name, "dropped").inc(report.dropped)
    gone = ", ".join(sorted(set(report.workers))[:10])
    message = (
        f"returned {report.requeued} items of gone workers ({gone}) to their queues"
        + (f"; dropped {report.dropped} already finished" if report.dropped else "")
    )
    events.append(Event("Normal", "Reclaimed", message))
    logger.info("pool %s/%s: %s", ns, name, message)
    return True


# --- Job mode ---------------------------------------------------------------------------------


def job_cycle(
    kube: Kube,
    pool: dict[str, Any],
    spec: PoolSpec,
    m: Measurement,
    state: PoolState,
    events: list[Event],
    now: float,
) -> dict[str, Any]:
    """Job mode: no worker Deployment; Jobs cover the pending items (jobmode.reconcile_jobs).

    Returns the status fields of the mode (workers, desired, activeJobs, selector).
    """
    meta = pool["metadata"]
    ns, name = meta["namespace"], meta["name"]
    labels = (ns, name)
    if state.mode != "Job":  # entering Job mode (start, or switched from Deployment mode)
        dep_name = manifests.deployment_name(name)
        dep = kube.get_deployment(ns, dep_name)
        if dep is not None and int(dep.get("spec", {}).get("replicas") or 0) > 0:
            kube.scale_deployment(ns, dep_name, 0)
            message = f"worker Deployment {dep_name} scaled to 0: the pool is in Job mode"
            events.append(Event("Normal", "DeploymentScaledDown", message))
    result = jobmode.reconcile_jobs(
        kube.batch, ns, name, spec, m.pending, owner=pool, request_timeout=kube.timeout
    )
    if m.depth > 0 or result.active > 0:
        state.last_active = now
    elif state.last_active is None:
        state.last_active = now
    if result.created:
        state.last_scale_time = iso(now)
        metrics.JOBS_CREATED.labels(*labels).inc(len(result.created))
        metrics.SCALE_EVENTS.labels(*labels, "up").inc()
        shown = ", ".join(result.created[:5]) + (", ..." if len(result.created) > 5 else "")
        events.append(
            Event(
                "Normal",
                "JobsCreated",
                f"created {len(result.created)} worker Jobs ({shown}) for {m.pending} pending items, "
                f"{result.plan.active} Jobs already active, batch size {spec.scaling.batch_size}",
            )
        )
    scale_model_server(kube, ns, spec, result.active > 0 or m.pending > 0, state, events)
    metrics.QUEUE_PENDING.labels(*labels).set(m.pending)
    metrics.QUEUE_IN_FLIGHT.labels(*labels).set(m.in_flight)
    metrics.WORKERS_DESIRED.labels(*labels).set(result.active)
    metrics.WORKERS_CURRENT.labels(*labels).set(result.active)
    metrics.WORKERS_BUSY.labels(*labels).set(len(m.busy_workers))
    reason = (
        f"{len(result.created)} Jobs created, {result.active} active" if result.created
        else f"{result.active} Jobs active ({result.plan.pending_pods} not running yet)"
    )
    set_condition(state, "ScalingActive", True, "Scaling" if result.created else "Stable", reason, now)
    set_condition(state, "Ready", True, "JobMode", f"{result.active} worker Jobs active", now)
    return {
        "workers": result.active,
        "desired": result.active,
        "activeJobs": result.active,
        "selector": manifests.label_selector(name, manifests.JOB_COMPONENT),
    }


def _no_cycle(*_: Any) -> None:
    return None


#: Scaling modes other than Deployment: mode -> fn(kube, pool, spec, measurement, state, events, now)
#: returning extra status fields (or None).
MODE_CYCLES: dict[str, Callable[..., dict[str, Any] | None]] = {"Job": job_cycle}


def write_status(kube: Kube, ns: str, name: str, state: PoolState, fields: dict[str, Any]) -> None:
    """Patch status only when something changed (200 pools x 1 s polls would flood the API)."""
    status = {**state.status, **fields}
    if state.last_scale_time:
        status["lastScaleTime"] = state.last_scale_time
    status["conditions"] = [state.conditions[c] for c in sorted(state.conditions)]
    if status != state.status:
        kube.patch_pool_status(ns, name, status)
        state.status = status
