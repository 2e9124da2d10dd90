"""Composition: wire settings into one aiohttp application that hosts every listener."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from opentelemetry import metrics

from gateway.audit import AUDIT_FILE, Action, AuditKeys, AuditLog, AuditRecord, load_keys
from gateway.config import (
    BackendAuthConfig,
    BackendConfig,
    ClientConfig,
    IssuerConfig,
    Settings,
)
from gateway.edge import audit_http, fhir_errors, fhir_http, http
from gateway.edge.auth import (
    ApiKey,
    Authenticator,
    ExternalIssuer,
    checked_scopes,
    install_auth,
)
from gateway.edge.auth_server import SIGNING_KEY_FILE as TOKEN_SIGNING_KEY_FILE
from gateway.edge.auth_server import (
    AuthorizationServer,
    AuthSetupError,
    Client,
    TokenHook,
    load_signing_key,
)
from gateway.edge.fhir_api import FHIR, FhirApi, FhirLimits
from gateway.edge.fhir_proxy import Facade
from gateway.edge.ingest import Ingest
from gateway.edge.mllp import MllpServer
from gateway.edge.tls import SenderRule, sender_check, server_context
from gateway.fhir.search import TABLE as SEARCH_TABLE
from gateway.fhir.search import SearchRegistry
from gateway.forward.backend import Backend
from gateway.forward.cache import ReadCache
from gateway.forward.fhir_backend import FhirBackend, FhirBackendSpec, client_tls_context
from gateway.forward.local import LocalApplier
from gateway.forward.mllp_backend import MllpBackend, MllpBackendSpec
from gateway.forward.normalize import load_vendor
from gateway.forward.outbound_auth import AuthSpec
from gateway.forward.outbox import DeliveryPolicy, Dispatcher
from gateway.forward.routes import LOCAL, Route, Router
from gateway.hl7.definitions import preload as preload_definitions
from gateway.mapping.engine import Translator
from gateway.mapping.tables import SHIPPED
from gateway.policy import KeySet, load_jwks, patient_reference, public_key_from_pem
from gateway.policy.profiles import Profile, load_profiles
from gateway.store import SqliteInbox
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.outbox import SqliteOutbox
from gateway.telemetry import Telemetry, configure

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
TELEMETRY = http.TELEMETRY  # the edge's /metrics route reads it too
MLLP = web.AppKey("mllp", MllpServer)
MLLP_ADDRESS = web.AppKey("mllp_address", tuple)
TRANSLATOR = web.AppKey("translator", Translator)
APPLIER = web.AppKey("applier", LocalApplier)
PROFILES = web.AppKey("profiles", dict[str, Profile])

INBOX_FILE = "inbox.db"
FHIR_FILE = "fhir.db"
KEYS_DIR = "keys"


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
    app[audit_http.REVIEWERS] = tuple(
        audit_http.Reviewer(r.name, bytes.fromhex(r.token_sha256), frozenset(r.roles),
                            r.decrypt) for r in settings.audit.reviewers)
    # The profiles are checked against the R4 model now: a typo stops the start.
    app[PROFILES] = load_profiles(settings.profiles)
    setup_auth(app, settings, on_token=_token_auditor(app))
    if settings.fhir.enabled:
        app.add_routes(fhir_http.routes)
    app.cleanup_ctx.append(_store_and_mllp)
    return app


def setup_auth(app: web.Application, settings: Settings, *,
               on_token: TokenHook | None = None) -> None:
    """The authorization server and authenticator from the `auth` settings, on the app."""
    auth = settings.auth
    default_key = settings.store.data_dir / KEYS_DIR / TOKEN_SIGNING_KEY_FILE
    if auth.signing_key_file is None and not auth.clients and not default_key.exists():
        # No registered client, so no token is ever issued: no key file to create.
        signing_key = ec.generate_private_key(ec.SECP384R1())
    else:
        signing_key = load_signing_key(auth.signing_key_file, settings.store.data_dir)
    server = AuthorizationServer(
        [_client(i, c) for i, c in enumerate(auth.clients)], signing_key, issuer=auth.issuer,
        fhir_base=settings.fhir.base_url, token_lifetime=auth.token_lifetime,
        on_token=on_token)
    api_keys = [ApiKey(k.name, bytes.fromhex(k.key_sha256),
                       checked_scopes(k.scopes, f"auth.api_keys[{i}]"), k.profile)
                for i, k in enumerate(auth.api_keys)]
    anonymous = (checked_scopes(auth.anonymous_scopes, "auth.anonymous_scopes")
                 if auth.anonymous else None)
    install_auth(app, server, Authenticator(
        server, issuers=[_issuer(i, c) for i, c in enumerate(auth.issuers)],
        api_keys=api_keys, anonymous=anonymous))


def _token_auditor(app: web.Application) -> TokenHook:
    """Every token issued or refused goes into the audit trail (the log opens later)."""
    async def record(client_id: str, outcome: str, peer: str) -> None:
        audit = app.get(audit_http.AUDIT)
        if audit is not None:
            await audit.record(AuditRecord(Action.TOKEN, outcome, client_id=client_id,
                                           peer=peer))
    return record


def _client(index: int, config: ClientConfig) -> Client:
    where = f"auth.clients[{index}] ({config.client_id})"
    try:
        if config.jwks_file is not None:
            keys = load_jwks(config.jwks_file)
        else:
            assert config.public_key_file is not None  # config guarantees exactly one
            keys = KeySet.of(public_key_from_pem(config.public_key_file.read_bytes()))
    except (OSError, ValueError) as exc:
        raise AuthSetupError(f"{where}: {exc}") from None
    checked_scopes(config.scopes, where)
    patient = patient_reference(config.patient) if config.patient else None
    return Client(config.client_id, keys, config.scopes, config.profile, patient)


def _issuer(index: int, config: IssuerConfig) -> ExternalIssuer:
    where = f"auth.issuers[{index}] ({config.issuer})"
    try:
        keys = load_jwks(config.jwks_file)
    except ValueError as exc:
        raise AuthSetupError(f"{where}: {exc}") from None
    checked_scopes(config.allowed_scopes, where)
    return ExternalIssuer(config.issuer, keys, config.audience, config.client_claim,
                          config.allowed_scopes, config.profile)


def search_registry(settings: Settings) -> SearchRegistry:
    """The search parameter table: the site's copy if it has one, else the shipped one."""
    mapping = settings.mapping
    site = mapping.site_dir / SEARCH_TABLE if mapping.site_dir is not None else None
    if site is not None and site.is_file():
        return SearchRegistry.load(site)
    return SearchRegistry.load((mapping.tables_dir or SHIPPED) / SEARCH_TABLE)


