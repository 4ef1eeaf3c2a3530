"""`kiosk status`: gather queues, workers and pools into one snapshot (rendering is elsewhere)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis

import kiosk_protocol as protocol
from kiosk_cli.errors import CliError
from kiosk_cli.pools import PoolRow
from kiosk_protocol.errors import describe


@dataclass(frozen=True)
class QueueRow:
    name: str
    pending: int
    in_flight: int
    workers: int


@dataclass(frozen=True)
class WorkerRow:
    name: str
    queue: str
    age: float
    stale: bool
    in_flight: int
    state: str
    current: str
    done: str
    failed: str


@dataclass(frozen=True)
class Snapshot:
    queues: tuple[QueueRow, ...]
    workers: tuple[WorkerRow, ...]
    pools: tuple[PoolRow, ...] | None
    pools_note: str = ""


def discover_queues(client: redis.Redis, configured: Iterable[str]) -> list[str]:
    """Configured queues, their -zip siblings, and every queue a worker has registered for.

    The registry scan is fine for a person running one command; the operator never scans.
    """
    registered = [
        key[len(protocol.WORKERS_PREFIX) :]
        for key in client.scan_iter(match=protocol.WORKERS_PREFIX + "*", count=1000, _type="zset")
    ]
    names: dict[str, None] = {}
    for queue in [*configured, *registered]:
        names.setdefault(queue, None)
        if not queue.endswith(protocol.ZIP_SUFFIX):
            names.setdefault(queue + protocol.ZIP_SUFFIX, None)
    return list(names)


def collect(
    client: redis.Redis,
    queues: Sequence[str],
    stale_after: float,
    pools: tuple[PoolRow, ...] | None = None,
    pools_note: str = "",
    now: float | None = None,
) -> Snapshot:
    """Per-queue depth via the shared protocol (one measure_depth per queue, O(queues + workers))."""
    now = time.time() if now is None else now
    queue_rows, worker_rows = [], []
    try:
        for queue in queues:
            depth = protocol.measure_depth(client, [queue], with_info=True)
            queue_rows.append(QueueRow(queue, depth.pending, depth.in_flight, len(depth.workers)))
            for w in depth.workers:
                age = max(0.0, now - w.heartbeat)
                info = w.info
                row = WorkerRow(
                    w.name, w.queue, age, age > stale_after, w.in_flight, info.get("state", ""),
                    info.get("current", ""), info.get("jobs_done", ""), info.get("jobs_failed", ""),
                )
                worker_rows.append(row)
    except redis.RedisError as exc:
        raise CliError(f"Redis failed while reading queue depth: {describe(exc)}") from None
    worker_rows.sort(key=lambda w: (w.queue, w.name))
    return Snapshot(tuple(queue_rows), tuple(worker_rows), pools, pools_note)
