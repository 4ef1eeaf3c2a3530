"""Job mode on the real local cluster (kube-apiserver + kwok).

The first tests run the real operator process (fixture ``operator``) on a Job-mode pool;
the test plays kubelet and worker for each Job pod (takes up to batchSize items off the
queue as ``kiosk-worker --max-jobs N`` does, then reports the pod Succeeded). The later
ones drive jobmode.reconcile_jobs directly, as the operator's timer does.
"""

from __future__ import annotations

import re

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

import kiosk_protocol as protocol
from harness.cluster import HARNESS_KUBELET_LABEL
from harness.kubelet import terminal_status
from harness.operator_process import pool_manifest
from harness.wait import wait_for
from kiosk_operator import jobmode, manifests
from kiosk_operator.spec import parse_spec
from kiosk_protocol import JobStore

pytestmark = pytest.mark.cluster
DELAY = "pod-complete.stage.kwok.x-k8s.io/delay"
QUEUE = "segmentation"
T = 60


# --- the real operator ------------------------------------------------------------------------


def _job_pool(name: str, redis_port: int, batch: int, max_workers: int, **worker) -> dict:
    return pool_manifest(
        name,
        redis_port,
        worker={"podLabels": {HARNESS_KUBELET_LABEL: "played-by-test"}, **worker},
        scaling={
            "mode": "Job",
            "batchSize": batch,
            "maxWorkers": max_workers,
            "job": {"successfulJobsHistoryLimit": 3, "failedJobsHistoryLimit": 1, "ttlSecondsAfterFinished": 3600},
        },
    )


def _push(client, n: int) -> list[str]:
    return [protocol.submit_job(client, QUEUE, f"uploads/img{i}.tif", "segmentation", "1") for i in range(n)]


def _metric(text: str, name: str, pool: str) -> float:
    """Sum of a metric's samples for one pool in Prometheus text format (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'pool="{pool}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


class JobRecorder:
    """Polls the pool's Jobs: every Job ever seen, and the most active at one time."""

    def __init__(self, api, pool: str) -> None:
        self.api, self.pool = api, pool
        self.seen: set[str] = set()
        self.peak = 0
        self.active = 0

    def poll(self) -> list[dict]:
        selector = manifests.label_selector(self.pool, manifests.JOB_COMPONENT)
        jobs = self.api.c.get(f"/apis/batch/v1/namespaces/{self.api.ns}/jobs", labelSelector=selector)["items"]
        self.seen.update(j["metadata"]["name"] for j in jobs)
        self.active = sum(1 for j in jobs if jobmode.job_state(j) in jobmode.ACTIVE_STATES)
        self.peak = max(self.peak, self.active)
        return jobs


class BatchPodPlayer:
    """Plays kubelet + batch worker for the pool's Job pods, one batch per pod.

    A Running pod takes up to ``batch`` items off the queue into its processing list and
    finishes them (JobStore, as the worker does), stops at an empty queue, and is then
    reported Succeeded, which the Job controller turns into a completed Job.
    """

    def __init__(self, api, client, pool: str, batch: int) -> None:
        self.api, self.client, self.pool, self.batch = api, client, pool, batch
        self.taken: dict[str, int] = {}

    def step(self) -> None:
        selector = manifests.label_selector(self.pool, manifests.JOB_COMPONENT)
        for pod in self.api.pods(selector):
            name = pod["metadata"]["name"]
            if name in self.taken or pod["status"].get("phase") != "Running":
                continue
            store = JobStore(self.client, name)
            taken = 0
            while taken < self.batch and (key := store.pop(QUEUE, 0)):
                store.finish(QUEUE, key, {"status": "done"})
                taken += 1
            self.taken[name] = taken
            started = pod["status"].get("startTime") or pod["metadata"]["creationTimestamp"]
            self.api.c.request(
                "PATCH",
                f"/api/v1/namespaces/{self.api.ns}/pods/{name}/status",
                terminal_status(pod, 0, started),
                content_type="application/strategic-merge-patch+json",
            )


