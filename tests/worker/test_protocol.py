"""The Redis job protocol against a real redis-server: pop, finish, requeue, registry, reclaim."""

from __future__ import annotations

import threading

import pytest
import redis

import kiosk_protocol as protocol
from harness.wait import wait_for
from kiosk_protocol import JobStore


def test_submit_job_writes_the_kiosk_frontend_fields(redis_client: redis.Redis) -> None:
    key = protocol.submit_job(redis_client, "segmentation", "uploads/cells.tif", "seg", "3",
                              channels="0", dimension_order="YX")
    assert key.startswith("segmentation:cells.tif:")
    job = redis_client.hgetall(key)
    assert set(protocol.SUBMISSION_FIELDS) <= set(job)
    assert job["status"] == "new" and job["model_version"] == "3" and job["channels"] == "0"
    assert job["created_at"].endswith("Z") and job["identity_upload"] == ""
    assert redis_client.lrange("segmentation", 0, -1) == [key]


def test_zip_inputs_go_to_the_zip_queue(redis_client: redis.Redis) -> None:
    key = protocol.submit_job(redis_client, "predict", "batch.zip", "seg", "1")
    assert key.startswith("predict-zip:batch.zip:")
    assert redis_client.llen("predict-zip") == 1 and redis_client.llen("predict") == 0


def test_pop_is_fifo_into_the_processing_list(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, "w1")
    first = protocol.submit_job(redis_client, "q", "a.tif")
    second = protocol.submit_job(redis_client, "q", "b.tif")
    assert store.pop("q", 0) == first
    assert store.held("q") == [first]
    assert store.pop("q", 0.1) == second
    assert store.pop("q", 0) is None
    assert store.pop("q", 0.05) is None
    assert redis_client.llen("q") == 0
    assert set(redis_client.lrange("processing-q:w1", 0, -1)) == {first, second}


def test_blocking_pop_wakes_on_push(redis_client: redis.Redis, redis_server) -> None:
    store = JobStore(redis_server.client(), "w1")
    got: list[str | None] = []
    thread = threading.Thread(target=lambda: got.append(store.pop("q", 10)))
    thread.start()
    wait_for(lambda: redis_client.execute_command("CLIENT", "LIST").count("cmd=blmove"), 5,
             "the pop to block")
    key = protocol.submit_job(redis_client, "q", "a.tif")
    thread.join(10)
    assert got == [key]


def test_finish_stamps_writes_and_releases(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, "w1", expire_time=100)
    key = protocol.submit_job(redis_client, "q", "a.tif")
    store.pop("q", 0)
    store.update(key, {"status": "started"})
    assert redis_client.hget(key, "updated_by") == "w1"
    store.finish("q", key, {"status": "done", "output_url": "x"})
    job = redis_client.hgetall(key)
    assert job["status"] == "done" and job["output_url"] == "x" and job["updated_by"] == "w1"
    assert store.held("q") == []
    assert 0 < redis_client.ttl(key) <= 100


def test_requeue_front_and_back_only_when_held(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, "w1")
    a = protocol.submit_job(redis_client, "q", "a.tif")
    b = protocol.submit_job(redis_client, "q", "b.tif")
    c = protocol.submit_job(redis_client, "q", "c.tif")
    assert store.pop("q", 0) == a
    assert store.requeue("q", a, front=True)
    assert store.pop("q", 0) == a  # taken next
    assert store.requeue("q", a, front=False)
    assert [store.pop("q", 0) for _ in range(3)] == [b, c, a]
    assert not store.requeue("q", "q:never-held:1")
    assert redis_client.llen("q") == 0


def test_heartbeat_registers_and_unregister_removes(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, "w1")
    store.heartbeat(["q1", "q2"], ttl=2, info={"current": "k", "jobs_done": 3})
    assert redis_client.zscore("kiosk:workers:q1", "w1") is not None
    assert redis_client.zscore("kiosk:workers:q2", "w1") is not None
    info = redis_client.hgetall("kiosk:worker:w1")
    assert info["current"] == "k" and info["jobs_done"] == "3" and info["queues"] == "q1,q2"
    assert 0 < redis_client.ttl("kiosk:worker:w1") <= protocol.heartbeat_ttl(2)  # the liveness rule
    store.unregister(["q1", "q2"])
    assert redis_client.zcard("kiosk:workers:q1") == 0
    assert not redis_client.exists("kiosk:worker:w1")


def test_measure_depth_counts_pending_and_in_flight(redis_client: redis.Redis) -> None:
    for i in range(5):
        protocol.submit_job(redis_client, "q", f"{i}.tif")
    protocol.submit_job(redis_client, "other", "x.tif")
    w1, w2 = JobStore(redis_client, "w1"), JobStore(redis_client, "w2")
    for store in (w1, w2):
        store.heartbeat(["q"], ttl=2, info={"current": ""})
    w1.pop("q", 0)
    w1.pop("q", 0)
    w2.pop("q", 0)
    depth = protocol.measure_depth(redis_client, ["q"], with_info=True)
    assert (depth.pending, depth.in_flight, depth.total) == (2, 3, 5)
    assert {w.name: w.in_flight for w in depth.workers} == {"w1": 2, "w2": 1}
    assert all(w.info["queues"] == "q" for w in depth.workers)
    empty = protocol.measure_depth(redis_client, ["nothing"])
    assert (empty.total, empty.workers) == (0, ())


@pytest.mark.parametrize("round_", range(3))
def test_two_concurrent_reclaimers_requeue_each_item_exactly_once(
        redis_client: redis.Redis, redis_server, round_: int) -> None:
    dead = JobStore(redis_client, "dead-worker")
    keys = [protocol.submit_job(redis_client, "q", f"{i}.tif") for i in range(300)]
    for _ in keys:
        dead.pop("q", 0)
    finished = set(keys[::7])
    for key in finished:
        redis_client.hset(key, "status", "done" if round_ % 2 else "failed")
    processing = protocol.processing_key("q", "dead-worker")
    results: list[dict[str, int]] = []
    barrier = threading.Barrier(2)

    def reclaim() -> None:
        client = redis_server.client()
        barrier.wait()
        results.append(protocol.reclaim_list(client, processing, "q"))

    threads = [threading.Thread(target=reclaim) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    queue = redis_client.lrange("q", 0, -1)
    assert sorted(queue) == sorted(set(keys) - finished)  # no duplicates, nothing lost
    assert redis_client.llen(processing) == 0
    assert sum(r["requeued"] for r in results) == len(keys) - len(finished)
    assert sum(r["dropped"] for r in results) == len(finished)
    # Oldest first: the next pop takes the oldest unfinished item.
    assert JobStore(redis_client, "w2").pop("q", 0) == next(k for k in keys if k not in finished)


def test_forget_worker(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, "w1")
    store.heartbeat(["q"], ttl=1)
    protocol.forget_worker(redis_client, "q", "w1")
    assert redis_client.zcard("kiosk:workers:q") == 0 and not redis_client.exists("kiosk:worker:w1")


def test_names_round_trip() -> None:
    assert protocol.parse_processing_key("processing-seg-zip:pod-1") == ("seg-zip", "pod-1")
    assert protocol.parse_processing_key("seg") is None
    assert protocol.queue_of_key("segmentation:a.tif:123") == "segmentation"
    assert protocol.queue_for_file("predict", "A.ZIP") == "predict-zip"
