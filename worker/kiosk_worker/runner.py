"""The worker loop: register, pop (blocking), consume, heartbeat, drain on SIGTERM.

* Pop is an atomic blocking move (BLMOVE) of the oldest job into
  ``processing-{queue}:{worker}``; no polling sleeps. Several queues
  (QUEUE=a,b): a non-blocking sweep over all, then a short block on each in turn.
* A heartbeat thread (``heartbeat``) keeps ``kiosk:workers:{queue}`` /
  ``kiosk:worker:{name}`` fresh with ``current`` (job key or ''), ``jobs_done``
  and ``service_time_ewma`` (seconds per item), which the operator uses for
  depth, busy-worker protection and drain-time scaling.
* Jobs run in a helper thread so the main thread can honour SIGTERM: take no
  new job, let the current one finish within GRACE_PERIOD, otherwise cancel
  it and put it back at the front of its queue; unregister; exit 0.
* At-least-once: an item only leaves the processing list when its final
  status is written (or it is given back), so a SIGKILLed worker leaves its
  item where the operator reclaims it. Items found in our own processing
  lists at start (same pod name, restarted container) go back to the front.
"""

from __future__ import annotations

import logging
import queue as queue_mod
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

import kiosk_protocol as protocol
from kiosk_protocol import errors
from kiosk_protocol.backoff import jittered_delay
from kiosk_protocol.errors import printable
from kiosk_protocol.fields import STATUS
from kiosk_protocol.jobs import is_wrong_type
from kiosk_protocol.keys import dead_letter_key
from kiosk_protocol.settings import Settings
from kiosk_worker.consumers.base import Consumer
from kiosk_worker.heartbeat import Heartbeat, WorkerStats
from kiosk_worker.metrics import Metrics, start_metrics
from kiosk_worker.work import Outcome, OutcomeKind, WorkItem

# WorkerStats lives in kiosk_worker.heartbeat; re-exported for existing importers.
__all__ = ["MULTI_QUEUE_BLOCK", "Runner", "WorkerStats"]

log = logging.getLogger(__name__)

#: Seconds to block on each queue in turn when serving several queues.
MULTI_QUEUE_BLOCK = 0.1
#: A job we put back (e.g. a zip parent waiting for children) is not re-run sooner than this.
RECHECK_DELAY = 1.0
#: Reconnect backoff while Redis is unreachable (seconds): first ceiling and cap.
REDIS_RETRY_BASE = 0.05
REDIS_RETRY_CAP = 5.0


#: Allocations up to this size come from the heap and freed ones stay there (glibc's default
#: serves each one over 32 MiB with a fresh mmap, zeroed page by page on first touch).
LARGE_BUFFER_BYTES = 1 << 30


