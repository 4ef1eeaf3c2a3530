"""Table-driven tests of the pure scaling formulas (no I/O)."""

from __future__ import annotations

import dataclasses

import pytest

from kiosk_operator.scaling import (
    DOWN,
    HOLD,
    MIN_DRAIN_SAMPLES,
    UP,
    desired_workers,
    drain_workers,
    jobs_to_create,
    target_workers,
)
from kiosk_operator.spec import ScalingSpec

BASE = ScalingSpec(
    min_workers=0, max_workers=10, items_per_worker=10, activation_threshold=1, cooldown_seconds=60.0
)


def spec(**kw) -> ScalingSpec:
    return dataclasses.replace(BASE, **kw)


NOW = 1000.0

# (id, depth, current, spec, last_active, busy, expected replicas, expected direction)
DESIRED_CASES = [
    ("empty-stays-zero", 0, 0, BASE, None, 0, 0, HOLD),
    ("one-item-from-zero", 1, 0, BASE, None, 0, 1, UP),
    ("100-items-10-per-worker", 100, 0, BASE, None, 0, 10, UP),
    ("101-items-rounds-up-but-capped", 101, 0, BASE, None, 0, 10, UP),
    ("95-items-rounds-up", 95, 0, BASE, None, 0, 10, UP),
    ("11-items", 11, 0, BASE, None, 0, 2, UP),
    ("huge-depth-capped-at-max", 10**9, 3, BASE, NOW - 5, 0, 10, UP),
    ("scale-up-immediately-from-some", 50, 2, BASE, NOW - 1, 0, 5, UP),
    ("steady", 50, 5, BASE, NOW - 1, 0, 5, HOLD),
    ("min-kept-when-idle", 0, 0, spec(min_workers=2), None, 0, 2, UP),
    ("min-above-target", 5, 1, spec(min_workers=3), NOW, 0, 3, UP),
    ("max-zero-pauses", 100, 0, spec(max_workers=0), None, 0, 0, HOLD),
    ("activation-below-threshold", 4, 0, spec(activation_threshold=5), None, 0, 0, HOLD),
    ("activation-at-threshold", 5, 0, spec(activation_threshold=5), None, 0, 1, UP),
    ("activation-only-from-zero", 2, 1, spec(activation_threshold=5), NOW, 0, 1, HOLD),
    ("activation-with-min-keeps-min", 2, 0, spec(activation_threshold=5, min_workers=1), None, 0, 1, UP),
    ("cooldown-not-elapsed", 0, 5, BASE, NOW - 59.9, 0, 5, HOLD),
    ("cooldown-exact-boundary", 0, 5, BASE, NOW - 60.0, 0, 0, DOWN),
    ("cooldown-elapsed", 0, 5, BASE, NOW - 61, 0, 0, DOWN),
    ("cooldown-to-min", 0, 5, spec(min_workers=2), NOW - 61, 0, 2, DOWN),
    ("cooldown-zero-scales-down-at-once", 0, 5, spec(cooldown_seconds=0), NOW - 0.0, 0, 0, DOWN),
    ("unknown-last-active-starts-cooldown", 0, 5, BASE, None, 0, 5, HOLD),
    ("partial-scale-down-keeps-busy", 10, 8, spec(cooldown_seconds=0), NOW - 1, 6, 6, DOWN),
    ("partial-scale-down-waits-its-window", 10, 8, BASE, NOW - 1, 0, 8, HOLD),
    ("busy-above-desired-holds", 10, 8, BASE, NOW - 1, 8, 8, HOLD),
    ("busy-above-max-after-max-lowered", 100, 8, spec(max_workers=4), NOW, 6, 6, DOWN),
    ("busy-never-counted-above-current", 5, 2, BASE, NOW, 7, 2, HOLD),
    ("in-flight-only-counts-as-depth", 3, 3, spec(items_per_worker=1), NOW - 100, 3, 3, HOLD),
    ("items-per-worker-one", 7, 0, spec(items_per_worker=1), None, 0, 7, UP),
]


@pytest.mark.parametrize(
    "depth,current,sp,last_active,busy,replicas,direction",
    [c[1:] for c in DESIRED_CASES],
    ids=[c[0] for c in DESIRED_CASES],
)
def test_desired_workers(depth, current, sp, last_active, busy, replicas, direction):
    decision = desired_workers(depth, current, sp, last_active, NOW, busy=busy)
    assert (decision.replicas, decision.direction) == (replicas, direction), decision.reason
    assert decision.changed == (direction != HOLD)
    assert decision.reason


def test_last_active_follows_depth():
    assert desired_workers(5, 1, BASE, NOW - 500, NOW).last_active == NOW
    assert desired_workers(0, 1, BASE, NOW - 30, NOW).last_active == NOW - 30
    assert desired_workers(0, 1, BASE, None, NOW).last_active == NOW


def test_cooldown_sequence_scales_down_exactly_once_elapsed():
    """Simulate ticks: a burst, then an empty queue; the last workers go only at the boundary.

    While items remain a lower count waits its window (cooldownSeconds); the step to minWorkers
    waits for the cooldown since depth was last > 0.
    """
    last, current, lower, history = None, 0, None, []
    ticks = [(0, 100, 0), (1, 40, 10), (1.5, 40, 4), (2, 0, 0), (30, 0, 0), (61.4, 0, 0), (61.5, 0, 0)]
    for t, depth, busy in ticks:
        d = desired_workers(depth, current, BASE, last, float(t), busy=busy, lower=lower)
        last, current, lower = d.last_active, d.replicas, d.lower
        history.append(current)
    assert history == [10, 10, 10, 10, 10, 10, 0]


