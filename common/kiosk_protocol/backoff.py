"""Bounded retries with capped exponential backoff and full jitter.

One helper for every dependency the worker calls (storage, Redis, ...), so that
"retry" always means the same thing: a fixed number of attempts, delays that
grow exponentially up to a cap, and full jitter (a uniform draw between zero
and the capped delay) so that many workers hit by the same outage do not retry
in lockstep. The upstream Kiosk retried some calls forever; we never do.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

RetryOn = tuple[type[BaseException], ...] | Callable[[BaseException], bool]

# 2**64 already dwarfs any sane cap; keeps the float math finite for huge retry counts.
_MAX_EXPONENT = 64


def capped_delay(retry: int, base_delay: float, max_delay: float) -> float:
    """The ceiling for retry number ``retry`` (0-based): base * 2**retry, at most max_delay."""
    if retry < 0:
        raise ValueError("retry must be zero or more")
    base = max(0.0, float(base_delay))
    cap = max(0.0, float(max_delay))
    return min(cap, base * 2.0 ** min(retry, _MAX_EXPONENT))


def jittered_delay(retry: int, base_delay: float, max_delay: float,
                   rng: random.Random | None = None) -> float:
    """The sleep before retry number ``retry`` (0-based): uniform in [0, capped_delay] (full jitter).

    The one backoff formula of the project: storage, Redis reconnects and the
    TF Serving client all wait this long.
    """
    return (rng or random).uniform(0.0, capped_delay(retry, base_delay, max_delay))


def backoff_delays(
    base_delay: float,
    max_delay: float,
    retries: int | None = None,
    *,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Yield the sleep before each retry: uniform in [0, capped_delay(n)] (full jitter).

    Yields ``retries`` values, or forever when ``retries`` is None. Pass a seeded
    ``rng`` for reproducible sequences.
    """
    n = 0
    while retries is None or n < retries:
        yield jittered_delay(n, base_delay, max_delay, rng)
        n += 1


def _predicate(retry_on: RetryOn) -> Callable[[BaseException], bool]:
    if isinstance(retry_on, tuple):
        kinds = retry_on
        return lambda exc: isinstance(exc, kinds)
    return retry_on


def retry_call(
    fn: Callable[[], T],
    *,
    attempts: int,
    base_delay: float,
    max_delay: float,
    retry_on: RetryOn,
    sleep: Callable[[float], object] = time.sleep,
    on_retry: Callable[[int, BaseException, float], object] | None = None,
    rng: random.Random | None = None,
) -> T:
    """Call ``fn()`` up to ``attempts`` times; return its first result.

    An exception for which ``retry_on`` holds (a tuple of exception types, or a
    predicate) is retried after a jittered, capped backoff, as long as attempts
    remain; any other exception propagates at once, unchanged. When attempts
    are exhausted the last exception propagates unchanged, so the caller
    decides how to word it. ``on_retry(attempt, exc, delay)`` is called before
    each sleep (``attempt`` is the 1-based number of the attempt that failed).
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    should_retry = _predicate(retry_on)
    delays = backoff_delays(base_delay, max_delay, attempts - 1, rng=rng)
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except BaseException as exc:
            # KeyboardInterrupt, SystemExit and friends always stop at once.
            if attempt >= attempts or not isinstance(exc, Exception) or not should_retry(exc):
                raise
            delay = next(delays)
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            sleep(delay)
