"""Kubernetes mode: the shared cycle over a pool's Deployment, its Jobs and its model server.

KubeBackend is the cycle's WorkerBackend on the Kube wrapper; run_cycle turns the pool
object into one cycle (spec, Redis client from the pool's Secrets) and writes its status.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from kiosk_operator import cycle, jobmode, manifests, policy, reclaim
from kiosk_operator.cycle import CycleResult, Jobs, Scaled, Workers
from kiosk_operator.deployment import Refused, check_owned, ensure_deployment, refusals, scale_deployment, stand_down
from kiosk_operator.depth import DepthBatch, RedisClients, tls_material
from kiosk_operator.kube import Kube
from kiosk_operator.spec import PoolSpec, SpecError, parse_spec
from kiosk_operator.status import (
    Event,
    PoolState,
    StatusWriter,
    parse_iso,
    set_condition,
    warn_once,
    write_status,
)

log = logging.getLogger("kiosk_operator")

#: Seconds until a pool with an invalid spec is looked at again.
INVALID_SPEC_INTERVAL = 5.0
#: A shared depth round serves a pool's cycle for this fraction of its polling interval: the
#: pools' loops wake on the same tick, but on a busy machine their cycles spread over it.
BATCH_AGE = 0.5

#: (namespace, Deployment) -> (spec replicas, pods[, owner uids, resourceVersion]) from a watch
#: cache, or None.
ReplicasOf = Callable[[str, str], tuple[int, int] | tuple[int, int, tuple[str, ...], str] | None]


class KubeBackend:
    """One cycle's view of a pool's workers in the cluster (built anew each cycle)."""

    def __init__(
        self,
        kube: Kube,
        pool: dict[str, Any],
        spec: PoolSpec,
        state: PoolState,
        events: list[Event],
        replicas_of: ReplicasOf | None = None,
        logger: Any = log,
    ) -> None:
        self.kube, self.pool, self.spec, self.state, self.events = kube, pool, spec, state, events
        self.replicas_of, self.logger = replicas_of, logger
        meta = pool["metadata"]
        self.ns, self.name = meta["namespace"], meta["name"]
        self.dep_name = manifests.deployment_name(self.name)
        self._pod_alive = reclaim.kube_pod_alive(kube.core, self.ns)
        self._jobs: list[jobmode.JobView] = []
        #: The watch cache says the pool owns its Deployment: scaling needs no GET to check.
        self._owned = False
        #: The Deployment's resourceVersion in the watch cache this cycle ('' when not cached).
        self._seen_version = ""

    # -- Deployment mode --

    def workers(self) -> Workers:
        """From the watch cache when it knows the Deployment, else read (and created when missing)."""
        cached = self.replicas_of(self.ns, self.dep_name) if self.replicas_of else None
        if cached is not None:
            uid = self.pool["metadata"].get("uid")
            if len(cached) < 4:  # no owners cached: scale_to reads the Deployment to check
                return Workers(cached[0], cached[1])
            replicas, pods, owners, version = cached  # type: ignore[misc]
            if uid is not None and uid in owners:
                self._owned, self._seen_version = True, version
                scaled = self.state.scaled
                if scaled is not None and scaled[1] == version:
                    # The watch has not brought our last scale yet: count what we asked for, so
                    # that a slow API server is not sent the same patch again every interval.
                    return Workers(scaled[0], pods)
                self.state.scaled = None
                return Workers(replicas, pods)
            # Not the pool's (or replaced meanwhile): the read below refuses it.
        dep = self.kube.get_deployment(self.ns, self.dep_name)
        check_owned(dep, self.pool)
        if dep is None:
            action, dep = ensure_deployment(self.kube, self.pool, self.spec, self.logger, have=None)
            if action == "created":
                self.events.append(
                    Event("Normal", "DeploymentCreated", f"worker Deployment {self.dep_name} created")
                )
        spec_replicas = int(dep.get("spec", {}).get("replicas") or 0)
        return Workers(spec_replicas, int((dep.get("status") or {}).get("replicas") or 0))

    def busy(self, holding: frozenset[str]) -> frozenset[str]:
        # Every live busy worker of the queues counts: telling this Deployment's pods apart would
        # cost a pod list per cycle, and counting more only keeps more workers.
        return holding

    def scale_to(self, current: int, replicas: int, busy: frozenset[str]) -> Scaled:
        if not self._owned:
            check_owned(self.kube.get_deployment(self.ns, self.dep_name), self.pool)
        scale_deployment(self.kube, self.ns, self.name, current, replicas, busy)
        self.state.scaled = (replicas, self._seen_version) if self._seen_version else None
        return Scaled()

    # -- Job mode --

    def jobs(self) -> Jobs:
        self._jobs = jobmode.list_pool_jobs(self.kube.batch, self.ns, self.name, _request_timeout=self.kube.timeout)
        return Jobs(sum(j.active for j in self._jobs), sum(j.state == jobmode.PENDING for j in self._jobs))

    def enter_job_mode(self) -> None:
        dep = self.kube.get_deployment(self.ns, self.dep_name)
        if dep is not None and policy.owned_by(dep, self.pool) and int(dep.get("spec", {}).get("replicas") or 0) > 0:
            self.kube.scale_deployment(self.ns, self.dep_name, 0)
            message = f"worker Deployment {self.dep_name} scaled to 0: the pool is in Job mode"
            self.events.append(Event("Normal", "DeploymentScaledDown", message))

    def create_jobs(self, count: int) -> list[str]:
        """Create ``count`` Jobs owned by the pool; also deletes finished ones beyond the history limits."""
        batch, timeout, limits = self.kube.batch, self.kube.timeout, self.spec.scaling.job
        created = jobmode.create_jobs(batch, self.ns, self.name, self.spec, count, self.pool, timeout)
        old = jobmode.history_to_delete(
            self._jobs, limits.successful_jobs_history_limit, limits.failed_jobs_history_limit
        )
        deleted = jobmode.prune_jobs(batch, self.ns, old, timeout)
        if created or deleted:
            self.logger.info("pool %s/%s: created %d Jobs, pruned %d", self.ns, self.name, len(created), len(deleted))
        return created

    # -- both --

    def worker_alive(self, name: str) -> bool:
        return self._pod_alive(name)

    def scale_model_server(self, active: bool) -> None:
        """spec.modelServer.deployment follows the pool: its replicas while active, 0 when idle."""
        dep = self.spec.model_server.deployment
        if dep is None:
            return
        want = dep.replicas if active else 0
        if self.state.model_server_replicas == want:
            return  # already applied; read again only when the pool turns active or idle
        have = self.kube.get_deployment(self.ns, dep.name)
        if have is None:
            missing = Event("Warning", "ModelServerMissing", f"model-server Deployment {dep.name} not found")
            warn_once(self.state, "model-server-missing", self.events, missing)
            return
        self.state.warned.discard("model-server-missing")
        if not policy.model_server_allowed(policy.current(), have, self.pool):
            message = (
                f"spec.modelServer.deployment.name: Deployment {dep.name} is neither owned by this pool "
                f'nor labelled {policy.MODEL_SERVER_LABEL}="true"; not scaled'
            )
            warn_once(self.state, "model-server-refused", self.events, Event("Warning", "PolicyViolation", message))
            return
        self.state.warned.discard("model-server-refused")
        self.state.model_server_replicas = want
        if int(have.get("spec", {}).get("replicas") or 0) != want:
            self.kube.scale_deployment(self.ns, dep.name, want)
            message = f"model-server Deployment {dep.name} scaled to {want}"
            self.events.append(Event("Normal", "ModelServerScaled", message))


def redis_client(kube: Kube, clients: RedisClients, ns: str, spec: PoolSpec) -> redis.Redis:
    """The pool's Redis client, with its password and TLS Secrets; LookupError when one is missing."""
    ref = spec.redis.password_secret_ref
    if ref and not policy.secret_allowed(kube.read_secret(ns, ref.name)):
        raise LookupError(f'Secret {ns}/{ref.name} is not labelled {policy.SECRET_LABEL}="true"')
    password = kube.secret_value(ns, ref.name, ref.key) if ref else ""
    tls_ref = spec.redis.tls_secret_ref
    tls = tls_material(kube.read_secret(ns, tls_ref.name), tls_ref) if tls_ref else None
    return clients.get(spec.redis, password, tls)


