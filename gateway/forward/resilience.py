"""Per-backend protection: circuit breaker, token-bucket rate limit, bulkhead, backoff.

These keep a struggling EHR from being hammered: the breaker stops calls after a run of
failures and lets one probe through after the reset timeout; the bucket spaces calls to
the rate the backend allows; the bulkhead caps calls in flight; retries wait an
exponentially growing, fully jittered time, and never less than the backend's
Retry-After.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import pybreaker

# BreakerOpen and RateLimited are defined in errors.py; imported here too for the old path.
from gateway.forward.errors import BreakerOpen as BreakerOpen
from gateway.forward.errors import ForwardError
from gateway.forward.errors import RateLimited as RateLimited

# Statuses worth another try of an idempotent request (RFC 9110 §15; 429: RFC 6585 §4).
RETRYABLE_STATUSES = frozenset({408, 429, 502, 503, 504})
# Statuses that count as the backend failing (the breaker's business); a 4xx is the
# caller's problem and says the backend is healthy.
FAILURE_STATUSES = frozenset({500, 502, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})

_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"
BREAKER_STATES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # as a gauge value


class _Failed(ForwardError):
    """How a failure is told to pybreaker (its own state machine counts it)."""


def _fail() -> None:
    raise _Failed


def _succeed() -> None:
    return None


class Breaker:
    """A pybreaker circuit breaker for awaited calls: `check()` before, then `success()` or
    `failure()` after. Half-open lets exactly one probe through at a time."""

    def __init__(self, name: str, failures: int, reset_timeout: float,
                 on_change: Callable[[str, str], None] | None = None) -> None:
        listeners: list[pybreaker.CircuitBreakerListener] = []
        if on_change is not None:
            listeners.append(_Listener(on_change))
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=failures, reset_timeout=reset_timeout, name=name,
            listeners=listeners, throw_new_error_on_trip=False)
        self._reset_timeout = reset_timeout
        self._probing = False

    @property
    def state(self) -> str:
        state = str(self._breaker.current_state)
        if state == OPEN and self.available_in() == 0.0:
            return HALF_OPEN  # the next call is the probe
        return state

    def available_in(self) -> float:
        """Seconds until a call may pass (0: now)."""
        if str(self._breaker.current_state) != OPEN:
            return 1.0 if self._probing else 0.0
        opened = self._breaker._state_storage.opened_at
        if opened is None:
            return 0.0
        elapsed = (datetime.now(UTC) - opened).total_seconds()
        return max(0.0, self._reset_timeout - elapsed)

    def check(self) -> None:
        """Raise BreakerOpen unless a call may go now; a passing half-open call is the probe."""
        state = str(self._breaker.current_state)
        if state == CLOSED:
            return
        if state == OPEN:
            wait = self.available_in()
            if wait > 0:
                raise BreakerOpen(wait)
            self._breaker.half_open()
        if self._probing:
            raise BreakerOpen(min(1.0, self._reset_timeout))
        self._probing = True

    def success(self) -> None:
        self._probing = False
        try:
            self._breaker.call(_succeed)
        except pybreaker.CircuitBreakerError:
            pass  # a late answer after another call opened the breaker: it stays open

    def failure(self) -> None:
        self._probing = False
        try:
            self._breaker.call(_fail)
        except (_Failed, pybreaker.CircuitBreakerError):
            pass

    def release(self) -> None:
        """The call ended without a verdict on the backend (cancelled): free the probe."""
        self._probing = False


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, on_change: Callable[[str, str], None]) -> None:
        self._on_change = on_change

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: object,
                     new_state: object) -> None:
        self._on_change(str(getattr(old_state, "name", old_state)),
                        str(getattr(new_state, "name", new_state)))


def parse_rate(text: str) -> tuple[float, float] | None:
    """"5000/hour" -> (tokens per second, burst); "" -> None (unlimited).

    The burst is a tenth of the period's allowance (at least 1), so a quiet backend can
    take a short burst but an hour's budget is never spent in a minute.
    """
    if not text:
        return None
    count_text, _, period = text.partition("/")
    count = float(count_text)
    if count <= 0 or period not in _PERIODS:
        raise ValueError(f"rate limit '{text}': expected N/second|minute|hour|day")
    rate = count / _PERIODS[period]
    return rate, max(1.0, count / 10)


class TokenBucket:
    """Tokens at `rate` per second up to `burst`; a call takes one, waiting if needed."""

    def __init__(self, rate: float, burst: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._tokens = burst
        self._stamp = clock()

    def wait_time(self) -> float:
        """Seconds until a token is free (0: now)."""
        self._refill()
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self._rate

    async def acquire(self, max_wait: float | None = None) -> float:
        """Take a token; returns the seconds waited. RateLimited past `max_wait`."""
        waited = 0.0
        while True:
            wait = self.wait_time()
            if wait == 0.0:
                self._tokens -= 1
                return waited
            if max_wait is not None and waited + wait > max_wait:
                raise RateLimited(wait)
            await asyncio.sleep(wait)
            waited += wait

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now


def backoff(attempt: int, base: float, cap: float,
            rng: Callable[[], float] = random.random) -> float:
    """Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): a uniform
    wait in [0, min(cap, base * 2**(attempt-1))] after the `attempt`-th failure."""
    return rng() * min(cap, base * 2.0 ** max(0, attempt - 1))


def retry_delay(attempt: int, base: float, cap: float, retry_after: float | None) -> float:
    """The wait before the next attempt: the jittered backoff, never under Retry-After."""
    delay = backoff(attempt, base, cap)
    return max(delay, retry_after) if retry_after is not None else delay


def parse_retry_after(value: str | None,
                      now: Callable[[], float] = time.time) -> float | None:
    """Retry-After (RFC 9110 §10.2.3) as seconds from now: delay-seconds or an HTTP-date.
    None when absent or unreadable; a date in the past is 0."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - float(now()))
