"""kopf wiring: pool lifecycle -> Deployment, one scaling loop per pool, drift repair, probes.

Handlers stay thin; the work is in kiosk_operator.cycle via kube_backend.run_cycle and in
kiosk_operator.deployment (sync, run in a thread pool so that 200 pools' loops never block
kopf's event loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from typing import Any

import kopf

from kiosk_operator import manifests, metrics
from kiosk_operator.deployment import ensure_deployment, render_deployment
from kiosk_operator.depth import DepthBatch, RedisClients
from kiosk_operator.drift import deployment_drift
from kiosk_operator.kube import Kube
from kiosk_operator.kube_backend import forget, run_cycle
from kiosk_operator.spec import SpecError, parse_spec
from kiosk_operator.status import PoolState, StatusWriter
from kiosk_protocol.crd import API_VERSION, GROUP, KIND, PLURAL, VERSION
from kiosk_protocol.errors import describe

log = logging.getLogger("kiosk_operator")

POOL = (GROUP, VERSION, PLURAL)
#: Seconds until a pool's cycle runs again after an unexpected error (a Kubernetes API hiccup).
ERROR_INTERVAL = 5.0
_state: dict[str, Any] = {}


def _kube(memo: Any) -> Kube:
    kube = getattr(memo, "kube", None) or _state.get("kube")
    if kube is None:
        kube = _state["kube"] = Kube()
    return kube


#: Threads running the pools' cycles. Most of a cycle's time is a wait for the API server:
#: when it is slow (a burst of 200 scales on a busy control plane: ~0.4 s a request), 16
#: threads all wait on patches while the other pools' cycles queue behind them and see
#: their items late. Waiting threads cost little memory and no CPU.
CYCLE_THREADS = 64


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    if "executor" not in _state:
        _state["executor"] = concurrent.futures.ThreadPoolExecutor(
            max_workers=CYCLE_THREADS, thread_name_prefix="pool"
        )
    return _state["executor"]


def _status_writer(kube: Kube) -> StatusWriter:
    if "status_writer" not in _state:
        _state["status_writer"] = StatusWriter(kube)
    return _state["status_writer"]


def _clients() -> RedisClients:
    if "redis" not in _state:
        _state["redis"] = RedisClients()
    return _state["redis"]


def _batch() -> DepthBatch:
    if "batch" not in _state:
        _state["batch"] = DepthBatch()
    return _state["batch"]


def until_tick(now: float, interval: float, due: float) -> tuple[float, float]:
    """(seconds to wait, the tick waited for): the first multiple of ``interval`` after ``now``
    and after ``due`` (the tick this cycle ran for), so that all pools polling every
    ``interval`` wake together and share one depth round per server."""
    if interval <= 0:
        return 0.0, now
    tick = max(math.floor(now / interval) + 1, round(due / interval) + 1) * interval
    return max(0.0, tick - now), tick


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    """Timeouts so that a silent watch reconnects in a minute, not never; quiet success events."""
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 10
    settings.posting.level = logging.WARNING
    settings.persistence.finalizer = f"{GROUP}/kopf-finalizer"
    # kopf's handler progress and last-handled spec live in annotations only (kopf's default also
    # copies progress to status.kopf): the pool's status schema is typed, and status belongs to the
    # operator's own fields. status.kopf stays declared opaque in the CRD for older writers.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage()
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage()
    settings.scanning.disabled = True  # no cluster-wide CRD/namespace watching: namespaced RBAC suffices
    settings.execution.max_workers = 16
    settings.queueing.error_delays = (1, 2, 5, 10, 30)
    memo.kube = _kube(memo)


@kopf.on.cleanup()
def cleanup(**_: Any) -> None:
    if "redis" in _state:
        _state.pop("redis").close()
    if "executor" in _state:
        _state.pop("executor").shutdown(wait=False, cancel_futures=True)
    if "status_writer" in _state:
        writer = _state.pop("status_writer")
        writer.flush(5.0)
        writer.close()


@kopf.on.probe(id="pools")
def probe_pools(**_: Any) -> int:
    """Liveness: answers while the event loop is healthy; reports the pools being scaled."""
    return len(_state.get("loops", {}))


@kopf.index(*POOL)
def pools_by_name(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict]:
    return {
        (namespace, name): {
            "metadata": dict(body.metadata),
            "spec": dict(body.spec),
            "apiVersion": body["apiVersion"],
            "kind": body["kind"],
        }
    }


@kopf.on.resume(*POOL)
@kopf.on.create(*POOL)
@kopf.on.update(*POOL, field="spec")
def reconcile_pool(body: kopf.Body, spec: kopf.Spec, memo: Any, logger: Any, patch: kopf.Patch, **_: Any) -> None:
    """Render the pool's Deployment (Deployment mode); bad specs become a condition, not a crash loop."""
    try:
        pool_spec = parse_spec(dict(spec))
    except SpecError as exc:
        kopf.warn(body, reason="InvalidSpec", message=str(exc))
        raise kopf.PermanentError(str(exc)) from None
    if pool_spec.scaling.mode == "Deployment":
        action, _ = ensure_deployment(_kube(memo), dict(body), pool_spec, logger)
        if action != "unchanged":
            kopf.info(
                body,
                reason=f"Deployment{action.capitalize()}",
                message=f"worker Deployment {manifests.deployment_name(body.metadata.name)} {action}",
            )