def test_partial_scale_down_waits_its_window_then_keeps_the_highest_count_wanted():
    """A stream whose depth dips: no worker is deleted for a dip; after a whole window below the
    current count, the pool goes to the highest count wanted in that window (never below busy)."""
    sp = spec(cooldown_seconds=10)
    current, last, lower, history = 8, NOW, None, []
    for t, depth, busy in [(0, 30, 2), (3, 60, 2), (6, 20, 5), (9.9, 20, 5), (10, 20, 5), (11, 20, 1)]:
        d = desired_workers(depth, current, sp, last, NOW + t, busy=busy, lower=lower)
        current, last, lower = d.replicas, d.last_active, d.lower
        history.append((current, d.direction))
    # 30 items want 3, 60 want 6, 20 want 5 (busy floor): held at 8 until the window (10 s) ends,
    # then 6, the highest count wanted since it began; the window starts again after a scale.
    assert history == [(8, HOLD), (8, HOLD), (8, HOLD), (8, HOLD), (6, DOWN), (6, HOLD)]
    assert lower is not None and lower[0] == NOW + 11


def test_a_lowered_ceiling_applies_at_once():
    d = desired_workers(100, 8, spec(max_workers=4), NOW, NOW, busy=0, lower=None)
    assert (d.replicas, d.direction, d.lower) == (4, DOWN, None)


def test_scaling_up_ends_the_window():
    d = desired_workers(10, 8, BASE, NOW, NOW, lower=(NOW - 30, 2))
    assert d.direction == HOLD and d.lower == (NOW - 30, 2)
    up = desired_workers(200, 8, BASE, NOW, NOW + 1, lower=d.lower)
    assert (up.direction, up.lower) == (UP, None)


def test_negative_inputs_are_treated_as_zero():
    d = desired_workers(-5, -1, BASE, None, NOW, busy=-3)
    assert (d.replicas, d.direction) == (0, HOLD)


def test_drain_time_target_used_with_enough_samples():
    sp = spec(target_drain_seconds=60.0, items_per_worker=100, max_workers=50)
    # 120 items x 2 s / 60 s target = 4 workers, instead of ceil(120/100) = 2.
    assert desired_workers(120, 0, sp, None, NOW, service=(2.0, MIN_DRAIN_SAMPLES)).replicas == 4
    # Too few samples: fall back to items per worker.
    assert desired_workers(120, 0, sp, None, NOW, service=(2.0, MIN_DRAIN_SAMPLES - 1)).replicas == 2
    # Clamped by max.
    assert desired_workers(10**6, 0, sp, None, NOW, service=(2.0, 100)).replicas == 50


DRAIN_CASES = [
    # depth, mean, samples, target, fallback, expected
    (0, 2.0, 100, 60.0, 3, 0),
    (120, 2.0, 100, 60.0, 9, 4),
    (121, 2.0, 100, 60.0, 9, 5),
    (1, 0.01, 100, 60.0, 9, 1),
    (10, 100.0, 100, 1.0, 9, 10),  # never more workers than items
    (120, 2.0, MIN_DRAIN_SAMPLES - 1, 60.0, 9, 9),
    (120, None, 0, 60.0, 9, 9),
    (120, 0.0, 100, 60.0, 9, 9),
    (120, 2.0, 100, None, 9, 9),
    (120, 2.0, 100, 0.0, 9, 9),
]


@pytest.mark.parametrize("depth,mean,samples,target,fallback,expected", DRAIN_CASES)
def test_drain_workers(depth, mean, samples, target, fallback, expected):
    assert drain_workers(depth, mean, samples, target, fallback) == expected


def test_target_workers_without_service_uses_items_per_worker():
    assert target_workers(0, BASE) == 0
    assert target_workers(1, BASE) == 1
    assert target_workers(250, spec(items_per_worker=25)) == 10


JOB_CASES = [
    # id, pending, active, capacity, batch, max, expected
    ("empty-queue", 0, 0, None, 25, 100, 0),
    ("negative-pending", -3, 0, None, 25, 100, 0),
    ("250-by-25", 250, 0, None, 25, 100, 10),
    ("251-by-25", 251, 0, None, 25, 100, 11),
    ("one-item", 1, 0, None, 25, 100, 1),
    ("never-more-jobs-than-items", 3, 0, None, 1, 100, 3),
    ("capped-by-max", 250, 0, None, 25, 4, 4),
    ("capped-by-max-minus-active", 250, 3, None, 25, 5, 2),
    ("pending-pods-cover-everything", 250, 10, None, 25, 100, 0),
    ("pending-pods-cover-part", 250, 4, None, 25, 100, 6),
    ("explicit-capacity", 250, 4, 30, 25, 100, 9),
    ("capacity-above-pending", 10, 1, 50, 25, 100, 0),
    ("active-at-max", 1000, 10, 0, 25, 10, 0),
    ("active-above-max", 1000, 12, 0, 25, 10, 0),
    ("zero-batch", 10, 0, None, 0, 10, 0),
    ("huge-burst", 10**7, 0, None, 25, 10000, 10000),
]


@pytest.mark.parametrize(
    "pending,active,capacity,batch,max_workers,expected",
    [c[1:] for c in JOB_CASES],
    ids=[c[0] for c in JOB_CASES],
)
def test_jobs_to_create(pending, active, capacity, batch, max_workers, expected):
    assert jobs_to_create(pending, active, capacity, batch, max_workers) == expected


def test_jobs_stream_never_over_creates():
    """Replay a trace: Jobs created by our formula never exceed ceil(items / batch) at any instant."""
    batch, max_workers, active, created_total = 25, 100, 0, 0
    pending = 250
    for _tick in range(20):  # Jobs stay Pending: nothing consumed, nothing finishes.
        n = jobs_to_create(pending, active, None, batch, max_workers)
        active += n
        created_total += n
    assert created_total == 10