def test_operator_250_items_batch_25_exactly_10_jobs(operator, api, redis_server, redis_client):
    keys = _push(redis_client, 250)  # before the pool: no Job pod ever sees a half-filled queue
    api.create_pool(_job_pool("burst", redis_server.port, batch=25, max_workers=50))
    jobs, player = JobRecorder(api, "burst"), BatchPodPlayer(api, redis_client, "burst", 25)

    def all_done() -> bool:
        jobs.poll()
        player.step()
        jobs.poll()
        return redis_client.llen(QUEUE) == 0 and jobs.active == 0 and len(player.taken) == len(jobs.seen)

    wait_for(all_done, 120, "250 items taken by the pool's Jobs", interval=0.1, max_interval=0.2)
    assert len(jobs.seen) == 10, sorted(jobs.seen)
    assert jobs.peak == 10
    assert sorted(player.taken.values()) == [25] * 10
    assert all(redis_client.hget(k, "status") == "done" for k in keys)
    # The operator's own count agrees (a Job created and pruned between two polls would show here).
    assert _metric(operator.metrics(), "kiosk_pool_jobs_created_total", "burst") == 10
    # Job mode runs no worker Deployment.
    assert api.deployment(manifests.deployment_name("burst")) is None
    # History limit: only the 3 newest succeeded Jobs are kept.
    wait_for(lambda: len(jobs.poll()) == 3, T, "succeeded Jobs pruned to the history limit 3")
    assert len(jobs.seen) == 10
    status = wait_for(
        lambda: (s := api.pool("burst").get("status", {})).get("activeJobs") == 0 and s, T, "activeJobs 0"
    )
    assert status["pending"] == 0 and status["workers"] == 0
    def jobs_in(events: list[dict]) -> int:
        return sum(int(re.search(r"created (\d+) worker Jobs", e["message"]).group(1)) * e.get("count", 1)
                   for e in events)

    created = api.wait_events("burst", "JobsCreated", until=lambda events: jobs_in(events) >= 10)
    assert jobs_in(created) == 10
    # Nothing left for a reclaim: every taken item was finished.
    assert not [k for k in redis_client.keys("processing-*")]


def test_operator_pending_pods_do_not_trigger_extra_jobs(operator, api, redis_server, redis_client):
    _push(redis_client, 100)
    api.create_pool(
        _job_pool("stuck", redis_server.port, batch=10, max_workers=100,
                  nodeSelector={"kiosk-test/no-such-node": "true"})
    )
    jobs = JobRecorder(api, "stuck")
    wait_for(lambda: len(jobs.poll()) == 10, T, "10 Jobs for 100 items")
    selector = manifests.label_selector("stuck", manifests.JOB_COMPONENT)

    def unschedulable() -> bool:
        pods = api.pods(selector)
        return len(pods) == 10 and all(
            p["status"].get("phase") == "Pending"
            and any(c["type"] == "PodScheduled" and c["status"] == "False" for c in p["status"].get("conditions", []))
            for p in pods
        )

    wait_for(unschedulable, T, "10 unschedulable pods")

    def cycles() -> float:
        return _metric(operator.metrics(), "kiosk_pool_reconcile_seconds_count", "stuck")

    def after_cycles(n: int) -> None:
        target = cycles() + n
        wait_for(lambda: (jobs.poll(), cycles() >= target)[1], T, f"{n} more operator cycles")

    after_cycles(10)  # poll after poll, the Pending Jobs still cover the queue
    assert len(jobs.seen) == 10 and jobs.peak == 10
    assert _metric(operator.metrics(), "kiosk_pool_jobs_created_total", "stuck") == 10
    # Items beyond what the Pending Jobs cover do get Jobs: 25 more -> ceil(25 / 10) = 3.
    _push(redis_client, 25)
    wait_for(lambda: len(jobs.poll()) == 13, T, "3 more Jobs for 25 more items")
    after_cycles(10)
    assert len(jobs.seen) == 13 and jobs.peak == 13
    status = api.pool("stuck")["status"]
    assert status["activeJobs"] == 13 and status["pending"] == 125


