"""A job's life in Redis: submission (producers) and the consumer's pop/update/finish/requeue.

Every write a consumer makes to a job goes through JobStore, so updated_at/updated_by are
stamped in one place and the in-flight item moves with the status that ends it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from kiosk_protocol import registry, scripts
from kiosk_protocol.errors import printable
from kiosk_protocol.fields import (
    DONE,
    FAILED,
    MAX_ATTEMPTS,
    MAX_FIELD_BYTES,
    NEW,
    STARTED,
    SUBMISSION_FIELDS,
    UPDATED_AT,
    UPDATED_BY,
    ZIP_PARENT_FIELDS,
)
from kiosk_protocol.keys import dead_letter_key, job_key, processing_key, queue_for_file, text, utc_now_iso


class NotAJobHash(redis.ResponseError):
    """A queue item names a key that is not a hash (a string, a list...): Redis would answer
    WRONGTYPE to every job command. It belongs in the queue's dead-letter list."""

    def __init__(self, key: str, kind: str) -> None:
        super().__init__(f"WRONGTYPE item '{printable(key)}' is a {kind}, not a job hash")
        self.key = key
        self.kind = kind


class FieldTooLarge(ValueError):
    """A job field is longer than MAX_FIELD_BYTES; the message is the job's one-line reason."""

    def __init__(self, field: str, size: int, limit: int) -> None:
        super().__init__(f"job field '{printable(field, 64)}' is {size} bytes, "
                         f"more than MAX_FIELD_BYTES ({limit})")
        self.field = field
        self.size = size
        self.limit = limit


class TooManyAttempts(RuntimeError):
    """The job was taken MAX_ATTEMPTS times already and its workers died each time (a poison
    pill); the message is the job's one-line reason."""

    def __init__(self, attempts: int) -> None:
        super().__init__(f"worker died {attempts} times on this job")
        self.attempts = attempts


def is_wrong_type(err: BaseException) -> bool:
    """Redis refused a command because the key holds another type (WRONGTYPE)."""
    return isinstance(err, redis.ResponseError) and str(err).startswith("WRONGTYPE")


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
    client.eval(scripts.PUSH_ONCE, 2, key, queue, *args)



@dataclass
class JobStore:
    """The consumer's view of the protocol: pop, update, finish, requeue, heartbeat."""

    client: redis.Redis
    worker: str
    expire_time: int = 3600
    #: Items left in our processing list after the last ``finish``: more than we knew we held.
    strays: int = 0
    #: A job with a longer field (except the zip parent's lists of children) fails at ``start``.
    max_field_bytes: int = MAX_FIELD_BYTES
    #: Takes of a job before ``start`` raises TooManyAttempts (0 = no limit): MAX_ATTEMPTS.
    max_attempts: int = MAX_ATTEMPTS

    def __post_init__(self) -> None:
        self._requeue = self.client.register_script(scripts.REQUEUE)
        self._finish = self.client.register_script(scripts.FINISH)
        self._start = self.client.register_script(scripts.START)
        self._dead_letter = self.client.register_script(scripts.DEAD_LETTER)
        self._forgive = self.client.register_script(scripts.FORGIVE_ATTEMPT)

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
        return text(reply)

    def requeue(self, queue: str, key: str, front: bool = True) -> bool:
        """Give a held job back; front=True means it is taken next."""
        src = processing_key(queue, self.worker)
        return bool(self._requeue(keys=[src, queue], args=[key, "front" if front else "back"]))

    def release(self, queue: str, key: str) -> None:
        """Drop a job from our processing list without touching its hash."""
        self.client.lrem(processing_key(queue, self.worker), 1, key)

    def dead_letter(self, queue: str, key: str) -> bool:
        """Move a held item that is not a job hash to ``kiosk:dead-letter:{queue}``; False if
        we no longer held it."""
        dest = dead_letter_key(queue)
        return bool(self._dead_letter(keys=[processing_key(queue, self.worker), dest], args=[key]))

    def held(self, queue: str) -> list[str]:
        return [text(k) for k in self.client.lrange(processing_key(queue, self.worker), 0, -1)]

    def holding(self, queues: Iterable[str]) -> int:
        """How many items our processing lists hold, over ``queues``."""
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(processing_key(queue, self.worker))
        return sum(pipe.execute())

    # -- job hash --

    def get(self, key: str) -> dict[str, str]:
        return {text(k): text(v) for k, v in self.client.hgetall(key).items()}

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
        data[UPDATED_AT] = utc_now_iso()
        data[UPDATED_BY] = self.worker
        return data

    def stamp(self, fields: Mapping[str, Any]) -> dict[str, str]:
        """Fields as every consumer write sends them, for callers batching writes in a transaction."""
        return self._stamp(fields)

    def start(self, key: str, announce: bool = True) -> tuple[dict[str, str] | None, str | None]:
        """Mark a held job started (+identity_started unless ``announce`` is False) in one round
        trip. Returns (its fields, the status it had), or (None, why) when it is to be skipped:
        the hash is gone or already finished. Raises NotAJobHash when the key is not a hash
        and FieldTooLarge when a field is longer than ``max_field_bytes``; neither writes."""
        args = [self.worker, STARTED, DONE, FAILED, utc_now_iso(), "1" if announce else "0"]
        args += [str(self.max_field_bytes), *sorted(ZIP_PARENT_FIELDS)] if self.max_field_bytes > 0 else ["0"]
        args.append(str(self.max_attempts or 0))
        reply = self._start(keys=[key], args=args)
        code = int(reply[0])
        if code == 2:
            flat = [text(v) for v in reply[1]]
            return dict(zip(flat[0::2], flat[1::2], strict=True)), text(reply[2])
        if code == 3:
            raise NotAJobHash(key, text(reply[1]))
        if code == 4:
            raise FieldTooLarge(text(reply[1]), int(reply[2]), self.max_field_bytes)
        if code == 5:
            raise TooManyAttempts(int(reply[1]))
        return None, "no such job hash" if code == 0 else f"already {text(reply[1])}"

    def forgive_attempt(self, key: str) -> int:
        """A take that ended without the worker dying does not count against MAX_ATTEMPTS."""
        return int(self._forgive(keys=[key]))

    # -- registry --

    def heartbeat(self, queues: Iterable[str], ttl: float, info: Mapping[str, Any] | None = None) -> None:
        """Register as alive for ``queues``; ``ttl`` is the heartbeat interval (seconds)."""
        registry.beat(self.client, self.worker, list(queues), ttl, info)

    def unregister(self, queues: Iterable[str]) -> None:
        """Leave the registry on clean exit, once nothing is held."""
        registry.unregister(self.client, self.worker, queues)


def dead_letter_foreign(client: redis.Redis, processing: str, queue: str) -> list[tuple[str, str]]:
    """Move the items of a processing list that are not job hashes to the dead-letter list of
    ``queue``, each exactly once (racing reclaimers and workers included); returns the
    (item, type) pairs this call moved. For reclaim, before its items go back to ``queue``."""
    items = [text(k) for k in client.lrange(processing, 0, -1)]
    if not items:
        return []
    pipe = client.pipeline(transaction=False)
    for item in items:
        pipe.type(item)
    kinds = [text(k) for k in pipe.execute()]
    script = client.register_script(scripts.DEAD_LETTER)
    moved = []
    for item, kind in zip(items, kinds, strict=True):
        if kind not in ("hash", "none") and int(script(keys=[processing, dead_letter_key(queue)], args=[item])):
            moved.append((item, kind))
    return moved
