"""One HTTP attempt at a backend, as every call makes it: the bulkhead, the outbound
credentials, the request in its own client span (trace context propagated), the answer or
the failure classified, the breaker told how it went, the metrics recorded.

What to do next (return, retry, refresh the token) is the caller's `Judge`; spans,
metrics and failures carry a path template, a status or a state, never an id or a value.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import aiohttp
import pybreaker
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.forward.backend import FhirResponse, Verdict
from gateway.forward.metrics import ForwardMetrics
from gateway.forward.outbound_auth import OutboundAuth, TokenUnavailable
from gateway.forward.resilience import FAILURE_STATUSES, Breaker, TokenBucket
from gateway.telemetry import AttributeValue, set_attributes

_PROPAGATOR = TraceContextTextMapPropagator()
# The body is decoded by the client, so these no longer describe it; the rest pass on.
_NOT_PASSED = frozenset({"content-encoding", "content-length", "transfer-encoding",
                         "connection", "keep-alive"})


@dataclass(frozen=True, slots=True)
class Failure:
    """An attempt that got no HTTP answer. `sent`: the request may have reached the
    server (so only an idempotent one may go again)."""

    reason: str
    sent: bool
    timeout: bool = False
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class Sent:
    """What one attempt got: an answer or a failure, and the credentials it carried."""

    response: FhirResponse | None = None
    failure: Failure | None = None
    authorization: str | None = None  # the Authorization value the attempt carried


Action = Literal["return", "retry", "refresh"]


@dataclass(frozen=True, slots=True)
class Step:
    """What the caller does after an attempt, and what the attempt's span says about it."""

    label: str  # forward.verdict
    action: Action = "return"
    retry_after: float | None = None
    delay: float = 0.0
    verdict: Verdict | None = None  # deliver's answer


Judge = Callable[[Sent], Step]


