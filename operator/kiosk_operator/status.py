"""What a pool remembers between cycles and reports: conditions, Events, status fields.

No Kubernetes import at module level: local mode keeps a PoolState too.
"""

from __future__ import annotations

import datetime
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiosk_operator.kube import Kube


#: Present (True) only while spec.scaling.maxWorkers is 0.
PAUSED = "Paused"


@dataclass
class PoolState:
    """What one pool's loop remembers between cycles (in memory; lastActiveTime also in status)."""

    last_active: float | None = None
    last_scale_time: str | None = None
    redis_failures: int = 0
    status: dict[str, Any] = field(default_factory=dict)
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)
    model_server_replicas: int | None = None
    mode: str | None = None
    last_reclaim: float | None = None
    reclaimed: int | None = None
    #: metadata.generation of the pool this cycle acts on (conditions' observedGeneration).
    generation: int | None = None
    #: (replicas, resourceVersion): the last scale of the worker Deployment and the version the
    #: watch cache showed before it; while the cache still shows that version, ``replicas`` is current.
    scaled: tuple[int, str] | None = None
    #: (since, highest count wanted) while a partial scale-down waits its window (scaling.Decision.lower).
    scale_down_window: tuple[float, int] | None = None


@dataclass
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC).timestamp()
    except ValueError:
        return None


def set_condition(
    state: PoolState, ctype: str, ok: bool | None, reason: str, message: str, now: float
) -> None:
    """Update a condition (metav1.Condition's shape); lastTransitionTime changes only when the status does."""
    status = "Unknown" if ok is None else "True" if ok else "False"
    old = state.conditions.get(ctype)
    since = old["lastTransitionTime"] if old and old["status"] == status else iso(now)
    cond: dict[str, Any] = {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message[:1000],
        "lastTransitionTime": since,
    }
    if state.generation is not None:
        cond["observedGeneration"] = state.generation
    state.conditions[ctype] = cond


def set_paused(state: PoolState, max_workers: int, now: float) -> None:
    """The Paused condition is there while spec.scaling.maxWorkers is 0, and gone otherwise."""
    if max_workers == 0:
        message = "spec.scaling.maxWorkers is 0: no workers run; raise it (or kubectl scale --replicas=N) to resume"
        set_condition(state, PAUSED, True, "MaxWorkersZero", message, now)
    else:
        state.conditions.pop(PAUSED, None)


def warn_once(state: PoolState, key: str, events: list[Event], event: Event) -> None:
    """Post a Warning the first time a problem shows up, not every polling interval."""
    if key not in state.warned:
        state.warned.add(key)
        events.append(event)


def write_status(
    kube: Kube, ns: str, name: str, state: PoolState, fields: dict[str, Any], writer: StatusWriter | None = None
) -> None:
    """Patch status only when something changed (200 pools x 1 s polls would flood the API);
    through ``writer`` (off the caller's thread) when given, else at once."""
    status = {**state.status, **fields}
    if state.last_scale_time:
        status["lastScaleTime"] = state.last_scale_time
    status["conditions"] = [state.conditions[c] for c in sorted(state.conditions)]
    if status != state.status:
        if writer is None:
            kube.patch_pool_status(ns, name, status)
            state.status = status
        else:  # assumed written; the writer forgets it again if the patch fails
            state.status = status
            writer.submit(ns, name, status, state)


class StatusWriter:
    """Pool status patches off the scaling path: the newest status of each pool, written in
    the order pools asked, by a few threads of their own.

    When 200 pools scale at once, their Deployment patches must not queue behind 200 status
    patches on the same threads and API server; a status superseded while it waited is
    written once, in its newest form. A failed write is logged and forgotten by the pool's
    state, so its next cycle writes the status again.
    """

    def __init__(self, kube: Kube, threads: int = 2) -> None:
        self.kube = kube
        self._pending: dict[tuple[str, str], tuple[dict[str, Any], PoolState]] = {}
        self._cond = threading.Condition()
        self._busy = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"status-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, ns: str, name: str, status: dict[str, Any], state: PoolState) -> None:
        """Queue ``status`` for the pool (replacing one still waiting, keeping its place)."""
        with self._cond:
            self._pending[(ns, name)] = (status, state)
            self._cond.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued status is written; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                (ns, name), (status, state) = next(iter(self._pending.items()))
                del self._pending[(ns, name)]
                self._busy += 1
            try:
                self.kube.patch_pool_status(ns, name, status)
            except Exception as exc:  # noqa: BLE001 - an API hiccup: the pool's next cycle retries
                logging.getLogger("kiosk_operator").warning("status of pool %s/%s not written: %s", ns, name, exc)
                if state.status is status:
                    state.status = {}
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()
