"""The per-backend protections on their own: token bucket (a fake clock), full-jitter
backoff bounds, Retry-After forms, the breaker's transitions and its single probe."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from gateway.forward.resilience import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    Breaker,
    BreakerOpen,
    RateLimited,
    TokenBucket,
    backoff,
    parse_rate,
    parse_retry_after,
    retry_delay,
)
from support.wait import ManualClock

# -- rates and the token bucket -----------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("", None),
    ("10/second", (10.0, 1.0)),
    ("20/second", (20.0, 2.0)),
    ("600/minute", (10.0, 60.0)),
    ("5000/hour", (5000 / 3600, 500.0)),
    ("1/day", (1 / 86400, 1.0)),
])
def test_parse_rate(text: str, expected: tuple[float, float] | None) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["0/second", "5/fortnight", "abc/minute", "-1/hour"])
def test_parse_rate_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


async def test_bucket_allows_its_burst_then_spaces_calls_at_the_rate() -> None:
    clock = ManualClock()
    bucket = TokenBucket(rate=10.0, burst=3.0, clock=clock)
    for _ in range(3):
        assert await bucket.acquire(max_wait=0.0) == 0.0
    with pytest.raises(RateLimited) as refused:
        await bucket.acquire(max_wait=0.0)
    assert refused.value.retry_after == pytest.approx(0.1)
    clock.now += 0.05
    assert bucket.wait_time() == pytest.approx(0.05)
    clock.now += 0.06
    assert bucket.wait_time() == 0.0
    assert await bucket.acquire(max_wait=0.0) == 0.0
    assert bucket.wait_time() == pytest.approx(0.09)


async def test_bucket_refills_only_up_to_its_burst() -> None:
    clock = ManualClock()
    bucket = TokenBucket(rate=100.0, burst=2.0, clock=clock)
    clock.now += 3600
    assert await bucket.acquire(max_wait=0.0) == 0.0
    assert await bucket.acquire(max_wait=0.0) == 0.0
    with pytest.raises(RateLimited):
        await bucket.acquire(max_wait=0.0)


async def test_bucket_acquire_refuses_a_wait_longer_than_allowed() -> None:
    clock = ManualClock()
    bucket = TokenBucket(rate=1 / 60, burst=1.0, clock=clock)
    assert await bucket.acquire(max_wait=1.0) == 0.0
    with pytest.raises(RateLimited) as refused:
        await bucket.acquire(max_wait=1.0)
    assert refused.value.retry_after == pytest.approx(60.0)


async def test_bucket_acquire_waits_for_a_token() -> None:
    bucket = TokenBucket(rate=50.0, burst=1.0)
    await bucket.acquire()
    started = time.monotonic()
    waited = await bucket.acquire(max_wait=1.0)
    assert waited == pytest.approx(0.02, abs=0.005)
    assert time.monotonic() - started >= 0.015


# -- backoff and Retry-After --------------------------------------------------------------


@pytest.mark.parametrize(("attempt", "ceiling"), [(1, 0.2), (2, 0.4), (3, 0.8), (8, 25.6),
                                                  (9, 30.0), (40, 30.0)])
def test_backoff_is_full_jitter_under_an_exponential_ceiling(attempt: int,
                                                             ceiling: float) -> None:
    assert backoff(attempt, 0.2, 30.0, rng=lambda: 0.0) == 0.0
    assert backoff(attempt, 0.2, 30.0, rng=lambda: 1.0) == pytest.approx(ceiling)
    for _ in range(200):
        assert 0.0 <= backoff(attempt, 0.2, 30.0) <= ceiling


def test_retry_delay_is_never_shorter_than_retry_after() -> None:
    for _ in range(100):
        assert retry_delay(1, 0.2, 30.0, 3.0) >= 3.0
        assert retry_delay(5, 0.2, 30.0, 0.0) <= 3.2
        assert 0.0 <= retry_delay(2, 0.2, 30.0, None) <= 0.4


NOW = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("value", "expected"), [
    (None, None),
    ("", None),
    ("0", 0.0),
    ("120", 120.0),
    (" 7 ", 7.0),
    ("-1", None),
    ("1.5", None),
    ("soon", None),
    ("Fri, 01 Mar 2024 12:00:30 GMT", 30.0),
    ("Fri, 01 Mar 2024 11:59:00 GMT", 0.0),  # a date in the past: now
    ("Friday, 01-Mar-24 12:00:10 GMT", 10.0),  # RFC 850 form
])
def test_parse_retry_after_forms(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=lambda: NOW) == expected


def test_parse_retry_after_http_date_round_trip() -> None:
    moment = datetime.fromtimestamp(NOW + 42, UTC)
    assert parse_retry_after(format_datetime(moment, usegmt=True),
                             now=lambda: NOW) == pytest.approx(42.0)


# -- the breaker --------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_only() -> None:
    breaker = Breaker("ehr", failures=3, reset_timeout=30.0)
    breaker.check()
    breaker.failure()
    breaker.failure()
    breaker.success()  # resets the run
    breaker.failure()
    breaker.failure()
    assert breaker.state == CLOSED
    breaker.failure()
    assert breaker.state == OPEN
    assert 29.0 < breaker.available_in() <= 30.0
    with pytest.raises(BreakerOpen) as refused:
        breaker.check()
    assert 29.0 < refused.value.retry_after <= 30.0


async def test_breaker_lets_one_probe_through_after_the_reset_timeout() -> None:
    changes: list[tuple[str, str]] = []
    breaker = Breaker("ehr", failures=1, reset_timeout=0.05,
                      on_change=lambda old, new: changes.append((old, new)))
    breaker.failure()
    assert breaker.state == OPEN
    # The reset timeout is the behaviour under test; the breaker reads the wall clock.
    await asyncio.sleep(0.06)
    assert breaker.state == HALF_OPEN
    assert breaker.available_in() == 0.0
    breaker.check()  # the probe
    with pytest.raises(BreakerOpen):
        breaker.check()  # a second caller while the probe is out
    breaker.success()
    assert breaker.state == CLOSED
    breaker.check()
    breaker.check()
    assert changes == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


async def test_a_failed_probe_opens_the_breaker_again() -> None:
    breaker = Breaker("ehr", failures=2, reset_timeout=0.05)
    breaker.failure()
    breaker.failure()
    # The reset timeout is the behaviour under test; the breaker reads the wall clock.
    await asyncio.sleep(0.06)
    breaker.check()
    breaker.failure()
    assert breaker.state == OPEN
    assert breaker.available_in() > 0.0
    with pytest.raises(BreakerOpen):
        breaker.check()


async def test_a_cancelled_probe_frees_the_slot() -> None:
    breaker = Breaker("ehr", failures=1, reset_timeout=0.05)
    breaker.failure()
    # The reset timeout is the behaviour under test; the breaker reads the wall clock.
    await asyncio.sleep(0.06)
    breaker.check()
    breaker.release()
    breaker.check()  # another probe may go
    breaker.success()
    assert breaker.state == CLOSED
