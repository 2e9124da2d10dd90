"""A remote FHIR R4 server as a backend: the facade's proxied requests and the outbox's
transaction Bundles, without hurting the server.

Every call passes, in order: the circuit breaker (open: refused at once, no network),
the token bucket (the backend's rate limit), the bulkhead (calls in flight), the
outbound credentials, then one HTTP attempt in its own client span. The facade's
`request` retries idempotent calls on 408/429/502/503/504 and connection failures with
full-jitter backoff, never sooner than Retry-After; the outbox's `deliver` makes one
attempt and turns the answer into a verdict (a failing answer to a row that has failed
before is that row's fault, not the backend's: the breaker is not told, `Fault`). Spans,
metrics, logs and errors carry a
path template, a status or a state, never an id or a query value.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import orjson

from gateway.forward.backend import (
    BackendTimeout,
    BackendUnavailable,
    Delivered,
    Delivery,
    Fault,
    FhirResponse,
    Permanent,
    Retry,
    Verdict,
)

# The set-up, metrics and attempt machinery live in their own modules since the split;
# their public names are imported here too for the old import paths.
from gateway.forward.fhir_setup import FhirBackendSpec as FhirBackendSpec
from gateway.forward.fhir_setup import client_ssl_context as client_ssl_context
from gateway.forward.fhir_setup import client_tls_context as client_tls_context
from gateway.forward.fhir_setup import open_session
from gateway.forward.http_attempt import Action as Action
from gateway.forward.http_attempt import HttpAttempts, Sent, Step, parent_context
from gateway.forward.http_attempt import Judge as Judge
from gateway.forward.metrics import ForwardMetrics as ForwardMetrics
from gateway.forward.outbound_auth import OutboundAuth, build_auth
from gateway.forward.resilience import (
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
from gateway.telemetry import AttributeValue, Telemetry, safe_attributes

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
KIND = "fhir"
# The longest a facade request waits for the rate limit before answering 503.
MAX_RATE_WAIT = 1.0
# Retry-After offered when a backend could not be reached and the breaker is still closed.
UNREACHABLE_RETRY_AFTER = 5.0

# Literal path segments: interactions and operations (`_history`, `_search`, `$everything`)
# and resource types; anything else is an id and becomes `{id}` in a template.
_LITERAL = re.compile(r"[_$][a-z][A-Za-z-]{0,40}")
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_ISSUE_CODE = re.compile(r"[a-z][a-z-]{0,39}")


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


class FhirBackend:
    """A remote FHIR R4 server: `request` for the facade, `deliver` for the outbox."""

    kind = KIND

    def __init__(self, spec: FhirBackendSpec, telemetry: Telemetry,
                 session: aiohttp.ClientSession) -> None:
        self.name = spec.name
        self.spec = spec
        self._session = session
        self._telemetry = telemetry
        self._base = spec.base_url.rstrip("/")
        self._auth = build_auth(spec.auth, session)
        self._breaker = Breaker(spec.name, spec.breaker_failures, spec.breaker_reset,
                                on_change=self._breaker_changed)
        rate = parse_rate(spec.rate_limit)
        bucket = TokenBucket(*rate) if rate is not None else None
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
        self._http = HttpAttempts(session, telemetry.tracer, self._auth, self._breaker,
                                  bucket, self._metrics, self._span_base,
                                  self._metric_base, max_concurrency=spec.max_concurrency,
                                  connect_timeout=spec.connect_timeout,
                                  read_timeout=spec.read_timeout)

    @classmethod
    async def open(cls, spec: FhirBackendSpec, telemetry: Telemetry) -> FhirBackend:
        """The backend with its one HTTP session (closed by `close`)."""
        session = open_session(spec)
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

        def judge(sent: Sent) -> Step:
            nonlocal retries, refreshed
            if sent.failure is not None:
                failure = sent.failure
                if (failure.retryable and retries < spec.max_retries
                        and (may_repeat or not failure.sent)):
                    retries += 1
                    return Step("retry", "retry",
                                 delay=retry_delay(retries, spec.backoff_base,
                                                   spec.backoff_max, None))
                return Step("timeout" if failure.timeout else "unavailable")
            assert sent.response is not None
            status = sent.response.status
            if status == 401 and sent.authorization is not None and not refreshed:
                refreshed = True
                return Step("refresh", "refresh")
            if status in RETRYABLE_STATUSES and may_repeat:
                after = parse_retry_after(sent.response.headers.get("Retry-After"))
                if retries < spec.max_retries and (after is None
                                                   or after <= spec.max_retry_after):
                    retries += 1
                    delay = retry_delay(retries, spec.backoff_base, spec.backoff_max, after)
                    return Step("retry", "retry", after, delay)
                return Step("answered", retry_after=after)
            return Step("answered")

        parent = parent_context(traceparent)
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
                self._http.count("breaker_open")
                if last is not None:
                    return last
                raise BackendUnavailable("circuit breaker open", exc.retry_after) from None
            try:
                await self._http.take_token(MAX_RATE_WAIT)
            except RateLimited as exc:
                self._breaker.release()
                self._http.count("rate_limited")
                if last is not None:
                    return last
                raise BackendUnavailable("rate limit", exc.retry_after) from None
            except asyncio.CancelledError:
                self._breaker.release()
                raise
            sent, step = await self._http.attempt(method, url, template, params, body,
                                                  sent_headers, number, parent, traceparent,
                                                  judge)
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
            return Retry(type(exc).__name__, fault="message")

    async def _deliver(self, delivery: Delivery) -> Verdict:
        wait = self._breaker.available_in()
        if wait > 0:
            self._http.count("breaker_open")
            return Retry("circuit breaker open", after=wait, fault="unsent")
        # Deliveries go at the backend's pace: no bound on the wait for the rate limit.
        await self._http.take_token(None)
        headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON,
                   "Prefer": "return=minimal",
                   "X-Request-Id": f"isthmus-outbox-{delivery.outbox_id}"}
        traceparent = delivery.traceparent or None
        parent = parent_context(traceparent)
        refreshed = False
        # A row that has failed before and fails again with an answer is this payload's
        # problem (a poison message), not evidence that the backend is down.
        suspect = delivery.attempt > 1
        answered_fault: Fault = "message" if suspect else "backend"

        def judge(sent: Sent) -> Step:
            nonlocal refreshed
            if sent.failure is not None:
                after = self._breaker.available_in() or None
                return Step("retry", retry_after=after,
                             verdict=Retry(sent.failure.reason, after=after))
            assert sent.response is not None
            status = sent.response.status
            label = f"HTTP {status}"
            if status == 401 and sent.authorization is not None and not refreshed:
                refreshed = True
                return Step("refresh", "refresh")
            if 200 <= status < 300:
                return Step("delivered", verdict=Delivered(label))
            if status in (408, 429) or status >= 500:
                after = parse_retry_after(sent.response.headers.get("Retry-After"))
                return Step("retry", retry_after=after,
                             verdict=Retry(label, after=after, status=label,
                                           fault=answered_fault))
            codes = _issue_codes(sent.response)
            reason = f"{label}: {', '.join(codes)}" if codes else label
            return Step("permanent", verdict=Permanent(reason, status=label))

        number = 0
        while True:
            number += 1
            try:
                self._breaker.check()
            except BreakerOpen as exc:
                self._http.count("breaker_open")
                return Retry("circuit breaker open", after=exc.retry_after, fault="unsent")
            sent, step = await self._http.attempt("POST", self._base, "", None,
                                                  delivery.payload, headers, number, parent,
                                                  traceparent, judge,
                                                  outbox_id=delivery.outbox_id,
                                                  suspect=suspect)
            if step.action == "refresh":
                assert sent.authorization is not None
                self._auth.invalidate(sent.authorization)
                continue
            assert step.verdict is not None
            return step.verdict

    def _breaker_changed(self, old: str, new: str) -> None:
        log.warning("backend %s: circuit breaker %s -> %s", self.name, old, new)


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
