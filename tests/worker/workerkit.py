"""Helpers for worker tests (imported as ``workerkit``; a uniquely named module, because
``from conftest import ...`` picks whichever test directory's conftest was imported last).

Jobs are written with ``protocol.submit_job`` exactly as the Kiosk frontend
writes them; the worker runs in-process (``run_batch``) or as the
``kiosk-worker`` console script (``spawn_worker``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import redis
import tifffile
from scipy.optimize import linear_sum_assignment

import kiosk_protocol as protocol
from kiosk_model_server import ModelServer
from kiosk_protocol.settings import Settings, load_settings
from kiosk_worker.runner import Runner

WORKER_BIN = Path(sys.executable).with_name("kiosk-worker")


def worker_env(redis_server, server: ModelServer, bucket: Path, **extra: object) -> dict[str, str]:
    """Environment of a test worker: short timeouts, bounded retries, file:// storage."""
    env = {
        **redis_server.env(),
        "TF_HOST": "127.0.0.1",
        "TF_PORT": str(server.port),
        "STORAGE_BUCKET": f"file://{bucket}",
        "QUEUE": "segmentation",
        "CONSUMER_TYPE": "segmentation",
        "EMPTY_QUEUE_TIMEOUT": "0.3",
        "HEARTBEAT_INTERVAL": "0.2",
        "GRPC_TIMEOUT": "10",
        "GRPC_BACKOFF": "0.01",
        "MAX_RETRY": "2",
        "STORAGE_BACKOFF": "0.01",
        "STORAGE_MAX_RETRY": "1",
        "WORKER_NAME": "test-worker",
        "LOG_LEVEL": "DEBUG",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def settings_for(redis_server, server: ModelServer, bucket: Path, **extra: object) -> Settings:
    return load_settings(worker_env(redis_server, server, bucket, **extra))


def run_batch(settings: Settings, max_jobs: int = 1000) -> Runner:
    """Run an in-process batch worker until the queue is empty; returns it for its stats."""
    runner = Runner(settings, max_jobs=max_jobs)
    assert runner.run() == 0
    return runner


#: Every process spawn_worker started; ``reap_workers`` ends those still running.
SPAWNED: list[subprocess.Popen[str]] = []


def spawn_worker(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """``kiosk-worker`` as a process; it is killed at the end of the test if still running
    (conftest's ``reap_workers``), so it can never take jobs from a later test."""
    full = {**os.environ, **env}
    proc = subprocess.Popen([str(WORKER_BIN), *args], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    SPAWNED.append(proc)
    return proc


def reap_workers() -> list[int]:
    """SIGKILL spawned workers that are still running and wait for them; returns their pids."""
    leftover = []
    while SPAWNED:
        proc = SPAWNED.pop()
        if proc.poll() is None:
            leftover.append(proc.pid)
            proc.kill()
        proc.communicate()  # waits and closes the pipes
    return leftover


def save_tiff(bucket: Path, name: str, image: np.ndarray) -> str:
    tifffile.imwrite(bucket / name, image)
    return name


def submit(client: redis.Redis, name: str, model: str = "segmentation", version: str = "1",
           queue: str = "segmentation", **extra: str) -> str:
    return protocol.submit_job(client, queue, name, model, version, **extra)


def result_labels(bucket: Path, job: dict[str, str]) -> list[np.ndarray]:
    """Label TIFFs inside the job's result zip, in name order."""
    zip_path = Path(job["output_url"])
    assert zip_path.is_file(), job
    assert zip_path.resolve().is_relative_to(bucket.resolve())
    out = []
    with zipfile.ZipFile(zip_path) as zf:
        for member in sorted(zf.namelist()):
            with zf.open(member) as fh:
                out.append(tifffile.imread(fh))
    return out


def mean_matched_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over true cells of the IoU with their optimally matched predicted cell (0 if none)."""
    true_ids = [int(v) for v in np.unique(truth) if v]
    pred_ids = [int(v) for v in np.unique(pred) if v]
    if not true_ids:
        return 1.0 if not pred_ids else 0.0
    col = {p: j for j, p in enumerate(pred_ids)}
    ious = np.zeros((len(true_ids), max(1, len(pred_ids))))
    for i, t in enumerate(true_ids):
        tmask = truth == t
        for p in np.unique(pred[tmask]):
            if p:
                pmask = pred == p
                ious[i, col[int(p)]] = (tmask & pmask).sum() / (tmask | pmask).sum()
    rows, cols = linear_sum_assignment(-ious)
    scores = np.zeros(len(true_ids))
    scores[rows] = ious[rows, cols]
    return float(scores.mean())


class StatusRecorder:
    """Every ``status`` value written to chosen job hashes, in server order (Redis MONITOR).

    MONITOR also shows writes made inside Lua scripts and MULTI blocks, so a status
    that lives for a microsecond (``started``) is seen too, which polling cannot promise.
    Use as a context manager; ``statuses(key)`` collapses repeats of the same status.
    """

    def __init__(self, client: redis.Redis) -> None:
        import threading

        self._client = client
        self._events: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)

    def __enter__(self) -> StatusRecorder:
        self._thread.start()
        assert self._ready.wait(10), "MONITOR did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._client.ping()  # wakes the monitor so the thread can end
        self._thread.join(10)

    def _run(self) -> None:
        with self._client.monitor() as mon:
            self._ready.set()
            for event in mon.listen():
                if self._stop.is_set():
                    return
                tokens = event["command"].split(" ")
                if tokens[0].upper() != "HSET" or len(tokens) < 4:
                    continue
                fields = dict(zip(tokens[2::2], tokens[3::2], strict=False))
                if "status" in fields:
                    with self._lock:
                        self._events.append((tokens[1], fields["status"]))

    def statuses(self, key: str) -> list[str]:
        with self._lock:
            seen = [status for k, status in self._events if k == key]
        return [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]
