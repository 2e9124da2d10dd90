"""Change events out: the pump that follows the store's events into the outbox, the rules
Subscription writes are checked by, and the FHIR edge's read rules that cut what each
Subscription's owner receives (minimum necessary, as for a read)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from gateway.agent import flatten
from gateway.app.files import FHIR_FILE, INBOX_FILE
from gateway.app.state import (
    CODEC,
    DATABASE,
    FHIR_STORE,
    FORWARDING,
    POOL,
    SEARCH_REGISTRY,
    SETTINGS,
    TELEMETRY,
)
from gateway.config import ConfigError, Settings
from gateway.config.events import (
    EventsSecretError,
    WebhookConfig,
    subscription_secrets,
    webhook_secrets,
)
from gateway.edge.fhir_api import FHIR, FhirApi
from gateway.events.catalogue import unknown_events
from gateway.events.delivery import TargetSpec
from gateway.events.matcher import Webhook
from gateway.events.payloads import JSON
from gateway.events.pump import EventPump, PumpSpec
from gateway.events.subscriptions import Owner, SubscriptionRules
from gateway.fhir import jsonio
from gateway.fhir.errors import FhirError
from gateway.forward.outbox import DeliveryPolicy, Dispatcher
from gateway.policy.principal import Principal
from gateway.policy.scopes import ScopeSet
from gateway.store.errors import StoreUnavailable
from gateway.store.events import SqliteEventLog, SqliteEventQueue, purge_sqlite_events
from gateway.store.fhir import FhirStore
from gateway.store.inbox_sqlite import blind_patient
from gateway.store.pg.connect import (
    DATABASE_ERRORS,
    Connection,
    PgSpec,
    Pool,
    advisory_key,
    connect,
)
from gateway.store.pg.events import PgEventLog, PgEventQueue
from gateway.store.sealing import RowCodec

log = logging.getLogger(__name__)
_LEAD_ERRORS: tuple[type[BaseException], ...] = (*DATABASE_ERRORS, StoreUnavailable)


class PgEventLeader:
    """On PostgreSQL one instance at a time pumps the events and delivers them: the one
    holding the events' session-level advisory lock. The others try again every
    `retry` seconds; a holder's crash or cut connection frees the lock (PostgreSQL
    releases it) and the next one starts from the shared cursor."""

    def __init__(self, spec: PgSpec, make: Callable[[], EventPump], retry: float) -> None:
        self._spec = spec
        self._make = make
        self._retry = retry
        self._key = advisory_key("isthmus-events", spec.schema)
        self._lease: Connection | None = None
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.pump: EventPump | None = None

    async def start(self) -> None:
        await self._step()  # at once, so a lone instance pumps from its start
        self._task = asyncio.create_task(self._run(), name="event-leader")

    async def _run(self) -> None:
        while not self._closing.is_set():
            try:
                await asyncio.wait_for(self._closing.wait(), self._retry)
            except TimeoutError:
                pass
            if self._closing.is_set():
                break
            try:
                await self._step()
            except Exception as exc:  # a bug must not end the tries: say where, resign
                log.error("events: taking the lead failed (%s)", type(exc).__name__)
                await self._resign()

    async def _step(self) -> None:
        try:
            lease = self._lease
            if lease is None or lease.is_closed():
                await self._resign()
                lease = self._lease = await connect(self._spec)
            if self.pump is not None:
                await lease.fetchval("SELECT 1")  # the session, and so the lock, lives
                return
            if await lease.fetchval("SELECT pg_try_advisory_lock($1)", self._key):
                pump = self._make()
                try:
                    await pump.start()
                except BaseException:
                    await pump.close()  # what it attached goes; the lock with the lease
                    raise
                self.pump = pump
                log.info("events: this instance pumps and delivers them now")
        except _LEAD_ERRORS as exc:
            log.error("events: the lead could not be checked (%s)", type(exc).__name__)
            await self._resign()

    async def _resign(self) -> None:
        pump, self.pump = self.pump, None
        if pump is not None:
            await pump.close()
        lease, self._lease = self._lease, None
        if lease is not None and not lease.is_closed():
            lease.terminate()

    async def close(self) -> None:
        self._closing.set()
        if self._task is not None:
            await self._task
        pump, self.pump = self.pump, None
        if pump is not None:
            await pump.close()
        lease, self._lease = self._lease, None
        if lease is not None and not lease.is_closed():
            await lease.close()  # the lock goes with the session: a standby takes over


EVENTS = web.AppKey("events", EventPump)
EVENT_LEADER = web.AppKey("event_leader", PgEventLeader)
Json = dict[str, Any]


class ReadGate:
    """What a Subscription's owner may read, judged as the FHIR edge judges a read: its
    scopes, patient compartment, scope constraints and task profile."""

    def __init__(self, api: FhirApi) -> None:
        self._api = api
        self._principals: dict[Owner, Principal] = {}

    def principal(self, owner: Owner) -> Principal:
        found = self._principals.get(owner)
        if found is None:
            found = self._principals[owner] = Principal(
                owner.client_id, ScopeSet.parse(owner.scopes), "smart", owner.profile,
                owner.patient)
        return found

    def may_read(self, principal: Principal, resource_type: str) -> bool:
        try:
            self._api.authorize(principal, "read", resource_type)
        except FhirError:
            return False
        return True

    def view(self, owner: Owner, resource_type: str, resource: Json) -> Json | None:
        principal = self.principal(owner)
        if owner.profile is not None and self._api.profile(principal) is None:
            return None  # its profile is no longer configured: fail closed
        if not self.may_read(principal, resource_type):
            return None
        try:
            visibility = self._api.visibility(principal, "read", resource_type)
        except FhirError:
            return None
        if not visibility.shows(resource):
            return None
        return self._api.shaped_resource(principal, resource)


class Flattener:
    """The agent API's flat objects for `payload = "flat"` webhooks, names read from the
    local store."""

    def __init__(self, store: FhirStore) -> None:
        self._store = store

    async def __call__(self, resource_type: str, resource: Json) -> Json | None:
        if resource_type == "Patient":
            return {"id": resource.get("id"), "name": flatten.display_name(resource)}
        if resource_type not in ("Appointment", "MedicationRequest"):
            return {"id": resource.get("id")}
        names: dict[str, str] = {}
        for reference in flatten.references(resource):
            type_, _, id_ = reference.partition("/")
            stored = await self._store.read(type_, id_)
            if stored is not None and not stored.deleted:
                name = flatten.display_name(jsonio.loads(stored.body))
                if name:
                    names[reference] = name
        if resource_type == "Appointment":
            return flatten.appointment(resource, names)
        return flatten.medication(resource, [], names)


def _secrets(settings: Settings) -> tuple[dict[str, bytes], bytes | None, dict[str, bytes]]:
    try:
        hooks = webhook_secrets(settings.webhooks)
        default, clients = subscription_secrets(settings.events)
    except EventsSecretError as exc:
        raise ConfigError(str(exc)) from None
    return hooks, default, clients


def _policy(config: WebhookConfig | Any) -> DeliveryPolicy:
    return DeliveryPolicy(max_attempts=config.max_attempts, retry_base=config.retry_base,
                          retry_max_delay=config.retry_max_delay,
                          concurrency=config.concurrency)


def pump_spec(settings: Settings, codec: RowCodec) -> PumpSpec:
    """The pump's targets and settings; ConfigError (one line) for what cannot work."""
    hooks, default, clients = _secrets(settings)
    webhooks = [(Webhook(c.name, frozenset(c.events), c.payload),
                 TargetSpec(f"webhook:{c.name}", c.url, hooks[c.name], JSON, (), c.timeout),
                 _policy(c)) for c in settings.webhooks]
    config = settings.events

    def secret_for(client_id: str) -> bytes | None:
        return clients.get(client_id, default)

    return PumpSpec(webhooks, secret_for, _policy(config), config.poll_interval,
                    config.batch, config.handshake_attempts, config.timeout,
                    config.outbox_poll_interval, config.error_after,
                    blind=lambda key: blind_patient(key, codec))


