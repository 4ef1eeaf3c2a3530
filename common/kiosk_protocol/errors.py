"""One-line errors: what a user reads in a job's reason, a status condition or a CLI message."""

from __future__ import annotations

REASON_LIMIT = 300


class ConfigError(ValueError):
    """A setting (an environment variable) has a value that cannot be used; one line naming it."""


def one_line(text: object, limit: int = REASON_LIMIT) -> str:
    """Collapse whitespace to a single line and cap its length."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe(exc: BaseException, limit: int = REASON_LIMIT) -> str:
    """An exception as one line: its message, or its type when the message is empty."""
    return one_line(exc, limit) or type(exc).__name__
