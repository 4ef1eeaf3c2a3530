"""Every scaling formula of the operator, as pure functions (no I/O, clock passed in).

Deployment mode::

    target  = ceil(depth / itemsPerWorker)            depth = pending + in-flight
              (or drain-time sizing when targetDrainSeconds is set and enough samples exist)
    desired = clamp(target, minWorkers, maxWorkers), never below the busy workers

    * from 0 workers, scale up only once depth >= activationThreshold;
    * scale up immediately;
    * scale down to minWorkers only after cooldownSeconds without any pending or in-flight item;
    * while items remain, scale down only after a lower count has been wanted for cooldownSeconds,
      and then to the highest count wanted in that window (a stream whose depth dips for a
      moment does not delete workers it needs again a second later); above maxWorkers at once.

Job mode::

    uncovered = pending - capacity of running and still-pending Jobs (batchSize each)
    new Jobs  = min(ceil(uncovered / batchSize), maxWorkers - active Jobs), never for an empty queue
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kiosk_operator.spec import ScalingSpec

#: Drain-time sizing needs this many service-time samples before it is trusted.
MIN_DRAIN_SAMPLES = 5

UP, DOWN, HOLD = "up", "down", "hold"


@dataclass(frozen=True)
class Decision:
    """What to do with the pool; ``last_active`` is the clock value to remember for next time."""

    replicas: int
    direction: str
    reason: str
    last_active: float | None
    #: (since, highest count wanted) while a partial scale-down waits its window; else None.
    lower: tuple[float, int] | None = None

    @property
    def changed(self) -> bool:
        return self.direction != HOLD


def clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def drain_workers(
    depth: int,
    mean_service_seconds: float | None,
    samples: int,
    target_drain_seconds: float | None,
    fallback: int,
) -> int:
    """Workers needed to drain ``depth`` items within the target: ceil(depth * mean / target).

    Falls back to ``fallback`` (the items-per-worker count) while fewer than
    MIN_DRAIN_SAMPLES service times are known or no target is set.
    """
    if depth <= 0:
        return 0
    if (
        not target_drain_seconds
        or target_drain_seconds <= 0
        or mean_service_seconds is None
        or mean_service_seconds <= 0
        or samples < MIN_DRAIN_SAMPLES
    ):
        return fallback
    return min(depth, math.ceil(depth * mean_service_seconds / target_drain_seconds))


def target_workers(depth: int, spec: ScalingSpec, service: tuple[float, int] | None = None) -> int:
    """Unclamped worker count for a depth: items per worker, or drain time when configured."""
    if depth <= 0:
        return 0
    by_items = math.ceil(depth / spec.items_per_worker)
    if spec.target_drain_seconds and service is not None:
        mean, samples = service
        return drain_workers(depth, mean, samples, spec.target_drain_seconds, by_items)
    return by_items


def desired_workers(
    depth: int,
    current: int,
    spec: ScalingSpec,
    last_active: float | None,
    now: float,
    *,
    busy: int = 0,
    service: tuple[float, int] | None = None,
    lower: tuple[float, int] | None = None,
) -> Decision:
    """Decide the replica count of a Deployment-mode pool.

    ``depth`` = pending + in-flight items; ``current`` = replicas now; ``busy`` = workers
    holding an item that a scale-down could remove (the one place the busy floor is applied);
    ``last_active`` = the clock when depth was last above zero (None if never seen);
    ``service`` = (mean seconds per item, sample count) for drain-time sizing;
    ``lower`` = the previous decision's ``lower`` (the partial scale-down window).
    """
    depth, current, busy = max(0, depth), max(0, current), max(0, busy)
    if depth > 0 or last_active is None:
        last_active = now
    floor = min(busy, current)  # never remove a worker that holds an item

    if depth > 0 and current == 0 and depth < spec.activation_threshold:
        replicas = max(spec.min_workers, 0)
        return _decide(
            replicas,
            current,
            f"depth {depth} below activation threshold {spec.activation_threshold}",
            last_active,
        )

    wanted = clamp(target_workers(depth, spec, service), spec.min_workers, spec.max_workers)
    wanted = max(wanted, floor)
    if wanted >= current:
        return _decide(wanted, current, f"depth {depth} needs {wanted}", last_active)

    # Scaling down.
    if depth == 0:
        idle_for = now - last_active
        if idle_for < spec.cooldown_seconds:
            return _decide(
                current, current, f"idle {idle_for:.1f}s of {spec.cooldown_seconds:g}s cooldown", last_active
            )
        return _decide(
            wanted, current, f"idle for {idle_for:.1f}s (cooldown {spec.cooldown_seconds:g}s)", last_active
        )
    if current > spec.max_workers:  # the ceiling was lowered: no window
        return _decide(wanted, current, f"depth {depth} needs {wanted} (maxWorkers {spec.max_workers}), "
                       f"{busy} busy", last_active)
    since, peak = lower if lower is not None else (now, wanted)
    peak = max(peak, wanted)
    waited = now - since
    if waited < spec.cooldown_seconds:
        return Decision(current, HOLD, f"depth {depth} needs {wanted}; holding {current} "
                        f"{spec.cooldown_seconds - waited:.1f}s more (scale-down window)", last_active, (since, peak))
    return _decide(peak, current, f"depth {depth} needed at most {peak} for {spec.cooldown_seconds:g}s, "
                   f"{busy} busy", last_active)


def _decide(replicas: int, current: int, reason: str, last_active: float | None) -> Decision:
    direction = UP if replicas > current else DOWN if replicas < current else HOLD
    return Decision(replicas, direction, reason, last_active)


def jobs_to_create(
    pending: int,
    active_jobs: int,
    pending_jobs_capacity: int | None,
    batch_size: int,
    max_workers: int,
) -> int:
    """New worker Jobs for Job mode: cover the pending items no active Job will take.

    ``active_jobs`` counts running Jobs and Jobs whose pods are still Pending;
    ``pending_jobs_capacity`` is how many queue items they will still take (None:
    assume a full ``batch_size`` each, which is what a still-Pending Job will take).
    """
    if pending <= 0 or batch_size <= 0:
        return 0
    active_jobs = max(0, active_jobs)
    capacity = active_jobs * batch_size if pending_jobs_capacity is None else max(0, pending_jobs_capacity)
    uncovered = pending - capacity
    if uncovered <= 0:
        return 0
    room = max(0, max_workers - active_jobs)
    return min(math.ceil(uncovered / batch_size), room, uncovered)
