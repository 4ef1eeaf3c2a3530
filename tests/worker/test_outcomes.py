"""What became of a job is decided where its last status is written (Consumer.handle ->
Outcome), so the runner never works it out again; one JobWriter makes every such write."""

from __future__ import annotations

from collections.abc import Callable

import redis

import kiosk_protocol as protocol
from kiosk_protocol.settings import load_settings
from kiosk_worker.consumers.base import Consumer
from kiosk_worker.errors import JobError
from kiosk_worker.work import OutcomeKind, WorkItem


class Scripted(Consumer):
    """Does whatever ``action`` says."""

    action: Callable[[Consumer, str], str] = staticmethod(lambda consumer, key: consumer.final_status)

    def _consume(self, redis_hash: str) -> str:
        return self.action(self, redis_hash)


def make(client: redis.Redis) -> Scripted:
    store = protocol.JobStore(client, "outcome-1", expire_time=60)
    return Scripted(client, storage=None, queue="q", settings=load_settings({}), store=store)


def take(consumer: Consumer, client: redis.Redis) -> WorkItem:
    key = protocol.submit_job(client, "q", "x.tif")
    assert consumer.store.pop("q", 0) == key
    return WorkItem("q", key)


def fail(consumer: Consumer, key: str) -> str:
    raise JobError("no such model")


def lose_redis(consumer: Consumer, key: str) -> str:
    raise redis.ConnectionError("gone")


def cancelled_meanwhile(consumer: Consumer, key: str) -> str:
    consumer.cancel()  # what the runner does when the grace period is over
    consumer.set_status(key, protocol.PREDICTING)
    return consumer.final_status


def test_each_ending_is_reported_as_what_was_written(redis_client: redis.Redis) -> None:
    consumer = make(redis_client)

    item = take(consumer, redis_client)
    done = consumer.handle(item)
    assert (done.kind, done.status, done.error) == (OutcomeKind.DONE, "done", None)
    assert done.finished and done.seconds > 0
    assert redis_client.hget(item.key, "total_time")

    item = take(consumer, redis_client)
    consumer.action = fail
    failed = consumer.handle(item)
    assert (failed.kind, failed.status) == (OutcomeKind.FAILED, "failed") and failed.finished
    assert isinstance(failed.error, JobError)
    assert redis_client.hget(item.key, "reason") == "no such model"

    item = take(consumer, redis_client)
    consumer.action = lambda consumer, key: protocol.WAITING
    requeued = consumer.handle(item)
    assert (requeued.kind, requeued.status, requeued.finished) == (OutcomeKind.REQUEUED, "waiting", False)
    assert redis_client.lrange("q", 0, -1) == [item.key] and consumer.store.held("q") == []

    assert consumer.store.pop("q", 0) == item.key
    redis_client.hset(item.key, "status", "done")
    skipped = consumer.handle(item)
    assert (skipped.kind, skipped.status) == (OutcomeKind.SKIPPED, None)
    assert consumer.store.held("q") == []
    assert consumer.consume(take(consumer, redis_client).key, "q") == "waiting"  # the status, as upstream


def test_what_breaks_out_of_the_consumer_is_reported_not_raised(redis_client: redis.Redis) -> None:
    consumer = make(redis_client)
    item = take(consumer, redis_client)
    consumer.action = lose_redis
    crashed = consumer.handle(item)
    assert crashed.kind is OutcomeKind.CRASHED and isinstance(crashed.error, redis.ConnectionError)
    assert consumer.store.held("q") == [item.key]  # the runner gives it back once Redis answers

    consumer.action = cancelled_meanwhile
    outcome = consumer.handle(item)
    assert (outcome.kind, outcome.status) == (OutcomeKind.CANCELLED, None)
    assert redis_client.hget(item.key, "status") == protocol.STARTED  # nothing written after cancel

    consumer.action = lambda consumer, key: consumer.final_status
    assert consumer.handle(item).kind is OutcomeKind.DONE  # the next job may write again


def test_give_back_cancels_the_writes_and_returns_the_item_to_the_front(redis_client: redis.Redis) -> None:
    consumer = make(redis_client)
    item = take(consumer, redis_client)
    redis_client.lpush("q", "other")
    assert consumer.give_back(item) is True and consumer.cancelled
    assert redis_client.lrange("q", 0, -1) == ["other", item.key]  # the right end is taken next
    assert redis_client.hget(item.key, "status") == protocol.NEW
    assert consumer.give_back(item) is False  # no longer held
