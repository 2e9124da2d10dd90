"""HTTP routes of the edge that exist so far: liveness and readiness."""

from __future__ import annotations

from aiohttp import web

from gateway.edge.audit_http import AUDIT
from gateway.store import SqliteInbox, StoreUnavailable

INBOX = web.AppKey("inbox", SqliteInbox)

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
