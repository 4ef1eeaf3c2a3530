"""The shared scaling cycle (observe -> decide -> act -> report) on an in-memory backend and a real Redis."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import kiosk_protocol as protocol
from harness.ports import free_port
from kiosk_operator import cycle, reclaim
from kiosk_operator.cycle import Jobs, Scaled, WorkerBackend, Workers
from kiosk_operator.spec import PoolSpec, parse_spec
from kiosk_operator.status import PoolState
from kiosk_protocol import JobStore

QUEUE = "segmentation"


class FakeBackend:
    """Workers as a list of names; records what the cycle asked for."""

    def __init__(self, workers: int = 0) -> None:
        self.names: list[str] = []
        self.serial = 0
        self.scale_calls: list[tuple[int, int, frozenset[str]]] = []
        self.active_jobs = 0
        self.created_jobs: list[str] = []
        self.create_calls: list[int] = []
        self.entered_job_mode = 0
        self.model_server: list[bool] = []
        self.start(workers)

    def start(self, count: int) -> list[str]:
        names = [f"w{self.serial + i}" for i in range(count)]
        self.serial += count
        self.names.extend(names)
        return names

    def workers(self) -> Workers:
        return Workers(len(self.names), len(self.names))

    def busy(self, holding: frozenset[str]) -> frozenset[str]:
        return holding & frozenset(self.names)

    def scale_to(self, current: int, replicas: int, busy: frozenset[str]) -> Scaled:
        self.scale_calls.append((current, replicas, busy))
        if replicas > len(self.names):
            return Scaled(started=self.start(replicas - len(self.names)))
        victims = sorted(self.names, key=lambda n: n in busy)[: len(self.names) - replicas]
        self.names = [n for n in self.names if n not in victims]
        return Scaled(stopped=victims)

    def jobs(self) -> Jobs:
        return Jobs(self.active_jobs)

    def enter_job_mode(self) -> None:
        self.entered_job_mode += 1

    def create_jobs(self, count: int) -> list[str]:
        self.create_calls.append(count)
        names = [f"job-{len(self.created_jobs) + i}" for i in range(count)]
        self.created_jobs.extend(names)
        self.active_jobs += count
        return names

    def worker_alive(self, name: str) -> bool:
        return name in self.names

    def scale_model_server(self, active: bool) -> None:
        self.model_server.append(active)


def _spec(**scaling: Any) -> PoolSpec:
    return parse_spec({"queues": [QUEUE], "worker": {"image": "w", "heartbeatIntervalSeconds": 1}, "scaling": scaling})


def _run(spec: PoolSpec, backend: WorkerBackend, state: PoolState, client: Any, now: float) -> cycle.CycleResult:
    connect = client if callable(client) else (lambda: client)
    return cycle.run(cycle.PoolCycle("test", "pool", spec, state, backend, connect, now))


def _push(client: redis.Redis, n: int) -> None:
    if n:
        client.rpush(QUEUE, *[f"job-{i}" for i in range(n)])


def _take(client: redis.Redis, worker: str, beat_at: float | None = None) -> None:
    """``worker`` holds one item and heartbeats (``beat_at`` backdates the heartbeat)."""
    store = JobStore(client, worker)
    assert store.pop(QUEUE, 0)
    store.heartbeat([QUEUE], ttl=1)
    if beat_at is not None:
        client.zadd(protocol.workers_key(QUEUE), {worker: beat_at})


def _reasons(result: cycle.CycleResult) -> list[str]:
    return [e.reason for e in result.events]


def test_scales_up_from_zero_when_items_appear(redis_client):
    spec, backend, state = _spec(maxWorkers=10, itemsPerWorker=5), FakeBackend(), PoolState()
    idle = _run(spec, backend, state, redis_client, time.time())
    assert backend.names == [] and backend.scale_calls == [] and idle.status["desired"] == 0
    _push(redis_client, 12)
    result = _run(spec, backend, state, redis_client, time.time())
    assert len(backend.names) == 3, "ceil(12 / 5)"
    assert result.status["pending"] == 12 and result.status["desired"] == 3
    assert _reasons(result) == ["ScaledUp"] and len(result.scaled.started) == 3
    assert backend.model_server[-1] is True
    assert state.conditions["ScalingActive"]["reason"] == "Scaling"


def test_scale_down_never_below_busy_workers_and_idle_go_first(redis_client):
    # cooldownSeconds 0: no scale-down window, so this is about the busy floor alone
    spec, backend, state = _spec(maxWorkers=10, itemsPerWorker=10, cooldownSeconds=0), FakeBackend(4), PoolState()
    _push(redis_client, 2)
    _take(redis_client, "w1")
    _take(redis_client, "w3")
    # Two items in flight need ceil(2 / 10) = 1 worker, but both holders stay.
    result = _run(spec, backend, state, redis_client, time.time())
    assert result.plan.replicas == 2
    assert sorted(backend.names) == ["w1", "w3"]
    assert sorted(result.scaled.stopped) == ["w0", "w2"]
    assert backend.scale_calls == [(4, 2, frozenset({"w1", "w3"}))]
    assert _reasons(result) == ["ScaledDown"]


def test_busy_workers_that_are_not_ours_do_not_hold_the_floor(redis_client):
    """The floor counts the backend's busy workers (here: none of the 3), not every busy heartbeat."""
    spec, backend, state = _spec(maxWorkers=10, itemsPerWorker=10, cooldownSeconds=0), FakeBackend(3), PoolState()
    _push(redis_client, 2)
    _take(redis_client, "elsewhere-1")
    _take(redis_client, "elsewhere-2")
    result = _run(spec, backend, state, redis_client, time.time())
    assert result.plan.replicas == 1 and len(backend.names) == 1


