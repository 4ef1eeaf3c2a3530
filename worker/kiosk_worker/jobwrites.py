"""The one writer of a held job's statuses: start, progress, finish, put back, give back.

Every status a worker writes to a job goes through a JobWriter (and from there through
``kiosk_protocol.JobStore``), so the order of a job's statuses, the stamping and the cancel
guard are decided in one place. After ``cancel`` (the runner gave the job back) every write
of the job thread raises Cancelled: a late consumer must not overwrite the next owner's
statuses.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import redis

import kiosk_protocol as protocol
from kiosk_protocol.errors import printable
from kiosk_protocol.fields import FINISHED_AT, REASON, STATUS, TOTAL_TIME
from kiosk_protocol.jobs import FieldTooLarge, NotAJobHash, TooManyAttempts
from kiosk_protocol.keys import DEAD_LETTER_PREFIX
from kiosk_worker.errors import Cancelled, JobError
from kiosk_worker.work import WorkItem

__all__ = ["JobWriter", "StatusPosts"]

class JobWriter:
    """Writes of the job a consumer holds; used by its job thread, except ``give_back``."""

    def __init__(self, store: protocol.JobStore, client: redis.Redis) -> None:
        self.store = store
        self.posts = StatusPosts(client)
        self._cancelled = threading.Event()
        #: The key ``start`` found not to be a hash: ``skip`` dead-letters it instead of dropping it.
        self._not_a_job: str | None = None

    # -- the cancel guard ------------------------------------------------------------------

    def begin(self) -> None:
        """A new job: the last one's pending posts land, and writes are allowed again."""
        self.posts.drain()
        self._cancelled.clear()

    def cancel(self) -> None:
        """Thread-safe: refuse every further write of the current job."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _guard(self, key: str) -> None:
        if self._cancelled.is_set():
            raise Cancelled(key)

    # -- a visit ---------------------------------------------------------------------------

    def start(self, key: str, announce: bool) -> tuple[dict[str, str] | None, str | None]:
        """Mark the job started (+identity_started if ``announce``): (its fields, the status it
        had), or (None, why) when it is to be skipped; an item that is not a job hash is skipped
        too, and ``skip`` moves it to the dead-letter list. A field longer than MAX_FIELD_BYTES
        raises JobError (the job fails with that reason, nothing else was done), and so does a
        job taken MAX_ATTEMPTS times already: "worker died N times on this job"."""
        self._guard(key)
        self._not_a_job = None
        try:
            return self.store.start(key, announce)
        except NotAJobHash as err:
            self._not_a_job = key
            return None, (f"not a job hash but a {printable(err.kind, 20)}; moved to the dead-letter "
                          f"list of its queue ({DEAD_LETTER_PREFIX}{{queue}})")
        except (FieldTooLarge, TooManyAttempts) as err:
            raise JobError(str(err)) from None

    def update(self, key: str, data: Mapping[str, Any]) -> None:
        """HSET stamped fields, after every pending post."""
        self._guard(key)
        self.posts.drain()
        self.store.update(key, data)

    def post(self, key: str, status: str, **fields: Any) -> None:
        """A progress status, sent without waiting for the reply (read before our next write)."""
        self._guard(key)
        self.posts.post(key, self.store.stamp({STATUS: status, **fields}))

    def finish(self, item: WorkItem, status: str, fields: Mapping[str, Any], seconds: float) -> None:
        """The final status with ``fields`` (+finished_at, total_time unless set), and the item
        leaves the processing list, atomically; every progress status lands first."""
        data = {k: _fmt(v) for k, v in fields.items()}
        data[STATUS] = status
        data.setdefault(FINISHED_AT, protocol.utc_now_iso())
        data.setdefault(TOTAL_TIME, f"{seconds:.6f}")
        self._guard(item.key)
        self.posts.drain()
        self.store.finish(item.queue, item.key, data)

    def fail(self, item: WorkItem, status: str, reason: str, seconds: float) -> None:
        """End the job ``status`` (the failed one) with a one-line ``reason``."""
        self.finish(item, status, {REASON: reason}, seconds)

    def put_back(self, item: WorkItem, status: str, announced: bool = True) -> None:
        """Keep the job alive: write ``status`` and move it to the back of its queue (the
        take does not count against MAX_ATTEMPTS when it was counted: ``announced``)."""
        self.update(item.key, {STATUS: status})
        if announced:
            self.store.forgive_attempt(item.key)
        self.store.requeue(item.queue, item.key, front=False)

    def skip(self, item: WorkItem) -> None:
        """Drop a vanished or finished job from processing without touching its hash; an item
        that is not a job hash goes to ``kiosk:dead-letter:{queue}`` instead."""
        if self._not_a_job == item.key:  # the base consumer logged why, in one line
            self._not_a_job = None
            self.store.dead_letter(item.queue, item.key)
            return
        self.store.release(item.queue, item.key)

    # -- the runner's side -----------------------------------------------------------------

    def give_back(self, item: WorkItem, reset: bool) -> bool:
        """Grace period over (runner's thread): cancel the job's writes and return the item to
        the front of its queue, ``status=new`` again if ``reset``. False if it was no longer
        held. Raises redis.RedisError if Redis cannot be reached."""
        self.cancel()
        returned = self.store.requeue(item.queue, item.key, front=True)
        if returned and reset:
            try:  # a graceful give-back: the take does not count against MAX_ATTEMPTS
                self.store.forgive_attempt(item.key)
                self.store.update(item.key, {STATUS: protocol.NEW})
            except redis.RedisError:
                pass
        return returned


class StatusPosts:
    """HSETs sent on one dedicated connection whose replies are read later, in order.

    A progress status is a notification: nothing waits for its reply, so ``post`` only
    sends it and ``drain`` reads the replies before the consumer's next write to Redis
    (which is then ordered after them). On a connection error, or READONLY from a
    demoted master, the pending writes are replayed through the normal client, which
    reconnects and retries; they are idempotent HSETs.
    Used by the job thread only.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._conn: Any = None
        self._pending: list[tuple[str, dict[str, str]]] = []

    def post(self, key: str, data: dict[str, str]) -> None:
        args: list[str] = ["HSET", key]
        for item in data.items():
            args.extend(item)
        try:
            if self._conn is None:
                self._conn = self.client.connection_pool.get_connection()
            self._conn.send_command(*args, check_health=not self._pending)
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self._replay([*self._pending, (key, data)])
            return
        self._pending.append((key, data))

    def drain(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        error: redis.ResponseError | None = None
        try:
            for _ in pending:
                try:
                    self._conn.read_response()
                except redis.ResponseError as err:  # keep reading: the stream stays in step
                    error = error or err
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self._replay(pending)
            return
        if isinstance(error, redis.ReadOnlyError):  # a demoted master (Sentinel failover)
            self._replay(pending)
        elif error is not None:
            raise error

    def _replay(self, writes: list[tuple[str, dict[str, str]]]) -> None:
        self._pending = []
        if self._conn is not None:
            self._conn.disconnect()
            self.client.connection_pool.release(self._conn)
            self._conn = None
        for key, data in writes:
            self.client.hset(key, mapping=data)


def _fmt(value: Any) -> str:
    """Timing fields are seconds as strings, as the Kiosk writes them."""
    if isinstance(value, float):
        return f"{value:.6f}"
    return "" if value is None else str(value)
