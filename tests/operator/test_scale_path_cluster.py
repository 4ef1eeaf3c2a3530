"""The scaling path against the real API server: one request per scale, status off that path.

With 200 pools scaling at once the API server is the bottleneck, so a scale costs one PATCH:
no GET when the watch cache knows the pool owns its Deployment, no second PATCH while the
watch has not caught up, and the status patch is queued to StatusWriter's own threads.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes import client as k8s_client

from harness.operator_process import POOLS
from kiosk_operator import manifests
from kiosk_operator.deployment import ensure_deployment
from kiosk_operator.depth import RedisClients
from kiosk_operator.kube import Kube
from kiosk_operator.kube_backend import run_cycle
from kiosk_operator.spec import parse_spec
from kiosk_operator.status import PoolState, StatusWriter, write_status

pytestmark = pytest.mark.cluster

POOL = {
    "apiVersion": "kiosk.deepcell.org/v1alpha1",
    "kind": "ConsumerPool",
    "metadata": {"name": "p"},
    "spec": {"queues": ["q"], "worker": {"image": "kiosk-worker:1"},
             "scaling": {"maxWorkers": 4, "itemsPerWorker": 1, "cooldownSeconds": 0}},
}
DEPLOYMENTS = "/apis/apps/v1/namespaces/{ns}/deployments"


class CountingKube(Kube):
    """The real client, counting the Deployment reads the cycle makes."""

    def __init__(self, api_client: Any) -> None:
        super().__init__(api_client)
        self.reads = 0

    def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        return super().get_deployment(namespace, name)


def _pool_with_deployment(k8s_cluster: Any, ns: str, redis_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    body = copy.deepcopy(POOL)
    body["spec"]["redis"] = {"host": "127.0.0.1", "port": redis_port}
    pool = k8s_cluster.request("POST", POOLS.format(ns=ns), body)
    kube = Kube(k8s_cluster.api_client())
    _, dep = ensure_deployment(kube, pool, parse_spec(pool["spec"]))
    return pool, dep


def _cache_entry(dep: dict[str, Any]) -> tuple[int, int, tuple[str, ...], str]:
    """What handlers.worker_replicas indexes for a Deployment."""
    meta = dep["metadata"]
    owners = tuple(ref["uid"] for ref in meta.get("ownerReferences") or [])
    return int(dep["spec"]["replicas"]), 0, owners, meta["resourceVersion"]


def test_a_scale_is_one_patch_and_a_stale_cache_does_not_resend_it(
    k8s_cluster, k8s_namespace, crd, redis_server, redis_client
):
    ns = k8s_namespace
    pool, dep = _pool_with_deployment(k8s_cluster, ns, redis_server.port)
    path = f"{DEPLOYMENTS.format(ns=ns)}/{manifests.deployment_name('p')}"
    stale = _cache_entry(dep)  # replicas 0: the watch never delivers our scale below
    assert stale[0] == 0
    redis_client.rpush("q", "a", "b")
    kube, clients, state = CountingKube(k8s_cluster.api_client()), RedisClients(), PoolState()
    try:
        run_cycle(kube, clients, pool, state, replicas_of=lambda *_: stale)
        assert kube.reads == 0  # ownership came from the cache
        assert k8s_cluster.get(path)["spec"]["replicas"] == 2
        # Someone scales by hand meanwhile; the cache still shows the version before our scale.
        k8s_cluster.request("PATCH", f"{path}/scale", {"spec": {"replicas": 3}},
                            content_type="application/merge-patch+json")
        run_cycle(kube, clients, pool, state, replicas_of=lambda *_: stale)
        assert k8s_cluster.get(path)["spec"]["replicas"] == 3, "the same scale was sent again"
        # Once the watch shows a newer version, its replicas count again: 3 -> 2.
        fresh = _cache_entry(k8s_cluster.get(path))
        run_cycle(kube, clients, pool, state, replicas_of=lambda *_: fresh)
        assert k8s_cluster.get(path)["spec"]["replicas"] == 2
    finally:
        clients.close()


def test_a_deployment_the_cache_does_not_show_as_the_pools_is_read_before_scaling(
    k8s_cluster, k8s_namespace, crd, redis_server, redis_client
):
    ns = k8s_namespace
    pool, dep = _pool_with_deployment(k8s_cluster, ns, redis_server.port)
    replicas, pods, _, version = _cache_entry(dep)
    redis_client.rpush("q", "a")
    kube, clients = CountingKube(k8s_cluster.api_client()), RedisClients()
    try:
        result = run_cycle(kube, clients, pool, PoolState(),
                           replicas_of=lambda *_: (replicas, pods, ("other",), version))
    finally:
        clients.close()
    assert kube.reads >= 1  # the live object decides; here it is the pool's own, so the pool scales
    assert result.plan is not None and result.plan.replicas == 1


def test_status_writer_writes_the_newest_status(k8s_cluster, k8s_namespace, crd):
    ns = k8s_namespace
    pool = k8s_cluster.request("POST", POOLS.format(ns=ns), copy.deepcopy(POOL))
    name = pool["metadata"]["name"]
    kube = Kube(k8s_cluster.api_client())
    writer = StatusWriter(kube, threads=1)
    state = PoolState()
    try:
        for pending in range(1, 6):
            write_status(kube, ns, name, state, {"pending": pending}, writer)
        assert writer.flush(30)
    finally:
        writer.close()
    assert k8s_cluster.get(f"{POOLS.format(ns=ns)}/{name}")["status"]["pending"] == 5
    assert state.status["pending"] == 5


def test_status_writer_forgets_a_status_it_could_not_write():
    conf = k8s_client.Configuration()
    conf.host = "https://127.0.0.1:1"  # nothing listens: connection refused
    conf.retries = 0
    kube = Kube(k8s_client.ApiClient(conf), request_timeout=2)
    writer = StatusWriter(kube, threads=1)
    state = PoolState()
    try:
        write_status(kube, "ns", "p", state, {"pending": 1}, writer)
        assert writer.flush(30)
    finally:
        writer.close()
    assert state.status == {}, "a status never written must be written again by the next cycle"