def test_a_dip_in_the_stream_deletes_no_worker_until_the_window_ends(redis_client):
    """Items remain but fewer workers would do: the cycle holds the count for cooldownSeconds
    (remembered in the pool state between cycles), then scales down once."""
    spec, backend, state = _spec(maxWorkers=10, itemsPerWorker=10, cooldownSeconds=20), FakeBackend(4), PoolState()
    _push(redis_client, 5)  # needs 1 worker, none busy
    t0 = time.time()
    for offset in (0, 10, 19.5):
        held = _run(spec, backend, state, redis_client, t0 + offset)
        assert len(backend.names) == 4 and held.events == [], f"scaled down at +{offset}s"
    done = _run(spec, backend, state, redis_client, t0 + 20)
    assert len(backend.names) == 1 and _reasons(done) == ["ScaledDown"]


def test_scale_to_min_only_after_the_cooldown(redis_client):
    spec, backend, state = _spec(minWorkers=1, maxWorkers=5, cooldownSeconds=30), FakeBackend(3), PoolState()
    t0 = time.time()
    for offset in (0, 10, 29):
        held = _run(spec, backend, state, redis_client, t0 + offset)
        assert len(backend.names) == 3 and held.events == [], f"still cooling down at +{offset}s"
        assert state.conditions["ScalingActive"]["reason"] == "Stable"
    done = _run(spec, backend, state, redis_client, t0 + 31)
    assert len(backend.names) == 1 and _reasons(done) == ["ScaledDown"]
    # Work again resets the clock: scale up at once.
    _push(redis_client, 4)
    assert len(_run(spec, backend, state, redis_client, t0 + 32).scaled.started) == 3


def test_job_mode_creates_ceil_pending_over_batch_then_nothing_while_covered(redis_client):
    spec, backend, state = _spec(mode="Job", batchSize=25, maxWorkers=10), FakeBackend(), PoolState()
    _push(redis_client, 130)
    first = _run(spec, backend, state, redis_client, time.time())
    assert len(backend.created_jobs) == 6, "ceil(130 / 25)"
    assert first.status["activeJobs"] == 6 and _reasons(first) == ["JobsCreated"]
    assert backend.entered_job_mode == 1 and backend.names == []
    again = _run(spec, backend, state, redis_client, time.time())
    assert len(backend.created_jobs) == 6 and again.events == [], "6 active Jobs cover 130 items"
    assert backend.entered_job_mode == 1, "entering Job mode happens once"
    _push(redis_client, 1000)
    _run(spec, backend, state, redis_client, time.time())
    assert len(backend.created_jobs) == 10, "capped at maxWorkers"
    assert backend.create_calls == [6, 0, 4], "asked every cycle (Kubernetes prunes finished Jobs then)"
    assert backend.model_server == [True, True, True]


