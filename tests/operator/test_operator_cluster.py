"""The operator against the real local cluster, running as its ServiceAccount (exact RBAC)."""

from __future__ import annotations

import math

import pytest

import kiosk_protocol as protocol
from harness.operator_process import pool_manifest
from harness.wait import wait_for
from kiosk_operator import manifests
from kiosk_protocol import JobStore

pytestmark = pytest.mark.cluster
T = 60
DEP = manifests.deployment_name


def _env(dep: dict) -> dict:
    container = dep["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _push(client, queue: str, n: int) -> list[str]:
    return [protocol.submit_job(client, queue, f"uploads/img{i}.tif", "segmentation", "1") for i in range(n)]


def test_pool_creates_owned_deployment_with_env(operator, api, redis_server):
    pool = api.create_pool(
        pool_manifest(
            "seg",
            redis_server.port,
            redis={"passwordSecretRef": {"name": "redis-auth", "key": "password"}},
            storage={"credentialsSecretRef": {"name": "s3-creds"}, "endpoint": "http://minio:9000"},
            worker={
                "env": [{"name": "MAX_RETRY", "value": "2"}],
                "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "1Gi"}},
            },
        )
    )
    dep = wait_for(lambda: api.deployment(DEP("seg")), T, "worker Deployment")
    owner = dep["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("ConsumerPool", "seg", pool["metadata"]["uid"])
    assert owner.get("controller") is True
    env = _env(dep)
    assert env["QUEUE"] == "segmentation"
    assert env["CONSUMER_TYPE"] == "segmentation"
    assert env["REDIS_HOST"] == "127.0.0.1" and env["REDIS_PORT"] == str(redis_server.port)
    assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "redis-auth", "key": "password"}}
    assert env["WORKER_NAME"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["STORAGE_BUCKET"] == "s3://results" and env["STORAGE_ENDPOINT"] == "http://minio:9000"
    assert env["MAX_RETRY"] == "2" and env["TF_HOST"] == "tf-serving"
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert dep["spec"]["replicas"] == 0
    # The password Secret does not exist yet: reported as a condition, not a crash.
    cond = wait_for(lambda: api.condition("seg", "RedisReachable"), T, "RedisReachable condition")
    assert cond["status"] == "False" and cond["reason"] == "SecretMissing"
    assert operator.alive()


def test_scale_up_with_queue_and_back_to_min_after_cooldown(operator, api, redis_server, redis_client):
    api.create_pool(
        pool_manifest(
            "seg", redis_server.port, scaling={"minWorkers": 1, "maxWorkers": 8, "itemsPerWorker": 15}
        )
    )
    wait_for(lambda: api.replicas(DEP("seg")) == 1, T, "min replicas 1")
    _push(redis_client, "segmentation", 100)
    wait_for(lambda: api.replicas(DEP("seg")) == min(math.ceil(100 / 15), 8), T, "replicas ceil(100/15)=7")
    status = wait_for(
        lambda: (s := api.pool("seg").get("status", {})).get("pending") == 100 and s, T, "status pending=100"
    )
    assert status["desired"] == 7 and status["observedGeneration"] == 1
    api.wait_events("seg", "ScaledUp")
    # More items than the cap: clipped to maxWorkers.
    _push(redis_client, "segmentation", 100)
    wait_for(lambda: api.replicas(DEP("seg")) == 8, T, "replicas clipped to max 8")
    # Drain the queue: back to minWorkers once the cooldown has passed.
    redis_client.delete("segmentation")
    wait_for(lambda: api.replicas(DEP("seg")) == 1, T, "back to min after cooldown")
    api.wait_events("seg", "ScaledDown")
    assert "kiosk_pool_queue_pending" in operator.metrics()


def test_busy_workers_survive_scale_down(operator, api, redis_server, redis_client):
    api.create_pool(pool_manifest("seg", redis_server.port, scaling={"itemsPerWorker": 1, "maxWorkers": 4}))
    _push(redis_client, "segmentation", 4)
    wait_for(lambda: api.replicas(DEP("seg")) == 4, T, "4 replicas")
    selector = manifests.label_selector("seg")
    pods = wait_for(
        lambda: (
            (p := [x for x in api.pods(selector) if x["status"].get("phase") == "Running"])
            and len(p) == 4
            and p
        ),
        T,
        "4 running pods",
    )
    names = sorted(p["metadata"]["name"] for p in pods)
    busy = names[:2]
    # Two pods pop an item each and heartbeat: they are busy. The rest of the queue is dropped.
    for name in busy:
        store = JobStore(redis_client, name)
        assert store.pop("segmentation", 0)
        store.heartbeat(["segmentation"], ttl=60)
    redis_client.delete("segmentation")
    wait_for(lambda: api.replicas(DEP("seg")) == 2, T, "scaled down to the 2 busy workers")

    def survivors():
        alive = [
            p["metadata"]["name"] for p in api.pods(selector) if not p["metadata"].get("deletionTimestamp")
        ]
        return sorted(alive) == busy and alive

    wait_for(survivors, T, "only the busy pods remain")
    costs = {
        p["metadata"]["name"]: p["metadata"]["annotations"][manifests.DELETION_COST_ANNOTATION]
        for p in api.pods(selector)
    }
    assert all(int(costs[n]) > 0 for n in busy)
    # Items done: the heartbeat stays, nothing in flight -> after the cooldown down to zero.
    for name in busy:
        store = JobStore(redis_client, name)
        for key in store.held("segmentation"):
            store.finish("segmentation", key, {"status": "done"})
    wait_for(lambda: api.replicas(DEP("seg")) == 0, T, "scaled to zero when idle")


def test_pool_update_and_hand_edits(operator, api, redis_server):
    api.create_pool(pool_manifest("seg", redis_server.port))
    wait_for(lambda: api.deployment(DEP("seg")), T, "Deployment")
    api.patch_pool(
        "seg",
        {
            "spec": {
                "worker": {
                    "image": "example.invalid/kiosk-worker:v2",
                    "env": [{"name": "EXPIRE_TIME", "value": "60"}],
                },
                "scaling": {"minWorkers": 2, "maxWorkers": 3},
            }
        },
    )

    def updated():
        dep = api.deployment(DEP("seg"))
        c = dep["spec"]["template"]["spec"]["containers"][0]
        return (
            c["image"].endswith(":v2")
            and _env(dep).get("EXPIRE_TIME") == "60"
            and dep["spec"]["replicas"] == 2
        )

    wait_for(updated, T, "image, env and min applied")

    # Hand edits of owned fields are reverted.
    api.patch_deployment(
        DEP("seg"),
        {"spec": {"template": {"spec": {"containers": [{"name": "worker", "image": "evil/image:latest"}]}}}},
        content_type="application/strategic-merge-patch+json",
    )
    wait_for(
        lambda: (
            api.deployment(DEP("seg"))["spec"]["template"]["spec"]["containers"][0]["image"]
            == "example.invalid/kiosk-worker:v2"
        ),
        T,
        "image reverted",
    )
    # Replicas edited by hand go back to what the queue says.
    api.patch_deployment(DEP("seg"), {"spec": {"replicas": 7}})
    wait_for(lambda: api.replicas(DEP("seg")) == 2, T, "replicas reverted to 2")
    api.wait_events("seg", "DeploymentReverted")


def test_deleted_pool_garbage_collects_deployment(operator, api, redis_server):
    api.create_pool(pool_manifest("seg", redis_server.port))
    wait_for(lambda: api.deployment(DEP("seg")), T, "Deployment")
    api.delete_pool("seg")
    wait_for(lambda: api.deployment(DEP("seg")) is None, T, "Deployment garbage-collected")


def test_redis_down_keeps_replicas_and_recovers(operator, api, redis_server, redis_client):
    api.create_pool(
        pool_manifest(
            "seg", redis_server.port, scaling={"itemsPerWorker": 1, "maxWorkers": 3, "cooldownSeconds": 1}
        )
    )
    _push(redis_client, "segmentation", 3)
    wait_for(lambda: api.replicas(DEP("seg")) == 3, T, "3 replicas")
    redis_server.stop()
    try:
        cond = wait_for(
            lambda: (c := api.condition("seg", "RedisReachable")) and c["status"] == "False" and c,
            T,
            "RedisReachable False",
        )
        assert cond["reason"] == "RedisUnreachable"
        api.wait_events("seg", "RedisUnreachable")
        assert api.replicas(DEP("seg")) == 3
        assert operator.alive()
    finally:
        redis_server.start()
    wait_for(
        lambda: (c := api.condition("seg", "RedisReachable")) and c["status"] == "True",
        T,
        "RedisReachable True again",
    )
    # The data did not survive the restart (no persistence): the empty queue scales to zero.
    wait_for(lambda: api.replicas(DEP("seg")) == 0, T, "scaled down after recovery")


def test_model_server_deployment_follows_pool(
    operator, api, redis_server, redis_client, k8s_cluster, k8s_namespace
):
    k8s_cluster.apply(
        """
apiVersion: apps/v1
kind: Deployment
metadata: {name: tf-serving}
spec:
  replicas: 0
  selector: {matchLabels: {app: tf-serving}}
  template:
    metadata: {labels: {app: tf-serving}}
    spec: {containers: [{name: tfs, image: example.invalid/tfs:1}]}
""",
        namespace=k8s_namespace,
    )
    api.create_pool(
        pool_manifest(
            "seg", redis_server.port, modelServer={"deployment": {"name": "tf-serving", "replicas": 2}}
        )
    )
    _push(redis_client, "segmentation", 1)
    wait_for(lambda: api.replicas("tf-serving") == 2, T, "model server scaled up with work")
    redis_client.delete("segmentation")
    wait_for(lambda: api.replicas("tf-serving") == 0, T, "model server scaled to zero when idle")


def test_ready_column_paused_condition_and_scale_subresource(operator, api, redis_server, redis_client, k8s_cluster):
    """kubectl shows Ready; `kubectl scale --replicas=0` pauses (condition Paused) and N resumes with N as the
    ceiling, the scale's status.replicas following the ceiling, not the worker count."""
    ns = api.ns
    api.create_pool(pool_manifest("seg", redis_server.port, scaling={"itemsPerWorker": 1, "maxWorkers": 5}))

    def ready_column() -> str:
        lines = k8s_cluster.kubectl("get", "consumerpools", "-n", ns).stdout.splitlines()
        start = lines[0].index("READY")  # cells are aligned under their header; empty ones are blank
        return lines[1][start:].split(" ", 1)[0]

    wait_for(lambda: ready_column() == "True", T, "READY True in kubectl get")
    _push(redis_client, "segmentation", 3)
    wait_for(lambda: api.replicas(DEP("seg")) == 3, T, "3 replicas")

    k8s_cluster.kubectl("scale", "consumerpool", "seg", "-n", ns, "--replicas=0")
    paused = wait_for(lambda: api.condition("seg", "Paused"), T, "Paused condition")
    assert paused["status"] == "True" and paused["reason"] == "MaxWorkersZero"
    assert paused["observedGeneration"] == api.pool("seg")["metadata"]["generation"]
    wait_for(lambda: api.replicas(DEP("seg")) == 0, T, "paused: 0 replicas with 3 items pending")
    assert api.pool("seg")["status"]["pending"] == 3

    k8s_cluster.kubectl("scale", "consumerpool", "seg", "-n", ns, "--replicas=2")
    wait_for(lambda: api.condition("seg", "Paused") is None, T, "Paused condition gone")
    wait_for(lambda: api.replicas(DEP("seg")) == 2, T, "resumed: ceiling 2 for 3 items")
    scale = wait_for(
        lambda: (s := k8s_cluster.get(f"/apis/kiosk.deepcell.org/v1alpha1/namespaces/{ns}/consumerpools/seg/scale"))
        ["status"].get("replicas") == 2 and s,
        T,
        "scale status.replicas 2",
    )
    assert scale["spec"]["replicas"] == 2 and scale["status"]["selector"] == manifests.label_selector("seg")
    # Idle: workers go to 0, the ceiling (the scale's replicas) stays 2.
    redis_client.delete("segmentation")
    wait_for(lambda: api.pool("seg")["status"].get("workers") == 0, T, "status workers 0")
    scale = k8s_cluster.get(f"/apis/kiosk.deepcell.org/v1alpha1/namespaces/{ns}/consumerpools/seg/scale")
    assert (scale["spec"]["replicas"], scale["status"]["replicas"]) == (2, 2)
    # kopf keeps its state in annotations: nothing of it in the typed status.
    pool = api.pool("seg")
    assert "kopf" not in pool["status"]
    assert "kopf.zalando.org/last-handled-configuration" in pool["metadata"]["annotations"]
    assert operator.alive()
