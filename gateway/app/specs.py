"""Settings turned into what each layer takes: specs, limits and checks (the tables:
`tables`).

Pure conversions (files are read where a setting names one): the layers below never see
the configuration models, and `gateway.app` only wires what these return.
"""

from __future__ import annotations

import ssl

from gateway.config import (
    BackendAuthConfig,
    BackendConfig,
    ClientConfig,
    IssuerConfig,
    Settings,
)
from gateway.edge import audit_http
from gateway.edge.auth import ExternalIssuer, checked_scopes
from gateway.edge.auth_server import AuthSetupError, Client
from gateway.edge.fhir_api import FhirLimits
from gateway.edge.tls import (
    Reservations,
    SenderRule,
    reservations,
    sender_check,
    server_context,
)
from gateway.forward.fhir_backend import FhirBackendSpec, client_tls_context
from gateway.forward.mllp_backend import MllpBackendSpec
from gateway.forward.outbound_auth import AuthSpec
from gateway.forward.outbox import DeliveryPolicy
from gateway.forward.routes import LOCAL, Route, Router
from gateway.ingest.handler import IngestOptions
from gateway.ingest.protocol import SenderCheck
from gateway.policy.jose import KeySet, load_jwks, public_key_from_pem
from gateway.policy.principal import patient_reference
from gateway.store.pg.connect import PgSpec, tls_context

# -- the store ---------------------------------------------------------------------------------


def pg_spec(settings: Settings) -> PgSpec:
    """store.backend = "postgresql": the database the settings name (certificates read)."""
    store = settings.store
    assert store.url is not None  # the config refuses postgresql without a url

    def path(value: object) -> str | None:
        return str(value) if value is not None else None

    return PgSpec(
        url=store.url.get_secret_value(), schema=store.schema_name,
        pool_min_size=store.pool_min_size, pool_max_size=store.pool_max_size,
        connect_timeout=store.connect_timeout, statement_timeout=store.statement_timeout,
        ssl=tls_context(store.sslmode, path(store.sslrootcert), path(store.sslcert),
                        path(store.sslkey)))


# -- routing -----------------------------------------------------------------------------------


def build_router(settings: Settings) -> Router:
    """The [[routes]] as a Router; a backend of kind "local" is the local store."""
    local = {b.name for b in settings.backends if b.kind == "local"} | {LOCAL}
    routes = tuple(
        Route(to=tuple(dict.fromkeys(LOCAL if name in local else name for name in r.to)),
              **r.match.model_dump())
        for r in settings.routes)
    return Router(routes, {b.name: b.kind for b in settings.backends if b.kind != "local"})


# -- the MLLP listener -----------------------------------------------------------------------


def mllp_tls(settings: Settings) -> tuple[ssl.SSLContext | None, SenderCheck | None]:
    """The listener's TLS context and, with an allow-list, the check of each sender."""
    tls = settings.mllp.tls
    if not tls.enabled:
        return None, None
    assert tls.cert_file is not None and tls.key_file is not None
    context = server_context(tls.cert_file, tls.key_file, tls.client_ca_file,
                             tls.require_client_cert)
    check = None
    if tls.allowed_senders:
        check = sender_check(
            SenderRule(s.subject, s.sending_application, s.sending_facility)
            for s in tls.allowed_senders)
    return context, check


def mllp_reservations(settings: Settings) -> Reservations | None:
    """Connection slots the allow-list keeps for named senders (None: none reserved)."""
    tls = settings.mllp.tls
    if not tls.enabled:
        return None
    return reservations(
        SenderRule(s.subject, s.sending_application, s.sending_facility,
                   s.reserved_connections)
        for s in tls.allowed_senders)


def ingest_options(settings: Settings, check: SenderCheck | None = None) -> IngestOptions:
    mllp = settings.mllp
    return IngestOptions(validation=mllp.validation, default_charset=mllp.default_charset,
                         strict=settings.mapping.strict, sender_check=check,
                         budget_bytes=settings.processes.memory_budget_bytes,
                         offload_bytes=settings.processes.offload_bytes,
                         patient_keys=settings.store.backend == "postgresql")


# -- the FHIR API and its callers --------------------------------------------------------------


def fhir_limits(settings: Settings) -> FhirLimits:
    fhir = settings.fhir
    return FhirLimits(
        base_url=fhir.base_url, max_body_bytes=fhir.max_body_bytes, max_depth=fhir.max_depth,
        max_array_items=fhir.max_array_items, default_count=fhir.default_count,
        max_count=fhir.max_count, max_bundle_entries=fhir.max_bundle_entries,
        audit_reads=fhir.audit_reads, rate_limit_per_client=fhir.rate_limit_per_client,
        search_handling=fhir.search_handling)


def reviewers(settings: Settings) -> tuple[audit_http.Reviewer, ...]:
    return tuple(
        audit_http.Reviewer(r.name, bytes.fromhex(r.token_sha256), frozenset(r.roles),
                            r.decrypt) for r in settings.audit.reviewers)


def client(index: int, config: ClientConfig) -> Client:
    """A registered client (`auth.clients[index]`), its keys read and scopes checked."""
    where = f"auth.clients[{index}] ({config.client_id})"
    try:
        if config.jwks_file is not None:
            keys = load_jwks(config.jwks_file)
        else:
            assert config.public_key_file is not None  # config guarantees exactly one
            keys = KeySet.of(public_key_from_pem(config.public_key_file.read_bytes()),
                             config.kid)
    except (OSError, ValueError) as exc:
        raise AuthSetupError(f"{where}: {exc}") from None
    checked_scopes(config.scopes, where)
    patient = patient_reference(config.patient) if config.patient else None
    return Client(config.client_id, keys, config.scopes, config.profile, patient)


def issuer(index: int, config: IssuerConfig) -> ExternalIssuer:
    """A trusted external token issuer (`auth.issuers[index]`), its keys read."""
    where = f"auth.issuers[{index}] ({config.issuer})"
    try:
        keys = load_jwks(config.jwks_file)
    except ValueError as exc:
        raise AuthSetupError(f"{where}: {exc}") from None
    checked_scopes(config.allowed_scopes, where)
    return ExternalIssuer(config.issuer, keys, config.audience, config.client_claim,
                          config.allowed_scopes, config.profile)


# -- backends --------------------------------------------------------------------------------


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
        breaker_reset=config.breaker_reset, aliases=config.aliases,
        validation=config.validation)


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
