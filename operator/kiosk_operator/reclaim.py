"""Reclaim jobs stranded in the processing lists of dead workers (the Kiosk janitor, built in).

A worker moves each job it takes into ``processing-{queue}:{worker}``. If it dies
mid-job, that item would sit there forever. A worker is *gone* when its heartbeat
expired AND its pod (or local process) no longer exists or has terminated; both
are needed, because a slow heartbeat alone (GC pause, Redis hiccup) is not death,
and a pod that is still starting has not heartbeated yet.

The decision (`stranded`, `legacy_stranded`) is pure; the I/O (`reclaim_queues`)
takes the pod lookup as a callable, so the same code serves Kubernetes
(`kube_pod_alive`) and local mode (the process backend); `reclaim_step` is the
scaling cycle's pass, at most every RECLAIM_EVERY seconds. Moving each item is one
atomic Lua call in ``protocol.reclaim_list``, so two reclaimers, or a reclaimer
racing a worker that is finishing, move every item exactly once. Items that are not
job hashes (WRONGTYPE) go to the queue's dead-letter list (``kiosk:dead-letter:{queue}``)
first, with one log line each; the reclaim script itself never drops one either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

import kiosk_protocol as protocol
from kiosk_operator import metrics
from kiosk_operator.spec import PoolSpec
from kiosk_operator.status import PoolState
from kiosk_protocol import WorkerState
from kiosk_protocol.errors import printable
from kiosk_protocol.jobs import dead_letter_foreign
from kiosk_protocol.keys import dead_letter_key

log = logging.getLogger(__name__)

PodAlive = Callable[[str], bool]

#: Seconds between reclaim passes of a pool (the first pass runs at the first cycle).
RECLAIM_EVERY = 5.0


# --- pure decisions -------------------------------------------------------------------------


def stranded(
    workers: Iterable[WorkerState], now: float, ttl: float, pod_alive: PodAlive
) -> list[WorkerState]:
    """Registered workers that are gone: heartbeat older than ``ttl`` and no live pod.

    Returned even when they hold nothing, so the caller can also forget them.
    ``pod_alive`` is only asked about workers whose heartbeat expired.
    """
    return [w for w in workers if not w.alive(now, ttl) and not pod_alive(w.name)]


def legacy_stranded(
    processing_keys: Iterable[str],
    queues: Iterable[str],
    registered: Iterable[str],
    pod_alive: PodAlive,
) -> list[tuple[str, str]]:
    """(queue, worker) of legacy processing lists whose pod is gone.

    Legacy Kiosk consumers do not heartbeat, so pod existence alone decides, as
    kiosk-redis-janitor did. Workers in our registry are left to `stranded`.
    """
    wanted = set(queues)
    known = set(registered)
    out = []
    for key in processing_keys:
        parsed = protocol.parse_processing_key(key)
        if parsed is None:
            continue
        queue, worker = parsed
        if queue in wanted and worker not in known and not pod_alive(worker):
            out.append((queue, worker))
    return out


def pod_is_alive(pod: Any) -> bool:
    """A pod counts as alive until it has terminated (Succeeded/Failed).

    A pod being deleted still runs its container through the grace period (the
    worker is draining), so deletionTimestamp alone does not make it dead.
    """
    phase = _get(_get(pod, "status"), "phase")
    return phase not in ("Succeeded", "Failed")


# --- I/O ------------------------------------------------------------------------------------


@dataclass
class ReclaimReport:
    """What one reclaim pass did; the operator logs it and exports it as metrics."""

    requeued: int = 0
    dropped: int = 0
    raced: int = 0
    #: Items that were not job hashes, moved to their queue's dead-letter list.
    dead_lettered: int = 0
    workers: list[str] = field(default_factory=list)

    @property
    def moved(self) -> int:
        return self.requeued + self.dropped

    def add(self, counts: dict[str, int]) -> None:
        self.requeued += counts.get("requeued", 0)
        self.dropped += counts.get("dropped", 0)
        self.raced += counts.get("raced", 0)
        self.dead_lettered += counts.get("not_a_job", 0)

    def summary(self) -> str:
        gone = ", ".join(sorted(set(self.workers))[:10])
        dropped = f"; dropped {self.dropped} already finished" if self.dropped else ""
        dead = f"; {self.dead_lettered} not job hashes to dead-letter lists" if self.dead_lettered else ""
        return f"returned {self.requeued} items of gone workers ({gone}) to their queues{dropped}{dead}"


def reclaim_queues(
    client: redis.Redis,
    queues: Iterable[str],
    pod_alive: PodAlive,
    ttl: float,
    now: float | None = None,
    legacy: bool = False,
    workers: Iterable[WorkerState] | None = None,
) -> ReclaimReport:
    """One reclaim pass over ``queues``; safe to run concurrently with other reclaimers.

    ``ttl`` is the heartbeat expiry (``protocol.heartbeat_ttl`` of the workers' interval).
    ``workers`` may be passed in when the caller already measured depth
    (``protocol.measure_depth(...).workers``), saving a round trip.
    ``legacy=True`` additionally SCANs ``processing-{queue}:*`` (that pattern only)
    for Kiosk consumers that do not heartbeat.
    """
    queues = list(queues)
    now = time.time() if now is None else now
    if workers is None:
        workers = protocol.measure_depth(client, queues).workers
    workers = list(workers)
    report = ReclaimReport()
    for worker in stranded(workers, now, ttl, pod_alive):
        processing = protocol.processing_key(worker.queue, worker.name)
        report.dead_lettered += _dead_letter(client, processing, worker.queue)
        counts = protocol.reclaim_list(client, processing, worker.queue)
        report.add(counts)
        protocol.forget_worker(client, worker.queue, worker.name)
        report.workers.append(worker.name)
        if counts["requeued"] or counts["dropped"]:
            log.info("reclaimed worker %s on %s: %s", worker.name, worker.queue, counts)
    if legacy:
        keys = scan_processing_lists(client, queues)
        registered = {w.name for w in workers}
        for queue, name in legacy_stranded(keys, queues, registered, pod_alive):
            processing = protocol.processing_key(queue, name)
            report.dead_lettered += _dead_letter(client, processing, queue)
            counts = protocol.reclaim_list(client, processing, queue)
            report.add(counts)
            report.workers.append(name)
            log.info("reclaimed legacy consumer %s on %s: %s", name, queue, counts)
    return report


def _dead_letter(client: redis.Redis, processing: str, queue: str) -> int:
    """Move the items of ``processing`` that are not job hashes to the queue's dead-letter list
    (before reclaim_list, which would otherwise count them as raced); one log line each."""
    moved = dead_letter_foreign(client, processing, queue)
    for item, kind in moved:
        log.warning("reclaim: %s in %s is a %s, not a job hash; moved it to %s", printable(item),
                    printable(processing), printable(kind, 20), printable(dead_letter_key(queue)))
    return len(moved)


def reclaim_step(
    client: redis.Redis,
    spec: PoolSpec,
    state: PoolState,
    workers: Iterable[WorkerState],
    pod_alive: PodAlive,
    now: float,
    labels: tuple[str, str],
) -> ReclaimReport | None:
    """A pool's reclaim pass when one is due (every RECLAIM_EVERY s); None when none ran.

    Counts what moved in ``state.reclaimed`` and the metrics. Redis errors propagate.
    """
    if not spec.reclaim.enabled:
        return None
    if state.last_reclaim is not None and now - state.last_reclaim < RECLAIM_EVERY:
        return None
    state.last_reclaim = now
    ttl = protocol.heartbeat_ttl(spec.worker.heartbeat_interval_seconds)
    report = reclaim_queues(
        client, spec.queues, pod_alive, ttl, now=now, legacy=spec.reclaim.legacy_processing_lists, workers=workers
    )
    if report.moved:
        state.reclaimed = (state.reclaimed or 0) + report.requeued
    if report.requeued:
        metrics.RECLAIMED.labels(*labels, "requeued").inc(report.requeued)
    if report.dropped:
        metrics.RECLAIMED.labels(*labels, "dropped").inc(report.dropped)
    return report


def scan_processing_lists(client: redis.Redis, queues: Iterable[str], count: int = 1000) -> list[str]:
    """Legacy only: the keys matching ``processing-{queue}:*`` (SCAN limited to that pattern)."""
    keys: list[str] = []
    for queue in queues:
        pattern = protocol.processing_key(_glob_escape(queue), "*")
        for key in client.scan_iter(match=pattern, count=count, _type="list"):
            keys.append(key.decode() if isinstance(key, bytes) else key)
    return keys


def kube_pod_alive(core_v1: Any, namespace: str) -> PodAlive:
    """Pod lookup for Kubernetes: missing (404) or terminated pods are dead.

    Only called for workers whose heartbeat expired, so one GET per candidate is cheap.
    Any other API error counts as alive: when in doubt, do not reclaim.
    """
    from kubernetes.client.exceptions import ApiException

    def alive(name: str) -> bool:
        try:
            pod = core_v1.read_namespaced_pod(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return False
            log.warning("pod lookup %s/%s failed (%s); not reclaiming", namespace, name, err.status)
            return True
        return pod_is_alive(pod)

    return alive


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)