def test_reclaim_runs_before_the_decision_and_is_counted(redis_client):
    spec, backend, state = _spec(maxWorkers=10, itemsPerWorker=1), FakeBackend(1), PoolState()
    t0 = time.time()
    _push(redis_client, 4)
    for _ in range(3):
        JobStore(redis_client, "gone").pop(QUEUE, 0)
    JobStore(redis_client, "gone").heartbeat([QUEUE], ttl=1)
    redis_client.zadd(protocol.workers_key(QUEUE), {"gone": t0 - 3600})
    _take(redis_client, "w0", beat_at=t0 - 3600)  # late heartbeat, but its worker runs: kept
    result = _run(spec, backend, state, redis_client, t0)
    assert result.observation.reclaimed.requeued == 3
    # Measured again after reclaiming: the 3 items count as pending, not as in flight.
    assert (result.status["pending"], result.status["inFlight"]) == (3, 1)
    assert result.status["reclaimed"] == state.reclaimed == 3
    assert _reasons(result) == ["Reclaimed", "ScaledUp"]
    assert len(backend.names) == 4
    assert JobStore(redis_client, "w0").held(QUEUE) != []
    # Not due again until RECLAIM_EVERY has passed.
    JobStore(redis_client, "gone").pop(QUEUE, 0)
    redis_client.zadd(protocol.workers_key(QUEUE), {"gone": t0 - 3600})
    assert _run(spec, backend, state, redis_client, t0 + 1).observation.reclaimed is None
    later = _run(spec, backend, state, redis_client, t0 + reclaim.RECLAIM_EVERY)
    assert later.observation.reclaimed.requeued == 1 and later.status["reclaimed"] == 4


def test_redis_down_keeps_workers_and_reports_unreachable(redis_client):
    spec, backend, state = _spec(maxWorkers=5, pollingIntervalSeconds=1), FakeBackend(3), PoolState()
    down = redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    first = _run(spec, backend, state, down, time.time())
    assert first.redis_error and first.observation is None
    assert _reasons(first) == ["RedisUnreachable"] and first.interval == 2
    cond = state.conditions["RedisReachable"]
    assert (cond["status"], cond["reason"]) == ("False", "RedisUnreachable")
    assert state.conditions["ScalingActive"]["status"] == "False"
    second = _run(spec, backend, state, down, time.time())
    assert second.events == [] and second.interval == 4, "one Event per outage, backing off"
    assert len(backend.names) == 3 and backend.scale_calls == []
    back = _run(spec, backend, state, redis_client, time.time())
    assert "RedisReachable" in _reasons(back) and state.conditions["RedisReachable"]["status"] == "True"
    assert back.interval == 1


def test_missing_secret_is_reported_as_such(redis_client):
    spec, backend, state = _spec(), FakeBackend(1), PoolState()

    def connect() -> redis.Redis:
        raise LookupError("Secret ns/redis not found")

    result = _run(spec, backend, state, connect, time.time())
    assert _reasons(result) == ["SecretMissing"]
    assert result.redis_error == "Secret ns/redis not found"
    assert backend.names == ["w0"]


@pytest.mark.parametrize("held", [0, 1])
def test_model_server_follows_the_pool(redis_client, held):
    spec, backend, state = _spec(maxWorkers=2, cooldownSeconds=0), FakeBackend(), PoolState()
    _push(redis_client, held)
    _run(spec, backend, state, redis_client, time.time())
    assert backend.model_server == [bool(held)]


def test_paused_condition_while_max_workers_is_zero_and_gone_after(redis_client):
    state, backend = PoolState(), FakeBackend()
    _push(redis_client, 5)
    paused = _run(_spec(maxWorkers=0), backend, state, redis_client, 1000.0)
    cond = state.conditions["Paused"]
    assert (cond["status"], cond["reason"]) == ("True", "MaxWorkersZero")
    assert cond["lastTransitionTime"] == "1970-01-01T00:16:40Z" and "maxWorkers is 0" in cond["message"]
    assert paused.status["maxWorkers"] == 0 and paused.status["desired"] == 0 and not backend.names
    # Redis down while paused: still Paused (it depends on the spec only).
    down = PoolState(conditions=dict(state.conditions))
    _run(_spec(maxWorkers=0), backend, down, lambda: (_ for _ in ()).throw(redis.ConnectionError("x")), 1001.0)
    assert down.conditions["Paused"]["status"] == "True"
    resumed = _run(_spec(maxWorkers=3), backend, state, redis_client, 1002.0)
    assert "Paused" not in state.conditions
    assert resumed.status["maxWorkers"] == 3 and len(backend.names) > 0


def test_conditions_have_the_metav1_condition_shape(redis_client):
    state = PoolState(generation=4)
    _run(_spec(maxWorkers=0), FakeBackend(), state, redis_client, 1000.0)
    assert set(state.conditions) == {"Paused", "RedisReachable", "ScalingActive"}
    for ctype, cond in state.conditions.items():
        assert set(cond) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
        assert cond["type"] == ctype and cond["observedGeneration"] == 4 and cond["reason"] and cond["message"]
    # A new generation with the same status keeps lastTransitionTime but moves observedGeneration.
    state.generation = 5
    _run(_spec(maxWorkers=0), FakeBackend(), state, redis_client, 2000.0)
    assert state.conditions["Paused"]["observedGeneration"] == 5
    assert state.conditions["Paused"]["lastTransitionTime"] == "1970-01-01T00:16:40Z"
