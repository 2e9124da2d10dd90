"""Errors of the forwarding layer: one root, `ForwardError`, under every one of them.

Reasons are states and statuses (breaker open, rate limit, HTTP 503), never a value from
the data path, so the edge may show them to a caller.
"""

from __future__ import annotations


class ForwardError(Exception):
    """The root of every error `gateway.forward` raises."""


class BackendUnavailable(ForwardError):
    """The backend cannot be asked now (breaker open, bulkhead or rate limit full past the
    wait allowed, retries exhausted on 5xx/timeouts). The facade answers 503 with
    Retry-After; `reason` is safe to show (a state, never a value)."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class BackendTimeout(BackendUnavailable):
    """No answer within the read timeout (after the retries allowed): the facade
    answers 504."""


class BreakerOpen(ForwardError):
    """The breaker refuses the call; `retry_after`: seconds until it lets one through."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("circuit breaker open")
        self.retry_after = retry_after


class RateLimited(ForwardError):
    """The token bucket would make the call wait longer than allowed."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("rate limit reached")
        self.retry_after = retry_after


class TokenUnavailable(ForwardError):
    """No token could be had; `reason` is the status and OAuth error code, nothing else."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
