"""Many pools on one Redis share one depth pipeline per tick (DepthBatch), on real redis-servers.

Round trips are counted by the server itself: INFO stats ``total_reads_processed`` grows by
one per request batch a client sends (a pipeline is one read), so a tick of N pools that
costs one round trip grows it by one, where N pools measuring alone grow it by N or more.
"""

from __future__ import annotations

import concurrent.futures
import copy
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import kiosk_protocol as protocol
from harness.redis_server import RedisServer
from kiosk_operator import cycle, depth, kube_backend
from kiosk_operator.cycle import Jobs, Scaled, Workers
from kiosk_operator.handlers import until_tick
from kiosk_operator.spec import PoolSpec, parse_spec
from kiosk_operator.status import PoolState
from kiosk_protocol import JobStore
from kiosk_protocol.registry import measure_depths

POOLS = 20


class Backend:
    """A pool's workers as a count; records the scales asked for."""

    def __init__(self) -> None:
        self.current = 0
        self.scales: list[int] = []

    def workers(self) -> Workers:
        return Workers(self.current, self.current)

    def busy(self, holding: frozenset[str]) -> frozenset[str]:
        return holding

    def scale_to(self, current: int, replicas: int, busy: frozenset[str]) -> Scaled:
        self.scales.append(replicas)
        self.current = replicas
        return Scaled()

    def jobs(self) -> Jobs:
        return Jobs(0)

    def enter_job_mode(self) -> None:
        pass

    def create_jobs(self, count: int) -> list[str]:
        return []

    def worker_alive(self, name: str) -> bool:
        return True

    def scale_model_server(self, active: bool) -> None:
        pass


