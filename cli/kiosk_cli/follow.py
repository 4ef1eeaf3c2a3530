"""Follow submitted jobs until they finish: pure progress arithmetic plus one polling loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

import kiosk_protocol as protocol
from kiosk_cli.errors import CliError
from kiosk_protocol.errors import describe

#: Fields a client needs to follow a job (the ones the Kiosk frontend polls).
PROGRESS_FIELDS = ("status", "progress", "reason", "output_url", "output_file_name", "failures", "children")
MISSING = "missing"

# How far along each single-image status is; unknown statuses count as in progress.
_STAGE = {
    protocol.NEW: 0.0,
    protocol.STARTED: 0.1,
    protocol.PRE_PROCESSING: 0.2,
    protocol.PREDICTING: 0.4,
    protocol.POST_PROCESSING: 0.7,
    protocol.SAVING_RESULTS: 0.9,
    protocol.WAITING: 0.05,
}
_UNKNOWN_STAGE = 0.5


class WaitTimeout(CliError):
    """``--timeout`` expired: its own exit code; ``unfinished`` are the keys still running."""

    def __init__(self, message: str, unfinished: Sequence[str]) -> None:
        super().__init__(message)
        self.unfinished = tuple(unfinished)


@dataclass(frozen=True)
class JobProgress:
    """How far one submitted job has got: its status, 0..1 done, and the fields read."""

    key: str
    status: str
    fraction: float
    fields: dict[str, str]

    @property
    def finished(self) -> bool:
        return self.status in protocol.FINISHED_STATUSES or self.status == MISSING


def job_fraction(fields: dict[str, str]) -> float:
    """0..1 for a job hash: zip parents report ``progress`` (0-100), single jobs a stage."""
    status = fields.get("status", "")
    if status in protocol.FINISHED_STATUSES:
        return 1.0
    progress = fields.get("progress", "")
    if progress:
        try:
            return min(1.0, max(0.0, float(progress) / 100.0))
        except ValueError:
            pass
    return _STAGE.get(status, _UNKNOWN_STAGE)


def job_progress(key: str, fields: dict[str, str]) -> JobProgress:
    """The progress of job ``key`` from its hash fields (no status: the job is missing)."""
    if not fields.get("status"):
        reason = fields.get("reason") or "job not found in Redis (expired or never submitted)"
        fields = {**fields, "reason": reason}
        return JobProgress(key, MISSING, 1.0, fields)
    return JobProgress(key, fields["status"], job_fraction(fields), fields)


def fetch_progress(client: redis.Redis, keys: Sequence[str]) -> list[JobProgress]:
    """One round trip for all jobs."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hmget(key, PROGRESS_FIELDS)
    try:
        replies = pipe.execute()
    except redis.RedisError as exc:
        raise CliError(f"lost connection to Redis while waiting: {describe(exc)}") from None
    jobs = []
    for key, values in zip(keys, replies, strict=True):
        pairs = zip(PROGRESS_FIELDS, values, strict=True)
        fields = {name: value for name, value in pairs if value is not None}
        jobs.append(job_progress(key, fields))
    return jobs


def wait_jobs(
    client: redis.Redis,
    keys: Sequence[str],
    on_update: Callable[[list[JobProgress]], None],
    interval: float = 0.2,
    timeout: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[JobProgress]:
    """Poll until every job is finished; timeout 0 waits forever, else WaitTimeout on expiry."""
    deadline = clock() + timeout if timeout > 0 else None
    while True:
        jobs = fetch_progress(client, keys)
        on_update(jobs)
        if all(job.finished for job in jobs):
            return jobs
        if deadline is not None and clock() >= deadline:
            left = [job.key for job in jobs if not job.finished]
            message = f"timed out after {timeout:g}s with {len(left)} of {len(jobs)} jobs unfinished"
            raise WaitTimeout(message, left)
        sleep(interval)
