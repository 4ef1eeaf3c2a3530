"""Job mode: decide and apply the pool's short-lived worker Jobs.

Counting is where KEDA's ScaledJob over-creates: it ignores Jobs whose pods are
still Pending, so a slow node pool gets a new wave of Jobs every poll. Here every
active Job, running or still Pending, counts as ``batchSize`` of capacity
(``scaling.jobs_to_create``), so new Jobs only cover items no existing Job will take.

``plan_jobs`` is pure (Job objects in, counts and names out); ``reconcile_jobs``
lists, creates (owned by the pool via ``kopf.adopt``) and prunes history. Running
Jobs are never modified or deleted: a spec change only affects the Jobs created
after it.
"""

from __future__ import annotations

import datetime
import logging
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kiosk_operator import manifests, scaling
from kiosk_operator.spec import PoolSpec

log = logging.getLogger(__name__)

PENDING, RUNNING, SUCCEEDED, FAILED = "pending", "running", "succeeded", "failed"
ACTIVE_STATES = (PENDING, RUNNING)


@dataclass(frozen=True)
class JobView:
    """What the plan needs to know about one Job."""

    name: str
    created: float
    state: str

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


@dataclass(frozen=True)
class JobPlan:
    create: int
    delete: tuple[str, ...]
    pending_pods: int
    running: int
    succeeded: int
    failed: int

    @property
    def active(self) -> int:
        """Active Jobs before this plan's creations (running + pods still Pending)."""
        return self.pending_pods + self.running


# --- pure -----------------------------------------------------------------------------------


def job_state(job: Mapping[str, Any]) -> str:
    """pending / running / succeeded / failed from a Job's status (camelCase dict).

    An active Job without a Ready pod is ``pending``: unschedulable, pulling its image,
    or not yet given a pod by the Job controller. It still counts as capacity.
    """
    status = job.get("status") or {}
    for cond in status.get("conditions") or ():
        if cond.get("status") != "True":
            continue
        if cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            return SUCCEEDED
        if cond.get("type") in ("Failed", "FailureTarget"):
            return FAILED
    if (status.get("succeeded") or 0) >= 1 and not status.get("active"):
        return SUCCEEDED
    if (status.get("ready") or 0) >= 1:
        return RUNNING
    return PENDING


def job_view(job: Any) -> JobView:
    """A JobView from a Job dict or a kubernetes-client V1Job."""
    data = _as_dict(job)
    meta = data.get("metadata") or {}
    return JobView(str(meta.get("name", "")), _timestamp(meta.get("creationTimestamp")), job_state(data))


def history_to_delete(jobs: Iterable[JobView], succeeded_limit: int, failed_limit: int) -> list[str]:
    """Finished Jobs beyond the history limits, oldest first (newest ones are kept)."""
    out: list[str] = []
    for state, limit in ((SUCCEEDED, succeeded_limit), (FAILED, failed_limit)):
        done = sorted((j for j in jobs if j.state == state), key=lambda j: (j.created, j.name), reverse=True)
        out.extend(j.name for j in reversed(done[max(0, limit):]))
    return out


def plan_jobs(jobs: Iterable[JobView], pending_items: int, spec: PoolSpec) -> JobPlan:
    """How many Jobs to create and which finished ones to delete."""
    jobs = list(jobs)
    counts = {s: sum(1 for j in jobs if j.state == s) for s in (PENDING, RUNNING, SUCCEEDED, FAILED)}
    s = spec.scaling
    create = scaling.jobs_to_create(pending_items, counts[PENDING] + counts[RUNNING], None, s.batch_size,
                                    s.max_workers)
    delete = history_to_delete(jobs, s.job.successful_jobs_history_limit, s.job.failed_jobs_history_limit)
    return JobPlan(create, tuple(delete), counts[PENDING], counts[RUNNING], counts[SUCCEEDED], counts[FAILED])


def new_job_index() -> str:
    """A short unique suffix: Job names must not collide across operator restarts."""
    return secrets.token_hex(4)


# --- I/O ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobResult:
    plan: JobPlan
    created: tuple[str, ...]
    deleted: tuple[str, ...]

    @property
    def active(self) -> int:
        """Active Jobs after this reconcile (for status.workers / status.activeJobs)."""
        return self.plan.active + len(self.created)


def list_pool_jobs(batch_v1: Any, namespace: str, pool_name: str, **request: Any) -> list[JobView]:
    selector = manifests.label_selector(pool_name, manifests.JOB_COMPONENT)
    items = batch_v1.list_namespaced_job(namespace, label_selector=selector, **request).items
    return [job_view(j) for j in items]


def reconcile_jobs(
    batch_v1: Any,
    namespace: str,
    pool_name: str,
    spec: PoolSpec,
    pending_items: int,
    owner: Mapping[str, Any] | None = None,
    request_timeout: float | None = None,
) -> JobResult:
    """One Job-mode reconcile: list the pool's Jobs, create the missing ones, prune history.

    ``batch_v1`` is a ``kubernetes.client.BatchV1Api``; ``owner`` the pool body (kopf's
    ``body``) so that created Jobs are adopted and garbage-collected with the pool.
    ``pending_items`` = LLEN of the pool's queues (in-flight items are already taken).
    ``request_timeout`` bounds each API call, so a silent API server cannot stall the pool's loop.
    The operator's cycle runs the same steps (list, decide, create, prune) through kube_backend.
    """
    request = {"_request_timeout": request_timeout} if request_timeout else {}
    plan = plan_jobs(list_pool_jobs(batch_v1, namespace, pool_name, **request), pending_items, spec)
    created = create_jobs(batch_v1, namespace, pool_name, spec, plan.create, owner, request_timeout)
    deleted = prune_jobs(batch_v1, namespace, plan.delete, request_timeout)
    if created or deleted:
        log.info("pool %s/%s: %d pending items, %d active Jobs: created %d, pruned %d", namespace, pool_name,
                 pending_items, plan.active, len(created), len(deleted))
    return JobResult(plan, tuple(created), tuple(deleted))


def create_jobs(
    batch_v1: Any,
    namespace: str,
    pool_name: str,
    spec: PoolSpec,
    count: int,
    owner: Mapping[str, Any] | None = None,
    request_timeout: float | None = None,
) -> list[str]:
    """Create ``count`` worker Jobs (adopted by ``owner`` when given); returns their names."""
    request = {"_request_timeout": request_timeout} if request_timeout else {}
    created: list[str] = []
    for _ in range(count):
        body = manifests.build_job(pool_name, namespace, spec, new_job_index())
        if owner is not None:
            import kopf

            kopf.adopt(body, owner=owner)  # type: ignore[arg-type]
        batch_v1.create_namespaced_job(namespace, body, **request)
        created.append(body["metadata"]["name"])
    return created


def prune_jobs(
    batch_v1: Any, namespace: str, names: Iterable[str], request_timeout: float | None = None
) -> list[str]:
    """Delete finished Jobs beyond the history limits (already gone: fine); returns those deleted."""
    from kubernetes.client.exceptions import ApiException

    request = {"_request_timeout": request_timeout} if request_timeout else {}
    deleted: list[str] = []
    for name in names:
        try:
            batch_v1.delete_namespaced_job(name, namespace, propagation_policy="Background", **request)
            deleted.append(name)
        except ApiException as err:
            if err.status != 404:
                raise
    return deleted


def _as_dict(job: Any) -> Mapping[str, Any]:
    if isinstance(job, Mapping):
        return job
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(job)


def _timestamp(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    try:
        return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
