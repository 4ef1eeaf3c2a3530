"""Job mode on the real local cluster: jobmode.reconcile_jobs against kube-apiserver + kwok.

The test calls reconcile_jobs in a loop, as the operator's timer does, and plays the
workers (a succeeded Job took its batch off the queue).
"""

from __future__ import annotations

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from harness.wait import wait_for
from kiosk_operator import jobmode, manifests
from kiosk_operator.spec import parse_spec

pytestmark = pytest.mark.cluster
DELAY = "pod-complete.stage.kwok.x-k8s.io/delay"


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
