"""Job errors: what a user reads in a failed job's ``reason``.

Raise a JobError (or a subclass) from a consumer when the *input* or the
request is at fault; its message must be one line a user understands. The
base consumer turns any exception into such a line (``reason_for``) and keeps
the traceback in the log only.
"""

from __future__ import annotations

from kiosk_protocol.errors import REASON_LIMIT, one_line

__all__ = [
    "REASON_LIMIT",
    "BadImage",
    "Cancelled",
    "ImageTooLarge",
    "InputMissing",
    "JobError",
    "ModelMismatch",
    "UnsupportedFormat",
    "one_line",
    "reason_for",
]

#: Modules whose exceptions already carry a one-line message meant for users.
_OWN_MODULES = ("kiosk_worker.", "kiosk_storage.", "kiosk_protocol.")


class JobError(Exception):
    """A job cannot be done as asked; ``str(err)`` is the user-facing reason."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class InputMissing(JobError):
    """The input file does not exist in the bucket."""


class UnsupportedFormat(JobError):
    """The input is not a TIFF, PNG, JPEG or NPY image (or a zip for zip jobs)."""


class BadImage(JobError):
    """The file is empty, corrupt or has a shape the consumer cannot use."""


class ImageTooLarge(JobError):
    """Height or width over MAX_IMAGE_HEIGHT / MAX_IMAGE_WIDTH."""


class ModelMismatch(JobError):
    """The image does not fit the model's signature (rank, channels)."""


class Cancelled(BaseException):
    """The worker gave the job back (grace period over); write nothing more.

    A BaseException so that ``except Exception`` in consumer code does not
    swallow it and mark the job failed.
    """


def reason_for(err: BaseException) -> str:
    """One line for the job's ``reason``: our messages verbatim, others named by type."""
    if isinstance(err, JobError):
        return str(err)
    # TF Serving client and storage errors carry one-line messages of their own.
    module = type(err).__module__
    if module.startswith(_OWN_MODULES):
        return one_line(err) or type(err).__name__
    if isinstance(err, FileNotFoundError):
        return one_line(f"input file not found: {err.filename or err}")
    if isinstance(err, MemoryError):
        return "out of memory while processing the image"
    kind = type(err).__name__
    return one_line(f"internal error ({kind}): {err}" if str(err).strip() else f"internal error ({kind})")
