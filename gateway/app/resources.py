"""The application's resources, one aiohttp cleanup context each, in start-up order.

Each generator opens one resource, puts it on the app, yields, and closes it. aiohttp
enters them in `RESOURCES` order and leaves them in reverse, so shutdown first finishes and
answers what is in flight (housekeeping stopped, the MLLP listener drained, the applier
emptied), then closes the stores, the audit log last with a signed checkpoint over
everything recorded. After a failed start aiohttp closes only the contexts that started,
and only when the caller runs `runner.cleanup()`: whoever starts the app does so in a
`finally` (as `serve` does), the aiohttp idiom.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from datetime import UTC, datetime, timedelta

from aiohttp import web
from opentelemetry import metrics

from gateway.app.agent import agent_api
from gateway.app.audit import open_audit
from gateway.app.events import event_purger, events
from gateway.app.files import AUTH_FILE, FHIR_FILE, INBOX_FILE
from gateway.app.forwarding import open_forwarding
from gateway.app.memory import trim_after_bursts
from gateway.app.sealing import store_codec
from gateway.app.specs import fhir_limits, ingest_options, mllp_reservations, mllp_tls, pg_spec
from gateway.app.state import (
    APPLIER,
    CODEC,
    DATABASE,
    FHIR_STORE,
    FORWARDING,
    MLLP,
    MLLP_ADDRESS,
    POOL,
    PROFILES,
    REFUSALS,
    SEARCH_REGISTRY,
    SETTINGS,
    TELEMETRY,
    TRANSLATOR,
    WORKERS,
)
from gateway.app.tables import load_translator, search_registry
from gateway.app.webhooks import webhooks
from gateway.app.workers import Workers
from gateway.audit.log import AuditLog
from gateway.config import Settings
from gateway.config.cache import compiled_tables_dir
from gateway.edge import audit_http, http
from gateway.edge.auth_server import AUTH_SERVER
from gateway.edge.fhir_api import FHIR, FhirApi
from gateway.edge.mllp import MllpServer
from gateway.hl7.definitions import preload as preload_definitions
from gateway.ingest.applier import LocalApplier
from gateway.ingest.handler import Ingest, Routing
from gateway.ingest.prepare import Translators, start_child
from gateway.ingest.protocol import FrameHandler
from gateway.ingest.worker import Applier
from gateway.mapping.tables import SHIPPED
from gateway.policy.profiles import Profile
from gateway.store.data_dir import claim
from gateway.store.fhir import FhirStore
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.inbox import RunningInbox
from gateway.store.inbox_sqlite import SqliteInbox
from gateway.store.outbox import OutboxStore, SqliteOutbox
from gateway.store.pg.connect import DATABASE_ERRORS, open_pool
from gateway.store.pg.fhir import PgFhirStore
from gateway.store.pg.inbox import PgInbox
from gateway.store.pg.migrate import migrate
from gateway.store.pg.outbox import PgOutbox
from gateway.store.pg.replay import PgReplayStore
from gateway.store.pg.turns import PgApplyTurns
from gateway.store.refusals_sqlite import REFUSALS_FILE, SqliteRefusals
from gateway.store.replay_sqlite import SqliteReplayStore
from gateway.store.sealing import PLAIN

log = logging.getLogger(__name__)

Resource = Callable[[web.Application], AsyncIterator[None]]


async def shutdown_telemetry(app: web.Application) -> None:
    """An `on_cleanup` handler: runs after every cleanup context has closed, and only after
    a start that succeeded (a start that fails leaves the exporters as they are)."""
    app[TELEMETRY].shutdown()


async def child_processes(app: web.Application) -> AsyncIterator[None]:
    """With apply workers (`worker_processes`), the translator processes: started first, so
    that they load their tables while this process opens its stores, and are ready when
    it listens (`mllp`). The applier context starts the apply workers and stops them all;
    this one closes what a failed start left."""
    count = worker_processes(app[SETTINGS])
    if not count:
        yield
        return
    workers = Workers(app[SETTINGS], count)
    app[WORKERS] = workers
    try:
        await workers.start_translators()
        yield
    finally:
        await workers.close()


async def data_dir(app: web.Application) -> AsyncIterator[None]:
    """The data directory: created owner-only or refused if others may open it, locked
    for this process before any store in it opens (a second gateway stops here), and its
    data keys checked (a missing or wrong key stops the start here)."""
    store = app[SETTINGS].store
    held = claim(store.data_dir, allow_group_read=store.allow_group_read)
    try:
        # Sealed or plaintext, and every key it needs loaded: decided before any store opens.
        # The codec seals the embedded store's files; on PostgreSQL the database's own
        # encryption applies (docs/encryption.md).
        app[CODEC] = (PLAIN if store.backend == "postgresql"
                      else store_codec(app[SETTINGS], create=True))
        yield
    finally:
        held.release()


async def database(app: web.Application) -> AsyncIterator[None]:
    """store.backend = "postgresql": the schema brought up to date (once, whoever of
    several instances starting together gets the lock first) and the pool the stores
    share. The embedded backend needs nothing here."""
    settings = app[SETTINGS]
    if settings.store.backend != "postgresql":
        yield
        return
    spec = pg_spec(settings)
    applied = await migrate(spec)
    if applied:
        log.info("database %s: applied schema migrations %s", spec.where,
                 ", ".join(str(m.version) for m in applied))
    pool = await open_pool(spec)
    app[DATABASE] = spec
    app[POOL] = pool
    try:
        yield
    finally:
        try:
            await asyncio.wait_for(pool.close(), timeout=spec.connect_timeout * 2)
        except DATABASE_ERRORS as exc:  # TimeoutError among them
            # A connection the network cut cannot say goodbye: drop what is left.
            log.warning("database pool did not close cleanly (%s): terminated",
                        type(exc).__name__)
            pool.terminate()


async def translator(app: web.Application) -> AsyncIterator[None]:
    """The HL7 definitions and the mapping tables, compiled off the event loop."""
    settings = app[SETTINGS]
    loop = asyncio.get_running_loop()
    if settings.mllp.validation != "header":
        # Compile the HL7 definitions off the event loop now, not on the first message.
        await loop.run_in_executor(None, preload_definitions)
    # A bad table stops the start here (TableErrors: file:line: reason), before listening.
    app[TRANSLATOR] = await loop.run_in_executor(None, load_translator, settings)
    yield


async def audit(app: web.Application) -> AsyncIterator[None]:
    """The audit log (when enabled): closed last, with a signed checkpoint."""
    settings = app[SETTINGS]
    if not settings.audit.enabled:
        yield
        return
    audit_log = await open_audit(settings, app[TELEMETRY].meter, pool=app.get(POOL))
    app[audit_http.AUDIT] = audit_log
    try:
        yield
    finally:
        await audit_log.close()


async def assertion_ids(app: web.Application) -> AsyncIterator[None]:
    """The client assertion ids already used, kept on disk so that a restart does not
    let a captured assertion be replayed (only when clients can ask for tokens)."""
    settings = app[SETTINGS]
    if not settings.auth.clients:
        yield
        return
    opened: SqliteReplayStore | PgReplayStore
    if POOL in app:
        opened = PgReplayStore(app[POOL])
    else:
        opened = await SqliteReplayStore.open(settings.store.data_dir / AUTH_FILE,
                                              synchronous=settings.store.synchronous)
    try:
        app[AUTH_SERVER].replay.attach(opened, await opened.unexpired())
        yield
    finally:
        await opened.close()


async def inbox(app: web.Application) -> AsyncIterator[None]:
    """The inbox: committed what is queued, then closed."""
    store = app[SETTINGS].store
    window = timedelta(days=store.dedup_window_days)
    opened: RunningInbox
    if POOL in app:
        opened = await PgInbox.open(app[POOL], window, store.max_batch)
    else:
        opened = await SqliteInbox.open(store.data_dir / INBOX_FILE,
                                        synchronous=store.synchronous,
                                        dedup_window=window, max_batch=store.max_batch,
                                        codec=app[CODEC])
    app[http.INBOX] = opened
    try:
        yield
    finally:
        await opened.close()


async def refusals(app: web.Application) -> AsyncIterator[None]:
    """The operator's view of refused MLLP messages (no content): written after the
    listener stops, so its last refusals are kept."""
    opened = await SqliteRefusals.open(app[SETTINGS].store.data_dir / REFUSALS_FILE,
                                       synchronous="normal")
    app[REFUSALS] = opened
    try:
        yield
    finally:
        await opened.close()


async def fhir_store(app: web.Application) -> AsyncIterator[None]:
    """The search parameter table and the local FHIR store indexed by it."""
    settings = app[SETTINGS]
    registry = await asyncio.get_running_loop().run_in_executor(
        None, search_registry, settings)
    app[SEARCH_REGISTRY] = registry
    opened: FhirStore
    if POOL in app:
        opened = await PgFhirStore.open(app[POOL], registry.index,
                                        threads=max(1, settings.store.pool_max_size // 2))
    else:
        opened = await SqliteFhirStore.open(settings.store.data_dir / FHIR_FILE,
                                            registry.index,
                                            synchronous=settings.store.synchronous,
                                            codec=app[CODEC],
                                            string_groups=registry.string_groups())
    app[FHIR_STORE] = opened
    try:
        yield
    finally:
        await opened.close()


async def forwarding(app: web.Application) -> AsyncIterator[None]:
    """Backends, outbox and facade; closed before the inbox, whose connection the outbox
    shares. Pending rows stay pending."""
    outbox: OutboxStore
    if POOL in app:
        outbox = PgOutbox(app[POOL], app[DATABASE], _instance_name())
    else:
        inbox = app[http.INBOX]
        assert isinstance(inbox, SqliteInbox)
        outbox = SqliteOutbox(inbox.connection, inbox.codec)
    audit_log = app.get(audit_http.AUDIT)
    # The facade's paging cursors under a key derived from the audit signing key: the
    # instances that keep one trail open each other's cursors.
    secret = audit_log.keys.signing.mac_key if audit_log is not None else None
    opened = await open_forwarding(app[SETTINGS], outbox, app[TELEMETRY],
                                   cursor_secret=secret)
    if isinstance(outbox, PgOutbox) and opened.dispatcher is not None:
        outbox.on_new_rows = opened.dispatcher.wake  # another instance's rows: NOTIFY
    app[FORWARDING] = opened
    try:
        yield
    finally:
        await opened.close()
        if isinstance(outbox, PgOutbox):
            await outbox.close()


async def fhir_api(app: web.Application) -> AsyncIterator[None]:
    """The FHIR API over the local store and the facade (nothing of its own to close)."""
    profiles: dict[str, Profile] = app[PROFILES]
    app[FHIR] = FhirApi.build(
        app[FHIR_STORE], app[SEARCH_REGISTRY], app[TELEMETRY], fhir_limits(app[SETTINGS]),
        profiles, app.get(audit_http.AUDIT), facade=app[FORWARDING].facade)
    yield


async def applier(app: web.Application) -> AsyncIterator[None]:
    """The applier of translated messages to the FHIR store: the apply worker processes
    (`processes.workers`), or this process's own. Either starts with a sweep of the rows a
    crash left translated, and stops after the batch in hand (the rest waits, committed
    and marked, for the next start)."""
    settings = app[SETTINGS]
    if not (settings.fhir.enabled and settings.mapping.translate_on_ingest):
        yield
        return
    started: Applier
    turns: PgApplyTurns | None = None
    if WORKERS in app:
        # Worker processes apply (and translate again) what the edge commits: the second
        # core's work, off this event loop.
        workers = app[WORKERS]
        await workers.start()
        workers.observe(app[TELEMETRY].meter)
        started = workers
    else:
        # On PostgreSQL every instance applies what it commits: one patient's rows, in
        # whichever instances, are applied in inbox order by taking the patient's turn.
        turns = PgApplyTurns(app[DATABASE]) if POOL in app else None
        local = LocalApplier(app[FHIR_STORE], app[SEARCH_REGISTRY], app[http.INBOX],
                             app[TRANSLATOR], metrics=app[TELEMETRY].ingest, turns=turns)
        local.start()
        started = local
    app[APPLIER] = started
    try:
        yield
    finally:
        await started.close()
        if turns is not None:
            await turns.close()


async def mllp(app: web.Application) -> AsyncIterator[None]:
    """The MLLP listener; on stop it answers what is in flight before closing."""
    settings = app[SETTINGS]
    large = large_frames(settings)
    if settings.processes.worker_count() > 0:
        # Started now, not at the first large frame: its start (imports, tables: a second
        # or more of CPU) would otherwise compete with every connection beside that frame.
        large.submit(os.getpid)
    workers = app.get(WORKERS)
    if workers is not None:
        # What the edge translates itself for an ACK, its apply worker translates again.
        await workers.translators_ready()
    server = mllp_server(app, workers, large)
    observe_budget(app[TELEMETRY].meter, server.ingest)
    app[MLLP_ADDRESS] = await server.start(settings.server.host, settings.mllp.port)
    app[MLLP] = server
    budget = server.ingest.budget if isinstance(server.ingest, Ingest) else None
    trimming = None if budget is None else asyncio.create_task(
        trim_after_bursts(lambda: budget.held), name="memory-trim")
    try:
        yield
    finally:
        if trimming is not None:
            trimming.cancel()
        await server.stop(timeout=settings.server.shutdown_timeout)
        large.shutdown(wait=False, cancel_futures=True)


async def housekeeping(app: web.Application) -> AsyncIterator[None]:
    """Periodic tasks: duplicate-key expiry, delivered-row and change-event purges, audit
    retention."""
    settings = app[SETTINGS]
    tasks = [asyncio.create_task(_expire_dedup_keys(app[http.INBOX]), name="dedup-expiry")]
    outbox = app[FORWARDING].outbox
    if (app[FORWARDING].dispatcher is not None and outbox is not None
            and settings.forward.keep_delivered_days):
        tasks.append(asyncio.create_task(_purge_delivered(
            outbox, settings.forward.keep_delivered_days), name="outbox-purge"))
    tasks.append(asyncio.create_task(_purge_events(
        event_purger(app), settings.events.keep_days), name="event-purge"))
    audit_log = app.get(audit_http.AUDIT)
    if audit_log is not None and settings.audit.retention_days:
        tasks.append(asyncio.create_task(
            _audit_retention(audit_log, settings.audit.retention_days),
            name="audit-retention"))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()


# Start-up order; shutdown runs it backwards.
RESOURCES: tuple[Resource, ...] = (child_processes, data_dir, database, translator, audit,
                                   assertion_ids, inbox, refusals, fhir_store, forwarding,
                                   fhir_api, events, agent_api, webhooks, applier, mllp,
                                   housekeeping)


def worker_processes(settings: Settings) -> int:
    """How many apply worker processes apply what the edge commits (0: the edge applies,
    or nothing is applied here)."""
    if not (settings.fhir.enabled and settings.mapping.translate_on_ingest):
        return 0
    # Several instances on PostgreSQL scale out instead (each applies in its own process).
    return (0 if settings.store.backend == "postgresql"
            else settings.processes.worker_count())


def large_frames(settings: Settings) -> ProcessPoolExecutor:
    """The process that inspects large frames (`prepare.inspect`); started at the first
    (or at start-up, with worker processes)."""
    mapping = settings.mapping
    return ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn"),
        initializer=start_child,
        initargs=((mapping.tables_dir or SHIPPED) if mapping.translate_on_ingest else None,
                  mapping.site_dir, mapping.default_offset, compiled_tables_dir(), os.getpid()))


def mllp_server(app: web.Application, translators: Translators | None = None,
                large: Executor | None = None) -> MllpServer:
    """The MLLP listener and its handler, over what the contexts before it opened."""
    settings = app[SETTINGS]
    mllp = settings.mllp
    context, check = mllp_tls(settings)
    routes = app[FORWARDING]
    applied = app.get(APPLIER)
    ingest = Ingest(
        app[http.INBOX], app[TELEMETRY], ingest_options(settings, check),
        translator=app[TRANSLATOR] if settings.mapping.translate_on_ingest else None,
        applied=applied.submit if applied is not None else None,
        routing=Routing(routes.router, routes.dispatcher) if settings.routes else None,
        audit=app.get(audit_http.AUDIT), refused=app[REFUSALS].add,
        translators=translators, large=large)
    return MllpServer(
        ingest,
        max_frame_bytes=mllp.max_frame_bytes,
        idle_timeout=mllp.idle_timeout,
        max_connections=mllp.max_connections,
        max_in_flight=mllp.max_in_flight_per_connection,
        max_buffered_bytes=mllp.max_buffered_bytes,
        frame_deadline=mllp.frame_deadline,
        min_bytes_per_second=mllp.min_bytes_per_second,
        rate_window=mllp.rate_window,
        reservations=mllp_reservations(settings),
        ssl_context=context,
        meter=app[TELEMETRY].meter,
        budget=ingest.budget,
    )


def _instance_name() -> str:
    """Names this process in the rows it claims (host, pid and a nonce: a restarted
    process is another instance)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def observe_budget(meter: metrics.Meter, handler: FrameHandler) -> None:
    """The bytes the edge holds between receipt and commit, for /metrics."""
    budget = handler.budget if isinstance(handler, Ingest) else None
    if budget is None:
        return
    meter.create_observable_gauge(
        "isthmus.ingest.held_bytes", unit="By", callbacks=[lambda _: [metrics.Observation(
            budget.held, {"process": "edge"})]],
        description="bytes of MLLP messages held between receipt and commit "
                    "(processes.memory_budget_bytes bounds it)")