def event_purger(app: web.Application) -> Callable[[datetime], Awaitable[int]]:
    """The housekeeping's purge of handled change events older than an instant (the
    trigger records them whether or not events are enabled)."""
    if POOL in app:
        return PgEventLog(app[POOL]).purge
    data_dir = app[SETTINGS].store.data_dir

    async def purge(before: datetime) -> int:
        return await purge_sqlite_events(data_dir / FHIR_FILE, data_dir / INBOX_FILE, before)

    return purge


async def events(app: web.Application) -> AsyncIterator[None]:
    """Subscription rules on the FHIR API, and the pump (on PostgreSQL, in the one instance
    that leads)."""
    settings = app[SETTINGS]
    config = settings.events
    api = app[FHIR]
    gate = ReadGate(api)
    spec = pump_spec(settings, app[CODEC])
    registry = app[SEARCH_REGISTRY]
    unknown = unknown_events([e for c in settings.webhooks for e in c.events],
                             registry.types())
    if unknown:
        raise ConfigError(f"webhooks: unknown event {unknown[0]} (the type is not one the "
                          "store keeps; see docs/events.md)")
    if not config.enabled:
        yield
        return
    api.subscriptions = SubscriptionRules(registry, config.allow_insecure_http,
                                          lambda client: spec.secret_for(client) is not None,
                                          gate.may_read)
    data_dir = settings.store.data_dir
    forwarding = app[FORWARDING]
    assert forwarding.outbox is not None
    own = forwarding.dispatcher is None
    dispatcher = forwarding.dispatcher or Dispatcher(
        forwarding.outbox, {}, {}, app[TELEMETRY],
        poll_interval=settings.forward.poll_interval)
    if own:
        await dispatcher.start()
    if POOL in app:
        pool: Pool = app[POOL]
        leader = PgEventLeader(app[DATABASE], lambda: EventPump(
            PgEventLog(pool), PgEventQueue(pool), app[FHIR_STORE], registry, dispatcher,
            gate, Flattener(app[FHIR_STORE]), spec), config.leader_retry)
        try:
            await leader.start()
            app[EVENT_LEADER] = leader
            yield
        finally:
            await leader.close()
            if own:
                await dispatcher.close()
            api.subscriptions = None
        return
    log_ = await SqliteEventLog.open(data_dir / FHIR_FILE, app[CODEC])
    queue = await SqliteEventQueue.open(data_dir / INBOX_FILE, app[CODEC])
    pump = EventPump(log_, queue, app[FHIR_STORE], registry, dispatcher, gate,
                     Flattener(app[FHIR_STORE]), spec)
    try:
        await pump.start()
        app[EVENTS] = pump
        yield
    finally:
        await pump.close()
        if own:
            await dispatcher.close()
        await queue.close()
        await log_.close()
        api.subscriptions = None
