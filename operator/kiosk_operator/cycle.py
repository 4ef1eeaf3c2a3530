"""One scaling cycle of a pool: observe -> decide -> act -> report.

Kubernetes mode (kube_backend) and local mode (local_backend) run this same cycle; where
the workers run is behind WorkerBackend. Decisions come from kiosk_operator.scaling.
No Kubernetes import here: local mode runs without a cluster client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

import kiosk_protocol as protocol
from kiosk_operator import metrics, reclaim, scaling
from kiosk_operator.depth import Measurement, measure
from kiosk_operator.reclaim import ReclaimReport
from kiosk_operator.spec import PoolSpec
from kiosk_operator.status import Event, PoolState, iso, set_condition, set_paused
from kiosk_protocol.errors import describe

log = logging.getLogger("kiosk_operator")

JOB_MODE = "Job"
MAX_REDIS_BACKOFF = 30.0
#: What a failed measurement raises: Redis down or refusing, or its Secret missing (LookupError).
REDIS_ERRORS = (redis.RedisError, OSError, LookupError)


@dataclass(frozen=True)
class Workers:
    """Deployment mode: workers asked for (spec.replicas) and workers that exist now."""

    current: int
    running: int


@dataclass(frozen=True)
class Jobs:
    """Job mode: Jobs (batch workers) running or starting, and how many of them are not running yet."""

    active: int
    starting: int = 0


@dataclass(frozen=True)
class Scaled:
    """Names of the workers started and stopped (empty where the backend does not know them)."""

    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)


class WorkerBackend(Protocol):
    """Where a pool's workers run: a Deployment and Jobs, or processes on this machine."""

    def workers(self) -> Workers:
        """Deployment mode: the workers asked for and those that exist."""
        ...

    def busy(self, holding: frozenset[str]) -> frozenset[str]:
        """Of the live workers holding an item, those a scale-down could remove (the busy floor)."""
        ...

    def scale_to(self, current: int, replicas: int, busy: frozenset[str]) -> Scaled:
        """Go from ``current`` to ``replicas`` workers; idle ones go first, ``busy`` ones last."""
        ...

    def jobs(self) -> Jobs:
        """Job mode: the active Jobs."""
        ...

    def enter_job_mode(self) -> None:
        """The pool switched to Job mode: stop the Deployment-mode workers."""
        ...

    def create_jobs(self, count: int) -> list[str]:
        """Start ``count`` (maybe 0) batch workers, clean up finished ones; returns the names started."""
        ...

    def worker_alive(self, name: str) -> bool:
        """Does the worker's pod (process) still run? Reclaim asks about expired heartbeats only."""
        ...

    def scale_model_server(self, active: bool) -> None:
        """Scale the pool's model server (if it has one) with the pool being active or idle."""
        ...