async def _expire_dedup_keys(opened: RunningInbox) -> None:
    while True:
        await asyncio.sleep(3600)
        try:
            await opened.expire_dedup_keys()
        except Exception as exc:  # a failed housekeeping pass is retried next hour
            log.warning("duplicate-key expiry failed: %s", type(exc).__name__)


async def _purge_delivered(outbox: OutboxStore, days: float) -> None:
    while True:
        try:
            await outbox.purge_delivered(datetime.now(UTC) - timedelta(days=days))
        except Exception as exc:  # retried in an hour
            log.warning("outbox purge failed: %s", type(exc).__name__)
        await asyncio.sleep(3600)


async def _purge_events(purge: Callable[[datetime], Awaitable[int]], days: float) -> None:
    while True:
        try:
            await purge(datetime.now(UTC) - timedelta(days=days))
        except Exception as exc:  # retried in an hour
            log.warning("change event purge failed: %s", type(exc).__name__)
        await asyncio.sleep(3600)


async def _audit_retention(audit_log: AuditLog, days: float) -> None:
    while True:
        try:
            await audit_log.purge(datetime.now(UTC) - timedelta(days=days))
        except Exception as exc:  # retried tomorrow; verify shows what is wrong
            log.error("audit retention purge failed: %s", type(exc).__name__)
        await asyncio.sleep(86_400)
