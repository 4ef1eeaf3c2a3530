"""Reclaim of stranded jobs: the pure decision, and the Redis side against a real redis-server."""

from __future__ import annotations

import threading

import pytest

import kiosk_protocol as protocol
from kiosk_operator import reclaim
from kiosk_protocol import JobStore, WorkerState
from kiosk_protocol.jobs import dead_letter_foreign
from kiosk_protocol.keys import DEAD_LETTER_MAX, dead_letter_key

NOW = 1_000_000.0
TTL = 10.0


def _w(name: str, age: float, queue: str = "predict", in_flight: int = 1) -> WorkerState:
    return WorkerState(name, queue, NOW - age, in_flight, {})


# --- pure -----------------------------------------------------------------------------------


def test_fresh_heartbeat_is_never_stranded_even_without_pod():
    asked: list[str] = []
    out = reclaim.stranded([_w("a", 1.0)], NOW, TTL, lambda n: asked.append(n) or False)
    assert out == []
    assert asked == [], "pod lookup is only done for expired heartbeats"


def test_expired_heartbeat_with_live_pod_is_not_stranded():
    assert reclaim.stranded([_w("a", 60.0)], NOW, TTL, lambda n: True) == []


def test_expired_heartbeat_and_no_pod_is_stranded():
    workers = [_w("a", 60.0), _w("b", 60.0), _w("c", 2.0)]
    out = reclaim.stranded(workers, NOW, TTL, lambda n: n == "b")
    assert [w.name for w in out] == ["a"]


def test_heartbeat_exactly_at_ttl_still_alive():
    assert reclaim.stranded([_w("a", TTL)], NOW, TTL, lambda n: False) == []
    assert len(reclaim.stranded([_w("a", TTL + 0.001)], NOW, TTL, lambda n: False)) == 1


def test_idle_dead_workers_are_returned_so_they_can_be_forgotten():
    assert len(reclaim.stranded([_w("a", 60.0, in_flight=0)], NOW, TTL, lambda n: False)) == 1


def test_legacy_decides_by_pod_only_and_skips_registered_and_other_queues():
    keys = [
        "processing-predict:old-pod",
        "processing-predict:live-pod",
        "processing-predict:registered",
        "processing-other:old-pod-2",
        "not-a-processing-key",
    ]
    out = reclaim.legacy_stranded(keys, ["predict"], ["registered"], lambda n: n == "live-pod")
    assert out == [("predict", "old-pod")]


@pytest.mark.parametrize(
    "pod, alive",
    [
        ({"status": {"phase": "Running"}}, True),
        ({"status": {"phase": "Pending"}}, True),
        ({"status": {"phase": "Succeeded"}}, False),
        ({"status": {"phase": "Failed"}}, False),
        ({"metadata": {"deletionTimestamp": "x"}, "status": {"phase": "Running"}}, True),
    ],
)
def test_pod_is_alive(pod, alive):
    assert reclaim.pod_is_alive(pod) is alive


# --- against redis-server -------------------------------------------------------------------


def _abandoned(client, worker: str, n: int, queue: str = "predict", beat_age: float = 60.0) -> list[str]:
    """A worker that registered, popped n jobs and died: heartbeat backdated."""
    store = JobStore(client, worker)
    store.heartbeat([queue], ttl=TTL)
    keys = [protocol.submit_job(client, queue, f"in/{worker}-{i}.png") for i in range(n)]
    popped = [store.pop(queue, 0) for _ in range(n)]
    assert popped == keys
    client.zadd(protocol.workers_key(queue), {worker: NOW - beat_age})
    return keys


