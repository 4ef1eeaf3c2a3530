"""Worker Prometheus metrics, scraped over real HTTP from a running worker (METRICS_PORT)."""

from __future__ import annotations

import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from workerkit import save_tiff, settings_for, spawn_worker, submit, worker_env

import kiosk_protocol as protocol
from harness.ports import free_port
from harness.wait import wait_for
from kiosk_model_server import ModelServer
from kiosk_worker.metrics import queue_wait
from kiosk_worker.runner import Runner


@pytest.fixture()
def own_server() -> Iterator[ModelServer]:
    """A model server of our own, so injected faults and latency cannot leak into other tests."""
    server = ModelServer(models=["null"]).start()
    yield server
    server.stop(grace=0)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class RunningWorker:
    """An in-process long-lived worker (Runner.run in a thread), stopped on exit."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.thread = threading.Thread(target=runner.run, daemon=True)

    def __enter__(self) -> Runner:
        self.thread.start()
        return self.runner

    def __exit__(self, *exc: object) -> None:
        self.runner.request_stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


def test_metrics_count_jobs_durations_waits_and_retries(redis_client, redis_server, own_server, bucket):
    port = free_port()
    settings = settings_for(redis_server, own_server, bucket, METRICS_PORT=port, EMPTY_QUEUE_TIMEOUT=0.2)
    image = save_tiff(bucket, "tiny.tif", np.zeros((16, 16), dtype=np.float32))
    with RunningWorker(Runner(settings)) as runner:
        wait_for(lambda: runner.metrics is not None and runner.metrics.port == port, 10, "metrics served")
        assert value(scrape(port), "kiosk_worker_busy") == 0
        own_server.fail_next(1, "UNAVAILABLE")  # the first model call is retried once
        good = submit(redis_client, image, model="null")
        bad = submit(redis_client, "missing.tif", model="null")
        wait_for(lambda: redis_client.hget(bad, "status") in protocol.FINISHED_STATUSES, 30, "jobs finished")
        assert redis_client.hget(good, "status") == "done"
        assert redis_client.hget(bad, "status") == "failed"

        def both_counted() -> bool:
            s = scrape(port)
            return value(s, "kiosk_worker_job_duration_seconds_count", consumer="segmentation") == 2
        wait_for(both_counted, 10, "both jobs counted")
        s = scrape(port)

    jobs = {outcome: value(s, "kiosk_worker_jobs_total", consumer="segmentation", queue="segmentation",
                           outcome=outcome) for outcome in ("done", "failed", "requeued", "crashed")}
    assert jobs == {"done": 1, "failed": 1, "requeued": 0, "crashed": 0}
    assert value(s, "kiosk_worker_job_duration_seconds_sum", consumer="segmentation") > 0
    assert value(s, "kiosk_worker_queue_wait_seconds_count", queue="segmentation") == 2
    assert value(s, "kiosk_worker_busy") == 0
    retries = {k: v for k, v in s.items() if k[0] == "kiosk_worker_model_retries_total"}
    assert sum(retries.values()) == 1
    assert all(dict(labels)["code"] == "UNAVAILABLE" for _, labels in retries)
    assert value(s, "process_resident_memory_bytes") > 0
    with pytest.raises(urllib.error.URLError):  # the endpoint goes away with the worker
        scrape(port)


def test_busy_gauge_is_one_while_a_job_runs(redis_client, redis_server, own_server, bucket):
    port = free_port()
    settings = settings_for(redis_server, own_server, bucket, METRICS_PORT=port, EMPTY_QUEUE_TIMEOUT=0.2)
    image = save_tiff(bucket, "tiny.tif", np.zeros((16, 16), dtype=np.float32))
    own_server.set_latency(1500)
    with RunningWorker(Runner(settings)):
        key = submit(redis_client, image, model="null")
        wait_for(lambda: redis_client.hget(key, "status") == protocol.PREDICTING, 20, "job predicting")
        assert value(scrape(port), "kiosk_worker_busy") == 1
        wait_for(lambda: redis_client.hget(key, "status") == "done", 20, "job done")
        wait_for(lambda: value(scrape(port), "kiosk_worker_busy") == 0, 10, "idle again")


def test_taken_metrics_port_stops_the_worker_with_one_line(redis_server, model_server, bucket):
    import socket

    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = spawn_worker(worker_env(redis_server, model_server, bucket, METRICS_PORT=port))
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"kiosk-worker: invalid setting METRICS_PORT={port}: cannot listen"), err
    assert "Traceback" not in err


def test_queue_wait_reads_kiosk_timestamps() -> None:
    assert queue_wait("2024-05-01T12:00:00.000000Z", 1714564801.5) == pytest.approx(1.5)
    assert queue_wait("", 1.0) is None
    assert queue_wait("not a date", 1.0) is None
