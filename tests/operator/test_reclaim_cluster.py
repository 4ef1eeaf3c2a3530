"""Reclaim from the operator's timer on the real cluster: a gone worker's items go back to the queue.

A worker is gone when its heartbeat expired AND its pod does not exist (or terminated);
the test registers workers through JobStore as a real worker would, then backdates the
heartbeat (the registry score) so that it looks expired.
"""

from __future__ import annotations

import time

import pytest

import kiosk_protocol as protocol
from harness.operator_process import pool_manifest
from harness.wait import wait_for
from kiosk_protocol import JobStore

pytestmark = pytest.mark.cluster
QUEUE = "segmentation"
T = 60


def _submit(client, name: str) -> str:
    return protocol.submit_job(client, QUEUE, f"uploads/{name}.tif", "segmentation", "1")


def _take(client, worker: str) -> tuple[JobStore, str]:
    """``worker`` pops one item and heartbeats, then its heartbeat goes stale (an hour old)."""
    store = JobStore(client, worker)
    key = store.pop(QUEUE, 0)
    assert key
    store.heartbeat([QUEUE], ttl=2)
    client.zadd(protocol.workers_key(QUEUE), {worker: time.time() - 3600})
    return store, key


def _registered(client, worker: str) -> bool:
    return client.zscore(protocol.workers_key(QUEUE), worker) is not None


def _metric(text: str, name: str, pool: str, outcome: str | None = None) -> float:
    """One pool's sample of a metric (with that outcome label, if given) in Prometheus text."""
    for line in text.splitlines():
        if not line.startswith(name + "{") or f'pool="{pool}"' not in line:
            continue
        if outcome is None or f'outcome="{outcome}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_operator_reclaims_items_of_gone_workers_only(operator, api, k8s_cluster, k8s_namespace, redis_server,
                                                      redis_client):
    # A worker whose pod still exists (heartbeat late, e.g. a GC pause): must be left alone.
    k8s_cluster.apply(
        "{apiVersion: v1, kind: Pod, metadata: {name: seg-slow-worker},"
        " spec: {containers: [{name: w, image: example.invalid/w:1}]}}",
        namespace=k8s_namespace,
    )
    wait_for(lambda: api.c.get(f"/api/v1/namespaces/{k8s_namespace}/pods/seg-slow-worker"), T, "pod exists")
    slow_key = _submit(redis_client, "slow")
    slow, _ = _take(redis_client, "seg-slow-worker")
    # A worker with no pod (SIGKILLed and its pod gone): one unfinished item, one already done.
    done_key = _submit(redis_client, "finished")
    lost_key = _submit(redis_client, "lost")
    gone = JobStore(redis_client, "seg-worker-gone")
    assert gone.pop(QUEUE, 0) == done_key and gone.pop(QUEUE, 0) == lost_key
    gone.update(done_key, {"status": "done"})  # finished, but the worker died before LREM
    gone.heartbeat([QUEUE], ttl=2)
    redis_client.zadd(protocol.workers_key(QUEUE), {"seg-worker-gone": time.time() - 3600})
    assert redis_client.llen(QUEUE) == 0

    api.create_pool(pool_manifest("seg", redis_server.port, scaling={"maxWorkers": 0}))
    wait_for(lambda: redis_client.lrange(QUEUE, 0, -1) == [lost_key], T, "the lost item back on its queue")
    assert gone.held(QUEUE) == []
    assert not _registered(redis_client, "seg-worker-gone")
    assert redis_client.hget(done_key, "status") == "done"
    # The live pod's worker kept its item and its registration (same reclaim pass).
    assert slow.held(QUEUE) == [slow_key]
    assert _registered(redis_client, "seg-slow-worker")
    status = wait_for(lambda: (s := api.pool("seg").get("status", {})).get("reclaimed") and s, T, "status.reclaimed")
    assert status["reclaimed"] == 1
    events = api.wait_events("seg", "Reclaimed")
    assert "seg-worker-gone" in events[0]["message"]
    metrics = operator.metrics()
    assert _metric(metrics, "kiosk_pool_reclaimed_items_total", "seg", "requeued") == 1
    assert _metric(metrics, "kiosk_pool_reclaimed_items_total", "seg", "dropped") == 1

    # Once that pod is gone too, its item is reclaimed at a later pass.
    api.c.request("DELETE", f"/api/v1/namespaces/{k8s_namespace}/pods/seg-slow-worker",
                  {"gracePeriodSeconds": 0})
    wait_for(lambda: slow_key in redis_client.lrange(QUEUE, 0, -1), T, "the slow worker's item reclaimed")
    assert slow.held(QUEUE) == []
    wait_for(lambda: api.pool("seg").get("status", {}).get("reclaimed") == 2, T, "status.reclaimed 2")


def test_reclaim_disabled_leaves_items(operator, api, redis_server, redis_client):
    key = _submit(redis_client, "lost")
    gone, _ = _take(redis_client, "seg-worker-gone")
    api.create_pool(pool_manifest("seg", redis_server.port, scaling={"maxWorkers": 0},
                                  reclaim={"enabled": False}))
    # Several operator cycles later (status written with the pending count), nothing moved.
    wait_for(lambda: api.condition("seg", "RedisReachable"), T, "the pool was measured")

    def cycles() -> float:
        return _metric(operator.metrics(), "kiosk_pool_reconcile_seconds_count", "seg")

    target = cycles() + 5
    wait_for(lambda: cycles() >= target, T, "5 more operator cycles")
    assert gone.held(QUEUE) == [key]
    assert redis_client.llen(QUEUE) == 0