class HttpAttempts:
    """One backend's HTTP attempts, on its session, behind its bulkhead and breaker."""

    def __init__(self, session: aiohttp.ClientSession, tracer: trace.Tracer,
                 auth: OutboundAuth, breaker: Breaker, bucket: TokenBucket | None,
                 metrics: ForwardMetrics, span_base: Mapping[str, AttributeValue],
                 metric_base: Mapping[str, AttributeValue], *, max_concurrency: int,
                 connect_timeout: float, read_timeout: float) -> None:
        self._session = session
        self._tracer = tracer
        self._auth = auth
        self._breaker = breaker
        self._bucket = bucket
        self._bulkhead = asyncio.Semaphore(max_concurrency)
        self._metrics = metrics
        self._span_base = dict(span_base)
        self._metric_base = dict(metric_base)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout

    async def take_token(self, max_wait: float | None) -> None:
        """Wait for the rate limit (at most `max_wait` seconds; None: as long as it takes);
        RateLimited if that is not enough."""
        if self._bucket is None:
            return
        waited = await self._bucket.acquire(max_wait)
        if waited > 0:
            self._metrics.rate_limit_waits.add(1, self._metric_base)

    async def attempt(self, method: str, url: str, template: str,
                      params: list[tuple[str, str]] | None, body: bytes | None,
                      headers: Mapping[str, str], number: int, parent: Context | None,
                      traceparent: str | None, judge: Judge,
                      outbox_id: int | None = None,
                      suspect: bool = False) -> tuple[Sent, Step]:
        """One HTTP exchange in its span, the breaker told how it went; the breaker's
        check has passed. `suspect`: the request has been failing by itself (an outbox
        row's later attempt), so a failing answer to it says nothing about the backend."""
        span = self._tracer.start_span("forward.attempt", context=parent, kind=SpanKind.CLIENT,
                                       record_exception=False, set_status_on_exception=False)
        started = time.perf_counter()
        try:
            if span.is_recording():
                attributes = {**self._span_base, "forward.attempt": number,
                              "forward.breaker_state": self._breaker.state,
                              "http.request.method": method, "url.template": template}
                if outbox_id is not None:
                    attributes["outbox.id"] = outbox_id
                set_attributes(span, attributes)
            async with self._bulkhead:
                try:
                    credentials = await self._auth.headers()
                except TokenUnavailable as exc:
                    sent = Sent(failure=Failure(f"token unavailable ({exc.reason})",
                                                sent=False, retryable=False))
                else:
                    outgoing = {**headers, **credentials}
                    _propagate(outgoing, span, traceparent)
                    sent = await self._send(method, url, params, body, outgoing)
                    sent = Sent(sent.response, sent.failure, credentials.get("Authorization"))
        except BaseException:
            # Cancelled (or a bug): no verdict on the backend, so the probe slot is freed.
            self._breaker.release()
            span.end()
            raise
        self._record(sent, suspect)
        step = judge(sent)
        self._finish(span, sent, step, started)
        return sent, step

    async def _send(self, method: str, url: str, params: list[tuple[str, str]] | None,
                    body: bytes | None, headers: Mapping[str, str]) -> Sent:
        try:
            async with self._session.request(method, url, params=params, data=body,
                                             headers=headers,
                                             allow_redirects=False) as response:
                payload = await response.read()
                return Sent(FhirResponse(response.status, _passed_on(response.headers),
                                         payload))
        except (aiohttp.ClientSSLError, ssl.SSLError):
            # A certificate refused (either side) will be refused again: not retried.
            return Sent(failure=Failure("TLS handshake failed", sent=False,
                                        retryable=False))
        except aiohttp.ClientConnectorError as exc:
            refused = isinstance(exc.os_error, ConnectionRefusedError)
            return Sent(failure=Failure(
                "connection refused" if refused else "connection failed", sent=False))
        except aiohttp.ConnectionTimeoutError:
            return Sent(failure=Failure(f"no connection within {self._connect_timeout:g} s",
                                        sent=False))
        except TimeoutError:  # aiohttp.SocketTimeoutError: no answer within sock_read
            return Sent(failure=Failure(f"no answer within {self._read_timeout:g} s",
                                        sent=True, timeout=True))
        except aiohttp.ServerDisconnectedError:
            return Sent(failure=Failure("connection closed", sent=True))
        except aiohttp.ClientError as exc:
            return Sent(failure=Failure(f"connection failed ({type(exc).__name__})",
                                        sent=True))

    def _record(self, sent: Sent, suspect: bool) -> None:
        """Tell the breaker: no answer is a failure; a 500/502/503/504 is one unless the
        request is `suspect` (then it is about the request: the breaker is told nothing,
        and a half-open probe slot is freed for the next call); any other answer says
        the backend is healthy."""
        if sent.failure is not None:
            self._breaker.failure()
            return
        if sent.response is not None and sent.response.status in FAILURE_STATUSES:
            # A backend answering 500 to one payload and 2xx to the others is not down:
            # only a payload's first failure is evidence about the backend.
            if suspect:
                self._breaker.release()
            else:
                self._breaker.failure()
            return
        try:
            self._breaker.success()
        except pybreaker.CircuitBreakerError:
            pass  # a late answer after another call opened the breaker: it stays open

    def _finish(self, span: trace.Span, sent: Sent, step: Step, started: float) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        self._metrics.duration.record(elapsed_ms, self._metric_base)
        if sent.response is not None:
            status = sent.response.status
            self._metrics.requests.add(1, {**self._metric_base,
                                           "http.response.status_code": status})
        else:
            self._metrics.requests.add(1, {**self._metric_base, "forward.verdict": step.label})
        if span.is_recording():
            attributes: dict[str, AttributeValue] = {"forward.verdict": step.label}
            if sent.response is not None:
                attributes["http.response.status_code"] = sent.response.status
            if step.retry_after is not None:
                attributes["forward.retry_after"] = step.retry_after
            set_attributes(span, attributes)
            if sent.response is None or sent.response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
        span.end()

    def count(self, verdict: str) -> None:
        """A call refused before any network: counted by why."""
        self._metrics.requests.add(1, {**self._metric_base, "forward.verdict": verdict})


def parent_context(traceparent: str | None) -> Context | None:
    """The caller's trace context from a W3C traceparent (None: the current context)."""
    if not traceparent:
        return None
    return _PROPAGATOR.extract({"traceparent": traceparent})


def _propagate(headers: dict[str, str], span: trace.Span, traceparent: str | None) -> None:
    """The attempt span's traceparent; unrecorded, the caller's as it came."""
    if span.get_span_context().is_valid:
        _PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))
    elif traceparent:
        headers["traceparent"] = traceparent
    else:
        _PROPAGATOR.inject(headers)


def _passed_on(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((name, value) for name, value in headers.items()
                       if name.lower() not in _NOT_PASSED)