def build_router(settings: Settings) -> Router:
    """The [[routes]] as a Router; a backend of kind "local" is the local store."""
    local = {b.name for b in settings.backends if b.kind == "local"} | {LOCAL}
    routes = tuple(
        Route(to=tuple(dict.fromkeys(LOCAL if name in local else name for name in r.to)),
              **r.match.model_dump())
        for r in settings.routes)
    return Router(routes, {b.name: b.kind for b in settings.backends if b.kind != "local"})


def _warn_if_insecure(backend: BackendConfig) -> None:
    if backend.insecure:
        log.warning("backend '%s' is reached without TLS verification (plain http or "
                    "verify_tls = false): allowed by allow_insecure_http; do not use this "
                    "with real patient data", backend.name)


def fhir_limits(settings: Settings) -> FhirLimits:
    fhir = settings.fhir
    return FhirLimits(
        base_url=fhir.base_url, max_body_bytes=fhir.max_body_bytes, max_depth=fhir.max_depth,
        max_array_items=fhir.max_array_items, default_count=fhir.default_count,
        max_count=fhir.max_count, max_bundle_entries=fhir.max_bundle_entries,
        audit_reads=fhir.audit_reads, rate_limit_per_client=fhir.rate_limit_per_client)


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
    registry = await asyncio.get_running_loop().run_in_executor(
        None, search_registry, settings)
    try:
        fhir_store = await SqliteFhirStore.open(store.data_dir / FHIR_FILE, registry.index,
                                                synchronous=store.synchronous)
    except BaseException:
        await inbox.close()
        if audit is not None:
            await audit.close()
        raise
    try:
        forwarding = await open_forwarding(settings, inbox, app[TELEMETRY])
    except BaseException:
        await fhir_store.close()
        await inbox.close()
        if audit is not None:
            await audit.close()
        raise
    app[FORWARDING] = forwarding
    profiles: dict[str, Profile] = app[PROFILES]
    app[FHIR] = FhirApi.build(
        fhir_store, registry, app[TELEMETRY], fhir_limits(settings), profiles, audit,
        facade=forwarding.facade)
    applier = None
    if settings.fhir.enabled and settings.mapping.translate_on_ingest:
        applier = LocalApplier(fhir_store, registry, inbox, app[TRANSLATOR])
        applier.start()
        app[APPLIER] = applier
    try:
        server = _mllp_server(settings, inbox, app[TELEMETRY], app[TRANSLATOR], audit,
                              applier, forwarding)
        app[MLLP_ADDRESS] = await server.start(settings.server.host, settings.mllp.port)
    except BaseException:
        if applier is not None:
            await applier.close()
        await forwarding.close()
        await fhir_store.close()
        await inbox.close()
        if audit is not None:
            await audit.close()
        raise
    app[MLLP] = server
    housekeeping = [asyncio.create_task(_expire_dedup_keys(inbox), name="dedup-expiry")]
    if forwarding.dispatcher is not None and settings.forward.keep_delivered_days:
        housekeeping.append(asyncio.create_task(_purge_delivered(
            SqliteOutbox(inbox.connection), settings.forward.keep_delivered_days),
            name="outbox-purge"))
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
        if applier is not None:
            await applier.close()
        # Before the inbox: the outbox shares its connection. Pending rows stay pending.
        await forwarding.close()
        await fhir_store.close()
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
                 translator: Translator, audit: AuditLog | None = None,
                 applier: LocalApplier | None = None,
                 forwarding: Forwarding | None = None) -> MllpServer:
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
                    strict=settings.mapping.strict, audit=audit,
                    applied=applier.submit if applier is not None else None,
                    router=forwarding.router if forwarding and settings.routes else None,
                    outbox=forwarding.dispatcher if forwarding else None)
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


