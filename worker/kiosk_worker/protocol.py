"""The Redis job protocol, shared by the worker, the operator and the CLI.

Everything that names a Redis key, a hash field or a status lives here, so that
the Kiosk wire format (DESIGN.md §2) is written down exactly once.

Layout in Redis:

* ``{queue}``                      list of job keys; producers LPUSH, consumers take the right end.
* ``{queue}:{image}:{uuid4}``      job hash (fields below).
* ``processing-{queue}:{worker}``  in-flight job keys of one worker (Kiosk name).
* ``kiosk:workers:{queue}``        ZSET worker name -> last heartbeat (unix seconds).
  Lets the operator find every processing list in O(workers), never SCAN.
* ``kiosk:worker:{worker}``        hash with the worker's live facts, expires with the heartbeat.
"""

from __future__ import annotations

import datetime
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

# --- statuses -------------------------------------------------------------------------------

NEW = "new"
STARTED = "started"
PRE_PROCESSING = "pre-processing"
PREDICTING = "predicting"
POST_PROCESSING = "post-processing"
SAVING_RESULTS = "saving-results"
WAITING = "waiting"
DONE = "done"
FAILED = "failed"
FINISHED_STATUSES = frozenset({DONE, FAILED})

ZIP_SUFFIX = "-zip"
PROCESSING_PREFIX = "processing-"
WORKERS_PREFIX = "kiosk:workers:"
WORKER_INFO_PREFIX = "kiosk:worker:"

#: Fields the Kiosk frontend writes at submission; unset ones are ''.
SUBMISSION_FIELDS: tuple[str, ...] = (
    "original_name",
    "input_file_name",
    "model_name",
    "model_version",
    "postprocess_function",
    "preprocess_function",
    "cuts",
    "url",
    "label",
    "status",
    "created_at",
    "updated_at",
    "identity_upload",
    "dimension_order",
    "channels",
    "scale",
    "segmentation_type",
)


# --- names ----------------------------------------------------------------------------------


def queue_for_file(queue: str, filename: str) -> str:
    """Kiosk routes archives to a sibling queue handled by the zip consumer."""
    return queue + ZIP_SUFFIX if filename.lower().endswith(".zip") else queue


def job_key(queue: str, image_name: str, job_id: str | None = None) -> str:
    return f"{queue}:{image_name}:{job_id or uuid.uuid4()}"


def queue_of_key(key: str) -> str:
    """The queue a job key was submitted to (the part before the first ':')."""
    return key.split(":", 1)[0]


def processing_key(queue: str, worker: str) -> str:
    return f"{PROCESSING_PREFIX}{queue}:{worker}"


def workers_key(queue: str) -> str:
    return WORKERS_PREFIX + queue


def worker_info_key(worker: str) -> str:
    return WORKER_INFO_PREFIX + worker


def parse_processing_key(key: str) -> tuple[str, str] | None:
    """Split ``processing-{queue}:{worker}`` into (queue, worker); None if not one."""
    if not key.startswith(PROCESSING_PREFIX) or ":" not in key:
        return None
    queue, worker = key[len(PROCESSING_PREFIX) :].rsplit(":", 1)
    return queue, worker


def utc_now_iso() -> str:
    """Kiosk timestamps: ISO 8601 in UTC with a trailing 'Z'."""
    # '+00:00' -> 'Z' (slicing is cheaper than replace(tzinfo=None); called ~7 times a job).
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def default_worker_name() -> str:
    """Pod name in Kubernetes (HOSTNAME), as upstream; unique enough elsewhere."""
    return os.environ.get("HOSTNAME") or f"worker-{os.getpid()}"


# --- submission -----------------------------------------------------------------------------


def submission_fields(
    input_file_name: str,
    model_name: str = "",
    model_version: str = "",
    original_name: str = "",
    **extra: str,
) -> dict[str, str]:
    """A job hash exactly as the Kiosk frontend writes it."""
    now = utc_now_iso()
    fields = {name: "" for name in SUBMISSION_FIELDS}
    fields.update(
        original_name=original_name or os.path.basename(input_file_name),
        input_file_name=input_file_name,
        model_name=model_name,
        model_version=str(model_version),
        status=NEW,
        created_at=now,
        updated_at=now,
    )
    for name, value in extra.items():
        fields[name] = "" if value is None else str(value)
    return fields


def submit_job(
    client: redis.Redis,
    queue: str,
    input_file_name: str,
    model_name: str = "",
    model_version: str = "",
    **extra: str,
) -> str:
    """Write the job hash and enqueue it; returns the job key."""
    real_queue = queue_for_file(queue, input_file_name)
    fields = submission_fields(input_file_name, model_name, model_version, **extra)
    key = job_key(real_queue, os.path.basename(input_file_name))
    push_once(client, key, fields, "input_file_name", real_queue, [key])
    return key


