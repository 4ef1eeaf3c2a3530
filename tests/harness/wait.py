"""Polling helper: wait for a condition with a deadline (never bare sleeps in tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """Raised by wait_for when the predicate did not become truthy in time."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    message: str = "condition",
    *,
    interval: float = 0.1,
    max_interval: float = 1.0,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns a truthy value; return that value.

    Polls every ``interval`` seconds, backing off (x1.5) up to ``max_interval``.
    Exceptions listed in ``ignore`` count as "not yet" (e.g. a 404 while an
    object is being created); any other exception propagates at once.
    On timeout raises WaitTimeout (an AssertionError, so pytest reports it as a
    failure) naming ``message``, the elapsed time and the last value/exception.
    """
    start = time.monotonic()
    deadline = start + timeout
    delay = interval
    last: object = None
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as exc:  # type: ignore[misc]
            last_exc, value = exc, None
        else:
            last_exc = None
            if value:
                return value
            last = value
        now = time.monotonic()
        if now >= deadline:
            detail = f"last exception: {last_exc!r}" if last_exc is not None else f"last value: {last!r}"
            raise WaitTimeout(f"timed out after {now - start:.1f}s waiting for {message} ({detail})")
        time.sleep(min(delay, max(0.0, deadline - now)))
        delay = min(delay * 1.5, max_interval)