# -- forwarding ------------------------------------------------------------------------------


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


FORWARDING = web.AppKey("forwarding", Forwarding)


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
                SqliteOutbox(inbox.connection), forwarding.backends,
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


def auth_spec(config: BackendAuthConfig) -> AuthSpec:
    return AuthSpec(
        kind=config.kind, client_id=config.client_id,
        client_secret=(config.client_secret.get_secret_value()
                       if config.client_secret is not None else None),
        method=config.method, private_key_file=config.private_key_file,
        algorithm=config.algorithm, key_id=config.key_id, token_url=config.token_url,
        scopes=config.scopes, refresh_margin=config.refresh_margin, header=config.header,
        key=config.key.get_secret_value() if config.key is not None else None)


def fhir_backend_spec(config: BackendConfig) -> FhirBackendSpec:
    return FhirBackendSpec(
        name=config.name, base_url=config.base_url, auth=auth_spec(config.auth),
        rate_limit=config.rate_limit, verify_tls=config.verify_tls,
        allow_insecure_http=config.allow_insecure_http, ca_file=config.ca_file,
        client_cert_file=config.client_cert_file, client_key_file=config.client_key_file,
        connect_timeout=config.connect_timeout, read_timeout=config.read_timeout,
        max_concurrency=config.max_concurrency, max_retries=config.max_retries,
        backoff_base=config.backoff_base, backoff_max=config.backoff_max,
        max_retry_after=config.max_retry_after, breaker_failures=config.breaker_failures,
        breaker_reset=config.breaker_reset)


def mllp_backend_spec(config: BackendConfig) -> MllpBackendSpec:
    return MllpBackendSpec(
        name=config.name, host=config.host, port=config.port,
        ssl_context=client_tls_context(config.ca_file, config.verify_tls,
                                       config.client_cert_file, config.client_key_file)
        if config.tls else None,
        connect_timeout=config.connect_timeout, ack_timeout=config.read_timeout,
        breaker_failures=config.breaker_failures, breaker_reset=config.breaker_reset,
        rate_limit=config.rate_limit)


def delivery_policy(config: BackendConfig) -> DeliveryPolicy:
    return DeliveryPolicy(
        max_attempts=config.max_attempts, retry_base=config.backoff_base,
        retry_max_delay=config.retry_max_delay, outbox_cap=config.outbox_cap,
        concurrency=1 if config.kind == "mllp" else config.max_concurrency)


async def _purge_delivered(outbox: SqliteOutbox, days: float) -> None:
    while True:
        try:
            await outbox.purge_delivered(datetime.now(UTC) - timedelta(days=days))
        except Exception as exc:  # retried in an hour
            log.warning("outbox purge failed: %s", type(exc).__name__)
        await asyncio.sleep(3600)
