"""Queue depth of a pool from Redis: pending + in-flight via the worker registry, never SCAN.

Thin on purpose: the key layout and the measurement live in kiosk_worker.protocol.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import redis

from kiosk_operator.spec import RedisSpec
from kiosk_worker import protocol
from kiosk_worker.protocol import WorkerState
from kiosk_worker.redis_conn import connect
from kiosk_worker.settings import Settings

#: Seconds a registered worker may miss heartbeats before it no longer counts as busy.
HEARTBEAT_SLACK = 3.0

#: Heartbeat info fields written by kiosk_worker.runner (RunStats.info): per-item service time.
SERVICE_SAMPLES_FIELD = "service_time_samples"
SERVICE_MEAN_FIELD = "service_time_ewma"


@dataclass(frozen=True)
class Measurement:
    """One depth measurement, reduced to what the scaling decision needs."""

    pending: int
    in_flight: int
    busy_workers: frozenset[str]
    live_workers: frozenset[str]
    mean_service_seconds: float | None
    service_samples: int
    #: Every registered worker as read (reclaim reuses them instead of reading again).
    workers: tuple[WorkerState, ...] = ()

    @property
    def depth(self) -> int:
        return self.pending + self.in_flight


def measure(
    client: redis.Redis, queues: tuple[str, ...] | list[str], now: float, heartbeat_ttl: float = 10.0
) -> Measurement:
    """O(queues + workers) Redis commands; busy = live workers holding at least one item."""
    depth = protocol.measure_depth(client, queues, with_info=True)
    busy, live = set(), set()
    total_time, samples = 0.0, 0
    for w in depth.workers:
        if w.alive(now, heartbeat_ttl):
            live.add(w.name)
            if w.in_flight > 0:
                busy.add(w.name)
        # Workers report a smoothed per-item service time (drain-time scaling).
        try:
            n = int(w.info.get(SERVICE_SAMPLES_FIELD, "0") or 0)
            mean = float(w.info.get(SERVICE_MEAN_FIELD, "0") or 0)
        except ValueError:
            continue
        if n > 0 and mean > 0:
            total_time += mean * n
            samples += n
    mean_service = total_time / samples if samples else None
    return Measurement(
        depth.pending, depth.in_flight, frozenset(busy), frozenset(live), mean_service, samples, depth.workers
    )


class RedisClients:
    """One client per distinct Redis of the pools (connection pools are reused across ticks)."""

    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout
        self._clients: dict[tuple, redis.Redis] = {}
        self._lock = threading.Lock()

    def get(self, spec: RedisSpec, password: str = "") -> redis.Redis:
        sentinel = spec.sentinel
        key = (
            spec.host,
            spec.port,
            spec.tls,
            password,
            sentinel.hosts if sentinel else (),
            sentinel.master if sentinel else "",
        )
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                settings = Settings(
                    redis_host=spec.host,
                    redis_port=spec.port,
                    redis_password=password,
                    redis_tls=spec.tls,
                    redis_sentinel_hosts=",".join(sentinel.hosts) if sentinel else "",
                    redis_sentinel_master=sentinel.master if sentinel else "mymaster",
                    redis_timeout=self.timeout,
                    empty_queue_timeout=0.001,
                )
                client = self._clients[key] = connect(settings)
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