def keep_large_buffers(limit: int = LARGE_BUFFER_BYTES) -> bool:
    """Let glibc reuse the memory of large messages instead of mapping it anew for each.

    A worker builds a PredictRequest of up to hundreds of MiB per job; with glibc's
    defaults every one is a new mapping whose page faults cost more than copying the
    tensor into it (64 MiB: ~1.6 GB/s instead of several GB/s). Process-wide and for good:
    the worker calls it once at start. Returns False where the
    C library has no ``mallopt`` (musl, macOS): nothing changes there.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    # One arena: a thread's own arena (the job thread's) is capped at 64 MiB and would map
    # large buffers anew after all. Call this before starting threads.
    return bool(mallopt(m_arena_max, 1) and mallopt(m_mmap_threshold, int(limit))
                and mallopt(m_trim_threshold, int(limit)))


class _Interrupted(BaseException):
    """Raised by the signal handler to break out of a blocking pop."""


@dataclass
class _Handoff:
    """A job on its way to the job thread, and its outcome on the way back."""

    item: WorkItem
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None


class Runner:
    """One worker process. ``run()`` returns the exit code (0 on a clean stop)."""

    def __init__(
        self,
        settings: Settings,
        *,
        client: redis.Redis | None = None,
        consumer: Consumer | None = None,
        storage: Any = None,
        max_jobs: int | None = None,
        name: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.name = name or settings.worker_name or protocol.default_worker_name()
        self.queues = settings.queues
        if not self.queues:
            raise ValueError("no queue to consume (QUEUE is empty)")
        if client is None:
            from kiosk_protocol.redis_config import connect

            client = connect(settings.redis_config())
        self.client = client
        self.store = protocol.JobStore(client, self.name, settings.expire_time,
                                       max_field_bytes=settings.max_field_bytes,
                                       max_attempts=settings.max_attempts)
        self.max_jobs = settings.max_jobs if max_jobs is None else max_jobs
        self._storage = storage
        self.consumer = consumer
        self.stats = WorkerStats()
        self.abandoned = False  # a cancelled job thread may still be running
        self._stop = threading.Event()
        self._stop_time: float | None = None
        self._wake = threading.Event()
        self._popping = False
        self._requeued_at: dict[str, float] = {}
        self.heartbeat = Heartbeat(self.store, self.stats, interval=settings.heartbeat_interval,
                                   consumer_type=settings.consumer_type, draining=self._stop.is_set)
        self._jobs: queue_mod.SimpleQueue[_Handoff | None] | None = None
        self.metrics = metrics

    # -- lifecycle -----------------------------------------------------------
    def build_consumer(self) -> Consumer:
        from kiosk_worker.consumers import get_consumer

        if self._storage is None:
            from kiosk_storage import get_storage

            self._storage = get_storage(self.settings)
        return get_consumer(self.settings.consumer_type, redis_client=self.client, storage=self._storage,
                            queue=self.queues[0], settings=self.settings, store=self.store,
                            name=self.name)

    def start_metrics(self) -> Metrics:
        """Serve Prometheus metrics on METRICS_PORT (no-op when 0); OSError if the port is taken."""
        if self.metrics is None:
            self.metrics = start_metrics(self.settings.metrics_port)
            if self.metrics.port:
                log.info("metrics on http://0.0.0.0:%d/metrics", self.metrics.port)
        return self.metrics

    def request_stop(self) -> None:
        """Stop taking jobs (thread-safe; what SIGTERM does)."""
        if self._stop_time is None:
            self._stop_time = time.monotonic()
        self._stop.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: object) -> None:
            log.info("received %s: finishing the current job, taking no new one",
                     signal.Signals(signum).name)
            self.request_stop()
            if self._popping:
                raise _Interrupted()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> int:
        """Serve until stopped, the queue is empty (batch mode) or max_jobs items were taken."""
        keep_large_buffers()
        if self.consumer is None:
            self.consumer = self.build_consumer()
        self.consumer.metrics = self.start_metrics()
        self.queues = type(self.consumer).source_queues(self.settings.queues)
        self.heartbeat.queues = self.queues
        self._wait_for_redis(self._give_back_held, "recover held items")
        self._wait_for_redis(self.heartbeat.beat, "register")
        self.heartbeat.start()
        log.info("worker %s ready: queues %s, consumer %s%s", self.name, ",".join(self.queues),
                 self.settings.consumer_type, f", batch of {self.max_jobs}" if self.max_jobs else "")
        try:
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.max_jobs and self.stats.items_taken >= self.max_jobs:
                log.info("batch of %d items done", self.max_jobs)
                return
            try:
                got = self._next_job()
            except _Interrupted:
                return
            except (redis.ConnectionError, redis.TimeoutError) as err:
                self._redis_trouble(err)
                continue
            if got is None:
                self._return_strays(idle=True)
                if self.max_jobs and not self._stop.is_set():
                    log.info("queue empty: batch worker exits after %d items", self.stats.items_taken)
                    return
                continue
            if not self._recheck_delay(got.key):
                return
            self._run_job(got)
            self._return_strays()

    def _return_strays(self, idle: bool = False) -> None:
        """Between jobs a worker holds nothing. An item found in its processing list then came
        from a pop whose reply was lost; no reclaim would touch it (this worker is alive), so
        give it back now. After a job the finish script already counted; when idle, ask."""
        try:
            strays = self.store.holding(self.queues) if idle else self.store.strays
        except (redis.ConnectionError, redis.TimeoutError) as err:
            self._redis_trouble(err)
            return
        if strays:
            log.warning("%d item(s) in our processing list that no pop returned; giving them back", strays)
            self.store.strays = 0
            self._wait_for_redis(self._give_back_held, "give back stray items")

    def _shutdown(self) -> None:
        if self._jobs is not None and not self.abandoned:
            self._jobs.put(None)
        self.heartbeat.stop()
        try:
            self._give_back_held()
            self.store.unregister(self.queues)
        except redis.RedisError as err:
            log.warning("could not unregister from Redis: %s", err)
        if self.metrics is not None:
            self.metrics.close()
        log.info("worker %s stopped after %d items (%d done, %d failed)", self.name,
                 self.stats.items_taken, self.stats.jobs_done, self.stats.jobs_failed)

    # -- popping ---------------------------------------------------------------
    def _pop(self, queue: str, timeout: float) -> str | None:
        self._popping = True
        try:
            if self._stop.is_set():
                return None
            return self.store.pop(queue, timeout)
        finally:
            self._popping = False

    def _next_job(self) -> WorkItem | None:
        """Blocking pop; None after EMPTY_QUEUE_TIMEOUT without work."""
        timeout = self.settings.empty_queue_timeout
        if len(self.queues) == 1:
            key = self._pop(self.queues[0], timeout)
            return WorkItem(self.queues[0], key) if key else None
        deadline = time.monotonic() + timeout
        turn = 0
        while not self._stop.is_set():
            for queue in self.queues:  # preferred queue first
                key = self._pop(queue, 0)
                if key:
                    return WorkItem(queue, key)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            queue = self.queues[turn % len(self.queues)]
            turn += 1
            key = self._pop(queue, min(MULTI_QUEUE_BLOCK, left))
            if key:
                return WorkItem(queue, key)
        return None

    def _recheck_delay(self, key: str) -> bool:
        """A job we just put back is not re-run at once; False if stopped meanwhile."""
        since = self._requeued_at.pop(key, None)
        if since is None:
            return True
        left = RECHECK_DELAY - (time.monotonic() - since)
        if left > 0 and self._stop.wait(left):
            return False
        return True

    # -- one job ---------------------------------------------------------------
    def _run_job(self, item: WorkItem) -> None:
        consumer = self.consumer
        assert consumer is not None
        self.stats.items_taken += 1
        self.stats.current = item.key
        self.heartbeat.report()
        metrics = self.metrics or Metrics()
        kind = self.settings.consumer
        metrics.job_started()
        handoff = _Handoff(item)
        self._job_thread().put(handoff)
        while not handoff.done.is_set():
            if self._stop.is_set():
                assert self._stop_time is not None
                left = self._stop_time + self.settings.grace_period - time.monotonic()
                if not handoff.done.wait(max(0.0, left)):
                    self._give_back(consumer, item)
                    metrics.job_ended(kind, item.queue, OutcomeKind.CANCELLED.value)
                    return
                break
            self._wake.wait()
            self._wake.clear()
        self.stats.current = ""
        outcome = handoff.outcome
        assert outcome is not None
        metrics.job_ended(kind, item.queue, outcome.kind.value, outcome.seconds if outcome.finished else None)
        if outcome.kind is OutcomeKind.CRASHED:
            err = outcome.error
            if isinstance(err, (redis.ConnectionError, redis.TimeoutError)):
                self._redis_trouble(err)
            else:
                log.error("job %s crashed the consumer: %r", item.key, err, exc_info=err)
        elif outcome.finished:
            self.stats.record(outcome.seconds)
            if outcome.kind is OutcomeKind.FAILED:
                self.stats.jobs_failed += 1
            else:
                self.stats.jobs_done += 1
        elif outcome.kind is OutcomeKind.REQUEUED:
            self._requeued_at[item.key] = time.monotonic()
        self.heartbeat.report()

    def _job_thread(self) -> queue_mod.SimpleQueue[_Handoff | None]:
        """One long-lived thread runs the jobs (a thread per job costs ~0.1-1 ms)."""
        if self._jobs is None:
            self._jobs = queue_mod.SimpleQueue()
            threading.Thread(target=self._job_loop, args=(self._jobs,), name="job", daemon=True).start()
        return self._jobs

    def _job_loop(self, jobs: queue_mod.SimpleQueue[_Handoff | None]) -> None:
        consumer = self.consumer
        assert consumer is not None
        while True:
            handoff = jobs.get()
            if handoff is None:
                return
            try:
                handoff.outcome = consumer.handle(handoff.item)
            except BaseException as err:  # noqa: BLE001 - handle() reports its own; a last resort
                handoff.outcome = Outcome(OutcomeKind.CRASHED, error=err)
            finally:
                handoff.done.set()
                self._wake.set()

    def _give_back(self, consumer: Consumer, item: WorkItem) -> None:
        """Grace period over: stop the job's writes and return the item to the front."""
        self.abandoned = True
        self.stats.current = ""
        try:
            returned = consumer.give_back(item)
        except redis.RedisError as err:
            log.error("could not give %s back (%s); it stays in %s for the operator to reclaim",
                      item.key, err, protocol.processing_key(item.queue, self.name))
            return
        log.warning("grace period of %.1fs over: %s %s", self.settings.grace_period, item.key,
                    "returned to the front of its queue" if returned else "was no longer held")

    def _give_back_held(self) -> None:
        """Return whatever our processing lists hold to the front of their queues; an item that
        is not a job hash goes to the queue's dead-letter list instead."""
        for queue in self.queues:
            # Newest first: each is RPUSHed (taken next), so the oldest ends up in front.
            for key in self.store.held(queue):
                if key == self.stats.current and not self.abandoned:
                    continue
                try:
                    status = self.client.hget(key, STATUS)
                except redis.ResponseError as err:
                    if not is_wrong_type(err):
                        raise
                    if self.store.dead_letter(queue, key):
                        log.warning("held item %s is not a job hash; moved it to %s", printable(key),
                                    printable(dead_letter_key(queue)))
                    continue
                if status in protocol.FINISHED_STATUSES:
                    self.store.release(queue, key)
                elif self.store.requeue(queue, key, front=True):
                    log.info("returned held item %s to the front of %s", printable(key), queue)

    # -- Redis trouble -----------------------------------------------------------
    def _redis_trouble(self, err: BaseException) -> None:
        log.warning("Redis unreachable (%s); retrying", errors.one_line(err))
        self._wait_for_redis(self._give_back_held, "recover")

    def _wait_for_redis(self, action: Callable[[], object], what: str) -> None:
        """Run ``action`` until Redis answers, with capped jittered backoff; stops on request."""
        attempt = 0
        while True:
            try:
                action()
                return
            except (redis.ConnectionError, redis.TimeoutError) as err:
                delay = jittered_delay(attempt, REDIS_RETRY_BASE, REDIS_RETRY_CAP)
                log.warning("Redis unreachable during %s (%s); retrying in %.2fs", what,
                            errors.one_line(err), delay)
            if self._stop.wait(delay):
                return
            attempt += 1
