"""Progress statuses are posted without waiting for Redis's reply (kiosk_worker.jobwrites.StatusPosts):
they must still land in order, before the final status, and survive a dropped connection."""

from __future__ import annotations

import pytest
import redis

import kiosk_protocol as protocol
from harness.wait import wait_for
from kiosk_protocol.settings import load_settings
from kiosk_worker.consumers.base import Consumer


class Steps(Consumer):
    """Posts three progress statuses, then finishes."""

    def _consume(self, redis_hash: str) -> str:
        for status in ("pre-processing", "predicting", "saving-results"):
            self.set_status(redis_hash, status)
        return self.final_status


def make(client: redis.Redis) -> Consumer:
    store = protocol.JobStore(client, "posts-1", expire_time=60)
    return Steps(client, storage=None, queue="q", settings=load_settings({}), store=store)


def test_posted_statuses_land_before_the_final_one(redis_client: redis.Redis) -> None:
    consumer = make(redis_client)
    key = protocol.submit_job(redis_client, "q", "x.tif")
    assert consumer.store.pop("q", 0) == key
    assert consumer.consume(key, "q") == "done"
    job = redis_client.hgetall(key)
    assert job["status"] == "done" and job["updated_by"] == "posts-1"
    assert consumer.store.held("q") == []


def test_a_dropped_connection_replays_pending_posts(redis_client: redis.Redis) -> None:
    consumer = make(redis_client)
    key = protocol.submit_job(redis_client, "q", "x.tif")
    consumer.set_status(key, "predicting")
    consumer.writer.posts.drain()
    host, port = consumer.writer.posts._conn._sock.getsockname()[:2]
    assert redis_client.client_kill(f"{host}:{port}")
    consumer.set_status(key, "post-processing")  # sent into a closed connection, or refused
    consumer.writer.posts.drain()                # either way: replayed through the client
    assert redis_client.hget(key, "status") == "post-processing"
    consumer.set_status(key, "saving-results")   # a fresh connection is used afterwards
    consumer.writer.posts.drain()
    wait_for(lambda: redis_client.hget(key, "status") == "saving-results", 5, "status after reconnect")


def test_an_error_reply_is_raised_and_the_stream_stays_in_step(redis_client: redis.Redis) -> None:
    consumer = make(redis_client)
    redis_client.rpush("not-a-hash", "x")
    key = protocol.submit_job(redis_client, "q", "x.tif")
    consumer.set_status("not-a-hash", "predicting")
    consumer.set_status(key, "predicting")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        consumer.writer.posts.drain()
    assert redis_client.hget(key, "status") == "predicting"  # the write after the bad one landed
    consumer.set_status(key, "saving-results")
    consumer.writer.posts.drain()
    assert redis_client.hget(key, "status") == "saving-results"