WORKER_LABELS = {manifests.POOL_LABEL: kopf.PRESENT, manifests.COMPONENT_LABEL: manifests.WORKER_COMPONENT}


@kopf.index("apps", "v1", "deployments", labels=WORKER_LABELS)
def worker_replicas(
    namespace: str, name: str, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, **_: Any
) -> dict:
    """(spec replicas, pods, owner uids, resourceVersion) of every worker Deployment, from the
    watch: neither an idle cycle nor a scale needs a GET (the owner uids answer "is it the
    pool's?", the resourceVersion "has the watch seen our last scale yet?")."""
    owners = tuple(ref.get("uid", "") for ref in meta.get("ownerReferences") or [])
    replicas, pods = int(spec.get("replicas") or 0), int(status.get("replicas") or 0)
    return {(namespace, name): (replicas, pods, owners, str(meta.get("resourceVersion", "")))}


@kopf.on.event("apps", "v1", "deployments", labels=WORKER_LABELS)
def repair_deployment(
    event: dict,
    body: kopf.Body,
    namespace: str,
    memo: Any,
    logger: Any,
    pools_by_name: kopf.Index,
    **_: Any,
) -> None:
    """Someone edited or deleted a worker Deployment by hand: put ours back."""
    pool_name = body.metadata.labels.get(manifests.POOL_LABEL)
    if (namespace, pool_name) not in pools_by_name:
        return
    indexed = next(iter(pools_by_name[(namespace, pool_name)]))
    deleted = event.get("type") == "DELETED"
    try:
        pool_spec = parse_spec(indexed.get("spec"))
    except SpecError:
        return
    if pool_spec.scaling.mode != "Deployment":
        return
    kube = _kube(memo)
    if not deleted:
        have = dict(body)
        want = render_deployment(indexed, pool_spec, int(have.get("spec", {}).get("replicas") or 0))
        if not deployment_drift(want, have):
            return  # the common case: our own scaling or a status update
    pool = kube.get_pool(namespace, pool_name)  # fresh: the index may lag a change or a deletion
    if pool is None or pool["metadata"].get("deletionTimestamp"):
        return
    action, _ = ensure_deployment(kube, pool, parse_spec(pool.get("spec")), logger)
    if action != "unchanged":
        kopf.event(
            pool,
            type="Warning",
            reason="DeploymentReverted",
            message=f"worker Deployment {body.metadata.name} was changed by hand; {action} it back",
        )


@kopf.daemon(*POOL, cancellation_timeout=10.0)
async def scaling_loop(
    stopped: kopf.DaemonStopped,
    body: kopf.Body,
    namespace: str,
    name: str,
    memo: Any,
    logger: Any,
    worker_replicas: kopf.Index,
    **_: Any,
) -> None:
    """Measure -> decide -> act every pollingIntervalSeconds, for as long as the pool exists."""
    kube = _kube(memo)
    state = PoolState()
    loops = _state.setdefault("loops", {})
    loops[(namespace, name)] = state
    loop = asyncio.get_running_loop()
    writer = _status_writer(kube)
    due = time.time()

    def replicas_of(ns: str, dep: str) -> tuple[int, int, tuple[str, ...], str] | None:
        found = worker_replicas.get((ns, dep))
        return next(iter(found)) if found else None

    try:
        while not stopped:
            pool = {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": dict(body.metadata),
                "spec": dict(body.spec),
                "status": dict(body.status),
            }
            try:
                result = await loop.run_in_executor(
                    _executor(),
                    lambda p=pool: run_cycle(
                        kube, _clients(), p, state, logger=logger, replicas_of=replicas_of,
                        status_writer=writer, batch=_batch(),
                    ),
                )
            except Exception as exc:  # Kubernetes API hiccup: log, post, retry next interval
                logger.warning("scaling cycle failed: %s", describe(exc))
                kopf.warn(pool, reason="ScalingError", message=describe(exc, 500))
                interval = ERROR_INTERVAL
            else:
                for ev in result.events:
                    kopf.event(pool, type=ev.type, reason=ev.reason, message=ev.message)
                interval = result.interval
            wait, due = until_tick(time.time(), interval, due)
            await stopped.wait(wait)
    finally:
        loops.pop((namespace, name), None)
        metrics.forget(namespace, name)
        forget(namespace, name)
