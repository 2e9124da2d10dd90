"""HTTP routes outside /fhir (liveness, readiness, the Prometheus metrics) and the
middleware that counts, times and traces every FHIR request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from opentelemetry import trace

from gateway.edge.audit_http import AUDIT
from gateway.edge.fhir_api import FHIR
from gateway.store.errors import StoreUnavailable
from gateway.store.inbox import RunningInbox
from gateway.telemetry import PROMETHEUS_CONTENT_TYPE, Telemetry, mark_failed, set_attributes

INBOX = web.AppKey("inbox", RunningInbox)
TELEMETRY = web.AppKey("telemetry", Telemetry)

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers HTTP."""
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready: the inbox (and the audit trail) take a real write, so a positive ACK could
    be given now."""
    inbox = request.app.get(INBOX)
    if inbox is None:
        return web.json_response({"status": "starting"}, status=503)
    try:
        await inbox.probe_writable()
    except StoreUnavailable:
        return web.json_response({"status": "store not writable"}, status=503)
    audit = request.app.get(AUDIT)
    if audit is not None:
        try:
            await audit.probe_writable()
        except StoreUnavailable:
            return web.json_response({"status": "audit trail not writable"}, status=503)
    return web.json_response({"status": "ready"})


@routes.get("/metrics")
async def prometheus(request: web.Request) -> web.Response:
    """Metrics in the Prometheus text format, open like /healthz: counts and timings by
    message type, ACK code, method and status, never message content."""
    telemetry = request.app.get(TELEMETRY)
    if telemetry is None or not telemetry.prometheus:
        raise web.HTTPNotFound(text="metrics are not enabled (telemetry.prometheus)")
    return web.Response(body=telemetry.render_prometheus(),
                        headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def fhir_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Each request under /fhir is counted and timed by method and status; with spans
    exported it gets a `fhir.request` span, the child of the caller's W3C `traceparent`
    if it sent one. Sits outside `fhir_errors.outcomes`, so a refusal counts with its
    status."""
    if not request.path.startswith("/fhir"):
        return await handler(request)
    api = request.app.get(FHIR)
    if api is None:
        return await handler(request)
    telemetry = api.telemetry
    counted = telemetry.fhir
    started = counted.clock()
    if not telemetry.recording:  # no span to fill: no cost
        response = await handler(request)
        counted.request(request.method, response.status, started)
        return response
    # Only names and codes go on the span: never the query string (url.query) or ids.
    # Exceptions are not recorded by OTel's default (their text can quote PHI): a failure
    # is marked with its type alone.
    with telemetry.tracer.start_as_current_span(
            "fhir.request", context=telemetry.parent_context(request.headers),
            kind=trace.SpanKind.SERVER, record_exception=False,
            set_status_on_exception=False) as span:
        try:
            response = await handler(request)
        except BaseException as exc:
            mark_failed(span, type(exc).__name__)
            raise
        set_attributes(span, {"http.request.method": counted.method_label(request.method),
                              "http.response.status_code": response.status})
        if response.status >= 500:  # semantic conventions: a server span fails on 5xx only
            mark_failed(span, str(response.status))
        counted.request(request.method, response.status, started)
        return response
