"""Worker benchmarks: pickup latency, jobs/s per process, cold start and RSS.

* pickup latency (enqueue -> status ``started``), measured from Redis's own
  MONITOR timestamps (server clock, microseconds) for both sides:
  - baseline: the upstream consumer loop replayed (LLEN; if empty sleep
    EMPTY_QUEUE_TIMEOUT=5 s; else RPOPLPUSH and HSET started). Jobs arrive at
    random times; 10 pollers on 10 queues run in parallel so 30 samples take
    ~15 s instead of minutes.
  - ours: a real ``kiosk-worker`` process blocked in BLMOVE, jobs arriving
    one at a time while it is idle.
* jobs/s per worker process: ``kiosk-worker --max-jobs N`` through the whole
  segmentation path (file:// download, TIFF decode, gRPC Predict to the
  ``null`` model, watershed, TIFF + zip, upload, status writes) with 32x32
  images, so it measures the worker's per-job overhead, not a model. Rate
  from the jobs' ``finished_at`` stamps. Baseline column: the README's target.
* cold start: process start -> heartbeat registered in Redis, and RSS then
  (from /proc), against ``import tensorflow_serving.apis`` (what a worker
  built on tensorflow-serving-api pays before doing anything).

``ratio`` > 1 means ours is better. Run standalone: ``python -m bench.bench_worker``.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis
import tifffile

import kiosk_protocol as protocol
from harness.procs import stop_process
from harness.redis_server import RedisServer
from kiosk_model_server import ModelServer

WORKER_BIN = str(Path(sys.executable).with_name("kiosk-worker"))
UPSTREAM_EMPTY_QUEUE_TIMEOUT = 5.0
BASELINE_POLLERS = 10
BASELINE_SAMPLES_EACH = 3
OUR_SAMPLES = 60
THROUGHPUT_JOBS = 1500


def _row(name: str, baseline: float | None, ours: float, unit: str, note: str,
         higher_is_better: bool = False) -> dict[str, Any]:
    ratio = None
    if baseline and ours:
        ratio = ours / baseline if higher_is_better else baseline / ours
    return {"name": name, "baseline": baseline, "ours": ours, "unit": unit, "ratio": ratio, "note": note}


# --- pickup latency -------------------------------------------------------------------------------


class _Monitor:
    """Server-side timestamps of LPUSH (enqueue) and HSET status=started per job key."""

    def __init__(self, port: int) -> None:
        self.pushed: dict[str, float] = {}
        self.started: dict[str, float] = {}
        self._client = redis.Redis(port=port, decode_responses=True)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Monitor:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._client.lpush("bench:poke", "x")  # wakes listen() so the thread can end
        self._thread.join(5)

    def _run(self) -> None:
        with self._client.monitor() as mon:
            self._ready.set()
            for event in mon.listen():
                if self._stop.is_set():
                    return
                tokens = event["command"].split(" ")
                op = tokens[0].upper()
                if op == "LPUSH" and len(tokens) >= 3:
                    for key in tokens[2:]:
                        self.pushed.setdefault(key, event["time"])
                elif op == "HSET" and len(tokens) >= 4:
                    pairs = dict(zip(tokens[2::2], tokens[3::2], strict=False))
                    if pairs.get("status") == protocol.STARTED:
                        self.started.setdefault(tokens[1], event["time"])

    def latencies(self, keys: list[str]) -> list[float]:
        return [self.started[k] - self.pushed[k] for k in keys if k in self.started and k in self.pushed]


def _upstream_poller(client: redis.Redis, queue: str, stop: threading.Event) -> None:
    """kiosk-redis-consumer's loop: LLEN, sleep when empty, RPOPLPUSH, HSET started, LREM."""
    processing = protocol.processing_key(queue, "upstream")
    while not stop.is_set():
        if client.llen(queue) == 0:
            stop.wait(UPSTREAM_EMPTY_QUEUE_TIMEOUT)
            continue
        key = client.rpoplpush(queue, processing)
        if key:
            client.hset(key, mapping={"status": protocol.STARTED, "identity_started": "upstream"})
            client.hset(key, mapping={"status": protocol.DONE})
            client.lrem(processing, 1, key)


def _baseline_pickup(server: RedisServer) -> list[float]:
    client = server.client()
    stop = threading.Event()
    keys: list[str] = []
    lock = threading.Lock()

    def producer(queue: str) -> None:
        rng = random.Random(queue)
        for _ in range(BASELINE_SAMPLES_EACH):
            stop.wait(rng.uniform(0, UPSTREAM_EMPTY_QUEUE_TIMEOUT))
            key = protocol.submit_job(client, queue, "x.tif", "null", "1")
            with lock:
                keys.append(key)
            deadline = time.monotonic() + 3 * UPSTREAM_EMPTY_QUEUE_TIMEOUT
            while client.hget(key, "status") != protocol.DONE and time.monotonic() < deadline:
                stop.wait(0.01)

    with _Monitor(server.port) as mon:
        queues = [f"baseline-{i}" for i in range(BASELINE_POLLERS)]
        pollers = [threading.Thread(target=_upstream_poller, args=(server.client(), q, stop), daemon=True)
                   for q in queues]
        producers = [threading.Thread(target=producer, args=(q,)) for q in queues]
        for t in pollers + producers:
            t.start()
        for t in producers:
            t.join()
        stop.set()
        time.sleep(0.1)  # let MONITOR deliver the last events
        return mon.latencies(keys)


