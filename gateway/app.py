"""Composition: wire settings into one aiohttp application that hosts every listener."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from aiohttp import web
from opentelemetry import metrics

from gateway.audit import AUDIT_FILE, AuditKeys, AuditLog, load_keys
from gateway.config import Settings
from gateway.edge import audit_http, http
from gateway.edge.ingest import Ingest
from gateway.edge.mllp import MllpServer
from gateway.edge.tls import SenderRule, sender_check, server_context
from gateway.hl7.definitions import preload as preload_definitions
from gateway.mapping.engine import Translator
from gateway.mapping.tables import SHIPPED
from gateway.store import SqliteInbox
from gateway.telemetry import Telemetry, configure

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
TELEMETRY = web.AppKey("telemetry", Telemetry)
MLLP = web.AppKey("mllp", MllpServer)
MLLP_ADDRESS = web.AppKey("mllp_address", tuple)
TRANSLATOR = web.AppKey("translator", Translator)

INBOX_FILE = "inbox.db"
KEYS_DIR = "keys"


def build_app(settings: Settings, telemetry: Telemetry | None = None) -> web.Application:
    """The application: HTTP routes plus the store and MLLP listener in its cleanup context."""
    app = web.Application(client_max_size=settings.mllp.max_frame_bytes)
    app[SETTINGS] = settings
    app[TELEMETRY] = telemetry or configure(
        settings.telemetry.exporter, settings.telemetry.service_name,
        settings.telemetry.otlp_endpoint)
    app.add_routes(http.routes)
    app.add_routes(audit_http.routes)
    app[audit_http.REVIEWERS] = tuple(
        audit_http.Reviewer(r.name, bytes.fromhex(r.token_sha256), frozenset(r.roles),
                            r.decrypt) for r in settings.audit.reviewers)
    app.cleanup_ctx.append(_store_and_mllp)
    return app


async def _store_and_mllp(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = settings.store
    if settings.mllp.validation != "header":
        # Compile the HL7 definitions off the event loop now, not on the first message.
        await asyncio.get_running_loop().run_in_executor(None, preload_definitions)
    # A bad table stops the start here (TableErrors: file:line: reason), before listening.
    app[TRANSLATOR] = await asyncio.get_running_loop().run_in_executor(
        None, load_translator, settings)
    audit = (await open_audit(settings, app[TELEMETRY].meter) if settings.audit.enabled
             else None)
    try:
        inbox = await SqliteInbox.open(
            store.data_dir / INBOX_FILE,
            synchronous=store.synchronous,
            dedup_window=timedelta(days=store.dedup_window_days),
            max_batch=store.max_batch,
        )
    except BaseException:
        if audit is not None:
            await audit.close()
        raise
    app[http.INBOX] = inbox
    try:
        server = _mllp_server(settings, inbox, app[TELEMETRY], app[TRANSLATOR], audit)
        app[MLLP_ADDRESS] = await server.start(settings.server.host, settings.mllp.port)
    except BaseException:
        await inbox.close()
        if audit is not None:
            await audit.close()
        raise
    app[MLLP] = server
    housekeeping = [asyncio.create_task(_expire_dedup_keys(inbox), name="dedup-expiry")]
    if audit is not None:
        app[audit_http.AUDIT] = audit
        if settings.audit.retention_days:
            housekeeping.append(asyncio.create_task(
                _audit_retention(audit, settings.audit.retention_days), name="audit-retention"))
    try:
        yield
    finally:
        for task in housekeeping:
            task.cancel()
        # Order matters: finish and answer what is in flight, then close the stores; the
        # audit log last, with a signed checkpoint over everything recorded.
        await server.stop(timeout=settings.server.shutdown_timeout)
        await inbox.close()
        if audit is not None:
            await audit.close()
        app[TELEMETRY].shutdown()


def audit_keys(settings: Settings, *, create: bool = False,
               need_data_keys: bool = True) -> AuditKeys:
    """The audit keys the settings name; `create` (serve only) generates missing defaults."""
    audit = settings.audit
    directory = settings.store.data_dir / KEYS_DIR
    keys, generated = load_keys(
        default_dir=directory,
        key_file=audit.key_file,
        keys_text=audit.keys.get_secret_value() if audit.keys else None,
        signing_key_file=audit.signing_key_file,
        signing_key_text=audit.signing_key.get_secret_value() if audit.signing_key else None,
        trusted_public_key_files=audit.trusted_public_key_files,
        create=create, need_data_keys=need_data_keys)
    if generated:
        log.warning("no audit keys configured: generated %s in %s (owner-only). Keep a copy "
                    "apart from the data, or set audit.key_file and audit.signing_key_file; "
                    "see README, Audit trail", " and ".join(p.name for p in generated),
                    directory)
    return keys


async def open_audit(settings: Settings, meter: metrics.Meter | None = None, *,
                     gateway: bool = True) -> AuditLog:
    """The audit log in the data dir: the gateway's (signing checkpoints) or a tool's."""
    audit = settings.audit
    return await AuditLog.open(
        settings.store.data_dir / AUDIT_FILE, audit_keys(settings, create=gateway),
        synchronous=settings.store.synchronous, max_batch=audit.max_batch,
        checkpoint_interval=audit.checkpoint_interval,
        checkpoint_every=audit.checkpoint_every,
        server=f"{settings.telemetry.service_name}@{socket.gethostname()}",
        meter=meter, checkpoints=gateway)


async def _audit_retention(audit: AuditLog, days: float) -> None:
    while True:
        try:
            await audit.purge(datetime.now(UTC) - timedelta(days=days))
        except Exception as exc:  # retried tomorrow; verify shows what is wrong
            log.error("audit retention purge failed: %s", type(exc).__name__)
        await asyncio.sleep(86_400)


def load_translator(settings: Settings) -> Translator:
    mapping = settings.mapping
    return Translator.load(mapping.tables_dir or SHIPPED, mapping.site_dir,
                           mapping.default_offset)


def _mllp_server(settings: Settings, inbox: SqliteInbox, telemetry: Telemetry,
                 translator: Translator, audit: AuditLog | None = None) -> MllpServer:
    mllp = settings.mllp
    tls = mllp.tls
    context = None
    check = None
    if tls.enabled:
        assert tls.cert_file is not None and tls.key_file is not None
        context = server_context(tls.cert_file, tls.key_file, tls.client_ca_file,
                                 tls.require_client_cert)
        if tls.allowed_senders:
            check = sender_check(
                SenderRule(s.subject, s.sending_application, s.sending_facility)
                for s in tls.allowed_senders)
    ingest = Ingest(inbox, telemetry, validation=mllp.validation,
                    default_charset=mllp.default_charset, sender_check=check,
                    translator=translator if settings.mapping.translate_on_ingest else None,
                    strict=settings.mapping.strict, audit=audit)
    return MllpServer(
        ingest,
        max_frame_bytes=mllp.max_frame_bytes,
        idle_timeout=mllp.idle_timeout,
        max_connections=mllp.max_connections,
        max_in_flight=mllp.max_in_flight_per_connection,
        max_buffered_bytes=mllp.max_buffered_bytes,
        ssl_context=context,
        meter=telemetry.meter,
    )


async def _expire_dedup_keys(inbox: SqliteInbox) -> None:
    while True:
        await asyncio.sleep(3600)
        try:
            await inbox.expire_dedup_keys()
        except Exception as exc:  # a failed housekeeping pass is retried next hour
            log.warning("duplicate-key expiry failed: %s", type(exc).__name__)


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; print the one `isthmus listening` line once both are up."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = build_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=settings.server.shutdown_timeout)
    await runner.setup()
    try:
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
