"""Prometheus metrics of the operator, served on an HTTP port (prometheus-client)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)
_LABELS = ("namespace", "pool")

QUEUE_PENDING = Gauge(
    "kiosk_pool_queue_pending", "Items waiting in the pool's queues.", _LABELS, registry=REGISTRY
)
QUEUE_IN_FLIGHT = Gauge(
    "kiosk_pool_in_flight", "Items held by the pool's workers.", _LABELS, registry=REGISTRY
)
WORKERS_DESIRED = Gauge(
    "kiosk_pool_workers_desired", "Workers the operator decided on.", _LABELS, registry=REGISTRY
)
WORKERS_CURRENT = Gauge(
    "kiosk_pool_workers_current", "Workers (replicas or active Jobs) right now.", _LABELS, registry=REGISTRY
)
WORKERS_BUSY = Gauge("kiosk_pool_workers_busy", "Workers holding an item.", _LABELS, registry=REGISTRY)
SCALE_EVENTS = Counter(
    "kiosk_pool_scale_events", "Worker count changes.", (*_LABELS, "direction"), registry=REGISTRY
)
REDIS_ERRORS = Counter(
    "kiosk_pool_redis_errors", "Failed depth measurements (Redis unreachable).", _LABELS, registry=REGISTRY
)
JOBS_CREATED = Counter(
    "kiosk_pool_jobs_created", "Worker Jobs created (Job mode).", _LABELS, registry=REGISTRY
)
RECLAIMED = Counter(
    "kiosk_pool_reclaimed_items",
    "Items taken back from the processing lists of gone workers (requeued, or dropped when finished).",
    (*_LABELS, "outcome"),
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "kiosk_pool_reconcile_seconds",
    "Time of one scaling cycle of one pool.",
    _LABELS,
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Expose /metrics; port 0 disables."""
    if port:
        start_http_server(port, addr=addr, registry=REGISTRY)


def forget(namespace: str, pool: str) -> None:
    """Drop a deleted pool's series."""
    for gauge in (QUEUE_PENDING, QUEUE_IN_FLIGHT, WORKERS_DESIRED, WORKERS_CURRENT, WORKERS_BUSY):
        try:
            gauge.remove(namespace, pool)
        except KeyError:
            pass
