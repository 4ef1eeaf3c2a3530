"""A pop whose reply never arrives must not strand the item it moved.

BLMOVE runs on the server and moves an item into the worker's processing list; if the
connection then drops (Redis restart, network blip) or the reply comes after the socket
timeout, the worker never learns the key. A silent client-side retry would pop a second
item and leave the first in the processing list of a live worker, where no reclaim
touches it: a job lost while everything looks healthy. The chaos test hit this once
after a Redis restart on a loaded machine.
"""

from __future__ import annotations

import uuid

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from workerkit import save_tiff, spawn_worker, submit, worker_env

import kiosk_protocol as protocol
from harness.procs import stop_process
from harness.redis_fault_proxy import RedisFaultProxy
from harness.wait import wait_for
from kiosk_model_server.synthetic import make_cells


@pytest.fixture()
def proxy(redis_server):
    proxy = RedisFaultProxy(redis_server.port).start()
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("mode", ["cut", "delay"])
def test_a_lost_pop_reply_strands_nothing(redis_client, redis_server, model_server, bucket, proxy, mode):
    queue = f"lost-{mode}-{uuid.uuid4().hex[:6]}"
    image, _ = make_cells((32, 32), 2, seed=3)
    name = save_tiff(bucket, "cells.tif", image)
    keys = [submit(redis_client, name, queue=queue, model="null") for _ in range(3)]
    proxy.arm("BLMOVE", mode, delay=2.0)
    env = worker_env(redis_server, model_server, bucket, QUEUE=queue, WORKER_NAME=f"lost-{mode}",
                     REDIS_PORT=proxy.port, REDIS_TIMEOUT=0.5, EMPTY_QUEUE_TIMEOUT=0.3)
    proc = spawn_worker(env)

    def all_done() -> bool:
        return all(redis_client.hget(k, "status") == "done" for k in keys)

    processing = protocol.processing_key(queue, f"lost-{mode}")
    try:
        wait_for(all_done, 30, f"every job done after a lost BLMOVE reply ({mode})", max_interval=0.3)
    except AssertionError as err:
        held = redis_client.lrange(processing, 0, -1)
        raise AssertionError(f"{err}; statuses {[redis_client.hget(k, 'status') for k in keys]}, "
                             f"still in the live worker's processing list: {held}") from None
    assert proxy.faults == 1
    wait_for(lambda: redis_client.llen(processing) == 0, 10, "the worker's processing list empty")
    assert redis_client.llen(queue) == 0
    assert stop_process(proc, 20) == 0


def test_an_item_that_appears_in_an_idle_workers_list_is_given_back(redis_client, redis_server, model_server,
                                                                     bucket):
    """The safety net: a BLMOVE the server ran after the client gave up lands an item in the
    list of a worker that is alive and idle; the worker notices on its next empty poll."""
    queue = f"stray-{uuid.uuid4().hex[:6]}"
    image, _ = make_cells((32, 32), 2, seed=3)
    key = submit(redis_client, save_tiff(bucket, "cells.tif", image), queue=queue, model="null")
    redis_client.lrem(queue, 1, key)
    env = worker_env(redis_server, model_server, bucket, QUEUE=queue, WORKER_NAME="stray-holder",
                     EMPTY_QUEUE_TIMEOUT=0.3)
    proc = spawn_worker(env)
    wait_for(lambda: redis_client.zscore(protocol.workers_key(queue), "stray-holder"), 20, "worker registered")
    redis_client.lpush(protocol.processing_key(queue, "stray-holder"), key)
    wait_for(lambda: redis_client.hget(key, "status") == "done", 20, "the stray item done")
    assert redis_client.llen(protocol.processing_key(queue, "stray-holder")) == 0
    proc.terminate()
    _, err = proc.communicate(timeout=20)
    assert "no pop returned; giving them back" in err


def test_finish_reports_items_held_beyond_the_finished_one(redis_client):
    queue = f"strays-{uuid.uuid4().hex[:6]}"
    store = protocol.JobStore(redis_client, "counting-worker")
    first = protocol.submit_job(redis_client, queue, "a.tif", "null", "1")
    protocol.submit_job(redis_client, queue, "b.tif", "null", "1")
    assert store.pop(queue, 0) == first
    store.finish(queue, first, {"status": "done"})
    assert store.strays == 0
    store.pop(queue, 0)
    redis_client.lpush(protocol.processing_key(queue, "counting-worker"), "someone-elses-lost-item")
    held = store.held(queue)
    store.finish(queue, held[-1], {"status": "done"})
    assert store.strays == 1 and store.holding([queue]) == 1


def test_a_submission_retried_after_a_lost_reply_enqueues_once(redis_client, proxy):
    """redis-py retries a command whose reply was lost; a second LPUSH of the same job
    would have two workers run it at once. The submission is written once, whatever the retries."""
    queue = f"submit-{uuid.uuid4().hex[:6]}"
    client = redis.Redis(port=proxy.port, decode_responses=True,
                         retry=Retry(NoBackoff(), 3), retry_on_error=[redis.ConnectionError])
    proxy.arm("lost-submit.tif", "cut")
    key = protocol.submit_job(client, queue, "lost-submit.tif", "null", "1")
    assert proxy.faults == 1
    assert redis_client.lrange(queue, 0, -1) == [key]
    assert redis_client.hget(key, "status") == "new"


def test_a_zip_fan_out_retried_after_a_lost_reply_queues_each_child_once(redis_client, proxy):
    queue = f"children-{uuid.uuid4().hex[:6]}"
    client = redis.Redis(port=proxy.port, decode_responses=True,
                         retry=Retry(NoBackoff(), 3), retry_on_error=[redis.ConnectionError])
    children = [f"{queue}:a.tif:{uuid.uuid4().hex}", f"{queue}:b.tif:{uuid.uuid4().hex}"]
    proxy.arm(children[0], "cut")
    pipe = client.pipeline(transaction=True)
    for key in children:
        pipe.hset(key, mapping={"status": "new"})
    protocol.push_once(pipe, f"{queue}-zip:parent.zip:x", {"children": ",".join(children)}, "children",
                       queue, children)
    pipe.execute()
    assert proxy.faults == 1
    assert sorted(redis_client.lrange(queue, 0, -1)) == sorted(children)
