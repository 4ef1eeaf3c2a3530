"""Depth measurement against real Redis, fed by the worker's own heartbeat (drain-time scaling)."""

from __future__ import annotations

import time

import pytest

import kiosk_protocol as protocol
from kiosk_operator import depth
from kiosk_operator.scaling import desired_workers
from kiosk_operator.spec import ScalingSpec
from kiosk_protocol import JobStore
from kiosk_worker.runner import WorkerStats

QUEUE = "segmentation"
DRAIN = ScalingSpec(max_workers=50, items_per_worker=50, target_drain_seconds=20.0)


def _submit(client, n: int) -> None:
    for i in range(n):
        protocol.submit_job(client, QUEUE, f"uploads/img{i}.tif", "segmentation", "1")


def _worker_info(samples: int, seconds: float) -> dict:
    """The heartbeat info exactly as a kiosk-worker writes it (runner.WorkerStats.info)."""
    stats = WorkerStats()
    for _ in range(samples):
        stats.record(seconds)
    return stats.info()


def test_worker_heartbeat_feeds_drain_time_sizing(redis_client):
    _submit(redis_client, 100)
    JobStore(redis_client, "w-1").heartbeat([QUEUE], ttl=10, info=_worker_info(6, 2.0))
    m = depth.measure(redis_client, [QUEUE], time.time())
    assert (m.pending, m.service_samples) == (100, 6)
    assert m.mean_service_seconds == pytest.approx(2.0)
    assert [w.name for w in m.workers] == ["w-1"]
    decision = desired_workers(
        m.depth, 0, DRAIN, None, time.time(), service=(m.mean_service_seconds, m.service_samples)
    )
    # ceil(100 items x 2 s / 20 s) = 10 workers, where itemsPerWorker alone says ceil(100/50) = 2.
    assert decision.replicas == 10


def test_literal_worker_field_names_are_read(redis_client):
    """The field names of the worker's heartbeat contract, spelled out."""
    JobStore(redis_client, "w-1").heartbeat(
        [QUEUE], ttl=10, info={"service_time_samples": 4, "service_time_ewma": "1.500000"}
    )
    JobStore(redis_client, "w-2").heartbeat(
        [QUEUE], ttl=10, info={"service_time_samples": 4, "service_time_ewma": "0.500000"}
    )
    m = depth.measure(redis_client, [QUEUE], time.time())
    assert m.service_samples == 8
    assert m.mean_service_seconds == pytest.approx(1.0)


def test_too_few_samples_fall_back_to_items_per_worker(redis_client):
    _submit(redis_client, 100)
    JobStore(redis_client, "w-1").heartbeat([QUEUE], ttl=10, info=_worker_info(2, 2.0))
    m = depth.measure(redis_client, [QUEUE], time.time())
    decision = desired_workers(
        m.depth, 0, DRAIN, None, time.time(), service=(m.mean_service_seconds, m.service_samples)
    )
    assert decision.replicas == 2


def test_worker_without_samples_yet_reports_nothing(redis_client):
    JobStore(redis_client, "w-1").heartbeat([QUEUE], ttl=10, info=WorkerStats().info())
    m = depth.measure(redis_client, [QUEUE], time.time())
    assert (m.mean_service_seconds, m.service_samples) == (None, 0)
