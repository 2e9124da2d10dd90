"""HTTP routes outside /fhir: liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

from aiohttp import web

from gateway.edge.audit_http import AUDIT
from gateway.store import SqliteInbox, StoreUnavailable
from gateway.telemetry import PROMETHEUS_CONTENT_TYPE, Telemetry

INBOX = web.AppKey("inbox", SqliteInbox)
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
