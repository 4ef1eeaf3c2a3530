"""retry.py: delay caps, jitter bounds, attempt counts, non-retryable errors pass through."""

from __future__ import annotations

import random

import pytest

from kiosk_protocol.backoff import backoff_delays, capped_delay, jittered_delay, retry_call


class Flaky:
    """Fails with the given exceptions in order, then returns 'ok'."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_capped_delay_grows_exponentially_then_caps() -> None:
    assert [capped_delay(n, 0.5, 5.0) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert capped_delay(10_000, 1.0, 30.0) == 30.0  # no overflow for huge retry numbers
    assert capped_delay(3, 0.0, 30.0) == 0.0
    with pytest.raises(ValueError):
        capped_delay(-1, 1.0, 2.0)


def test_backoff_delays_full_jitter_within_bounds() -> None:
    rng = random.Random(7)
    rounds = [list(backoff_delays(0.1, 1.0, 8, rng=rng)) for _ in range(300)]
    for delays in rounds:
        assert len(delays) == 8
        for n, delay in enumerate(delays):
            assert 0.0 <= delay <= capped_delay(n, 0.1, 1.0)
    # Full jitter really spreads: at the cap the draws cover most of [0, cap].
    last = [delays[-1] for delays in rounds]
    assert min(last) < 0.2 and max(last) > 0.8
    assert len(set(last)) > 250


def test_jittered_delay_is_the_formula_backoff_delays_yields() -> None:
    expected = [jittered_delay(n, 0.3, 2.0, random.Random(n)) for n in range(6)]
    for n, delay in enumerate(expected):
        assert 0.0 <= delay <= capped_delay(n, 0.3, 2.0)
    rng = random.Random(11)
    twin = random.Random(11)
    assert list(backoff_delays(0.3, 2.0, 6, rng=rng)) == [jittered_delay(n, 0.3, 2.0, twin) for n in range(6)]


def test_backoff_delays_reproducible_with_seed_and_unbounded_without_count() -> None:
    a = list(backoff_delays(0.2, 2.0, 5, rng=random.Random(1)))
    b = list(backoff_delays(0.2, 2.0, 5, rng=random.Random(1)))
    assert a == b
    endless = backoff_delays(0.2, 2.0)
    assert len([next(endless) for _ in range(100)]) == 100


def test_retry_call_retries_then_succeeds_with_bounded_sleeps() -> None:
    slept: list[float] = []
    seen: list[tuple[int, str, float]] = []
    fn = Flaky(ConnectionError("a"), ConnectionError("b"))
    result = retry_call(
        fn, attempts=5, base_delay=0.5, max_delay=0.75, retry_on=(ConnectionError,),
        sleep=slept.append, on_retry=lambda n, exc, d: seen.append((n, str(exc), d)),
    )
    assert result == "ok"
    assert fn.calls == 3
    assert len(slept) == 2
    assert 0.0 <= slept[0] <= 0.5 and 0.0 <= slept[1] <= 0.75
    assert [(n, msg) for n, msg, _ in seen] == [(1, "a"), (2, "b")]
    assert [d for _, _, d in seen] == slept


def test_retry_call_exhausts_attempts_and_reraises_last_error() -> None:
    slept: list[float] = []
    fn = Flaky(*(TimeoutError(f"t{i}") for i in range(10)))
    with pytest.raises(TimeoutError, match="t3"):
        retry_call(fn, attempts=4, base_delay=0.01, max_delay=0.02, retry_on=(TimeoutError,),
                   sleep=slept.append)
    assert fn.calls == 4
    assert len(slept) == 3


def test_retry_call_single_attempt_never_sleeps() -> None:
    slept: list[float] = []
    fn = Flaky(ConnectionError("down"))
    with pytest.raises(ConnectionError):
        retry_call(fn, attempts=1, base_delay=1, max_delay=1, retry_on=(ConnectionError,),
                   sleep=slept.append)
    assert fn.calls == 1 and slept == []
    with pytest.raises(ValueError):
        retry_call(fn, attempts=0, base_delay=1, max_delay=1, retry_on=(ConnectionError,))


def test_non_retryable_error_passes_through_at_once() -> None:
    slept: list[float] = []
    err = PermissionError("403 forbidden")
    fn = Flaky(err)
    with pytest.raises(PermissionError) as info:
        retry_call(fn, attempts=5, base_delay=0.1, max_delay=1, retry_on=(ConnectionError,),
                   sleep=slept.append)
    assert info.value is err
    assert fn.calls == 1 and slept == []


def test_predicate_decides_what_is_retried() -> None:
    class HttpError(Exception):
        def __init__(self, status: int) -> None:
            super().__init__(f"HTTP {status}")
            self.status = status

    slept: list[float] = []
    fn = Flaky(HttpError(503), HttpError(500), HttpError(404))
    with pytest.raises(HttpError, match="404"):
        retry_call(fn, attempts=10, base_delay=0.01, max_delay=0.01,
                   retry_on=lambda exc: isinstance(exc, HttpError) and exc.status >= 500,
                   sleep=slept.append)
    assert fn.calls == 3 and len(slept) == 2


def test_keyboard_interrupt_is_never_retried() -> None:
    fn = Flaky(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        retry_call(fn, attempts=5, base_delay=0, max_delay=0, retry_on=lambda exc: True,
                   sleep=lambda d: None)
    assert fn.calls == 1