def test_popped_then_killed_before_status_write_goes_back_to_front(redis_client):
    keys = _abandoned(redis_client, "dead-1", 2)
    later = protocol.submit_job(redis_client, "predict", "in/later.png")
    report = reclaim.reclaim_queues(redis_client, ["predict"], lambda n: False, TTL, now=NOW)
    assert (report.requeued, report.dropped, report.raced) == (2, 0, 0)
    assert report.workers == ["dead-1"]
    # The reclaimed items are taken next, oldest first, before the later submission.
    order = [redis_client.rpop("predict") for _ in range(3)]
    assert order == [keys[0], keys[1], later], "oldest reclaimed item must be taken first"
    assert not redis_client.exists(protocol.processing_key("predict", "dead-1"))
    assert redis_client.zscore(protocol.workers_key("predict"), "dead-1") is None
    assert redis_client.hget(keys[0], "status") == "new", "the job hash is untouched"


def test_finished_item_is_just_removed(redis_client):
    keys = _abandoned(redis_client, "dead-2", 2)
    JobStore(redis_client, "dead-2").update(keys[0], {"status": "done"})
    JobStore(redis_client, "dead-2").update(keys[1], {"status": "failed", "reason": "bad"})
    report = reclaim.reclaim_queues(redis_client, ["predict"], lambda n: False, TTL, now=NOW)
    assert (report.requeued, report.dropped) == (0, 2)
    assert redis_client.llen("predict") == 0
    assert redis_client.llen(protocol.processing_key("predict", "dead-2")) == 0


def test_live_pod_or_fresh_heartbeat_keeps_items(redis_client):
    _abandoned(redis_client, "slow-but-alive", 1)
    _abandoned(redis_client, "fresh", 1, beat_age=1.0)
    report = reclaim.reclaim_queues(redis_client, ["predict"], lambda n: n == "slow-but-alive", TTL, now=NOW)
    assert report.moved == 0 and report.workers == []
    assert redis_client.llen(protocol.processing_key("predict", "slow-but-alive")) == 1
    assert redis_client.llen(protocol.processing_key("predict", "fresh")) == 1


def test_two_reclaimers_at_once_move_each_item_exactly_once(redis_client, redis_server):
    workers = [f"dead-{i}" for i in range(8)]
    expected = set()
    for name in workers:
        expected.update(_abandoned(redis_client, name, 25))
    barrier = threading.Barrier(4)
    reports: list[reclaim.ReclaimReport] = []

    def run() -> None:
        client = redis_server.client()
        barrier.wait()
        reports.append(reclaim.reclaim_queues(client, ["predict"], lambda n: False, TTL, now=NOW))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    queue = redis_client.lrange("predict", 0, -1)
    assert len(queue) == len(expected) == 200
    assert set(queue) == expected, "no duplicates, nothing lost"
    assert sum(r.requeued for r in reports) == 200
    for name in workers:
        assert redis_client.llen(protocol.processing_key("predict", name)) == 0


def test_reclaimer_racing_a_finishing_worker(redis_client):
    """The worker's finish() removes the item first: the reclaimer then must not requeue it."""
    keys = _abandoned(redis_client, "racer", 1)
    JobStore(redis_client, "racer").finish("predict", keys[0], {"status": "done"})
    report = reclaim.reclaim_queues(redis_client, ["predict"], lambda n: False, TTL, now=NOW)
    assert report.requeued == 0
    assert redis_client.llen("predict") == 0


def test_legacy_mode_is_opt_in_and_uses_pod_existence(redis_client):
    # A Kiosk consumer that never heartbeats: RPOPLPUSH into its processing list.
    key = protocol.submit_job(redis_client, "predict", "in/legacy.png")
    redis_client.rpoplpush("predict", protocol.processing_key("predict", "consumer-abc"))
    other = protocol.submit_job(redis_client, "predict", "in/legacy2.png")
    redis_client.rpoplpush("predict", protocol.processing_key("predict", "consumer-live"))
    # Glob metacharacters in another queue's name must not widen the match.
    redis_client.rpush(protocol.processing_key("pre*", "x"), "junk")

    off = reclaim.reclaim_queues(redis_client, ["predict"], lambda n: False, TTL, now=NOW)
    assert off.moved == 0, "without legacy=True nothing unregistered is touched"

    report = reclaim.reclaim_queues(
        redis_client, ["predict"], lambda n: n == "consumer-live", TTL, now=NOW, legacy=True
    )
    assert report.requeued == 1 and report.workers == ["consumer-abc"]
    assert redis_client.lrange("predict", 0, -1) == [key]
    assert redis_client.lrange(protocol.processing_key("predict", "consumer-live"), 0, -1) == [other]
    assert redis_client.llen(protocol.processing_key("pre*", "x")) == 1