def test_switch_to_job_mode_scales_deployment_to_zero(operator, api, redis_server, redis_client):
    api.create_pool(pool_manifest("flip", redis_server.port, scaling={"minWorkers": 1, "maxWorkers": 3}))
    dep = manifests.deployment_name("flip")
    wait_for(lambda: api.replicas(dep) == 1, T, "Deployment with minWorkers 1")
    api.patch_pool("flip", {"spec": {"scaling": {"mode": "Job", "minWorkers": 0, "batchSize": 5},
                                     "worker": {"podLabels": {HARNESS_KUBELET_LABEL: "played-by-test"}}}})
    wait_for(lambda: api.replicas(dep) == 0, T, "worker Deployment scaled to 0 in Job mode")
    _push(redis_client, 12)
    jobs = JobRecorder(api, "flip")
    wait_for(lambda: len(jobs.poll()) == 3, T, "ceil(12 / 5) = 3 Jobs")
    assert api.replicas(dep) == 0
    api.wait_events("flip", "DeploymentScaledDown")


# --- jobmode.reconcile_jobs driven by the test ------------------------------------------------


@pytest.fixture()
def batch_api(k8s_cluster):
    api = k8s_config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig))
    yield k8s.BatchV1Api(api), k8s.CoreV1Api(api)
    api.close()


def _spec(batch=25, max_workers=50, image="kiosk-worker:a", keep=3, **worker):
    return parse_spec({
        "queues": ["segmentation"],
        "worker": {"image": image, **worker},
        "scaling": {"mode": "Job", "batchSize": batch, "maxWorkers": max_workers,
                    "job": {"successfulJobsHistoryLimit": keep, "failedJobsHistoryLimit": 1,
                            "ttlSecondsAfterFinished": 3600}},
    })


def _jobs(batch_v1, ns, pool):
    return jobmode.list_pool_jobs(batch_v1, ns, pool)


def _owner(core_v1, ns):
    cm = core_v1.create_namespaced_config_map(ns, {"metadata": {"name": "owner"}})
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": cm.metadata.name, "namespace": ns, "uid": cm.metadata.uid}}


def test_250_items_batch_25_exactly_10_jobs_never_more(batch_api, k8s_namespace):
    batch_v1, core_v1 = batch_api
    ns, pool = k8s_namespace, "burst"
    # History is kept while the test plays the workers (it must see every success once).
    spec = _spec(batch=25, max_workers=50, keep=100, podAnnotations={DELAY: "3s"})
    owner = _owner(core_v1, ns)
    pending = 250
    created: set[str] = set()
    consumed: set[str] = set()
    peak = 0

    def tick() -> bool:
        nonlocal pending, peak
        views = _jobs(batch_v1, ns, pool)
        for view in views:  # play the workers: a running Job takes its batch off the queue
            if view.state in (jobmode.RUNNING, jobmode.SUCCEEDED) and view.name not in consumed:
                consumed.add(view.name)
                pending = max(0, pending - 25)
        result = jobmode.reconcile_jobs(batch_v1, ns, pool, spec, pending, owner=owner)
        created.update(result.created)
        peak = max(peak, sum(1 for v in views if v.active) + len(result.created))
        return pending == 0 and not any(v.active for v in views) and not result.created

    wait_for(tick, 90, "all batches done", interval=0.2, max_interval=0.3)
    assert len(created) == 10, sorted(created)
    assert peak == 10
    # Created Jobs are owned by the pool (GC on delete) and run the worker in batch mode.
    job = batch_v1.read_namespaced_job(sorted(created)[0], ns)
    assert job.metadata.owner_references[0].uid == owner["metadata"]["uid"]
    assert "--max-jobs" in (job.spec.template.spec.containers[0].args or [])
    # History limit: one more reconcile prunes to the 3 newest succeeded Jobs.
    pruning = _spec(batch=25, max_workers=50, keep=3, podAnnotations={DELAY: "3s"})
    assert len(jobmode.reconcile_jobs(batch_v1, ns, pool, pruning, 0, owner=owner).deleted) == 7
    wait_for(lambda: len(_jobs(batch_v1, ns, pool)) == 3, 30, "history pruned to 3 succeeded Jobs")