def run_cycle(
    kube: Kube,
    clients: RedisClients,
    pool: dict[str, Any],
    state: PoolState,
    now: Callable[[], float] = time.time,
    logger: Any = log,
    replicas_of: ReplicasOf | None = None,
    status_writer: StatusWriter | None = None,
    batch: DepthBatch | None = None,
) -> CycleResult:
    """One cycle of a pool in the cluster, then its status. Never raises for Redis.

    ``replicas_of(namespace, deployment)`` -> (spec replicas, pods) answers from a watch cache
    (None: unknown, then the Deployment is read), so an idle cycle costs Redis round trips only.
    ``status_writer`` takes the status patch off this thread (else it is written before returning).
    ``batch`` shares one depth pipeline among the pools of a Redis server: a pool reads a round
    at most half its polling interval old (else its own round trips).
    """
    meta = pool["metadata"]
    ns, name = meta["namespace"], meta["name"]
    t = now()
    state.generation = meta.get("generation")
    try:
        spec = _parsed_spec(ns, name, pool.get("spec"))
    except SpecError as exc:
        return _invalid_spec(kube, pool, state, exc, t)
    state.warned.discard("invalid-spec")
    refused = refusals(kube, pool, spec)
    if refused:
        return _refused(kube, pool, state, refused, t)
    state.warned.discard("policy-violation")
    _restore(state, pool, spec)
    events: list[Event] = []
    backend = KubeBackend(kube, pool, spec, state, events, replicas_of, logger)
    connect = functools.partial(redis_client, kube, clients, ns, spec)
    try:
        pool_cycle = cycle.PoolCycle(ns, name, spec, state, backend, connect, t, logger, events)
        if batch is not None:
            max_age = spec.scaling.polling_interval_seconds * BATCH_AGE
            pool_cycle.measure = functools.partial(batch.measure, max_age=max_age)
        result = cycle.run(pool_cycle)
    except Refused as exc:  # a <pool>-worker Deployment the pool does not own
        return _refused(kube, pool, state, [str(exc)], t)
    fields = {**result.status, "observedGeneration": meta.get("generation")}
    if result.redis_error is None:
        job_mode = spec.scaling.mode == cycle.JOB_MODE
        component = manifests.JOB_COMPONENT if job_mode else manifests.WORKER_COMPONENT
        fields["selector"] = manifests.label_selector(name, component)
        if job_mode:
            set_condition(state, "Ready", True, "JobMode", f"{fields['activeJobs']} worker Jobs active", t)
        else:
            set_condition(state, "Ready", True, "DeploymentReady", f"worker Deployment {backend.dep_name}", t)
    else:
        why = state.conditions["RedisReachable"]
        set_condition(state, "Ready", False, why["reason"], why["message"], t)
    write_status(kube, ns, name, state, fields, status_writer)
    return result


