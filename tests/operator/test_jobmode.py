"""Job mode, pure part: Job states, the create count over a replayed trace, history limits."""

from __future__ import annotations

import pytest

from kiosk_operator import jobmode
from kiosk_operator.jobmode import FAILED, PENDING, RUNNING, SUCCEEDED, JobView
from kiosk_operator.spec import parse_spec


def _spec(batch: int = 25, max_workers: int = 100, ok: int = 3, bad: int = 1):
    return parse_spec({
        "queues": ["predict"], "worker": {"image": "w"},
        "scaling": {"mode": "Job", "batchSize": batch, "maxWorkers": max_workers,
                    "job": {"successfulJobsHistoryLimit": ok, "failedJobsHistoryLimit": bad}},
    })


def _job(status: dict, name: str = "j", created: str = "2026-01-01T00:00:00Z") -> dict:
    return {"metadata": {"name": name, "creationTimestamp": created}, "status": status}


@pytest.mark.parametrize("status, state", [
    ({}, PENDING),                                        # no pod yet
    ({"active": 1}, PENDING),                             # pod Pending (unschedulable, pulling)
    ({"active": 1, "ready": 0}, PENDING),
    ({"active": 1, "ready": 1}, RUNNING),
    ({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}, SUCCEEDED),
    ({"succeeded": 1, "conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]}, SUCCEEDED),
    ({"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]}, FAILED),
    ({"active": 1, "conditions": [{"type": "FailureTarget", "status": "True"}]}, FAILED),
    ({"active": 1, "ready": 1, "conditions": [{"type": "Suspended", "status": "False"}]}, RUNNING),
    ({"succeeded": 1}, SUCCEEDED),
])
def test_job_state(status, state):
    assert jobmode.job_state({"status": status}) == state


def test_job_view_from_kubernetes_model():
    from kubernetes.client import V1Job, V1JobStatus, V1ObjectMeta

    job = V1Job(metadata=V1ObjectMeta(name="p-job-1"), status=V1JobStatus(active=1, ready=1))
    view = jobmode.job_view(job)
    assert view.name == "p-job-1" and view.state == RUNNING


def test_exactly_ceil_items_over_batch_and_never_more_while_they_start():
    spec = _spec(batch=25, max_workers=100)
    jobs: list[JobView] = []
    plan = jobmode.plan_jobs(jobs, 250, spec)
    assert plan.create == 10
    # Those 10 Jobs are created but their pods are still Pending: nothing more, poll after poll.
    jobs = [JobView(f"j{i}", i, PENDING) for i in range(10)]
    for _ in range(5):
        assert jobmode.plan_jobs(jobs, 250, spec).create == 0
    # Running, items being taken: still nothing.
    jobs = [JobView(f"j{i}", i, RUNNING) for i in range(10)]
    assert jobmode.plan_jobs(jobs, 130, spec).create == 0


def test_new_items_beyond_capacity_get_new_jobs_capped_by_max():
    spec = _spec(batch=10, max_workers=6)
    jobs = [JobView(f"j{i}", i, RUNNING) for i in range(4)]
    assert jobmode.plan_jobs(jobs, 41, spec).create == 1       # 40 covered, 1 uncovered
    assert jobmode.plan_jobs(jobs, 500, spec).create == 2      # max 6 - 4 active
    assert jobmode.plan_jobs([], 3, spec).create == 1          # never more Jobs than items
    assert jobmode.plan_jobs([], 0, spec).create == 0          # never for an empty queue


def test_finished_jobs_are_not_capacity():
    spec = _spec(batch=10)
    jobs = [JobView("a", 1, SUCCEEDED), JobView("b", 2, FAILED)]
    assert jobmode.plan_jobs(jobs, 20, spec).create == 2


def test_history_limits_keep_newest():
    jobs = [JobView(f"ok{i}", i, SUCCEEDED) for i in range(6)] + [
        JobView(f"bad{i}", i, FAILED) for i in range(3)
    ] + [JobView("run", 0, RUNNING), JobView("pend", 0, PENDING)]
    plan = jobmode.plan_jobs(jobs, 0, _spec(ok=3, bad=1))
    assert plan.delete == ("ok0", "ok1", "ok2", "bad0", "bad1")
    assert jobmode.history_to_delete(jobs, 0, 0) == [f"ok{i}" for i in range(6)] + ["bad0", "bad1", "bad2"]
    assert jobmode.history_to_delete(jobs, 100, 100) == []


def test_burst_with_slow_pod_start_creates_exactly_ceil_items_over_batch():
    """250 items at once; pods stay Pending for 5 polls, then each Job takes 5 items per poll."""
    batch, spec = 25, _spec(batch=25, max_workers=1000)
    pending, created_total, peak = 250, 0, 0
    jobs: list[list[int]] = []  # [left to take, age in polls]
    while pending or jobs:
        views = [JobView(str(i), i, RUNNING if age >= 5 else PENDING) for i, (_, age) in enumerate(jobs)]
        plan = jobmode.plan_jobs(views, pending, spec)
        jobs += [[batch, 0] for _ in range(plan.create)]
        created_total += plan.create
        peak = max(peak, len(jobs))
        for job in jobs:
            if job[1] >= 5:
                take = min(5, job[0], pending)
                job[0] -= take
                pending -= take
            job[1] += 1
        jobs = [j for j in jobs if j[0] > 0 and pending > 0]
    assert created_total == 10 and peak == 10
