"""End to end through a real cluster: ConsumerPool -> operator -> Deployment or Jobs ->
pods (kwok) -> worker processes (the harness plays kubelet) -> Redis -> model server (gRPC) -> file://
bucket -> job hashes done -> pool status, and back to zero workers.

The operator runs as `kiosk-operator` with exactly its ServiceAccount's RBAC; jobs are written the way
the Kiosk frontend writes them; results are checked against the synthetic ground truth.
"""

from __future__ import annotations

import math
import re

import pytest
from e2e_support import mean_matched_iou, result_labels, statuses, submit_cells

import kiosk_protocol as protocol
from harness.cluster import HARNESS_KUBELET_LABEL
from harness.operator_process import pool_manifest
from harness.wait import wait_for
from kiosk_operator import manifests

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

T = 60
JOBS = 20
POOL = "e2e"


def _pool(redis_server, model_server, bucket, **scaling) -> dict:
    """A pool whose workers reach the test's Redis, model server and bucket on 127.0.0.1."""
    return pool_manifest(
        POOL,
        redis_server.port,
        worker={
            "podLabels": {HARNESS_KUBELET_LABEL: "harness"},  # kwok must not complete Job pods itself
            "graceSeconds": 5,
            "terminationGracePeriodSeconds": 10,
            "heartbeatIntervalSeconds": 0.5,
            "env": [
                {"name": "EMPTY_QUEUE_TIMEOUT", "value": "0.5"},
                {"name": "MAX_RETRY", "value": "2"},
                {"name": "GRPC_BACKOFF", "value": "0.05"},
            ],
        },
        modelServer={"host": "127.0.0.1", "port": model_server.port},
        storage={"bucket": f"file://{bucket}"},
        scaling={"pollingIntervalSeconds": 0.3, "cooldownSeconds": 2, **scaling},
    )


def _registered(client) -> set[str]:
    return set(client.zrange(protocol.workers_key("segmentation"), 0, -1))


def _check_results(client, truths: dict, worker_pods: set[str]) -> None:
    """Every job done by one of the pool's pod processes, with labels matching the ground truth."""
    for key, truth in truths.items():
        job = client.hgetall(key)
        assert job["status"] == "done", job
        assert job["identity_started"] in worker_pods, (job["identity_started"], worker_pods)
        assert mean_matched_iou(result_labels(job), truth) >= 0.8, key
    assert client.llen("segmentation") == 0
    for pod in worker_pods:
        assert client.llen(protocol.processing_key("segmentation", pod)) == 0, pod


def test_deployment_pool_end_to_end(operator, api, kubelet, redis_server, redis_client, e2e_model_server,
                                    bucket):
    dep = manifests.deployment_name(POOL)
    api.create_pool(_pool(redis_server, e2e_model_server, bucket, minWorkers=0, maxWorkers=3, itemsPerWorker=5))
    wait_for(lambda: api.replicas(dep) == 0, T, "worker Deployment at min 0")
    player = kubelet(f"{manifests.POOL_LABEL}={POOL}")

    truths = submit_cells(redis_client, bucket, JOBS)
    # ceil(20 / 5) = 4 workers wanted, capped at maxWorkers 3 (maybe in steps while jobs are being
    # submitted); each pod becomes a worker process.
    wait_for(lambda: any(e["reason"] == "ScaledUp" and re.search(r"-> 3\b", e["message"])
                         for e in api.events(POOL)), T, "ScaledUp to 3 event")
    wait_for(lambda: len(player.processes) >= 3, T, "3 worker processes started")
    wait_for(lambda: statuses(redis_client, list(truths)).get("done") == JOBS, 90,
             f"{JOBS} jobs done")
    _check_results(redis_client, truths, set(player.processes))

    # Idle after the cooldown: back to zero, every worker drained on SIGTERM and exited 0.
    wait_for(lambda: api.replicas(dep) == 0, T, "scaled back to min 0 after cooldown")
    wait_for(lambda: not player.running(), T, "worker processes stopped")
    wait_for(lambda: all(p.exit_code is not None for p in player.processes.values()), 10, "exits recorded")
    assert all(p.exit_codes == [0] for p in player.processes.values()), player.describe()
    wait_for(lambda: not _registered(redis_client), 10, "workers unregistered")
    status = wait_for(lambda: (s := api.pool(POOL).get("status", {})).get("workers") == 0 and s, T,
                      "status workers 0")
    assert (status["pending"], status["inFlight"], status["desired"]) == (0, 0, 0), status
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True", "RedisReachable": "True", "ScalingActive": "True"}
    api.wait_events(POOL, "ScaledDown")
    assert operator.alive()


def test_job_mode_pool_end_to_end(operator, api, kubelet, k8s_cluster, k8s_namespace, redis_server,
                                  redis_client, e2e_model_server, bucket):
    batch = 5
    pool = _pool(redis_server, e2e_model_server, bucket, mode="Job", minWorkers=0, maxWorkers=10,
                 batchSize=batch, job={"successfulJobsHistoryLimit": 20, "ttlSecondsAfterFinished": 600})
    api.create_pool(pool)
    player = kubelet(f"{manifests.POOL_LABEL}={POOL}")
    wait_for(lambda: api.condition(POOL, "RedisReachable"), T, "pool measured by the operator")

    def jobs() -> list[dict]:
        return k8s_cluster.get(f"/apis/batch/v1/namespaces/{k8s_namespace}/jobs",
                               labelSelector=manifests.label_selector(POOL, manifests.JOB_COMPONENT))["items"]

    assert jobs() == []  # nothing for an empty queue
    truths = submit_cells(redis_client, bucket, JOBS)
    wait_for(jobs, T, "worker Jobs created by the operator for the queued items")
    seen: set[str] = set()

    def all_done() -> bool:
        seen.update(j["metadata"]["name"] for j in jobs())
        assert len(seen) <= math.ceil(JOBS / batch), f"over-provisioned: {sorted(seen)}"
        return statuses(redis_client, list(truths)).get("done") == JOBS

    wait_for(all_done, 90, f"{JOBS} jobs done by worker Jobs")
    _check_results(redis_client, truths, set(player.processes))

    def complete(job: dict) -> bool:
        return any(c["type"] == "Complete" and c["status"] == "True"
                   for c in job.get("status", {}).get("conditions", []))

    finished = wait_for(lambda: (js := jobs()) and all(complete(j) for j in js) and js, T, "worker Jobs Complete")
    seen.update(j["metadata"]["name"] for j in finished)
    assert len(seen) == math.ceil(JOBS / batch), sorted(seen)      # exactly ceil(20 / 5) = 4, never more
    for job in finished:
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[-2:] == ["--max-jobs", str(batch)]
    procs = list(player.processes.values())
    assert len(procs) == len(seen) and all(p.reported == "Succeeded" and p.exit_code == 0 for p in procs), \
        player.describe()
    status = wait_for(lambda: (s := api.pool(POOL).get("status", {})).get("activeJobs") == 0 and s, T,
                      "status activeJobs 0")
    assert (status["pending"], status["inFlight"], status["workers"]) == (0, 0, 0), status
    api.wait_events(POOL, "JobsCreated")
    assert jobs() and len(jobs()) == len(seen)  # no new Job once the queue is empty
    assert operator.alive()
