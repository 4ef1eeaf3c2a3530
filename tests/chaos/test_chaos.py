"""Chaos in local mode: 1,000 jobs while workers are SIGKILLed, the operator and Redis restart,
the model server answers UNAVAILABLE for a while, and pop replies are lost on the way back
(the workers reach Redis through a fault proxy). Nothing may be lost.

Faults are driven by progress (every ~80 finished jobs a worker is killed; the operator,
Redis and model-server faults at fixed fractions), not by wall-clock sleeps.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

import kiosk_protocol as protocol
from harness.local_pool import (
    QUEUE,
    LocalOperator,
    processing_lists,
    statuses,
    submit_many,
    tiny_input,
    write_pool,
)
from harness.redis_fault_proxy import RedisFaultProxy
from harness.redis_server import RedisServer
from harness.wait import WaitTimeout, wait_for
from kiosk_model_server import ModelServer
from kiosk_operator.process_backend import pid_running

GOOD, BAD = 1000, 20
KILL_EVERY = 80
#: Retries outlast the model-server outage; short Redis timeouts ride through its restart.
WORKER_ENV = {"GRPC_BACKOFF": "0.1", "MAX_RETRY": "15", "GRPC_TIMEOUT": "10", "REDIS_TIMEOUT": "2"}


def chaos_report(client: redis.Redis, keys: list[str], state: Path, op: LocalOperator | None,
                 figures: dict[str, float], events: list) -> str:
    """What a stuck chaos run looks like: statuses, queues, workers and the tails of their logs."""
    now = statuses(client, keys)
    counts = Counter(now)
    lines = [f"statuses: {dict(counts)}", f"figures: {figures}",
             f"events not yet fired: {[fn.__name__ for _, fn in events]}",
             f"queue length: {client.llen(QUEUE)}", f"processing lists: {processing_lists(client)}",
             f"registered workers: {client.zrange(protocol.workers_key(QUEUE), 0, -1, withscores=True)}"]
    stuck = [k for k, s in zip(keys, now, strict=True) if s not in protocol.FINISHED_STATUSES][:3]
    for key in stuck:
        lines.append(f"unfinished {key}: {client.hgetall(key)}")
    if op is not None:
        lines.append(f"operator exited: {op.exited()}; log tail:\n{op.output()[-3000:]}")
    for pidfile in (state / "workers").glob("*.pid"):
        lines.append(f"worker pid file {pidfile.name}: {pidfile.read_text()}")
    for logfile in sorted((state / "logs").glob("*.log"), key=lambda f: f.stat().st_mtime)[-4:]:
        lines.append(f"--- {logfile.name} (tail)\n{logfile.read_text(errors='replace')[-1500:]}")
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_chaos_no_job_lost(tmp_path: Path):
    rng = random.Random(4)
    server = RedisServer(appendonly=True).start()
    proxy = RedisFaultProxy(server.port).start()
    model = ModelServer(models=["null"], latency_ms=15).start()
    bucket = tmp_path / "bucket"
    state = tmp_path / "state"
    figures: dict[str, float] = {"worker kills": 0}
    op: LocalOperator | None = None
    try:
        client = server.client(socket_timeout=5)
        pool = write_pool(
            tmp_path / "pool.yaml", "chaos", proxy.port, model.port, bucket,
            worker={"env": [{"name": k, "value": v} for k, v in WORKER_ENV.items()]},
            maxWorkers=4, itemsPerWorker=50, cooldownSeconds=1, pollingIntervalSeconds=0.2,
        )
        good = submit_many(client, tiny_input(bucket), GOOD)
        bad = submit_many(client, tiny_input(bucket, "broken.tif", bad=True), BAD)
        keys = good + bad
        started = time.monotonic()
        op = LocalOperator(pool, state).start()

        def kill_worker() -> None:
            pids = []
            for f in (state / "workers").glob("*.pid"):
                try:
                    pids.append(int(f.read_text()))
                except (OSError, ValueError):
                    continue
            pids = [p for p in pids if pid_running(p)]
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    figures["worker kills"] += 1
                except ProcessLookupError:
                    pass

        def restart_operator() -> None:
            nonlocal op
            assert op is not None
            op.kill()
            op = LocalOperator(pool, state).start()
            figures["operator restarts"] = 1

        def restart_redis() -> None:
            t0 = time.monotonic()
            server.restart()
            figures["redis restart s"] = round(time.monotonic() - t0, 2)

        def model_outage() -> None:
            model.fail_next(24, "UNAVAILABLE")
            figures["outage started"] = time.monotonic()

        events = [(0.25, restart_operator), (0.45, restart_redis), (0.65, model_outage)]
        next_kill = KILL_EVERY
        total = len(keys)

        def step() -> bool:
            nonlocal next_kill
            finished = sum(s in protocol.FINISHED_STATUSES for s in statuses(client, keys))
            if finished >= next_kill and finished < total - 40:
                kill_worker()
                # And one pop whose reply is lost: dropped, or later than the socket timeout.
                proxy.arm("BLMOVE", "cut" if next_kill % (2 * KILL_EVERY) else "delay", delay=3.5)
                next_kill += KILL_EVERY
            while events and finished >= events[0][0] * total:
                events.pop(0)[1]()
            if "outage started" in figures and "outage s" not in figures and model._fail_count == 0:
                figures["outage s"] = round(time.monotonic() - figures.pop("outage started"), 2)
            return finished == total and not events

        try:
            wait_for(step, 240, "every job finished under chaos", interval=0.2, max_interval=0.3,
                     ignore=(redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError))
        except WaitTimeout as err:
            pytest.fail(f"{err}\n{chaos_report(client, keys, state, op, figures, events)}")
        figures["makespan s"] = round(time.monotonic() - started, 1)

        wait_for(lambda: not any(processing_lists(client).values()), 30, "no processing list holds anything",
                 ignore=(redis.ConnectionError,))
        final = statuses(client, keys)
        assert final[:GOOD].count("done") == GOOD, {s: final[:GOOD].count(s) for s in set(final[:GOOD])}
        for key in bad:
            job = client.hgetall(key)
            assert job["status"] == "failed" and job["reason"] and "\n" not in job["reason"]
        outputs = len(list(bucket.glob("*.zip")))
        figures["processed twice"] = outputs - GOOD
        figures["lost pop replies"] = proxy.faults
        figures["predict calls"] = model.calls.get("Predict", 0)
        print("\nchaos figures:", figures)
        assert outputs >= GOOD
        assert figures["processed twice"] <= figures["worker kills"]
        assert figures["worker kills"] >= 5 and figures.get("operator restarts") == 1
        assert proxy.faults >= 5
        assert "redis restart s" in figures and "outage s" in figures
        # And the pool scales back to zero afterwards.
        wait_for(lambda: not list((state / "workers").glob("*.pid")), 60, "pool back to zero workers")
    finally:
        if op is not None and op.proc is not None and op.proc.poll() is None:
            op.stop(60)
        model.stop()
        proxy.stop()
        server.cleanup()
