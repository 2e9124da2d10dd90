"""The remote side of the gateway: backends, the outbox that feeds them, the FHIR facade."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.app.specs import (
    build_router,
    delivery_policy,
    fhir_backend_spec,
    mllp_backend_spec,
)
from gateway.config import BackendConfig, Settings
from gateway.edge.fhir_proxy import Facade
from gateway.forward.backend import Backend
from gateway.forward.cache import ReadCache
from gateway.forward.fhir_backend import FhirBackend
from gateway.forward.mllp_backend import MllpBackend
from gateway.forward.normalize import load_vendor
from gateway.forward.outbox import Dispatcher
from gateway.forward.routes import Router
from gateway.mapping.tables import SHIPPED
from gateway.store import SqliteInbox
from gateway.store.outbox import SqliteOutbox
from gateway.telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass
class Forwarding:
    """The remote backends, the outbox that feeds them and the FHIR facade in front."""

    router: Router
    backends: dict[str, Backend]
    dispatcher: Dispatcher | None = None
    facade: Facade | None = None

    async def close(self) -> None:
        """Stop delivering (what is pending stays in the outbox), then the connections."""
        if self.dispatcher is not None:
            await self.dispatcher.close()
        for backend in self.backends.values():
            try:
                await backend.close()
            except Exception as exc:  # one backend's close must not keep others open
                log.warning("closing backend failed: %s", type(exc).__name__)


async def open_forwarding(settings: Settings, inbox: SqliteInbox,
                          telemetry: Telemetry) -> Forwarding:
    """Open every [[backends]] entry, start the outbox and build the FHIR facade."""
    forwarding = Forwarding(build_router(settings), {})
    try:
        for config in settings.backends:
            _warn_if_insecure(config)
            if config.kind == "fhir":
                forwarding.backends[config.name] = await FhirBackend.open(
                    fhir_backend_spec(config), telemetry)
            elif config.kind == "mllp":
                forwarding.backends[config.name] = MllpBackend(mllp_backend_spec(config),
                                                               telemetry)
        if forwarding.backends:
            forwarding.dispatcher = Dispatcher(
                SqliteOutbox(inbox.connection, inbox.codec), forwarding.backends,
                {c.name: delivery_policy(c) for c in settings.backends},
                telemetry, poll_interval=settings.forward.poll_interval)
            await forwarding.dispatcher.start()
        if forwarding.router.remote_types:
            forwarding.facade = _facade(settings, forwarding)
    except BaseException:
        await forwarding.close()
        raise
    return forwarding


def _facade(settings: Settings, forwarding: Forwarding) -> Facade:
    remote = [c for c in settings.backends if c.kind == "fhir"]
    # Each backend its own cache and lifetime; 0 turns caching off for that backend.
    caches = {c.name: ReadCache(c.cache_ttl, c.cache_entries)
              for c in remote if c.cache_ttl > 0 and c.cache_entries > 0}
    shipped = settings.mapping.tables_dir or SHIPPED
    normalizers = {c.name: load_vendor(c.vendor, shipped, settings.mapping.site_dir)
                   for c in remote if c.vendor}
    return Facade(forwarding.router,
                  {name: backend for name, backend in forwarding.backends.items()
                   if isinstance(backend, FhirBackend)}, caches, normalizers)


def _warn_if_insecure(backend: BackendConfig) -> None:
    if backend.insecure:
        log.warning("backend '%s' is reached without TLS verification (plain http or "
                    "verify_tls = false): allowed by allow_insecure_http; do not use this "
                    "with real patient data", backend.name)
