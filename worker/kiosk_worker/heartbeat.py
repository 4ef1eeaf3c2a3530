"""The worker's heartbeat: what it reports in ``kiosk:worker:{name}`` and the thread that beats.

The operator reads these facts for queue depth, busy-worker protection and drain-time
scaling, so a state change (a job taken or ended) is reported at once, not a beat later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

import kiosk_protocol as protocol
from kiosk_protocol import errors
from kiosk_protocol.fields import (
    HB_CONSUMER_TYPE,
    HB_CURRENT,
    HB_JOBS_DONE,
    HB_JOBS_FAILED,
    HB_SERVICE_EWMA,
    HB_SERVICE_SAMPLES,
    HB_STARTED_AT,
    HB_STATE,
    STATE_BUSY,
    STATE_DRAINING,
    STATE_IDLE,
)

__all__ = ["EWMA_ALPHA", "KICK_MIN_INTERVAL", "Heartbeat", "WorkerStats"]

log = logging.getLogger(__name__)

#: Weight of the newest sample in the service-time moving average.
EWMA_ALPHA = 0.3
#: A job's start or end is reported at once unless a heartbeat went out this recently
#: (seconds); a worker taking hundreds of jobs a second would otherwise beat per job.
KICK_MIN_INTERVAL = 0.25


@dataclass
class WorkerStats:
    """What the heartbeat reports; mutated by the runner's main thread only."""

    current: str = ""
    jobs_done: int = 0
    jobs_failed: int = 0
    items_taken: int = 0
    service_time_ewma: float | None = None
    samples: int = 0
    started: float = field(default_factory=time.time)

    def record(self, seconds: float) -> None:
        self.samples += 1
        if self.service_time_ewma is None:
            self.service_time_ewma = seconds
        else:
            self.service_time_ewma = EWMA_ALPHA * seconds + (1 - EWMA_ALPHA) * self.service_time_ewma

    def info(self) -> dict[str, Any]:
        ewma = "" if self.service_time_ewma is None else f"{self.service_time_ewma:.6f}"
        return {HB_CURRENT: self.current, HB_JOBS_DONE: self.jobs_done, HB_JOBS_FAILED: self.jobs_failed,
                HB_SERVICE_EWMA: ewma, HB_SERVICE_SAMPLES: self.samples,
                HB_STARTED_AT: f"{self.started:.3f}"}


class Heartbeat:
    """Beats every ``interval`` seconds on its own thread, and early when kicked."""

    def __init__(
        self,
        store: protocol.JobStore,
        stats: WorkerStats,
        *,
        interval: float,
        consumer_type: str,
        draining: Callable[[], bool],
    ) -> None:
        self.store = store
        self.stats = stats
        self.interval = interval
        self.consumer_type = consumer_type
        self.queues: Sequence[str] = ()
        self._draining = draining
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._last_beat = 0.0
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """One heartbeat now (raises redis errors)."""
        self._last_beat = time.monotonic()
        info = self.stats.info()
        info[HB_CONSUMER_TYPE] = self.consumer_type
        info[HB_STATE] = STATE_DRAINING if self._draining() else (STATE_BUSY if self.stats.current else STATE_IDLE)
        self.store.heartbeat(self.queues, self.interval, info)

    def report(self) -> None:
        """Ask for an early heartbeat (state changed), at most every KICK_MIN_INTERVAL."""
        if time.monotonic() - self._last_beat >= min(KICK_MIN_INTERVAL, self.interval):
            self._kick.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._kick.wait(self.interval)
            self._kick.clear()
            if self._stop.is_set():
                return
            try:
                self.beat()
                failures = 0
            except redis.RedisError as err:
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("heartbeat failed (%s)", errors.one_line(err))