# Write a hash and push items, once: if the marker field already holds its value, an earlier
# attempt whose reply was lost did it all (redis-py retries commands on connection errors; a
# second LPUSH would queue the same job twice). KEYS = hash, queue; ARGV = marker field,
# marker value, number of items, items..., field, value, ...
_PUSH_ONCE_SCRIPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return 0 end
local n = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 4 + n))
if n > 0 then redis.call('LPUSH', KEYS[2], unpack(ARGV, 4, 3 + n)) end
return 1
"""


def push_once(
    client: redis.Redis | redis.client.Pipeline,
    key: str,
    fields: Mapping[str, str],
    marker: str,
    queue: str,
    items: list[str],
) -> None:
    """HSET ``fields`` on ``key`` and LPUSH ``items`` onto ``queue`` atomically, at most once.

    ``fields[marker]`` must be unique to this write (a job's file name under a fresh key, a
    zip parent's list of fresh child keys). Works inside a MULTI pipeline too.
    """
    args: list[str] = [marker, fields[marker], str(len(items)), *items]
    for item in fields.items():
        args.extend(item)
    client.eval(_PUSH_ONCE_SCRIPT, 2, key, queue, *args)


# --- consumer side --------------------------------------------------------------------------

# Put a job back where it will be taken next (the right end), or at the back of
# the line (left end), but only if this worker still holds it: LREM tells us.
_REQUEUE_SCRIPT = """
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
if removed == 0 then return 0 end
if ARGV[2] == 'front' then
  redis.call('RPUSH', KEYS[2], ARGV[1])
else
  redis.call('LPUSH', KEYS[2], ARGV[1])
end
return 1
"""

# Reclaim one stranded item exactly once: finished jobs are only removed,
# others go to the front of their queue. Returns 0 (someone else took it),
# 1 (requeued) or 2 (dropped, already finished).
_RECLAIM_SCRIPT = """
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
if removed == 0 then return 0 end
local status = redis.call('HGET', ARGV[1], 'status')
if status == 'done' or status == 'failed' then return 2 end
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""

# Final fields, drop from processing, expire: atomic like MULTI/EXEC but one command and
# one reply (the hottest write of a worker). ARGV[1] = expiry seconds (0 = keep),
# ARGV[2..] = field, value, ... Returns what the processing list still holds (0 normally).
_FINISH_SCRIPT = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('LREM', KEYS[2], 1, KEYS[1])
if tonumber(ARGV[1]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return redis.call('LLEN', KEYS[2])
"""

RECLAIM_TAKEN_ELSEWHERE = 0
RECLAIM_REQUEUED = 1
RECLAIM_DROPPED = 2


@dataclass
class JobStore:
    """The consumer's view of the protocol: pop, update, finish, requeue, heartbeat."""

    client: redis.Redis
    worker: str
    expire_time: int = 3600
    #: Items left in our processing list after the last ``finish``: more than we knew we held.
    strays: int = 0

    def __post_init__(self) -> None:
        self._requeue = self.client.register_script(_REQUEUE_SCRIPT)
        self._finish = self.client.register_script(_FINISH_SCRIPT)

    # -- queue operations --

    def pop(self, queue: str, timeout: float) -> str | None:
        """Atomically move the oldest job into our processing list, blocking up to timeout.

        ``timeout`` 0 means do not block at all. Sent once, bypassing the client's retries:
        if the reply is lost (connection dropped, socket timeout) the item may have moved
        anyway, and a silent retry would move a second one and strand the first in our
        list. The error reaches the caller instead, which gives back what the list holds.
        """
        dest = processing_key(queue, self.worker)
        if timeout <= 0:
            args: tuple[Any, ...] = ("LMOVE", queue, dest, "RIGHT", "LEFT")
        else:
            args = ("BLMOVE", queue, dest, "RIGHT", "LEFT", timeout)
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_command(*args)
            reply = conn.read_response()
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        return _text(reply)

    def requeue(self, queue: str, key: str, front: bool = True) -> bool:
        """Give a held job back; front=True means it is taken next."""
        src = processing_key(queue, self.worker)
        return bool(self._requeue(keys=[src, queue], args=[key, "front" if front else "back"]))

    def release(self, queue: str, key: str) -> None:
        """Drop a job from our processing list without touching its hash."""
        self.client.lrem(processing_key(queue, self.worker), 1, key)

    def held(self, queue: str) -> list[str]:
        return [_text(k) for k in self.client.lrange(processing_key(queue, self.worker), 0, -1)]

    def holding(self, queues: Iterable[str]) -> int:
        """How many items our processing lists hold, over ``queues``."""
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(processing_key(queue, self.worker))
        return sum(pipe.execute())

    # -- job hash --

    def get(self, key: str) -> dict[str, str]:
        return {_text(k): _text(v) for k, v in self.client.hgetall(key).items()}

    def update(self, key: str, fields: Mapping[str, Any]) -> None:
        """Every consumer write stamps updated_at and updated_by, as upstream."""
        self.client.hset(key, mapping=self._stamp(fields))

    def finish(self, queue: str, key: str, fields: Mapping[str, Any], expire: bool = True) -> None:
        """Write the final fields and drop the item from processing, atomically."""
        flat: list[str] = [str(self.expire_time if expire and self.expire_time > 0 else 0)]
        for item in self._stamp(fields).items():
            flat.extend(item)
        self.strays = int(self._finish(keys=[key, processing_key(queue, self.worker)], args=flat))

    def _stamp(self, fields: Mapping[str, Any]) -> dict[str, str]:
        data = {k: "" if v is None else str(v) for k, v in fields.items()}
        data["updated_at"] = utc_now_iso()
        data["updated_by"] = self.worker
        return data

    def stamp(self, fields: Mapping[str, Any]) -> dict[str, str]:
        """Fields as every consumer write sends them, for callers batching writes in a transaction."""
        return self._stamp(fields)

    # -- registry --

    def heartbeat(self, queues: Iterable[str], ttl: float, info: Mapping[str, Any] | None = None) -> None:
        """Register as alive; the operator reads this instead of scanning the keyspace."""
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            pipe.zadd(workers_key(queue), {self.worker: now})
        info_key = worker_info_key(self.worker)
        data = {"heartbeat": f"{now:.3f}", "queues": ",".join(queues)}
        if info:
            data.update({k: "" if v is None else str(v) for k, v in info.items()})
        pipe.hset(info_key, mapping=data)
        pipe.expire(info_key, max(1, int(ttl * 3)))
        pipe.execute()

    def unregister(self, queues: Iterable[str]) -> None:
        """Leave the registry on clean exit, once nothing is held."""
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            pipe.zrem(workers_key(queue), self.worker)
        pipe.delete(worker_info_key(self.worker))
        pipe.execute()


# --- operator side --------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerState:
    name: str
    queue: str
    heartbeat: float
    in_flight: int
    info: dict[str, str]

    def alive(self, now: float, ttl: float) -> bool:
        return now - self.heartbeat <= ttl


@dataclass(frozen=True)
class QueueDepth:
    pending: int
    in_flight: int
    workers: tuple[WorkerState, ...]

    @property
    def total(self) -> int:
        return self.pending + self.in_flight


def measure_depth(client: redis.Redis, queues: Iterable[str], with_info: bool = False) -> QueueDepth:
    """Pending + in-flight for a set of queues in two round trips: O(queues + workers)."""
    queues = list(queues)
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.llen(queue)
        pipe.zrange(workers_key(queue), 0, -1, withscores=True)
    replies = pipe.execute()
    pending = sum(replies[0::2])
    registered: list[tuple[str, str, float]] = []
    for queue, members in zip(queues, replies[1::2], strict=True):
        registered.extend((queue, _text(name), float(score)) for name, score in members)
    if not registered:
        return QueueDepth(pending, 0, ())
    pipe = client.pipeline(transaction=False)
    for queue, name, _ in registered:
        pipe.llen(processing_key(queue, name))
        if with_info:
            pipe.hgetall(worker_info_key(name))
    replies = pipe.execute()
    step = 2 if with_info else 1
    workers = []
    for i, (queue, name, beat) in enumerate(registered):
        info = {_text(k): _text(v) for k, v in replies[i * step + 1].items()} if with_info else {}
        workers.append(WorkerState(name, queue, beat, int(replies[i * step]), info))
    return QueueDepth(pending, sum(w.in_flight for w in workers), tuple(workers))


def reclaim_list(client: redis.Redis, processing: str, queue: str) -> dict[str, int]:
    """Return every item of a dead worker's processing list to its queue, exactly once each."""
    script = client.register_script(_RECLAIM_SCRIPT)
    counts = {"requeued": 0, "dropped": 0, "raced": 0}
    # LMOVE ... LEFT puts the newest item at the left end. Each reclaimed item is RPUSHed
    # (taken next), so go newest first: the oldest ends up rightmost and is retried first.
    for raw in client.lrange(processing, 0, -1):
        result = int(script(keys=[processing, queue], args=[_text(raw)]))
        if result == RECLAIM_REQUEUED:
            counts["requeued"] += 1
        elif result == RECLAIM_DROPPED:
            counts["dropped"] += 1
        else:
            counts["raced"] += 1
    return counts


def forget_worker(client: redis.Redis, queue: str, worker: str) -> None:
    """Remove a dead worker from the registry once its processing list is empty."""
    pipe = client.pipeline(transaction=True)
    pipe.zrem(workers_key(queue), worker)
    pipe.delete(worker_info_key(worker))
    pipe.execute()


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
