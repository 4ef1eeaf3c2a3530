"""The worker loop: register, pop (blocking), consume, heartbeat, drain on SIGTERM.

* Pop is an atomic blocking move (BLMOVE) of the oldest job into
  ``processing-{queue}:{worker}``; no polling sleeps. Several queues
  (QUEUE=a,b): a non-blocking sweep over all, then a short block on each in turn.
* A heartbeat thread keeps ``kiosk:workers:{queue}`` / ``kiosk:worker:{name}``
  fresh with ``current`` (job key or ''), ``jobs_done`` and
  ``service_time_ewma`` (seconds per item), which the operator uses for
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
from dataclasses import dataclass, field
from typing import Any

import redis

import kiosk_protocol as protocol
from kiosk_protocol.backoff import jittered_delay
from kiosk_protocol.settings import Settings
from kiosk_worker.consumers.base import Consumer
from kiosk_worker.errors import Cancelled
from kiosk_worker.metrics import Metrics, start_metrics

__all__ = ["MULTI_QUEUE_BLOCK", "Runner", "WorkerStats"]

log = logging.getLogger(__name__)

#: Seconds to block on each queue in turn when serving several queues.
MULTI_QUEUE_BLOCK = 0.1
#: Weight of the newest sample in the service-time moving average.
EWMA_ALPHA = 0.3
#: A job we put back (e.g. a zip parent waiting for children) is not re-run sooner than this.
RECHECK_DELAY = 1.0
#: Reconnect backoff while Redis is unreachable (seconds): first ceiling and cap.
#: A job's start or end is reported at once unless a heartbeat went out this recently
#: (seconds); a worker taking hundreds of jobs a second would otherwise beat per job.
KICK_MIN_INTERVAL = 0.25
REDIS_RETRY_BASE = 0.05
REDIS_RETRY_CAP = 5.0


class _Interrupted(BaseException):
    """Raised by the signal handler to break out of a blocking pop."""


@dataclass
class WorkerStats:
    """What the heartbeat reports; mutated by the main thread only."""

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
        return {"current": self.current, "jobs_done": self.jobs_done, "jobs_failed": self.jobs_failed,
                "service_time_ewma": ewma, "service_time_samples": self.samples,
                "started_at": f"{self.started:.3f}"}


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
        self.store = protocol.JobStore(client, self.name, settings.expire_time)
        self.max_jobs = settings.max_jobs if max_jobs is None else max_jobs
        self._storage = storage
        self.consumer = consumer
        self.stats = WorkerStats()
        self.abandoned = False  # a cancelled job thread may still be running
        self._stop = threading.Event()
        self._stop_time: float | None = None
        self._wake = threading.Event()
        self._kick = threading.Event()
        self._last_beat = 0.0
        self._popping = False
        self._requeued_at: dict[str, float] = {}
        self._hb_thread: threading.Thread | None = None
        self._hb_stop = threading.Event()
        self._jobs: queue_mod.SimpleQueue[Any] | None = None
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
        def handler(signum: int, _frame: Any) -> None:
            log.info("received %s: finishing the current job, taking no new one",
                     signal.Signals(signum).name)
            self.request_stop()
            if self._popping:
                raise _Interrupted()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> int:
        """Serve until stopped, the queue is empty (batch mode) or max_jobs items were taken."""
        if self.consumer is None:
            self.consumer = self.build_consumer()
        self.consumer.metrics = self.start_metrics()
        self.queues = type(self.consumer).source_queues(self.settings.queues)
        self._wait_for_redis(self._give_back_held, "recover held items")
        self._wait_for_redis(self._beat, "register")
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._hb_thread.start()
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
            queue, key = got
            if not self._recheck_delay(key):
                return
            self._run_job(queue, key)
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
        self._hb_stop.set()
        self._kick.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=5)
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

    def _next_job(self) -> tuple[str, str] | None:
        """Blocking pop; None after EMPTY_QUEUE_TIMEOUT without work."""
        timeout = self.settings.empty_queue_timeout
        if len(self.queues) == 1:
            key = self._pop(self.queues[0], timeout)
            return (self.queues[0], key) if key else None
        deadline = time.monotonic() + timeout
        turn = 0
        while not self._stop.is_set():
            for queue in self.queues:  # preferred queue first
                key = self._pop(queue, 0)
                if key:
                    return queue, key
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            queue = self.queues[turn % len(self.queues)]
            turn += 1
            key = self._pop(queue, min(MULTI_QUEUE_BLOCK, left))
            if key:
                return queue, key
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
    def _run_job(self, queue: str, key: str) -> None:
        consumer = self.consumer
        assert consumer is not None
        self.stats.items_taken += 1
        self.stats.current = key
        self._report()
        metrics = self.metrics or Metrics()
        kind = self.settings.consumer
        metrics.job_started()
        done = threading.Event()
        outcome: dict[str, Any] = {}
        start = time.perf_counter()
        self._job_thread().put((consumer, queue, key, outcome, done))
        while not done.is_set():
            if self._stop.is_set():
                assert self._stop_time is not None
                left = self._stop_time + self.settings.grace_period - time.monotonic()
                if not done.wait(max(0.0, left)):
                    self._give_back(consumer, queue, key)
                    metrics.job_ended(kind, queue, "given_back")
                    return
                break
            self._wake.wait()
            self._wake.clear()
        elapsed = time.perf_counter() - start
        self.stats.current = ""
        status = outcome.get("status")
        err = outcome.get("error")
        outcome = _outcome(consumer, status, err)
        metrics.job_ended(kind, queue, outcome, elapsed if outcome in ("done", "failed") else None)
        if err is not None:
            if isinstance(err, (redis.ConnectionError, redis.TimeoutError)):
                self._redis_trouble(err)
            else:
                log.error("job %s crashed the consumer: %r", key, err, exc_info=err)
        elif status in protocol.FINISHED_STATUSES or status == consumer.final_status:
            self.stats.record(elapsed)
            if status == consumer.failed_status:
                self.stats.jobs_failed += 1
            else:
                self.stats.jobs_done += 1
        elif status is not None:
            self._requeued_at[key] = time.monotonic()
        self._report()

    def _job_thread(self) -> queue_mod.SimpleQueue[Any]:
        """One long-lived thread runs the jobs (a thread per job costs ~0.1-1 ms)."""
        if self._jobs is None:
            self._jobs = queue_mod.SimpleQueue()
            threading.Thread(target=self._job_loop, args=(self._jobs,), name="job", daemon=True).start()
        return self._jobs

    def _job_loop(self, jobs: queue_mod.SimpleQueue[Any]) -> None:
        while True:
            item = jobs.get()
            if item is None:
                return
            consumer, queue, key, outcome, done = item
            try:
                outcome["status"] = consumer.consume(key, queue)
            except Cancelled:
                outcome["cancelled"] = True
            except BaseException as err:  # noqa: BLE001 - reported by the main thread
                outcome["error"] = err
            finally:
                done.set()
                self._wake.set()

    def _give_back(self, consumer: Consumer, queue: str, key: str) -> None:
        """Grace period over: stop the job's writes and return the item to the front."""
        consumer.cancel()
        self.abandoned = True
        self.stats.current = ""
        try:
            returned = self.store.requeue(queue, key, front=True)
        except redis.RedisError as err:
            log.error("could not give %s back (%s); it stays in %s for the operator to reclaim",
                      key, err, protocol.processing_key(queue, self.name))
            return
        log.warning("grace period of %.1fs over: %s %s", self.settings.grace_period, key,
                    "returned to the front of its queue" if returned else "was no longer held")
        if returned and consumer.announce_start:  # a waiting zip parent stays 'waiting'
            try:
                self.store.update(key, {"status": protocol.NEW})
            except redis.RedisError:
                pass

    def _give_back_held(self) -> None:
        """Return whatever our processing lists hold to the front of their queues."""
        for queue in self.queues:
            # Newest first: each is RPUSHed (taken next), so the oldest ends up in front.
            for key in self.store.held(queue):
                if key == self.stats.current and not self.abandoned:
                    continue
                status = self.client.hget(key, "status")
                if status in protocol.FINISHED_STATUSES:
                    self.store.release(queue, key)
                elif self.store.requeue(queue, key, front=True):
                    log.info("returned held item %s to the front of %s", key, queue)

    # -- Redis trouble -----------------------------------------------------------
    def _redis_trouble(self, err: BaseException) -> None:
        log.warning("Redis unreachable (%s); retrying", " ".join(str(err).split()))
        self._wait_for_redis(self._give_back_held, "recover")

    def _wait_for_redis(self, action: Any, what: str) -> None:
        """Run ``action`` until Redis answers, with capped jittered backoff; stops on request."""
        attempt = 0
        while True:
            try:
                action()
                return
            except (redis.ConnectionError, redis.TimeoutError) as err:
                delay = jittered_delay(attempt, REDIS_RETRY_BASE, REDIS_RETRY_CAP)
                log.warning("Redis unreachable during %s (%s); retrying in %.2fs", what,
                            " ".join(str(err).split()), delay)
            if self._stop.wait(delay):
                return
            attempt += 1

    # -- heartbeat ---------------------------------------------------------------
    def _report(self) -> None:
        """Ask for an early heartbeat (state changed), at most every KICK_MIN_INTERVAL."""
        if time.monotonic() - self._last_beat >= min(KICK_MIN_INTERVAL, self.settings.heartbeat_interval):
            self._kick.set()

    def _beat(self) -> None:
        self._last_beat = time.monotonic()
        info = self.stats.info()
        info["consumer_type"] = self.settings.consumer_type
        info["state"] = "draining" if self._stop.is_set() else ("busy" if self.stats.current else "idle")
        self.store.heartbeat(self.queues, self.settings.heartbeat_interval, info)

    def _heartbeat_loop(self) -> None:
        failures = 0
        while not self._hb_stop.is_set():
            self._kick.wait(self.settings.heartbeat_interval)
            self._kick.clear()
            if self._hb_stop.is_set():
                return
            try:
                self._beat()
                failures = 0
            except redis.RedisError as err:
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("heartbeat failed (%s)", " ".join(str(err).split()))


def _outcome(consumer: Consumer, status: str | None, err: BaseException | None) -> str:
    """The ``outcome`` label of a job that left the consumer."""
    if err is not None:
        return "crashed"
    if status is None:
        return "skipped"  # hash gone or already finished: only dropped from processing
    if status in protocol.FINISHED_STATUSES or status == consumer.final_status:
        return "failed" if status == consumer.failed_status else "done"
    return "requeued"
