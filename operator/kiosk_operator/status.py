"""What a pool remembers between cycles and reports: conditions, Events, status fields.

No Kubernetes import at module level: local mode keeps a PoolState too.
"""

from __future__ import annotations

import datetime
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


def write_status(kube: Kube, ns: str, name: str, state: PoolState, fields: dict[str, Any]) -> None:
    """Patch status only when something changed (200 pools x 1 s polls would flood the API)."""
    status = {**state.status, **fields}
    if state.last_scale_time:
        status["lastScaleTime"] = state.last_scale_time
    status["conditions"] = [state.conditions[c] for c in sorted(state.conditions)]
    if status != state.status:
        kube.patch_pool_status(ns, name, status)
        state.status = status