def test_scan_is_limited_to_the_pattern(redis_client):
    redis_client.rpush("processing-predict:a", "k")
    redis_client.rpush("processing-predict-zip:b", "k")
    redis_client.rpush("processing-predictx:c", "k")
    redis_client.set("processing-predict:str", "not a list")
    assert reclaim.scan_processing_lists(redis_client, ["predict"]) == ["processing-predict:a"]


def test_items_that_are_not_job_hashes_go_to_the_dead_letter_list(redis_client, caplog):
    """A non-hash key (WRONGTYPE) in a dead worker's list used to be removed by the reclaim
    script, which then failed: the item was lost and the pass aborted. Now it goes to
    ``kiosk:dead-letter:{queue}`` with one escaped log line, and the real jobs go back."""
    keys = _abandoned(redis_client, "dead-wt", 2)
    processing = protocol.processing_key("predict", "dead-wt")
    text_key = "predict:\nFAKE-LOG-LINE\x1b[2J:" + "s" * 10_000
    redis_client.set(text_key, "x")
    redis_client.sadd("predict:set.png:1", "y")
    redis_client.lpush(processing, text_key, "predict:set.png:1")
    with caplog.at_level("WARNING", logger="kiosk_operator.reclaim"):
        report = reclaim.reclaim_queues(redis_client, ["predict"], lambda n: False, TTL, now=NOW)
    assert (report.requeued, report.dropped, report.dead_lettered) == (2, 0, 2)
    assert "2 not job hashes" in report.summary()
    assert sorted(redis_client.lrange("predict", 0, -1)) == sorted(keys)
    dead = redis_client.lrange(dead_letter_key("predict"), 0, -1)
    assert sorted(dead) == sorted([text_key, "predict:set.png:1"])
    assert not redis_client.exists(processing)
    lines = [r.getMessage() for r in caplog.records if "not a job hash" in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in m and "\x1b" not in m and len(m) < 600 for m in lines)
    assert any("\\nFAKE-LOG-LINE\\x1b[2J" in m for m in lines)


def test_the_reclaim_script_never_drops_an_item_that_is_not_a_hash(redis_client):
    """Also without the dead-letter pass (another reclaimer, an older operator), the script
    moves a non-hash item to the dead-letter list instead of removing it and failing."""
    processing = protocol.processing_key("predict", "old")
    redis_client.set("predict:str.png:1", "x")
    job = protocol.submit_job(redis_client, "predict", "in/job.png")
    redis_client.rpop("predict")
    redis_client.rpush(processing, "predict:str.png:1", job)
    protocol.reclaim_list(redis_client, processing, "predict")
    assert redis_client.lrange(dead_letter_key("predict"), 0, -1) == ["predict:str.png:1"]
    assert redis_client.lrange("predict", 0, -1) == [job] and not redis_client.exists(processing)


def test_dead_letter_list_is_capped(redis_client):
    processing = protocol.processing_key("predict", "flood")
    names = [f"predict:s{i}:1" for i in range(DEAD_LETTER_MAX + 5)]
    redis_client.mset({n: "x" for n in names})
    redis_client.rpush(processing, *names)
    assert len(dead_letter_foreign(redis_client, processing, "predict")) == len(names)
    dead = redis_client.lrange(dead_letter_key("predict"), 0, -1)
    assert len(dead) == DEAD_LETTER_MAX and dead[0] == names[-1]  # the newest are kept
