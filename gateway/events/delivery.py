"""One event target (a webhook, a Subscription's endpoint) as an outbox backend: each
delivery POSTed, signed, with the stable event id in a header, judged like any backend
(2xx delivered; 408, 429, 5xx and no answer retried; other 4xx dead-lettered) behind a
breaker of its own, so one receiver that is down slows only its own deliveries."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson

from gateway.events.signing import EVENT_HEADER, EVENT_ID_HEADER, SIGNATURE_HEADER, signature
from gateway.forward.backend import Delivered, Delivery, Permanent, Retry, Verdict
from gateway.forward.resilience import Breaker, BreakerOpen, parse_retry_after
from gateway.store.outbox import EVENT_KIND

_RETRIED = frozenset({408, 429})


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """Where and how one target's deliveries go."""

    name: str  # the outbox backend name: webhook:<name>, subscription:<id>
    url: str
    secret: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 10.0
    breaker_failures: int = 5
    breaker_reset: float = 30.0


def split_payload(payload: bytes) -> tuple[str, bytes]:
    """(event id, body) of a stored event delivery (gateway.store.outbox)."""
    event_id, _, body = payload.partition(b"\n")
    return event_id.decode(), body


class EventBackend:
    """Posts one target's event deliveries on a shared HTTP session."""

    kind = EVENT_KIND

    def __init__(self, spec: TargetSpec, session: aiohttp.ClientSession,
                 on_failing: Callable[[str], None] | None = None,
                 fail_limit: int = 0) -> None:
        self.name = spec.name
        self.spec = spec
        self._session = session
        self._breaker = Breaker(spec.name, spec.breaker_failures, spec.breaker_reset)
        # After `fail_limit` failed attempts in a row (none delivered between), told once:
        # a Subscription then goes to `error` (its rows stay in the outbox).
        self._on_failing = on_failing
        self._fail_limit = fail_limit
        self._failed = 0

    def available_in(self) -> float:
        return self._breaker.available_in()

    async def deliver(self, delivery: Delivery) -> Verdict:
        try:
            self._breaker.check()
        except BreakerOpen as exc:
            return Retry("circuit breaker open", after=exc.retry_after,
                         status="breaker open", fault="unsent")
        event_id, body = split_payload(delivery.payload)
        try:
            status, retry_after = await post(self._session, self.spec, body,
                                             {EVENT_ID_HEADER: event_id})
        except BaseException:
            self._breaker.release()
            raise
        verdict = self._judge(delivery, status, retry_after)
        self._count(verdict)
        return verdict

    def _count(self, verdict: Verdict) -> None:
        if isinstance(verdict, Delivered):
            self._failed = 0
            return
        self._failed += 1
        if self._on_failing is not None and self._fail_limit and \
                self._failed >= self._fail_limit:
            self._failed = 0
            reason = verdict.status or verdict.reason
            self._on_failing(f"{self._fail_limit} deliveries failed in a row: {reason}")

    def _judge(self, delivery: Delivery, status: int | None,
               retry_after: str | None) -> Verdict:
        if status is None:
            self._breaker.failure()
            return Retry(retry_after_text(retry_after), status="no answer")
        answer = f"HTTP {status}"
        if 200 <= status < 300:
            self._breaker.success()
            return Delivered(answer)
        if status in _RETRIED or status >= 500:
            # Failing again after a first failure: this event's problem, not the target's.
            suspect = delivery.attempt > 1
            if not suspect:
                self._breaker.failure()
            return Retry(answer, after=parse_retry_after(retry_after), status=answer,
                         fault="message" if suspect else "backend")
        self._breaker.success()
        return Permanent(f"refused: {answer}", status=answer)

    async def close(self) -> None:
        """The session is the pump's, closed by it."""


def open_session() -> aiohttp.ClientSession:
    """One session for every target: a bounded pool, shared fairly (a wait for a pooled
    connection is not counted against a delivery's timeout, only connecting and reading)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256,
                                                                limit_per_host=32))


async def post(session: aiohttp.ClientSession, spec: TargetSpec, body: bytes,
               extra: dict[str, str]) -> tuple[int | None, str | None]:
    """POST a signed body: (status, Retry-After) or (None, why) when there is no answer."""
    headers = {name: value for name, value in spec.headers}
    headers.update(extra)
    headers["Content-Type"] = spec.content_type
    headers[SIGNATURE_HEADER] = signature(spec.secret, body)
    try:
        async with session.post(spec.url, data=body, headers=headers, allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(
                                    total=None, sock_connect=spec.timeout,
                                    sock_read=spec.timeout)) as resp:
            await resp.read()
            return resp.status, resp.headers.get("Retry-After")
    except TimeoutError:
        return None, "timeout"
    except (aiohttp.ClientError, OSError) as exc:
        return None, f"cannot connect ({type(exc).__name__})"


def retry_after_text(value: str | None) -> str:
    return value or "no answer"


async def handshake(session: aiohttp.ClientSession, spec: TargetSpec, subscription: str,
                    attempts: int, pause: float = 0.5) -> str | None:
    """The handshake a Subscription's endpoint must accept before it is active: a signed
    POST saying which Subscription it is. None when accepted; else why (no values)."""
    body = orjson.dumps({"type": "handshake", "subscription": subscription})
    reason = "no attempt"
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(pause * 2 ** (attempt - 1))
        status, detail = await post(session, spec, body, {EVENT_HEADER: "handshake"})
        if status is not None and 200 <= status < 300:
            return None
        reason = f"HTTP {status}" if status is not None else retry_after_text(detail)
    return f"handshake failed after {attempts} attempts: {reason}"
