"""Inbound webhooks' set-up: a hook per backend with a `webhook`, the recorded events
(a file in the data dir, or the shared database) and the fetcher that works them off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.app.state import CODEC, FHIR_STORE, FORWARDING, POOL, SETTINGS, TELEMETRY
from gateway.config import BackendConfig, ConfigError, Settings
from gateway.edge.webhooks_http import WEBHOOKS
from gateway.forward.fhir_backend import FhirBackend
from gateway.forward.normalize import Normalizer, load_vendor
from gateway.ingest.webhook_events import Rule, direct_rule, load_shape, reader
from gateway.ingest.webhooks import (
    Fetcher,
    Hook,
    Signing,
    Source,
    WebhookMetrics,
    Webhooks,
)
from gateway.mapping.tables import SHIPPED
from gateway.store.pg.webhooks import PgWebhookEvents
from gateway.store.webhooks import WEBHOOKS_FILE, SqliteWebhookEvents, WebhookEvents


def hook_of(config: BackendConfig, settings: Settings) -> Hook:
    """A backend's hook from its `webhook` settings; a missing secret or a bad shape
    table stops the start."""
    webhook = config.webhook
    assert webhook is not None
    try:
        secret = webhook.secret()
    except ValueError as exc:
        raise ConfigError(f"backends '{config.name}': {exc}") from None
    rules: list[Rule] = []
    if webhook.shape:
        rules.extend(load_shape(webhook.shape, settings.mapping.tables_dir or SHIPPED,
                                settings.mapping.site_dir))
    if webhook.event_id and webhook.resource:
        rules.append(direct_rule(webhook.event_id, webhook.resource))
    signing = Signing(secret, webhook.signature, webhook.signature_header,
                      webhook.timestamp_header, webhook.tolerance)
    return Hook(config.name, signing, reader(rules, config.base_url),
                webhook.max_body_bytes)


async def webhooks(app: web.Application) -> AsyncIterator[None]:
    """The hooks and their fetcher (only when some backend sends webhooks); the fetcher
    stops before the store it writes to closes."""
    settings = app[SETTINGS]
    senders = [c for c in settings.backends if c.webhook is not None]
    if not senders:
        yield
        return
    loop = asyncio.get_running_loop()
    hooks = {}
    for config in senders:
        hooks[config.name] = await loop.run_in_executor(None, hook_of, config, settings)
    sources = {c.name: await _source(app, c) for c in senders}
    events: WebhookEvents
    if POOL in app:
        events = PgWebhookEvents(app[POOL])
    else:
        events = await SqliteWebhookEvents.open(settings.store.data_dir / WEBHOOKS_FILE,
                                                synchronous=settings.store.synchronous,
                                                codec=app[CODEC])
    counted = WebhookMetrics.of(app[TELEMETRY].meter)
    fetcher = Fetcher(events, sources, app[FHIR_STORE], metrics=counted)
    app[WEBHOOKS] = Webhooks(hooks, events, fetcher, counted)
    fetcher.start()  # events recorded before a crash or restart are fetched now
    try:
        yield
    finally:
        await fetcher.close()
        await events.close()


async def _source(app: web.Application, config: BackendConfig) -> Source:
    """The backend's FHIR client and its vendor table (the facade's, when it has one)."""
    forwarding = app[FORWARDING]
    backend = forwarding.backends[config.name]
    assert isinstance(backend, FhirBackend) and config.webhook is not None
    normalizer: Normalizer | None = None
    if forwarding.facade is not None:
        normalizer = forwarding.facade.normalizer(config.name)
    if normalizer is None and config.vendor:
        settings = app[SETTINGS]
        normalizer = await asyncio.get_running_loop().run_in_executor(
            None, load_vendor, config.vendor, settings.mapping.tables_dir or SHIPPED,
            settings.mapping.site_dir)
    return Source(backend, normalizer, config.webhook.max_attempts,
                  config.webhook.retry_max_delay)
