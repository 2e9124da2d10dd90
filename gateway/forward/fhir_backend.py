"""A remote FHIR R4 server as a backend: the facade's proxied requests and the outbox's
transaction Bundles, without hurting the server.

Every call passes, in order: the circuit breaker (open: refused at once, no network),
the token bucket (the backend's rate limit), the bulkhead (calls in flight), the
outbound credentials, then one HTTP attempt in its own client span. The facade's
`request` retries idempotent calls on 408/429/502/503/504 and connection failures with
full-jitter backoff, never sooner than Retry-After; the outbox's `deliver` makes one
attempt and turns the answer into a verdict. Spans, metrics, logs and errors carry a
path template, a status or a state, never an id or a query value.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import orjson
import pybreaker
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.forward.backend import (
    BackendTimeout,
    BackendUnavailable,
    Delivered,
    Delivery,
    FhirResponse,
    Permanent,
    Retry,
    Verdict,
)
from gateway.forward.outbound_auth import AuthSpec, OutboundAuth, TokenUnavailable, build_auth
from gateway.forward.resilience import (
    BREAKER_STATES,
    FAILURE_STATUSES,
    IDEMPOTENT_METHODS,
    RETRYABLE_STATUSES,
    Breaker,
    BreakerOpen,
    RateLimited,
    TokenBucket,
    parse_rate,
    parse_retry_after,
    retry_delay,
)
from gateway.telemetry import AttributeValue, Telemetry, safe_attributes, set_attributes

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
KIND = "fhir"
# The longest a facade request waits for the rate limit before answering 503.
MAX_RATE_WAIT = 1.0
# Retry-After offered when a backend could not be reached and the breaker is still closed.
UNREACHABLE_RETRY_AFTER = 5.0

_PROPAGATOR = TraceContextTextMapPropagator()
# Literal path segments: interactions and operations (`_history`, `_search`, `$everything`)
# and resource types; anything else is an id and becomes `{id}` in a template.
_LITERAL = re.compile(r"[_$][a-z][A-Za-z-]{0,40}")
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_ISSUE_CODE = re.compile(r"[a-z][a-z-]{0,39}")
# The body is decoded by the client, so these no longer describe it; the rest pass on.
_NOT_PASSED = frozenset({"content-encoding", "content-length", "transfer-encoding",
                         "connection", "keep-alive"})


@dataclass(frozen=True)
class FhirBackendSpec:
    """One remote FHIR server: where, how to authenticate, and how gently to call it."""

    name: str
    base_url: str
    auth: AuthSpec = AuthSpec()
    rate_limit: str = ""  # "5000/hour"; "" is unlimited
    verify_tls: bool = True
    allow_insecure_http: bool = False
    ca_file: Path | None = None
    client_cert_file: Path | None = None  # mTLS
    client_key_file: Path | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_concurrency: int = 8
    max_retries: int = 2
    backoff_base: float = 0.2
    backoff_max: float = 30.0
    max_retry_after: float = 5.0
    breaker_failures: int = 5
    breaker_reset: float = 30.0


def client_ssl_context(spec: FhirBackendSpec) -> ssl.SSLContext | None:
    """The TLS context for an https backend (None for http): TLS >= 1.2, the server
    verified against the system store or `ca_file`, and the client certificate for mTLS."""
    if not spec.base_url.startswith("https://"):
        return None
    return _tls_context(spec)


def _tls_context(spec: FhirBackendSpec) -> ssl.SSLContext:
    return client_tls_context(spec.ca_file, spec.verify_tls, spec.client_cert_file,
                              spec.client_key_file)


def client_tls_context(ca_file: Path | None, verify: bool = True,
                       client_cert_file: Path | None = None,
                       client_key_file: Path | None = None) -> ssl.SSLContext:
    """A client TLS context for any backend (FHIR or MLLP): TLS >= 1.2, the server verified
    against the system store or `ca_file` unless `verify` is off, a certificate for mTLS."""
    context = ssl.create_default_context(
        cafile=str(ca_file) if ca_file is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client_cert_file is not None:
        context.load_cert_chain(client_cert_file, client_key_file)
    return context


def url_template(path: str) -> str:
    """A request path with its ids replaced: "Patient/{id}", "Patient/{id}/_history/{vid}",
    "Patient", "" for the base. Never carries the query."""
    parts = [part for part in path.partition("?")[0].split("/") if part]
    template: list[str] = []
    for index, part in enumerate(parts):
        if template and template[-1] == "_history":
            template.append("{vid}")
        elif (_LITERAL.fullmatch(part) or (index == 0 and part == "metadata")
              or (index % 2 == 0 and _RESOURCE_TYPE.fullmatch(part))):
            template.append(part)
        else:
            template.append("{id}")
    return "/".join(template)


def is_idempotent(method: str, path: str, headers: Mapping[str, str]) -> bool:
    """Whether sending the request twice does no more than sending it once: GET, PUT,
    DELETE...; a conditional create (If-None-Exist); a search by POST."""
    if method in IDEMPOTENT_METHODS:
        return True
    if method != "POST":
        return False
    if path.partition("?")[0].rstrip("/").endswith("_search"):
        return True
    return any(name.lower() == "if-none-exist" for name in headers)


# -- metrics ------------------------------------------------------------------------------


class ForwardMetrics:
    """The forwarding instruments of one meter, shared by every backend that uses it (an
    instrument name is registered once per meter; observable callbacks read all of them)."""

    _by_meter: weakref.WeakKeyDictionary[metrics.Meter, ForwardMetrics] = (
        weakref.WeakKeyDictionary())

    def __init__(self, meter: metrics.Meter) -> None:
        self.requests = meter.create_counter(
            "isthmus.forward.requests", unit="{request}",
            description="Attempts sent to a backend, by status (or verdict when unanswered)")
        self.duration = meter.create_histogram(
            "isthmus.forward.duration", unit="ms", description="Time of one attempt")
        self.retries = meter.create_counter(
            "isthmus.forward.retries", unit="{retry}", description="Attempts that were retries")
        self.rate_limit_waits = meter.create_counter(
            "isthmus.forward.rate_limit_waits", unit="{wait}",
            description="Calls that waited for the backend's rate limit")
        self._states: dict[str, Callable[[], str]] = {}
        self._refreshes: dict[str, Callable[[], int]] = {}
        meter.create_observable_counter(
            "isthmus.forward.token_refreshes", callbacks=[self._observe_refreshes],
            unit="{request}", description="Token requests made for a backend")
        meter.create_observable_gauge(
            "isthmus.forward.breaker_state", callbacks=[self._observe_states],
            description="Circuit breaker: 0 closed, 1 half-open, 2 open")

    @classmethod
    def of(cls, meter: metrics.Meter) -> ForwardMetrics:
        found = cls._by_meter.get(meter)
        if found is None:
            found = cls._by_meter[meter] = cls(meter)
        return found

    def watch(self, backend: str, breaker_state: Callable[[], str],
              refreshes: Callable[[], int] | None = None) -> None:
        """Report this backend's breaker state (and token requests) until `unwatch`."""
        self._states[backend] = breaker_state
        if refreshes is not None:
            self._refreshes[backend] = refreshes

    def unwatch(self, backend: str) -> None:
        self._states.pop(backend, None)
        self._refreshes.pop(backend, None)

    def _observe_states(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(BREAKER_STATES.get(state(), 0), {"forward.backend": name})
                for name, state in list(self._states.items())]

    def _observe_refreshes(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count(), {"forward.backend": name})
                for name, count in list(self._refreshes.items())]


