"""A job as the runner hands it to a consumer, and what became of it.

The consumer decides the outcome where it writes the job's last status, so the runner
(stats, metrics, heartbeat) reads it from here instead of working it out again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Outcome", "OutcomeKind", "WorkItem"]


@dataclass(frozen=True)
class WorkItem:
    """A job key held in our processing list of ``queue``."""

    queue: str
    key: str


class OutcomeKind(enum.Enum):
    """How a job left the consumer; the values are the ``outcome`` label of the job metrics."""

    DONE = "done"
    FAILED = "failed"
    #: Put back to be consumed again later (e.g. a zip parent waiting for its children).
    REQUEUED = "requeued"
    #: Hash gone or already finished: only dropped from processing.
    SKIPPED = "skipped"
    #: The runner gave the job back (grace period over) and cancelled its writes.
    CANCELLED = "given_back"
    #: The consumer raised past its own error handling (e.g. Redis unreachable).
    CRASHED = "crashed"


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    #: The status written to the job hash, None when none was.
    status: str | None = None
    #: What failed the job (FAILED) or broke out of the consumer (CRASHED).
    error: BaseException | None = None
    #: Seconds from pickup to the last write.
    seconds: float = 0.0

    @property
    def finished(self) -> bool:
        """The job got its final status (done or failed)."""
        return self.kind in (OutcomeKind.DONE, OutcomeKind.FAILED)
