"""Job-mode benchmarks: how many Jobs get created, and how close K workers come to the ideal makespan.

1. Jobs created versus ceil(items / batchSize), replaying the same trace (a burst, a
   steady stream) through ``scaling.jobs_to_create`` and through a KEDA-default-style
   formula (ceil(pending / target) - running, where Jobs whose pods are still Pending
   are not counted as running). Pods stay Pending for a few polls, as on a slow node pool.
2. Makespan of N jobs on K real ``kiosk-worker`` processes against a model server with a
   fixed latency, versus the ideal N * latency / K (target <= 1.05x). Measured this
   way: workers are started, registered and warmed before the clock starts (process start-up
   is the cold-start figure, measured elsewhere); the clock runs from the moment all N jobs
   are enqueued (one pipeline) to the last job's own ``finished_at``; the bench watches only
   the queue depth (O(K) commands per 50 ms), never every job hash, so the observer does not
   compete with the K workers for this machine's cores.

``run() -> list[dict]`` rows {name, baseline, ours, unit, ratio, note}; ratio = ours / baseline.
Sizes can be changed with BENCH_MAKESPAN_N, BENCH_MAKESPAN_K and BENCH_MAKESPAN_LATENCY_MS.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kiosk_operator import scaling

BATCH = 25
MAX_JOBS = 200
POD_START_POLLS = 4     # a Job's pod stays Pending this many polls
TAKE_PER_POLL = 5       # items a running Job takes per poll

Policy = Callable[[int, int, int], int]  # (pending items, running Jobs, Jobs with Pending pods) -> new Jobs


def ours(pending: int, running: int, starting: int) -> int:
    return scaling.jobs_to_create(pending, running + starting, None, BATCH, MAX_JOBS)


def keda_default(pending: int, running: int, starting: int) -> int:
    """ScaledJob 'default' strategy: min(ceil(queue / target), max) - running; Pending pods ignored."""
    return max(0, min(math.ceil(pending / BATCH), MAX_JOBS) - running)


@dataclass
class _Job:
    age: int = 0
    left: int = BATCH


def replay(trace: list[int], policy: Policy) -> tuple[int, int]:
    """Run the trace (arrivals per poll) to completion; returns (Jobs created, items)."""
    pending, created, items = 0, 0, 0
    jobs: list[_Job] = []
    t = 0
    while t < len(trace) or pending or jobs:
        arrivals = trace[t] if t < len(trace) else 0
        pending += arrivals
        items += arrivals
        running = sum(1 for j in jobs if j.age >= POD_START_POLLS)
        new = policy(pending, running, len(jobs) - running)
        jobs += [_Job() for _ in range(new)]
        created += new
        still: list[_Job] = []
        for job in jobs:
            if job.age >= POD_START_POLLS:
                take = min(TAKE_PER_POLL, job.left, pending)
                job.left -= take
                pending -= take
                if job.left == 0 or (take == 0 and pending == 0):
                    continue  # batch done, or the queue is empty: the worker exits 0
            job.age += 1
            still.append(job)
        jobs = still
        t += 1
        if t > 100_000:
            raise RuntimeError("trace did not drain")
    return created, items


TRACES = {
    "burst (1,000 items at once)": [1000],
    "steady stream (20 items/poll for 50 polls)": [20] * 50,
}


def job_count_rows() -> list[dict]:
    rows = []
    for label, trace in TRACES.items():
        keda, items = replay(trace, keda_default)
        mine, _ = replay(trace, ours)
        ideal = math.ceil(items / BATCH)
        rows.append({
            "name": f"Job mode: Jobs created, {label}",
            "baseline": keda, "ours": mine, "unit": "Jobs", "ratio": round(mine / keda, 3),
            "note": f"ideal ceil({items}/{BATCH}) = {ideal}; ours/ideal = {mine / ideal:.2f}, "
                    f"KEDA-default/ideal = {keda / ideal:.2f} (pods Pending {POD_START_POLLS} polls)",
        })
    return rows


# --- makespan -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def makespan_row(n: int, k: int, latency_ms: float) -> dict:
    import numpy as np
    import redis
    import tifffile

    import kiosk_protocol as protocol
    from harness.procs import stop_process
    from kiosk_model_server import ModelServer
    from kiosk_operator.local import start_redis
    from kiosk_operator.process_backend import ProcessBackend

    with tempfile.TemporaryDirectory(prefix="kiosk-bench-") as tmp:
        root = Path(tmp)
        port = _free_port()
        redis_proc = start_redis(port, root)
        model = ModelServer(models=["null"], latency_ms=latency_ms, max_workers=max(16, 2 * k)).start()
        bucket = root / "bucket"
        bucket.mkdir()
        tifffile.imwrite(bucket / "tiny.tif", np.zeros((16, 16), dtype=np.float32))
        env = {"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(port), "TF_HOST": "127.0.0.1",
               "TF_PORT": str(model.port), "STORAGE_BUCKET": f"file://{bucket}", "QUEUE": "bench",
               "CONSUMER_TYPE": "segmentation", "LOG_LEVEL": "WARNING", "HEARTBEAT_INTERVAL": "0.5"}
        backend = ProcessBackend(root / "state", env, prefix="bench")
        client = redis.Redis(port=port, decode_responses=True)
        try:
            backend.start(k)
            deadline = time.monotonic() + 60
            while client.zcard(protocol.workers_key("bench")) < k:
                if time.monotonic() > deadline:
                    raise RuntimeError("bench workers did not register")
                time.sleep(0.05)
            # Warm every worker (metadata cache, gRPC channel, lazy imports) before timing.
            warm = _enqueue(client, 2 * k)
            _wait_drained(client, 60)
            _wait_done(client, warm, 60)
            # The clock starts when all N jobs are in the queue (one pipeline, as the ideal
            # N*latency/K assumes) and stops at the last job's own finished_at stamp.
            start = time.time()
            keys = _enqueue(client, n)
            _wait_drained(client, 600)
            took = _last_finished(client, keys) - start
        finally:
            backend.stop_all(10)
            model.stop()
            stop_process(redis_proc, 10)
    ideal = n * latency_ms / 1000 / k
    overhead_ms = (took * k / n) * 1000 - latency_ms
    return {
        "name": f"Job mode: makespan of {n} jobs on {k} worker processes, model latency {latency_ms:g} ms",
        "baseline": round(ideal, 2), "ours": round(took, 2), "unit": "s", "ratio": round(took / ideal, 3),
        "note": f"baseline = ideal N*latency/K; target <= 1.05x; per-job overhead {overhead_ms:.1f} ms",
    }


def _enqueue(client, n: int) -> list[str]:
    """Write n job hashes as the Kiosk frontend does and LPUSH them all in one pipeline."""
    import kiosk_protocol as protocol

    keys, pipe = [], client.pipeline(transaction=False)
    for _ in range(n):
        key = protocol.job_key("bench", "tiny.tif")
        pipe.hset(key, mapping=protocol.submission_fields("tiny.tif", "null", "1"))
        keys.append(key)
    pipe.lpush("bench", *keys)
    pipe.execute()
    return keys


def _wait_drained(client, timeout: float) -> None:
    """Until nothing is pending or in flight: O(workers) commands every 50 ms, so the observer
    does not take CPU from the workers it measures (polling every job's hash would)."""
    import kiosk_protocol as protocol

    deadline = time.monotonic() + timeout
    while protocol.measure_depth(client, ["bench"]).total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench queue not drained in {timeout}s")
        time.sleep(0.05)


def _last_finished(client, keys: list[str]) -> float:
    """Unix time of the last finished_at among ``keys`` (all must be done)."""
    import datetime

    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hmget(key, "status", "finished_at")
    rows = pipe.execute()
    bad = [r[0] for r in rows if r[0] != "done"]
    if bad:
        raise RuntimeError(f"{len(bad)} bench jobs not done (statuses {sorted(set(map(str, bad)))})")
    return max(datetime.datetime.fromisoformat(r[1].rstrip("Z")).replace(tzinfo=datetime.UTC).timestamp()
               for r in rows)


def _wait_done(client, keys: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    remaining = list(keys)
    while remaining:
        pipe = client.pipeline(transaction=False)
        for key in remaining:
            pipe.hget(key, "status")
        remaining = [k for k, s in zip(remaining, pipe.execute(), strict=True) if s not in ("done", "failed")]
        if remaining and time.monotonic() > deadline:
            raise RuntimeError(f"{len(remaining)} bench jobs not finished in {timeout}s")
        time.sleep(0.05)


def run() -> list[dict]:
    rows = job_count_rows()
    n = int(os.environ.get("BENCH_MAKESPAN_N", "2000"))
    k = int(os.environ.get("BENCH_MAKESPAN_K", "8"))
    latency = float(os.environ.get("BENCH_MAKESPAN_LATENCY_MS", "300"))
    rows.append(makespan_row(n, k, latency))
    return rows


if __name__ == "__main__":
    for row in run():
        print(f"{row['name']}: baseline {row['baseline']} {row['unit']}, ours {row['ours']} {row['unit']}, "
              f"ratio {row['ratio']} ({row['note']})")
    sys.exit(0)
