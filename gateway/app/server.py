"""The edge process: settings wired into one aiohttp application that hosts every listener.

`specs` turns settings into what each layer takes, `resources` opens and closes what the
app holds (one cleanup context each), `state` names it; this module builds the app and
serves it. Only the edge imports it (its children import what they use, not this).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from aiohttp import web

from gateway.agent import routes as agent_routes
from gateway.app.auth import setup_auth, token_auditor
from gateway.app.console import setup_console
from gateway.app.memory import return_large_buffers
from gateway.app.resources import RESOURCES, shutdown_telemetry
from gateway.app.specs import reviewers
from gateway.app.state import MLLP_ADDRESS, PROFILES, SETTINGS, TELEMETRY
from gateway.config import Settings
from gateway.edge import audit_http, fhir_errors, fhir_http, http, webhooks_http
from gateway.edge.http_server import GatewayRunner
from gateway.policy.profiles import load_profiles
from gateway.store.data_dir import private_dir
from gateway.telemetry import Telemetry, configure

__all__ = ["build_app", "serve"]

log = logging.getLogger(__name__)


def build_app(settings: Settings, telemetry: Telemetry | None = None) -> web.Application:
    """The application: HTTP routes plus the store and MLLP listener in its cleanup context."""
    app = web.Application(client_max_size=max(settings.mllp.max_frame_bytes,
                                              settings.fhir.max_body_bytes),
                          middlewares=[http.fhir_requests, fhir_errors.outcomes])
    app[SETTINGS] = settings
    app[TELEMETRY] = telemetry or configure(
        settings.telemetry.exporter, settings.telemetry.service_name,
        settings.telemetry.otlp_endpoint, prometheus=settings.telemetry.prometheus)
    app.add_routes(http.routes)
    app.add_routes(audit_http.routes)
    app[audit_http.REVIEWERS] = reviewers(settings)
    # The profiles are checked against the R4 model now: a typo stops the start.
    app[PROFILES] = load_profiles(settings.profiles)
    # The token signing key may be generated under the data dir now, before the data_dir
    # context checks and locks it: make the directory owner-only first.
    private_dir(settings.store.data_dir)
    setup_auth(app, settings, on_token=token_auditor(app))
    if settings.fhir.enabled:
        app.add_routes(fhir_http.routes)
    setup_console(app, settings)
    if settings.agent.enabled:
        app.add_routes(agent_routes)
    app.add_routes(webhooks_http.routes)  # 404 OperationOutcome for a backend without one
    app.cleanup_ctx.extend(RESOURCES)  # one cleanup context per resource, in start order
    # on_cleanup handlers run after the cleanup contexts (aiohttp registers those first).
    app.on_cleanup.append(shutdown_telemetry)
    return app


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; print the one `isthmus listening` line once both are up."""
    os.umask(0o077)  # whatever the process creates (stores, WAL files, keys) is owner-only
    return_large_buffers()  # RSS falls back after a burst of large messages
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = build_app(settings)
    runner = GatewayRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=settings.server.shutdown_timeout)
    try:
        # Inside the `try`: a start that fails half-way closes what it opened so far.
        await runner.setup()
        site = web.TCPSite(runner, settings.server.host, settings.server.http_port,
                           reuse_address=True)
        await site.start()
        http_host, http_port = runner.addresses[0][:2]
        mllp_host, mllp_port = app[MLLP_ADDRESS]
        sys.stdout.write(f"isthmus listening mllp={mllp_host}:{mllp_port} "
                         f"http={http_host}:{http_port}\n")
        sys.stdout.flush()
        await stop.wait()
        log.info("shutting down: finishing messages in flight")
    finally:
        await runner.cleanup()
    log.info("stopped")
    return 0
