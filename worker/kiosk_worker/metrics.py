"""Prometheus metrics of one worker process, served over HTTP on METRICS_PORT (0 = off).

The runner and the consumers report through a ``Metrics`` object; with metrics
off it is ``Metrics()``, whose methods do nothing, so prometheus_client is only
imported (and its HTTP thread only started) by workers that serve metrics.

Served (all per worker process):

* ``kiosk_worker_jobs_total{consumer,queue,outcome}`` jobs ended: ``done``,
  ``failed``, ``requeued`` (put back to wait, e.g. a zip parent), ``skipped``
  (hash gone or already finished), ``given_back`` (grace period over at
  shutdown), ``crashed`` (consumer raised past its own error handling, e.g.
  Redis unreachable): the values of ``kiosk_worker.work.OutcomeKind``.
* ``kiosk_worker_job_duration_seconds{consumer}`` time per finished job.
* ``kiosk_worker_queue_wait_seconds{queue}`` submission (the job's ``created_at``)
  to first pickup, i.e. how long users wait before work starts.
* ``kiosk_worker_busy`` 1 while the worker holds a job, else 0.
* ``kiosk_worker_model_retries_total{method,code}`` TF Serving calls retried.
* the client library's ``process_*`` collector (CPU, RSS, open fds).
"""

from __future__ import annotations

import datetime
from typing import Any

__all__ = ["DURATION_BUCKETS", "WAIT_BUCKETS", "Metrics", "PrometheusMetrics", "queue_wait", "start_metrics"]

#: Job durations range from milliseconds (null model) to minutes (large tracking jobs).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: Queue waits range from sub-millisecond pickups to long backlogs.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    """What the worker reports; this base class records nothing (METRICS_PORT=0)."""

    port = 0

    def job_started(self) -> None:
        """A job was handed to the consumer."""

    def job_ended(self, consumer: str, queue: str, outcome: str, seconds: float | None = None) -> None:
        """A job left the worker; ``seconds`` is given for finished jobs (done/failed)."""

    def queue_waited(self, queue: str, seconds: float) -> None:
        """A new job was picked up ``seconds`` after its submission."""

    def model_retry(self, method: str, code: str) -> None:
        """A TF Serving call failed transiently and is retried."""

    def close(self) -> None:
        """Stop serving."""


class PrometheusMetrics(Metrics):
    """Metrics in their own registry (several runners may share a process in tests)."""

    def __init__(self, port: int, addr: str = "0.0.0.0") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = CollectorRegistry()
        reg = self.registry
        ProcessCollector(registry=reg)
        self._jobs = Counter("kiosk_worker_jobs", "Jobs ended by this worker, by outcome "
                             "(done, failed, requeued, skipped, given_back, crashed).",
                             ["consumer", "queue", "outcome"], registry=reg)
        self._duration = Histogram("kiosk_worker_job_duration_seconds",
                                   "Time from pickup to the final status of finished jobs.",
                                   ["consumer"], buckets=DURATION_BUCKETS, registry=reg)
        self._wait = Histogram("kiosk_worker_queue_wait_seconds",
                               "Time from submission (created_at) to the first pickup of a job.",
                               ["queue"], buckets=WAIT_BUCKETS, registry=reg)
        self._busy = Gauge("kiosk_worker_busy", "1 while this worker holds a job, else 0.", registry=reg)
        self._retries = Counter("kiosk_worker_model_retries", "TF Serving calls retried after a "
                                "transient failure (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED).",
                                ["method", "code"], registry=reg)
        self._server: Any = None
        self._serve(port, addr)

    def _serve(self, port: int, addr: str) -> None:
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        self.port = int(self._server.server_address[1])

    def job_started(self) -> None:
        self._busy.set(1)

    def job_ended(self, consumer: str, queue: str, outcome: str, seconds: float | None = None) -> None:
        self._busy.set(0)
        self._jobs.labels(consumer, queue, outcome).inc()
        if seconds is not None:
            self._duration.labels(consumer).observe(seconds)

    def queue_waited(self, queue: str, seconds: float) -> None:
        self._wait.labels(queue).observe(max(0.0, seconds))

    def model_retry(self, method: str, code: str) -> None:
        self._retries.labels(method, code).inc()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def start_metrics(port: int, addr: str = "0.0.0.0") -> Metrics:
    """Serve metrics on ``port`` (> 0); ``Metrics()`` when 0. Raises OSError if the port is taken."""
    return PrometheusMetrics(port, addr) if port > 0 else Metrics()


def queue_wait(created_at: str | None, picked_at: float) -> float | None:
    """Seconds from a job's ``created_at`` (Kiosk ISO form, 'Z') to ``picked_at`` (unix time)."""
    if not created_at:
        return None
    try:
        created = datetime.datetime.fromisoformat(created_at.strip().rstrip("Z"))
    except ValueError:
        return None
    if created.tzinfo is None:
        created = created.replace(tzinfo=datetime.UTC)
    return picked_at - created.timestamp()