#: (namespace, pool) -> (the spec as last read, parsed): an idle tick compares instead of parsing.
_specs: dict[tuple[str, str], tuple[Any, PoolSpec]] = {}


def _parsed_spec(ns: str, name: str, raw: Any) -> PoolSpec:
    """parse_spec, once per change of the pool's spec (parsing costs ~0.1 ms a tick per pool)."""
    cached = _specs.get((ns, name))
    if cached is not None and cached[0] == raw:
        return cached[1]
    spec = parse_spec(raw)
    _specs[(ns, name)] = (copy.deepcopy(raw), spec)
    return spec


def forget(ns: str, name: str) -> None:
    """The pool is gone (its loop ended): drop what was kept for it."""
    _specs.pop((ns, name), None)


def _restore(state: PoolState, pool: dict[str, Any], spec: PoolSpec) -> None:
    """After an operator restart, continue from what the pool's status remembers."""
    status = pool.get("status") or {}
    if state.last_active is None:
        state.last_active = parse_iso(status.get("lastActiveTime"))
    if state.reclaimed is None and spec.reclaim.enabled:
        state.reclaimed = int(status.get("reclaimed") or 0)


def _refused(kube: Kube, pool: dict[str, Any], state: PoolState, reasons: list[str], t: float) -> CycleResult:
    """The admin policy refuses the pool: conditions and one Warning naming the fields; its own workers go to 0."""
    meta = pool["metadata"]
    message = "; ".join(reasons)
    events: list[Event] = stand_down(kube, pool, message)
    set_condition(state, "Ready", False, "PolicyViolation", message, t)
    set_condition(state, "ScalingActive", False, "PolicyViolation", message, t)
    warn_once(state, "policy-violation", events, Event("Warning", "PolicyViolation", message))
    write_status(kube, meta["namespace"], meta["name"], state, {"observedGeneration": meta.get("generation")})
    return CycleResult(INVALID_SPEC_INTERVAL, events)


def _invalid_spec(kube: Kube, pool: dict[str, Any], state: PoolState, exc: SpecError, t: float) -> CycleResult:
    meta = pool["metadata"]
    events: list[Event] = []
    set_condition(state, "Ready", False, "InvalidSpec", str(exc), t)
    set_condition(state, "ScalingActive", False, "InvalidSpec", str(exc), t)
    warn_once(state, "invalid-spec", events, Event("Warning", "InvalidSpec", str(exc)))
    write_status(kube, meta["namespace"], meta["name"], state, {"observedGeneration": meta.get("generation")})
    return CycleResult(INVALID_SPEC_INTERVAL, events)