# -- one attempt --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Failure:
    """An attempt that got no HTTP answer. `sent`: the request may have reached the
    server (so only an idempotent one may go again)."""

    reason: str
    sent: bool
    timeout: bool = False
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class _Sent:
    response: FhirResponse | None = None
    failure: _Failure | None = None
    authorization: str | None = None  # the Authorization value the attempt carried


Action = Literal["return", "retry", "refresh"]


@dataclass(frozen=True, slots=True)
class _Step:
    """What the caller does after an attempt, and what the attempt's span says about it."""

    label: str  # forward.verdict
    action: Action = "return"
    retry_after: float | None = None
    delay: float = 0.0
    verdict: Verdict | None = None  # deliver's answer


Judge = Callable[[_Sent], _Step]


class FhirBackend:
    """A remote FHIR R4 server: `request` for the facade, `deliver` for the outbox."""

    kind = KIND

    def __init__(self, spec: FhirBackendSpec, telemetry: Telemetry,
                 session: aiohttp.ClientSession) -> None:
        self.name = spec.name
        self.spec = spec
        self._session = session
        self._telemetry = telemetry
        self._tracer = telemetry.tracer
        self._base = spec.base_url.rstrip("/")
        self._auth = build_auth(spec.auth, session)
        self._breaker = Breaker(spec.name, spec.breaker_failures, spec.breaker_reset,
                                on_change=self._breaker_changed)
        rate = parse_rate(spec.rate_limit)
        self._bucket = TokenBucket(*rate) if rate is not None else None
        self._bulkhead = asyncio.Semaphore(spec.max_concurrency)
        address = urlsplit(spec.base_url)
        scheme_port = 443 if address.scheme == "https" else 80
        self._span_base: dict[str, AttributeValue] = safe_attributes({
            "forward.backend": spec.name, "forward.kind": KIND,
            "server.address": address.hostname or "", "server.port": address.port or scheme_port,
        })
        self._metric_base: dict[str, AttributeValue] = {"forward.backend": spec.name}
        self._metrics = ForwardMetrics.of(telemetry.meter)
        self._metrics.watch(spec.name, lambda: self._breaker.state,
                            lambda: self._auth.refreshes)

    @classmethod
    async def open(cls, spec: FhirBackendSpec, telemetry: Telemetry) -> FhirBackend:
        """The backend with its one HTTP session (closed by `close`)."""
        _check_transport(spec)
        context = client_ssl_context(spec)
        if context is None and spec.auth.token_url.startswith("https://"):
            context = _tls_context(spec)
        # One more connection than the bulkhead: a token request made while every slot
        # is busy still finds one.
        connector = aiohttp.TCPConnector(limit=spec.max_concurrency + 1,
                                         ssl=context if context is not None else True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=spec.connect_timeout,
                                        sock_read=spec.read_timeout)
        session = aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                        headers={"User-Agent": "isthmus"})
        try:
            return cls(spec, telemetry, session)
        except BaseException:
            await session.close()
            raise

    async def close(self) -> None:
        self._metrics.unwatch(self.name)
        await self._session.close()

    @property
    def auth(self) -> OutboundAuth:
        return self._auth

    @property
    def breaker_state(self) -> str:
        return self._breaker.state

    def available_in(self) -> float:
        return self._breaker.available_in()

    # -- the facade ---------------------------------------------------------------------

    async def request(self, method: str, path: str, *, query: Sequence[tuple[str, str]] = (),
                      body: bytes | None = None, headers: Mapping[str, str] | None = None,
                      idempotent: bool | None = None,
                      traceparent: str | None = None) -> FhirResponse:
        """One FHIR interaction (path relative to the base, e.g. "Patient/123"), retried
        when that is safe. The answer is passed on whatever its status; BackendUnavailable
        (503) or BackendTimeout (504) when there is none to pass on."""
        method = method.upper()
        path, _, inline_query = path.partition("?")
        path = path.strip("/")
        if inline_query:
            query = [*parse_qsl(inline_query, keep_blank_values=True), *query]
        sent_headers = {"Accept": FHIR_JSON, **(headers or {})}
        if body is not None and not any(n.lower() == "content-type" for n in sent_headers):
            sent_headers["Content-Type"] = FHIR_JSON
        if idempotent is None:
            idempotent = is_idempotent(method, path, sent_headers)
        may_repeat = idempotent
        spec = self.spec
        retries = 0
        refreshed = False

        def judge(sent: _Sent) -> _Step:
            nonlocal retries, refreshed
            if sent.failure is not None:
                failure = sent.failure
                if (failure.retryable and retries < spec.max_retries
                        and (may_repeat or not failure.sent)):
                    retries += 1
                    return _Step("retry", "retry",
                                 delay=retry_delay(retries, spec.backoff_base,
                                                   spec.backoff_max, None))
                return _Step("timeout" if failure.timeout else "unavailable")
            assert sent.response is not None
            status = sent.response.status
            if status == 401 and sent.authorization is not None and not refreshed:
                refreshed = True
                return _Step("refresh", "refresh")
            if status in RETRYABLE_STATUSES and may_repeat:
                after = parse_retry_after(sent.response.headers.get("Retry-After"))
                if retries < spec.max_retries and (after is None
                                                   or after <= spec.max_retry_after):
                    retries += 1
                    delay = retry_delay(retries, spec.backoff_base, spec.backoff_max, after)
                    return _Step("retry", "retry", after, delay)
                return _Step("answered", retry_after=after)
            return _Step("answered")

        parent = _parent(traceparent)
        url = f"{self._base}/{path}" if path else self._base
        template = url_template(path)
        params = list(query) or None
        last: FhirResponse | None = None
        number = 0
        while True:
            number += 1
            try:
                self._breaker.check()
            except BreakerOpen as exc:
                self._count("breaker_open")
                if last is not None:
                    return last
                raise BackendUnavailable("circuit breaker open", exc.retry_after) from None
            try:
                await self._take_token(MAX_RATE_WAIT)
            except RateLimited as exc:
                self._breaker.release()
                self._count("rate_limited")
                if last is not None:
                    return last
                raise BackendUnavailable("rate limit", exc.retry_after) from None
            except asyncio.CancelledError:
                self._breaker.release()
                raise
            sent, step = await self._attempt(method, url, template, params, body, sent_headers,
                                             number, parent, traceparent, judge)
            if step.action == "refresh":
                assert sent.authorization is not None
                self._auth.invalidate(sent.authorization)
                continue
            if step.action == "retry":
                self._metrics.retries.add(1, self._metric_base)
                if sent.response is not None:
                    last = sent.response
                await asyncio.sleep(step.delay)
                continue
            if sent.response is not None:
                return sent.response
            assert sent.failure is not None
            retry_after = self._breaker.available_in() or UNREACHABLE_RETRY_AFTER
            if sent.failure.timeout:
                raise BackendTimeout(sent.failure.reason, retry_after)
            raise BackendUnavailable(sent.failure.reason, retry_after)

    # -- the outbox ---------------------------------------------------------------------

    async def deliver(self, delivery: Delivery) -> Verdict:
        """POST one transaction Bundle: one attempt (a 401 aside, which refreshes the
        token once), the answer as a verdict. Never raises for a backend problem."""
        try:
            return await self._deliver(delivery)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a verdict, not a crash: the outbox tries again later
            log.warning("backend %s: delivery of outbox row %d failed: %s",
                        self.name, delivery.outbox_id, type(exc).__name__)
            return Retry(type(exc).__name__)

    async def _deliver(self, delivery: Delivery) -> Verdict:
        wait = self._breaker.available_in()
        if wait > 0:
            self._count("breaker_open")
            return Retry("circuit breaker open", after=wait)
        # Deliveries go at the backend's pace: no bound on the wait for the rate limit.
        await self._take_token(None)
        headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON,
                   "Prefer": "return=minimal",
                   "X-Request-Id": f"isthmus-outbox-{delivery.outbox_id}"}
        traceparent = delivery.traceparent or None
        parent = _parent(traceparent)
        refreshed = False

        def judge(sent: _Sent) -> _Step:
            nonlocal refreshed
            if sent.failure is not None:
                after = self._breaker.available_in() or None
                return _Step("retry", retry_after=after,
                             verdict=Retry(sent.failure.reason, after=after))
            assert sent.response is not None
            status = sent.response.status
            label = f"HTTP {status}"
            if status == 401 and sent.authorization is not None and not refreshed:
                refreshed = True
                return _Step("refresh", "refresh")
            if 200 <= status < 300:
                return _Step("delivered", verdict=Delivered(label))
            if status in (408, 429) or status >= 500:
                after = parse_retry_after(sent.response.headers.get("Retry-After"))
                return _Step("retry", retry_after=after,
                             verdict=Retry(label, after=after, status=label))
            codes = _issue_codes(sent.response)
            reason = f"{label}: {', '.join(codes)}" if codes else label
            return _Step("permanent", verdict=Permanent(reason, status=label))

        number = 0
        while True:
            number += 1
            try:
                self._breaker.check()
            except BreakerOpen as exc:
                self._count("breaker_open")
                return Retry("circuit breaker open", after=exc.retry_after)
            sent, step = await self._attempt("POST", self._base, "", None, delivery.payload,
                                             headers, number, parent, traceparent, judge,
                                             outbox_id=delivery.outbox_id)
            if step.action == "refresh":
                assert sent.authorization is not None
                self._auth.invalidate(sent.authorization)
                continue
            assert step.verdict is not None
            return step.verdict

    # -- shared ------------------------------------------------------------------------

    async def _take_token(self, max_wait: float | None) -> None:
        if self._bucket is None:
            return
        waited = await self._bucket.acquire(max_wait)
        if waited > 0:
            self._metrics.rate_limit_waits.add(1, self._metric_base)

    async def _attempt(self, method: str, url: str, template: str,
                       params: list[tuple[str, str]] | None, body: bytes | None,
                       headers: Mapping[str, str], number: int, parent: Context | None,
                       traceparent: str | None, judge: Judge,
                       outbox_id: int | None = None) -> tuple[_Sent, _Step]:
        """One HTTP exchange in its span, the breaker told how it went; the breaker's
        check has passed."""
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
                    sent = _Sent(failure=_Failure(f"token unavailable ({exc.reason})",
                                                  sent=False, retryable=False))
                else:
                    outgoing = {**headers, **credentials}
                    _propagate(outgoing, span, traceparent)
                    sent = await self._send(method, url, params, body, outgoing)
                    sent = _Sent(sent.response, sent.failure, credentials.get("Authorization"))
        except BaseException:
            # Cancelled (or a bug): no verdict on the backend, so the probe slot is freed.
            self._breaker.release()
            span.end()
            raise
        self._record(sent)
        step = judge(sent)
        self._finish(span, sent, step, started)
        return sent, step

    async def _send(self, method: str, url: str, params: list[tuple[str, str]] | None,
                    body: bytes | None, headers: Mapping[str, str]) -> _Sent:
        spec = self.spec
        try:
            async with self._session.request(method, url, params=params, data=body,
                                             headers=headers,
                                             allow_redirects=False) as response:
                payload = await response.read()
                return _Sent(FhirResponse(response.status, _passed_on(response.headers),
                                          payload))
        except (aiohttp.ClientSSLError, ssl.SSLError):
            # A certificate refused (either side) will be refused again: not retried.
            return _Sent(failure=_Failure("TLS handshake failed", sent=False,
                                          retryable=False))
        except aiohttp.ClientConnectorError as exc:
            refused = isinstance(exc.os_error, ConnectionRefusedError)
            return _Sent(failure=_Failure(
                "connection refused" if refused else "connection failed", sent=False))
        except aiohttp.ConnectionTimeoutError:
            return _Sent(failure=_Failure(f"no connection within {spec.connect_timeout:g} s",
                                          sent=False))
        except TimeoutError:  # aiohttp.SocketTimeoutError: no answer within sock_read
            return _Sent(failure=_Failure(f"no answer within {spec.read_timeout:g} s",
                                          sent=True, timeout=True))
        except aiohttp.ServerDisconnectedError:
            return _Sent(failure=_Failure("connection closed", sent=True))
        except aiohttp.ClientError as exc:
            return _Sent(failure=_Failure(f"connection failed ({type(exc).__name__})",
                                          sent=True))

    def _record(self, sent: _Sent) -> None:
        """Tell the breaker: 5xx and no answer are failures, anything else says healthy."""
        if sent.failure is not None or (
                sent.response is not None and sent.response.status in FAILURE_STATUSES):
            self._breaker.failure()
            return
        try:
            self._breaker.success()
        except pybreaker.CircuitBreakerError:
            pass  # a late answer after another call opened the breaker: it stays open

    def _finish(self, span: trace.Span, sent: _Sent, step: _Step, started: float) -> None:
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

    def _count(self, verdict: str) -> None:
        """A call refused before any network: counted by why."""
        self._metrics.requests.add(1, {**self._metric_base, "forward.verdict": verdict})

    def _breaker_changed(self, old: str, new: str) -> None:
        log.warning("backend %s: circuit breaker %s -> %s", self.name, old, new)


def _check_transport(spec: FhirBackendSpec) -> None:
    address = urlsplit(spec.base_url)
    if address.scheme not in ("http", "https") or not address.hostname:
        raise ValueError(f"backend '{spec.name}': base_url must be an http(s) URL")
    host = address.hostname
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if address.scheme == "http" and not (spec.allow_insecure_http or loopback):
        raise ValueError(f"backend '{spec.name}': plain http:// needs allow_insecure_http")
    if not spec.verify_tls and not spec.allow_insecure_http:
        raise ValueError(f"backend '{spec.name}': verify_tls = false needs "
                         "allow_insecure_http")


def _parent(traceparent: str | None) -> Context | None:
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


def _issue_codes(response: FhirResponse) -> list[str]:
    """The OperationOutcome's issue codes (a fixed vocabulary; diagnostics are free text
    that may quote the data, so they are never read)."""
    if not response.body or len(response.body) > 1_000_000:
        return []
    try:
        outcome: Any = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return []
    codes: list[str] = []
    for issue in outcome.get("issue") or ():
        code = issue.get("code") if isinstance(issue, dict) else None
        if isinstance(code, str) and _ISSUE_CODE.fullmatch(code) and code not in codes:
            codes.append(code)
    return codes[:5]
