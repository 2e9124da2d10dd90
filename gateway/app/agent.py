"""The agent API's set-up: its records (local store, or the facade for routed types), the
matching table, the outbound tables, sessions and limits, from the `[agent]` settings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

from aiohttp import web

from gateway.agent import AGENT, AgentApi, AgentService, Limits
from gateway.agent.matching import MatchingRules
from gateway.agent.outbound import Outbound
from gateway.agent.records import LocalRecords, Records, RemoteRecords
from gateway.agent.sessions import Attempts, Idempotency, Sessions
from gateway.app.state import FHIR_STORE, FORWARDING, SEARCH_REGISTRY, SETTINGS, TELEMETRY
from gateway.config import Settings
from gateway.edge import audit_http, http
from gateway.forward.resilience import parse_rate
from gateway.mapping.tables import SHIPPED
from gateway.mapping.to_v2 import Reverser

AGENT_SCOPE = "agent"
# What the agent API sends on in the local shape (the outbound tables are compiled only
# when a route sends one of them somewhere).
SENT = ("SIU^S12", "SIU^S13", "SIU^S15", "OMP^O09")


def agent_clients(settings: Settings) -> frozenset[str]:
    """The clients and API keys given the `agent` scope."""
    auth = settings.auth
    return frozenset([c.client_id for c in auth.clients if AGENT_SCOPE in c.scopes]
                     + [k.name for k in auth.api_keys if AGENT_SCOPE in k.scopes])


async def agent_api(app: web.Application) -> AsyncIterator[None]:
    """The agent API over what the earlier contexts opened; its sessions are purged
    when it stops."""
    settings = app[SETTINGS]
    config = settings.agent
    if not config.enabled:
        yield
        return
    shipped = settings.mapping.tables_dir or SHIPPED
    site = settings.mapping.site_dir
    loop = asyncio.get_running_loop()
    rules = await loop.run_in_executor(None, MatchingRules.load, shipped, site)
    local = LocalRecords(app[FHIR_STORE], app[SEARCH_REGISTRY])
    forwarding = app[FORWARDING]
    records: Records = local
    if forwarding.facade is not None and forwarding.facade.backend_for(
            "Appointment", "search") is not None:
        records = RemoteRecords(forwarding.facade, local)
    outbound = None
    told = any(forwarding.router.for_message(kind, config.sender_application,
                                             config.sender_facility).remote
               for kind in SENT)
    if told and not records.remote:
        reverser = await loop.run_in_executor(None, lambda: Reverser.load(
            shipped, site, application=config.sender_application,
            facility=config.sender_facility))
        outbound = Outbound(reverser, app[http.INBOX], forwarding.router,
                            forwarding.dispatcher)
    sessions = Sessions(config.session_ttl)
    service = AgentService(
        records, rules, sessions, Attempts(config.attempts, config.window),
        Limits(config.deadline, config.verify_floor, timedelta(days=config.horizon_days),
               config.sender_application),
        outbound)
    app[AGENT] = AgentApi(service, app[TELEMETRY], agent_clients(settings),
                          Idempotency(config.idempotency_ttl), parse_rate(config.rate_limit),
                          app.get(audit_http.AUDIT))
    try:
        yield
    finally:
        sessions.close()
