"""Reclaim with real kiosk-worker processes: SIGKILL mid-job, the item is completed by another worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import kiosk_protocol as protocol
from harness.local_pool import QUEUE, tiny_input
from harness.wait import wait_for
from kiosk_model_server import ModelServer
from kiosk_operator import reclaim

TTL = 1.0
MID_JOB = (protocol.STARTED, protocol.PRE_PROCESSING, protocol.PREDICTING)


@pytest.fixture()
def slow_server() -> Iterator[ModelServer]:
    server = ModelServer(models=["null"], latency_ms=0).start()
    yield server
    server.stop()


def _spawn(name: str, redis_server, server: ModelServer, bucket: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **redis_server.env(),
        "TF_HOST": "127.0.0.1",
        "TF_PORT": str(server.port),
        "STORAGE_BUCKET": f"file://{bucket}",
        "QUEUE": QUEUE,
        "CONSUMER_TYPE": "segmentation",
        "EMPTY_QUEUE_TIMEOUT": "0.3",
        "HEARTBEAT_INTERVAL": "0.2",
        "WORKER_NAME": name,
        "GRPC_TIMEOUT": "30",
        "MAX_RETRY": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "kiosk_worker", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _reclaim_once(client, alive) -> int:
    return reclaim.reclaim_queues(client, [QUEUE], alive, TTL).requeued


def test_sigkill_mid_job_is_reclaimed_and_completed_by_another_worker(
    tmp_path: Path, redis_server, redis_client, slow_server
):
    bucket = tmp_path / "bucket"
    key = protocol.submit_job(redis_client, QUEUE, tiny_input(bucket), "null", "1")
    slow_server.set_latency(60_000)  # the model call hangs: the worker is surely mid-job
    first = _spawn("victim", redis_server, slow_server, bucket)
    try:
        wait_for(lambda: redis_client.hget(key, "status") in MID_JOB, 20, "victim is mid-job")
        assert redis_client.lrange(protocol.processing_key(QUEUE, "victim"), 0, -1) == [key]
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    slow_server.set_latency(0)
    # Still held: the item survived the kill in the processing list.
    assert redis_client.lrange(protocol.processing_key(QUEUE, "victim"), 0, -1) == [key]
    # While the pod (process) counts as alive nothing is reclaimed, whatever the heartbeat says.
    assert reclaim.reclaim_queues(redis_client, [QUEUE], lambda n: True, TTL, now=time.time() + 60).moved == 0

    alive = {"victim": first}
    wait_for(
        lambda: _reclaim_once(redis_client, lambda n: n in alive and alive[n].poll() is None),
        20,
        "reclaim after the heartbeat expired",
    )
    assert redis_client.lrange(QUEUE, 0, -1) == [key]
    assert redis_client.zscore(protocol.workers_key(QUEUE), "victim") is None

    second = _spawn("rescuer", redis_server, slow_server, bucket, "--max-jobs", "5")
    assert second.wait(60) == 0
    job = redis_client.hgetall(key)
    assert job["status"] == "done" and job["updated_by"] == "rescuer"
    assert redis_client.llen(protocol.processing_key(QUEUE, "victim")) == 0
    assert redis_client.llen(protocol.processing_key(QUEUE, "rescuer")) == 0


def test_reclaim_then_worker_finish_race_leaves_no_duplicate(
    tmp_path: Path, redis_server, redis_client, slow_server
):
    """A worker wrongly presumed dead (split brain) finishes after its item was reclaimed.

    At-least-once: the queue holds the item once more (it may run again); it must never be
    there twice, and the worker's own processing list ends empty.
    """
    bucket = tmp_path / "bucket"
    key = protocol.submit_job(redis_client, QUEUE, tiny_input(bucket), "null", "1")
    slow_server.set_latency(1500)
    worker = _spawn("zombie", redis_server, slow_server, bucket, "--max-jobs", "1")
    try:
        wait_for(lambda: redis_client.hget(key, "status") in MID_JOB, 20, "worker is mid-job")
        # Reclaim as if the pod were gone and the heartbeat old (a split-brain).
        report = reclaim.reclaim_queues(redis_client, [QUEUE], lambda n: False, TTL, now=time.time() + 60)
        assert report.requeued == 1
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    assert redis_client.hget(key, "status") == "done"
    assert redis_client.lrange(QUEUE, 0, -1).count(key) <= 1
    assert redis_client.llen(protocol.processing_key(QUEUE, "zombie")) == 0