def _worker_env(server: RedisServer, model: ModelServer, bucket: str, name: str, **extra: str) -> dict:
    env = {**os.environ, **server.env(), "TF_HOST": "127.0.0.1", "TF_PORT": str(model.port),
           "STORAGE_BUCKET": f"file://{bucket}", "QUEUE": "bench", "CONSUMER_TYPE": "segmentation",
           "WORKER_NAME": name, "LOG_LEVEL": "WARNING", "HEARTBEAT_INTERVAL": "1"}
    env.update(extra)
    return env


def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.0005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark timed out waiting for {what}")
        time.sleep(interval)


def _our_pickup(server: RedisServer, model: ModelServer, bucket: str, image: str) -> list[float]:
    client = server.client()
    proc = subprocess.Popen([WORKER_BIN], env=_worker_env(server, model, bucket, "bench-pickup",
                                                          EMPTY_QUEUE_TIMEOUT="30"))
    keys = []
    try:
        _wait(lambda: client.exists(protocol.worker_info_key("bench-pickup")), 30, "worker ready", 0.01)
        with _Monitor(server.port) as mon:
            rng = random.Random(1)
            for _ in range(OUR_SAMPLES):
                time.sleep(rng.uniform(0.005, 0.02))  # arrive while the worker is idle in BLMOVE
                key = protocol.submit_job(client, "bench", image, "null", "1")
                keys.append(key)
                _wait(lambda k=key: client.hget(k, "status") in protocol.FINISHED_STATUSES, 30, "job")
            time.sleep(0.1)
            return mon.latencies(keys)
    finally:
        stop_process(proc, 30)


# --- throughput -------------------------------------------------------------------------------------


def _throughput(server: RedisServer, model: ModelServer, bucket: str, image: str) -> tuple[float, int]:
    client = server.client()
    keys = []
    pipe = client.pipeline(transaction=False)
    for _ in range(THROUGHPUT_JOBS):
        fields = protocol.submission_fields(image, "null", "1")
        key = protocol.job_key("bench", os.path.basename(image))
        pipe.hset(key, mapping=fields)
        pipe.lpush("bench", key)
        keys.append(key)
    pipe.execute()
    proc = subprocess.run([WORKER_BIN, "--max-jobs", str(THROUGHPUT_JOBS)], timeout=600,
                          env=_worker_env(server, model, bucket, "bench-throughput",
                                          EMPTY_QUEUE_TIMEOUT="1"))
    if proc.returncode != 0:
        raise RuntimeError(f"kiosk-worker exited {proc.returncode}")
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hmget(key, "status", "finished_at")
    rows = pipe.execute()
    done = [r for r in rows if r[0] == protocol.DONE]
    stamps = sorted(_parse_iso(r[1]) for r in done)
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return rate, len(done)


def _parse_iso(text: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(text.rstrip("Z")).replace(
        tzinfo=datetime.UTC).timestamp()


# --- cold start -------------------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _our_cold_start(server: RedisServer, model: ModelServer, bucket: str, name: str) -> tuple[float, float]:
    client = server.client()
    start = time.monotonic()
    proc = subprocess.Popen([WORKER_BIN], env=_worker_env(server, model, bucket, name,
                                                          EMPTY_QUEUE_TIMEOUT="30"))
    try:
        _wait(lambda: client.exists(protocol.worker_info_key(name)), 60, "worker ready")
        ready = time.monotonic() - start
        return ready, _rss_mb(proc.pid)
    finally:
        stop_process(proc, 30)


_TF_PROBE = (
    "import resource, time; t = time.monotonic(); "
    "import tensorflow_serving.apis.prediction_service_pb2_grpc, tensorflow_serving.apis.predict_pb2; "
    "print(time.monotonic() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
)


def _baseline_cold_start() -> tuple[float, float] | None:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", _TF_PROBE], capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - start
    if out.returncode != 0:
        return None
    _, rss = out.stdout.split()
    return wall, float(rss)


# --- entry point --------------------------------------------------------------------------------------


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    server = RedisServer().start()
    model = ModelServer(models=["null"]).start()
    bucket = tempfile.mkdtemp(prefix="kiosk-bench-bucket-")
    try:
        image = "tiny.tif"
        tifffile.imwrite(os.path.join(bucket, image),
                         np.random.default_rng(0).random((32, 32), dtype=np.float32))

        base = _baseline_pickup(server)
        ours = _our_pickup(server, model, bucket, image)
        rows.append(_row("pickup latency p50 (enqueue -> started)", statistics.median(base) * 1000,
                         statistics.median(ours) * 1000, "ms",
                         f"upstream poll loop, {len(base)} random arrivals vs BLMOVE worker, {len(ours)}"))
        rows.append(_row("pickup latency p99", max(base) * 1000,
                         float(np.percentile(ours, 99)) * 1000, "ms", "baseline: max of its samples"))

        server.client().delete("bench")
        rate, done = _throughput(server, model, bucket, image)
        rows.append(_row("jobs/s per worker process (null model)", 300.0, rate, "jobs/s",
                         f"baseline = DESIGN target; {done} jobs 32x32, file://, full segmentation path",
                         higher_is_better=True))

        starts = [_our_cold_start(server, model, bucket, f"bench-cold-{i}") for i in range(3)]
        ready = statistics.median(s[0] for s in starts)
        rss = statistics.median(s[1] for s in starts)
        tf = _baseline_cold_start()
        rows.append(_row("worker cold start -> ready (heartbeat)", tf[0] if tf else None, ready, "s",
                         "baseline: python -c 'import tensorflow_serving.apis' (no Redis, no work)"))
        rows.append(_row("worker RSS when ready", tf[1] if tf else None, rss, "MB",
                         "baseline: max RSS of that import alone"))
    finally:
        model.stop(grace=0)
        server.cleanup()
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