class Clock:
    """A monotonic clock the test moves by hand (DepthBatch's freshness rule)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Pool:
    """One pool's cycle inputs kept across ticks, as the operator's loop keeps them."""

    def __init__(self, name: str, queues: list[str], client: redis.Redis) -> None:
        self.name, self.client = name, client
        self.spec: PoolSpec = parse_spec(
            {"queues": queues, "worker": {"image": "w", "heartbeatIntervalSeconds": 1},
             "scaling": {"maxWorkers": 10, "itemsPerWorker": 1, "cooldownSeconds": 0}}
        )
        self.state, self.backend = PoolState(), Backend()

    def run(self, batch: depth.DepthBatch | None, max_age: float = 0.5) -> cycle.CycleResult:
        pool = cycle.PoolCycle("test", self.name, self.spec, self.state, self.backend, lambda: self.client, time.time())
        if batch is not None:
            pool.measure = lambda *a, **kw: batch.measure(*a, max_age=max_age, **kw)
        return cycle.run(pool)


@pytest.fixture()
def second_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


def _reads(admin: redis.Redis) -> int:
    """Request batches the server has read so far (this INFO included)."""
    return int(admin.info("stats")["total_reads_processed"])


def _sent_since(admin: redis.Redis, before: int) -> int:
    """Request batches read since ``_reads`` returned ``before`` (less this INFO's own)."""
    return _reads(admin) - before - 1


def _operator_client(server: RedisServer) -> redis.Redis:
    client = server.client()
    client.ping()  # connect (and its handshake) before counting
    return client


def _tick(pools: list[Pool], batch: depth.DepthBatch | None, threads: int = 8) -> list[cycle.CycleResult]:
    """All pools' cycles of one tick, concurrently as the operator's thread pool runs them."""
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        return list(ex.map(lambda p: p.run(batch), pools))


def test_pools_on_one_server_cost_one_round_trip_per_tick(redis_client: redis.Redis, redis_server: RedisServer) -> None:
    client = _operator_client(redis_server)
    pools = [Pool(f"p{i}", [f"q{i}"], client) for i in range(POOLS)]
    clock = Clock()
    batch = depth.DepthBatch(clock)
    _tick(pools, batch)  # first tick: every pool is new to the server and measures alone
    for i in range(POOLS):
        if i % 4:
            redis_client.rpush(f"q{i}", *[f"item-{n}" for n in range(i % 4)])

    clock.t += 1.0
    before = _reads(redis_client)
    results = _tick(pools, batch)
    assert _sent_since(redis_client, before) == 1
    assert [r.status["pending"] for r in results] == [i % 4 for i in range(POOLS)]
    assert [p.backend.current for p in pools] == [i % 4 for i in range(POOLS)]
    assert all(r.redis_error is None for r in results)

    # The same tick without the batch: at least one round trip per pool.
    before = _reads(redis_client)
    _tick(pools, None)
    assert _sent_since(redis_client, before) >= POOLS


def test_a_round_older_than_max_age_is_not_reused(redis_client: redis.Redis, redis_server: RedisServer) -> None:
    client = _operator_client(redis_server)
    clock = Clock()
    batch = depth.DepthBatch(clock)
    pool = Pool("p", ["q"], client)
    pool.run(batch)
    redis_client.rpush("q", "a", "b")
    clock.t += 0.4
    assert pool.run(batch).status["pending"] == 0  # read from the round 0.4 s ago (max_age 0.5)
    clock.t += 0.2
    assert pool.run(batch).status["pending"] == 2


def test_shared_round_reads_what_each_pool_would_read_alone(
    redis_client: redis.Redis, redis_server: RedisServer
) -> None:
    """Shared queues, workers registered in two queues, items in flight, service-time info."""
    for i in range(3):
        protocol.submit_job(redis_client, "a", f"img{i}.tif")
        protocol.submit_job(redis_client, "b", f"img{i}.tif")
    store = JobStore(redis_client, "w-1")
    store.pop("a", 0)
    store.heartbeat(["a", "b"], ttl=10, info={"service_time_samples": 4, "service_time_ewma": "2.0"})
    JobStore(redis_client, "w-2").heartbeat(["b"], ttl=10)
    client = _operator_client(redis_server)
    batch = depth.DepthBatch(Clock())
    now = time.time()
    for queues in (["a"], ["b"], ["a", "b"], ["b", "a", "c"]):
        batch.depth(client, queues, 0.5)  # registers its queues with the server's round
    for queues in (["a"], ["b"], ["a", "b"], ["b", "a", "c"]):
        alone = depth.measure(client, queues, now, heartbeat_ttl=10)
        shared = batch.measure(client, queues, now, heartbeat_ttl=10, max_age=10)
        assert shared == alone
    assert depth.measure(client, ["a", "b"], now).pending == 5


def test_a_failing_server_only_fails_its_own_pools(
    redis_client: redis.Redis, redis_server: RedisServer, second_server: RedisServer
) -> None:
    good, bad = _operator_client(redis_server), second_server.client(socket_timeout=1, socket_connect_timeout=1)
    pools = [Pool(f"g{i}", [f"q{i}"], good) for i in range(5)] + [Pool(f"b{i}", [f"q{i}"], bad) for i in range(5)]
    clock = Clock()
    batch = depth.DepthBatch(clock)
    _tick(pools, batch)
    redis_client.rpush("q1", "x")
    second_server.stop()
    clock.t += 1.0
    results = _tick(pools, batch)
    assert [r.redis_error is None for r in results] == [True] * 5 + [False] * 5
    assert results[1].status["pending"] == 1
    for p in pools[5:]:
        assert p.state.conditions["RedisReachable"]["reason"] == "RedisUnreachable"
        assert p.state.redis_failures == 1
    for p in pools[:5]:
        assert p.state.conditions["RedisReachable"]["status"] == "True"


def test_a_broken_queue_only_fails_the_pools_that_read_it(redis_client: redis.Redis, redis_server: RedisServer) -> None:
    client = _operator_client(redis_server)
    pools = [Pool("ok", ["q-ok"], client), Pool("broken", ["q-bad"], client), Pool("both", ["q-ok", "q-bad"], client)]
    clock = Clock()
    batch = depth.DepthBatch(clock)
    _tick(pools, batch)
    redis_client.rpush("q-ok", "x")
    redis_client.set("q-bad", "not a list")
    clock.t += 1.0
    before = _reads(redis_client)
    ok, broken, both = _tick(pools, batch)
    assert _sent_since(redis_client, before) == 1
    assert (ok.redis_error, ok.status["pending"]) == (None, 1)
    assert broken.redis_error is not None and "WRONGTYPE" in broken.redis_error
    assert both.redis_error is not None and "WRONGTYPE" in both.redis_error
    with pytest.raises(redis.ResponseError):
        protocol.measure_depth(client, ["q-ok", "q-bad"])


def test_measure_depths_is_one_round_trip_without_workers(redis_client: redis.Redis, redis_server: RedisServer) -> None:
    client = _operator_client(redis_server)
    queues = [f"q{i}" for i in range(40)]  # larger pipelines go out in several writes, still one wait
    before = _reads(redis_client)
    depths = measure_depths(client, queues)
    assert _sent_since(redis_client, before) == 1
    assert set(depths) == set(queues)


@pytest.mark.parametrize(
    ("now", "interval", "due", "expected"),
    [
        (100.3, 1.0, 100.0, (0.7, 101.0)),  # the next tick after the one this cycle ran for
        (99.98, 1.0, 100.0, (1.02, 101.0)),  # woke a little early: still not twice for one tick
        (102.4, 1.0, 100.0, (0.6, 103.0)),  # a slow cycle skips the ticks it overran
        (100.05, 0.2, 100.0, (0.15, 100.2)),
    ],
)
def test_until_tick_wakes_pools_on_shared_ticks(now: float, interval: float, due: float, expected: Any) -> None:
    wait, tick = until_tick(now, interval, due)
    assert (wait, tick) == pytest.approx(expected)


def test_a_pools_spec_is_parsed_again_only_when_it_changes() -> None:
    """An idle tick compares the spec instead of parsing it; an edit (even nested) is seen."""
    raw = {"queues": ["q"], "worker": {"image": "w"}, "scaling": {"maxWorkers": 3}}
    first = kube_backend._parsed_spec("ns", "p", raw)
    assert kube_backend._parsed_spec("ns", "p", copy.deepcopy(raw)) is first
    raw["scaling"]["maxWorkers"] = 5  # in place, as a watch may update the body it hands out
    assert kube_backend._parsed_spec("ns", "p", raw).scaling.max_workers == 5
    kube_backend.forget("ns", "p")
    assert ("ns", "p") not in kube_backend._specs
