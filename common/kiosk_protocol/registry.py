"""The worker registry: heartbeats, the one liveness rule, queue depth and reclaim.

Workers beat into ``kiosk:workers:{queue}`` (ZSET name -> unix time) and ``kiosk:worker:{name}``
(a hash of facts that expires with the heartbeat), so depth and reclaim cost O(queues +
workers) commands and never SCAN the keyspace.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from kiosk_protocol import scripts
from kiosk_protocol.fields import HB_HEARTBEAT, HB_QUEUES
from kiosk_protocol.keys import processing_key, text, worker_info_key, workers_key

#: Heartbeats a worker may miss before it counts as gone.
MISSED_BEATS = 3
#: Seconds of slack on top (GC pauses, a slow Redis round trip).
HEARTBEAT_SLACK = 3.0

RECLAIM_TAKEN_ELSEWHERE = 0
RECLAIM_REQUEUED = 1
RECLAIM_DROPPED = 2
RECLAIM_NOT_A_JOB = 3


def heartbeat_ttl(interval: float) -> float:
    """The liveness rule: a worker beating every ``interval`` s is overdue after this long."""
    return MISSED_BEATS * interval + HEARTBEAT_SLACK


def beat(
    client: redis.Redis, worker: str, queues: list[str], interval: float, info: Mapping[str, Any] | None = None
) -> None:
    """Register ``worker`` as alive; its facts expire when it is overdue (heartbeat_ttl)."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.zadd(workers_key(queue), {worker: now})
    info_key = worker_info_key(worker)
    data = {HB_HEARTBEAT: f"{now:.3f}", HB_QUEUES: ",".join(queues)}
    if info:
        data.update({k: "" if v is None else str(v) for k, v in info.items()})
    pipe.hset(info_key, mapping=data)
    pipe.expire(info_key, max(1, math.ceil(heartbeat_ttl(interval))))
    pipe.execute()


def unregister(client: redis.Redis, worker: str, queues: Iterable[str]) -> None:
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.zrem(workers_key(queue), worker)
    pipe.delete(worker_info_key(worker))
    pipe.execute()


@dataclass(frozen=True)
class WorkerState:
    name: str
    queue: str
    heartbeat: float
    in_flight: int
    info: dict[str, str]

    def alive(self, now: float, ttl: float) -> bool:
        """Beat within ``ttl`` seconds (``heartbeat_ttl`` of the pool's interval)."""
        return now - self.heartbeat <= ttl


@dataclass(frozen=True)
class QueueDepth:
    pending: int
    in_flight: int
    workers: tuple[WorkerState, ...]

    @property
    def total(self) -> int:
        return self.pending + self.in_flight


def measure_depth(client: redis.Redis, queues: Iterable[str], with_info: bool = False) -> QueueDepth:
    """Pending + in-flight for a set of queues in two round trips: O(queues + workers)."""
    queues = list(queues)
    return combine_depths(queues, measure_depths(client, queues, with_info))


def measure_depths(
    client: redis.Redis, queues: Iterable[str], with_info: bool = False
) -> dict[str, QueueDepth | redis.ResponseError]:
    """Each queue's depth in the same two round trips (one when no worker is registered).

    Many pools on one Redis share this measurement. A reply error (a queue key of the wrong
    type) is returned for that queue alone, so one broken queue does not fail the others;
    connection errors raise, since they concern every queue of the server.
    """
    queues = list(dict.fromkeys(queues))
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.llen(queue)
        pipe.zrange(workers_key(queue), 0, -1, withscores=True)
    replies = pipe.execute(raise_on_error=False)
    out: dict[str, QueueDepth | redis.ResponseError] = {}
    registered: list[tuple[str, str, float]] = []
    for queue, pending, members in zip(queues, replies[0::2], replies[1::2], strict=True):
        error = next((r for r in (pending, members) if isinstance(r, redis.ResponseError)), None)
        if error is not None:
            out[queue] = error
            continue
        out[queue] = QueueDepth(int(pending), 0, ())
        registered.extend((queue, text(name), float(score)) for name, score in members)
    if not registered:
        return out
    names = list(dict.fromkeys(name for _, name, _ in registered)) if with_info else []
    pipe = client.pipeline(transaction=False)
    for queue, name, _ in registered:
        pipe.llen(processing_key(queue, name))
    for name in names:
        pipe.hgetall(worker_info_key(name))
    replies = pipe.execute(raise_on_error=False)
    infos: dict[str, Any] = dict(zip(names, replies[len(registered):], strict=True))
    workers: dict[str, list[WorkerState]] = {}
    for (queue, name, beat), held in zip(registered, replies, strict=False):
        info = infos.get(name, {})
        for reply in (held, info):
            if isinstance(reply, redis.ResponseError):
                out[queue] = reply
        if isinstance(out[queue], redis.ResponseError):
            continue
        data = {text(k): text(v) for k, v in info.items()} if with_info else {}
        workers.setdefault(queue, []).append(WorkerState(name, queue, beat, int(held), data))
    for queue, found in workers.items():
        depth = out[queue]
        if isinstance(depth, QueueDepth):
            out[queue] = QueueDepth(depth.pending, sum(w.in_flight for w in found), tuple(found))
    return out


def combine_depths(queues: Iterable[str], depths: Mapping[str, QueueDepth | redis.ResponseError]) -> QueueDepth:
    """One pool's depth (its queues, in order) from a shared per-queue measurement; raises a queue's error."""
    pending, in_flight, workers = 0, 0, []
    for queue in queues:
        depth = depths[queue]
        if isinstance(depth, Exception):
            raise depth
        pending += depth.pending
        in_flight += depth.in_flight
        workers.extend(depth.workers)
    return QueueDepth(pending, in_flight, tuple(workers))


def reclaim_list(client: redis.Redis, processing: str, queue: str) -> dict[str, int]:
    """Return every item of a dead worker's processing list to its queue, exactly once each."""
    script = client.register_script(scripts.RECLAIM)
    counts = {"requeued": 0, "dropped": 0, "raced": 0, "not_a_job": 0}
    # LMOVE ... LEFT puts the newest item at the left end. Each reclaimed item is RPUSHed
    # (taken next), so go newest first: the oldest ends up rightmost and is retried first.
    for raw in client.lrange(processing, 0, -1):
        result = int(script(keys=[processing, queue], args=[text(raw)]))
        if result == RECLAIM_REQUEUED:
            counts["requeued"] += 1
        elif result == RECLAIM_DROPPED:
            counts["dropped"] += 1
        elif result == RECLAIM_NOT_A_JOB:
            counts["not_a_job"] += 1
        else:
            counts["raced"] += 1
    return counts


def forget_worker(client: redis.Redis, queue: str, worker: str) -> None:
    """Remove a dead worker from the registry once its processing list is empty."""
    pipe = client.pipeline(transaction=True)
    pipe.zrem(workers_key(queue), worker)
    pipe.delete(worker_info_key(worker))
    pipe.execute()