@dataclass
class PoolCycle:
    """One cycle's inputs: which pool, its spec and memory, where its workers run, the clock."""

    namespace: str
    name: str
    spec: PoolSpec
    state: PoolState
    backend: WorkerBackend
    connect: Callable[[], redis.Redis]
    now: float
    logger: Any = log
    #: Events to post, in order; the backend may append its own (it is given the same list).
    events: list[Event] = field(default_factory=list)
    #: How observe reads the depth: ``depth.measure`` (own round trips), or a DepthBatch's
    #: ``measure`` that shares one pipeline among the pools of a server (same signature).
    measure: Callable[..., Measurement] = measure

    @property
    def labels(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def job_mode(self) -> bool:
        return self.spec.scaling.mode == JOB_MODE


@dataclass(frozen=True)
class Observation:
    measurement: Measurement
    #: Busy workers a scale-down could remove (WorkerBackend.busy).
    busy: frozenset[str]
    workers: Workers | None = None
    jobs: Jobs | None = None
    #: The reclaim pass of this cycle, when one was due.
    reclaimed: ReclaimReport | None = None


@dataclass(frozen=True)
class Plan:
    """Deployment mode: ``replicas`` from ``current``; Job mode: ``new_jobs`` on top of ``current``."""

    current: int
    replicas: int
    direction: str
    reason: str
    last_active: float | None
    new_jobs: int = 0
    #: scaling.Decision.lower: the partial scale-down window to remember.
    lower: tuple[float, int] | None = None


@dataclass
class CycleResult:
    interval: float
    events: list[Event] = field(default_factory=list)
    #: Status fields to publish (Kubernetes mode adds its own: observedGeneration, selector).
    status: dict[str, Any] = field(default_factory=dict)
    #: One line when Redis could not be measured (then nothing below was decided or done).
    redis_error: str | None = None
    observation: Observation | None = None
    plan: Plan | None = None
    scaled: Scaled | None = None


class RedisUnavailable(Exception):
    """observe() could not measure the queues; ``__cause__`` is the error."""


def run(pool: PoolCycle) -> CycleResult:
    """observe -> decide -> act -> report. Redis errors are reported, never raised."""
    started = time.perf_counter()
    set_paused(pool.state, pool.spec.scaling.max_workers, pool.now)
    try:
        obs = observe(pool)
    except RedisUnavailable as exc:
        return report_unavailable(pool, exc.__cause__ or exc)
    plan = decide(pool, obs)
    scaled = act(pool, obs, plan)
    status = report(pool, obs, plan, scaled)
    metrics.RECONCILE_SECONDS.labels(*pool.labels).observe(time.perf_counter() - started)
    return CycleResult(pool.spec.scaling.polling_interval_seconds, pool.events, status, None, obs, plan, scaled)


def observe(pool: PoolCycle) -> Observation:
    """Measure the queues, reclaim the items of gone workers when due (then measure again), count workers."""
    spec, t = pool.spec, pool.now
    ttl = protocol.heartbeat_ttl(spec.worker.heartbeat_interval_seconds)
    try:
        client = pool.connect()
        m = pool.measure(client, spec.queues, t, heartbeat_ttl=ttl)
        report = reclaim.reclaim_step(client, spec, pool.state, m.workers, pool.backend.worker_alive, t, pool.labels)
        if report is not None and report.moved:
            _reclaimed(pool, report)
            m = measure(client, spec.queues, t, heartbeat_ttl=ttl)  # reclaimed items are pending again
    except REDIS_ERRORS as exc:
        raise RedisUnavailable() from exc
    _redis_ok(pool, m)
    busy = pool.backend.busy(m.busy_workers)
    if pool.job_mode:
        return Observation(m, busy, jobs=pool.backend.jobs(), reclaimed=report)
    return Observation(m, busy, workers=pool.backend.workers(), reclaimed=report)


def decide(pool: PoolCycle, obs: Observation) -> Plan:
    """Pure: the worker count (Deployment mode) or the new Jobs (Job mode), from scaling."""
    s, m, t, last_active = pool.spec.scaling, obs.measurement, pool.now, pool.state.last_active
    if obs.jobs is not None:
        new = scaling.jobs_to_create(m.pending, obs.jobs.active, None, s.batch_size, s.max_workers)
        if m.depth > 0 or obs.jobs.active > 0 or last_active is None:
            last_active = t
        direction = scaling.UP if new else scaling.HOLD
        reason = f"{new} Jobs for {m.pending} pending items, {obs.jobs.active} active"
        return Plan(obs.jobs.active, obs.jobs.active + new, direction, reason, last_active, new)
    assert obs.workers is not None
    service = (m.mean_service_seconds, m.service_samples) if m.mean_service_seconds else None
    current = obs.workers.current
    d = scaling.desired_workers(m.depth, current, s, last_active, t, busy=len(obs.busy), service=service,
                                lower=pool.state.scale_down_window)
    return Plan(current, d.replicas, d.direction, d.reason, d.last_active, lower=d.lower)


def act(pool: PoolCycle, obs: Observation, plan: Plan) -> Scaled:
    """Apply the plan through the backend; Events and counters for what changed."""
    state, backend = pool.state, pool.backend
    if pool.job_mode and state.mode != JOB_MODE:  # entering Job mode (start, or switched)
        backend.enter_job_mode()
    state.mode = pool.spec.scaling.mode
    state.last_active = plan.last_active
    state.scale_down_window = plan.lower
    if pool.job_mode:
        scaled = Scaled(started=backend.create_jobs(plan.new_jobs))
        if scaled.started:
            _jobs_created(pool, obs, scaled.started)
        backend.scale_model_server(plan.current + len(scaled.started) > 0 or obs.measurement.pending > 0)
        return scaled
    scaled = Scaled()
    if plan.replicas != plan.current:
        scaled = backend.scale_to(plan.current, plan.replicas, obs.busy)
        _scaled(pool, plan)
    backend.scale_model_server(plan.replicas > 0)
    return scaled


def report(pool: PoolCycle, obs: Observation, plan: Plan, scaled: Scaled) -> dict[str, Any]:
    """Metrics and the ScalingActive condition; returns the status fields."""
    m, labels, state = obs.measurement, pool.labels, pool.state
    if pool.job_mode:
        active = plan.current + len(scaled.started)
        desired = running = active
        starting = obs.jobs.starting if obs.jobs else 0
        reason = (
            f"{len(scaled.started)} Jobs created, {active} active" if scaled.started
            else f"{active} Jobs active ({starting} not running yet)"
        )
        changed = bool(scaled.started)
    else:
        assert obs.workers is not None
        desired, running, reason = plan.replicas, obs.workers.running, plan.reason
        changed = plan.replicas != plan.current
    metrics.QUEUE_PENDING.labels(*labels).set(m.pending)
    metrics.QUEUE_IN_FLIGHT.labels(*labels).set(m.in_flight)
    metrics.WORKERS_DESIRED.labels(*labels).set(desired)
    metrics.WORKERS_CURRENT.labels(*labels).set(running)
    metrics.WORKERS_BUSY.labels(*labels).set(len(m.busy_workers))
    set_condition(state, "ScalingActive", True, "Scaling" if changed else "Stable", reason, pool.now)
    fields: dict[str, Any] = {
        "pending": m.pending,
        "inFlight": m.in_flight,
        "busy": len(m.busy_workers),
        "lastActiveTime": iso(state.last_active) if state.last_active else None,
        "workers": running,
        "desired": desired,
        "maxWorkers": pool.spec.scaling.max_workers,
    }
    if pool.job_mode:
        fields["activeJobs"] = desired
    if state.reclaimed is not None:
        fields["reclaimed"] = state.reclaimed
    return fields


def report_unavailable(pool: PoolCycle, exc: BaseException) -> CycleResult:
    """Redis (or its Secret) failed: keep the workers as they are, say why, back off."""
    state, t = pool.state, pool.now
    state.redis_failures += 1
    metrics.REDIS_ERRORS.labels(*pool.labels).inc()
    reason = "SecretMissing" if isinstance(exc, LookupError) else "RedisUnreachable"
    error = describe(exc)
    message = f"{reason}: {error}"
    set_condition(state, "RedisReachable", False, reason, message, t)
    set_condition(state, "ScalingActive", False, reason, "keeping the current worker count", t)
    if state.redis_failures == 1:
        pool.events.append(Event("Warning", reason, message))
        pool.logger.warning("pool %s/%s: %s", pool.namespace, pool.name, message)
    interval = pool.spec.scaling.polling_interval_seconds
    backoff = min(MAX_REDIS_BACKOFF, interval * 2 ** min(state.redis_failures, 10))
    return CycleResult(backoff, pool.events, redis_error=error)


def _redis_ok(pool: PoolCycle, m: Measurement) -> None:
    state = pool.state
    if state.redis_failures:
        message = f"Redis reachable again after {state.redis_failures} failed attempts"
        pool.events.append(Event("Normal", "RedisReachable", message))
        state.redis_failures = 0
    message = f"{m.pending} pending, {m.in_flight} in flight"
    set_condition(state, "RedisReachable", True, "Measured", message, pool.now)


def _reclaimed(pool: PoolCycle, report: ReclaimReport) -> None:
    message = report.summary()
    pool.events.append(Event("Normal", "Reclaimed", message))
    pool.logger.info("pool %s/%s: %s", pool.namespace, pool.name, message)


def _scaled(pool: PoolCycle, plan: Plan) -> None:
    up = plan.replicas > plan.current
    pool.state.last_scale_time = iso(pool.now)
    metrics.SCALE_EVENTS.labels(*pool.labels, "up" if up else "down").inc()
    message = f"workers {plan.current} -> {plan.replicas}: {plan.reason}"
    pool.events.append(Event("Normal", "ScaledUp" if up else "ScaledDown", message))
    pool.logger.info(
        "pool %s/%s: workers %d -> %d (%s)", pool.namespace, pool.name, plan.current, plan.replicas, plan.reason
    )


def _jobs_created(pool: PoolCycle, obs: Observation, names: list[str]) -> None:
    pool.state.last_scale_time = iso(pool.now)
    metrics.JOBS_CREATED.labels(*pool.labels).inc(len(names))
    metrics.SCALE_EVENTS.labels(*pool.labels, "up").inc()
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    active = obs.jobs.active if obs.jobs else 0
    message = (
        f"created {len(names)} worker Jobs ({shown}) for {obs.measurement.pending} pending items, "
        f"{active} Jobs already active, batch size {pool.spec.scaling.batch_size}"
    )
    pool.events.append(Event("Normal", "JobsCreated", message))