def test_pending_pods_do_not_trigger_extra_jobs(batch_api, k8s_namespace):
    batch_v1, core_v1 = batch_api
    ns, pool = k8s_namespace, "stuck"
    spec = _spec(batch=10, max_workers=100, nodeSelector={"kiosk-test/no-such-node": "true"})
    first = jobmode.reconcile_jobs(batch_v1, ns, pool, spec, 100)
    assert len(first.created) == 10

    def pods_unschedulable() -> bool:
        selector = manifests.label_selector(pool, manifests.JOB_COMPONENT)
        pods = core_v1.list_namespaced_pod(ns, label_selector=selector).items
        return len(pods) == 10 and all(
            p.status.phase == "Pending" and any(c.type == "PodScheduled" and c.status == "False"
                                                for c in (p.status.conditions or []))
            for p in pods)

    wait_for(pods_unschedulable, 30, "10 unschedulable pods")
    for _ in range(5):  # poll after poll, still covered
        assert jobmode.reconcile_jobs(batch_v1, ns, pool, spec, 100).created == ()
    views = _jobs(batch_v1, ns, pool)
    assert len(views) == 10 and all(v.state == jobmode.PENDING for v in views)
    # More items than the pending Jobs cover do get Jobs, capped by maxWorkers.
    assert len(jobmode.reconcile_jobs(batch_v1, ns, pool, spec, 125).created) == 3


def test_spec_change_keeps_running_jobs_and_new_jobs_use_new_spec(batch_api, k8s_namespace):
    batch_v1, _ = batch_api
    ns, pool = k8s_namespace, "change"
    old = _spec(batch=10, image="kiosk-worker:old", podAnnotations={DELAY: "60s"})
    first = jobmode.reconcile_jobs(batch_v1, ns, pool, old, 20)
    wait_for(lambda: all(v.state == jobmode.RUNNING for v in _jobs(batch_v1, ns, pool)), 30, "Jobs running")
    new = _spec(batch=10, image="kiosk-worker:new", podAnnotations={DELAY: "60s"})
    second = jobmode.reconcile_jobs(batch_v1, ns, pool, new, 35)
    assert len(second.created) == 2 and not second.deleted

    def image(name: str) -> str:
        return batch_v1.read_namespaced_job(name, ns).spec.template.spec.containers[0].image

    assert {image(n) for n in first.created} == {"kiosk-worker:old"}
    assert {image(n) for n in second.created} == {"kiosk-worker:new"}
    assert {v.state for v in _jobs(batch_v1, ns, pool) if v.name in first.created} == {jobmode.RUNNING}


def test_failed_jobs_history_limit(batch_api, k8s_namespace):
    batch_v1, _ = batch_api
    ns, pool = k8s_namespace, "fails"
    spec = _spec(batch=5, podAnnotations={"kiosk-operator.test/pod-fail": "true"})
    assert len(jobmode.reconcile_jobs(batch_v1, ns, pool, spec, 15).created) == 3
    wait_for(lambda: [v.state for v in _jobs(batch_v1, ns, pool)].count(jobmode.FAILED) == 3, 60,
             "3 failed Jobs")
    result = jobmode.reconcile_jobs(batch_v1, ns, pool, spec, 0)
    assert len(result.deleted) == 2
    wait_for(lambda: len(_jobs(batch_v1, ns, pool)) == 1, 30, "failed history pruned to 1")
