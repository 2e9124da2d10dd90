"""Configuration: one TOML file, environment overrides and CLI flags, validated once.

Precedence, lowest first: built-in defaults, the TOML file (`--config` or ISTHMUS_CONFIG),
environment variables `ISTHMUS_<SECTION>__<KEY>`, command-line flags. Every setting has a
default, so the gateway runs with no file at all.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.edge.dn import parse as parse_dn

ENV_PREFIX = "ISTHMUS_"
CONFIG_ENV = "ISTHMUS_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerConfig(_Section):
    host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65535)
    # SIGTERM/SIGINT: stop accepting, finish messages in flight, close the store, exit.
    shutdown_timeout: float = Field(default=8.0, gt=0, le=60)


class AllowedSender(_Section):
    """An mTLS client certificate subject and the MSH-3/MSH-4 it may send as."""

    subject: str = Field(min_length=1, description="e.g. 'CN=lab.example,O=Example Lab'")
    sending_application: str = Field(min_length=1)
    sending_facility: str = "*"
    # Connection slots kept for this subject alone (summed over its rules), so other
    # peers cannot take the last of mllp.max_connections.
    reserved_connections: int = Field(default=0, ge=0)

    @field_validator("subject")
    @classmethod
    def _rfc4514(cls, subject: str) -> str:
        parse_dn(subject)  # ValueError naming the offset: refused at start, not per message
        return subject


class TlsConfig(_Section):
    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    require_client_cert: bool = False
    allowed_senders: tuple[AllowedSender, ...] = ()

    @model_validator(mode="after")
    def _files_present(self) -> TlsConfig:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("cert_file and key_file are required when TLS is enabled")
        if self.require_client_cert and self.client_ca_file is None:
            raise ValueError("client_ca_file is required when require_client_cert is true")
        if self.allowed_senders and not self.require_client_cert:
            raise ValueError("allowed_senders needs require_client_cert = true")
        if self.enabled:
            for name in ("cert_file", "key_file", "client_ca_file"):
                path = getattr(self, name)
                if path is not None and not path.is_file():
                    raise ValueError(f"{name} {path} is not a readable file")
        return self


class MllpConfig(_Section):
    port: int = Field(default=2575, ge=0, le=65535)
    max_frame_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    # Unfinished frames held in memory across all connections; past it, the frame that
    # crossed the line is refused with AR ("resend later").
    max_buffered_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    idle_timeout: float = Field(default=300.0, gt=0)
    max_connections: int = Field(default=10_000, ge=1)
    # Frames read ahead of their ACK on one connection before we stop reading from it.
    max_in_flight_per_connection: int = Field(default=256, ge=1)
    # Slow senders (slow loris): a frame must end within frame_deadline seconds of its
    # first byte, and while it is open it must arrive at min_bytes_per_second at least,
    # measured over each rate_window seconds (0: no minimum). Violators are evicted.
    frame_deadline: float = Field(default=120.0, gt=0)
    min_bytes_per_second: float = Field(default=1024.0, ge=0)
    rate_window: float = Field(default=10.0, gt=0)
    default_charset: str = "utf-8"
    validation: Literal["header", "standard", "strict"] = "standard"
    tls: TlsConfig = TlsConfig()

    @model_validator(mode="after")
    def _buffer_holds_a_frame(self) -> MllpConfig:
        if self.max_buffered_bytes < self.max_frame_bytes:
            raise ValueError("max_buffered_bytes must be at least max_frame_bytes")
        return self

    @model_validator(mode="after")
    def _reservations_fit(self) -> MllpConfig:
        reserved = sum(s.reserved_connections for s in self.tls.allowed_senders)
        if reserved > self.max_connections:
            raise ValueError(f"tls.allowed_senders reserve {reserved} connections, more than "
                             f"max_connections ({self.max_connections})")
        return self

    @model_validator(mode="after")
    def _charset_known(self) -> MllpConfig:
        import codecs

        try:
            codecs.lookup(self.default_charset)
        except LookupError:
            raise ValueError(f"default_charset '{self.default_charset}' is not a known "
                             "character set") from None
        return self


class StoreConfig(_Section):
    data_dir: Path = Path("./var")
    # SQLite WAL: 'full' fsyncs the WAL on every (group) commit and survives power loss;
    # 'normal' survives a process crash but may lose the last commits on power loss.
    synchronous: Literal["normal", "full", "extra"] = "full"
    dedup_window_days: float = Field(default=7.0, gt=0)
    max_batch: int = Field(default=512, ge=1, le=2000)
    # The data dir holds PHI: created 0700 with files 0600, and a start refuses a directory
    # others may open. true: a group may read (0750/0640, e.g. for a backup agent).
    allow_group_read: bool = False


class MappingConfig(_Section):
    tables_dir: Path | None = Field(
        default=None, description="the mapping tables; default: the shipped mappings/")
    site_dir: Path | None = Field(
        default=None, description="a site's tables, replacing or adding shipped ones by name")
    default_offset: str = Field(
        default="+00:00", pattern=r"^[+-]\d{2}:\d{2}$",
        description="time-zone offset for local times when MSH-7 carries none")
    strict: bool = Field(
        default=False, description="validate every produced resource (slow; for new tables)")
    translate_on_ingest: bool = True


class AuditReviewer(_Section):
    """A credential for GET /audit/AuditEvent: a bearer token, stored only as its SHA-256."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")
    token_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$",
                              description="hex SHA-256 of the bearer token")
    roles: tuple[str, ...] = ("audit.read",)
    decrypt: bool = Field(default=False, description="may ask for PHI decrypted")


class AuditConfig(_Section):
    enabled: bool = True
    # Data keys (AES-256, for PHI in records): a key file, or the keys themselves (e.g.
    # ISTHMUS_AUDIT__KEYS="id:base64,id:base64"). Neither: <data_dir>/keys/, generated.
    key_file: Path | None = None
    keys: SecretStr | None = None
    # The Ed25519 key that signs checkpoints and exports: PEM file, or PEM/base64 text.
    signing_key_file: Path | None = None
    signing_key: SecretStr | None = None
    # Public keys of earlier signing keys, so checkpoints they signed still verify.
    trusted_public_key_files: tuple[Path, ...] = ()
    checkpoint_interval: float = Field(default=300.0, gt=0, le=86_400)
    checkpoint_every: int = Field(default=10_000, ge=1)
    # Records older than this are purged (the chain stays verifiable); 0 keeps everything.
    retention_days: float = Field(default=2190.0, ge=0)
    max_batch: int = Field(default=1024, ge=1, le=2900)
    reviewers: tuple[AuditReviewer, ...] = ()
    # Each signed checkpoint is also written here, outside the data dir (another mount,
    # append-only): a file gets one line a checkpoint, a directory one file a checkpoint.
    # `isthmus audit verify` reads it to catch a rolled-back or truncated audit.db.
    checkpoint_publish: Path | None = None
    # An HTTP(S) URL each signed checkpoint is POSTed to (a witness that keeps them).
    witness_url: str | None = Field(default=None, pattern=r"^https?://[^\s]+$")
    witness_timeout: float = Field(default=5.0, gt=0, le=60)

    @field_validator("key_file", "signing_key_file")
    @classmethod
    def _file_present(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path} is not a readable file")
        return path

    @field_validator("trusted_public_key_files")
    @classmethod
    def _files_present(cls, paths: tuple[Path, ...]) -> tuple[Path, ...]:
        for path in paths:
            cls._file_present(path)
        return paths

    @field_validator("reviewers")
    @classmethod
    def _names_unique(cls, reviewers: tuple[AuditReviewer, ...]) -> tuple[AuditReviewer, ...]:
        if len({r.name for r in reviewers}) != len(reviewers):
            raise ValueError("reviewer names must be unique")
        return reviewers


class FhirConfig(_Section):
    """The FHIR R4 REST edge at /fhir on the HTTP port."""

    enabled: bool = True
    # The public base URL (e.g. https://gw.example/fhir) for fullUrls and paging links;
    # empty: taken from each request's scheme and Host.
    base_url: str = ""
    # Checked before a body is parsed: size, then nesting depth and array lengths.
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_depth: int = Field(default=32, ge=4, le=256)
    max_array_items: int = Field(default=10_000, ge=10)
    default_count: int = Field(default=50, ge=1)
    max_count: int = Field(default=1000, ge=1)
    max_bundle_entries: int = Field(default=1000, ge=1)
    # Reads and searches in the audit trail: "durable" answers only once the record is
    # committed; "queued" answers as soon as the record is queued for the next group commit
    # (a crash may lose the last ~ms of read records; a failed commit makes the following
    # requests wait again); "off" records none. true/false mean durable/off.
    audit_reads: Literal["durable", "queued", "off"] = "durable"

    @field_validator("audit_reads", mode="before")
    @classmethod
    def _audit_reads_bool(cls, value: object) -> object:
        if isinstance(value, bool):
            return "durable" if value else "off"
        return value
    # Requests per second each client may make (token bucket, burst = 2 s worth); 0: off.
    rate_limit_per_client: float = Field(default=0.0, ge=0)


class ClientConfig(_Section):
    """A registered SMART Backend Services client ([[auth.clients]])."""

    client_id: str = Field(min_length=1, max_length=128)
    jwks_file: Path | None = None
    public_key_file: Path | None = None
    # The kid the client's assertions name for public_key_file; unset: the one key is
    # tried whatever kid an assertion names (SMART requires clients to send a kid).
    kid: str | None = Field(default=None, min_length=1, max_length=256)
    scopes: tuple[str, ...] = ()
    profile: str | None = None
    # A client acting for one patient (e.g. a patient-facing service): its patient/ scopes
    # are confined to this patient's compartment ('Patient/123' or '123').
    patient: str | None = Field(default=None, pattern=r"^(Patient/)?[A-Za-z0-9\-.]{1,64}$")

    @model_validator(mode="after")
    def _one_key_source(self) -> ClientConfig:
        if (self.jwks_file is None) == (self.public_key_file is None):
            raise ValueError("give exactly one of jwks_file or public_key_file")
        if self.kid is not None and self.public_key_file is None:
            raise ValueError("kid goes with public_key_file (a JWKS names its own kids)")
        for path in (self.jwks_file, self.public_key_file):
            if path is not None and not path.is_file():
                raise ValueError(f"{path} is not a readable file")
        return self


class IssuerConfig(_Section):
    """An external authorization server whose access tokens are accepted ([[auth.issuers]])."""

    issuer: str = Field(min_length=1)
    jwks_file: Path
    audience: str = Field(min_length=1)
    # The claim naming the client (defaults to client_id, then azp, then sub).
    client_claim: str = "client_id"
    # Scopes the issuer may grant through this gateway; a token's scopes are cut to these.
    allowed_scopes: tuple[str, ...] = ("system/*.rs",)
    profile: str | None = None

    @field_validator("jwks_file")
    @classmethod
    def _file_present(cls, path: Path) -> Path:
        if not path.is_file():
            raise ValueError(f"{path} is not a readable file")
        return path


class ApiKeyConfig(_Section):
    """A static API key ([[auth.api_keys]]), stored only as its SHA-256."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")
    key_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    scopes: tuple[str, ...] = ()
    profile: str | None = None


class AuthConfig(_Section):
    # Without credentials every FHIR request but metadata answers 401, unless this is set.
    anonymous: bool = False
    anonymous_scopes: tuple[str, ...] = ("system/*.rs",)
    token_lifetime: int = Field(default=300, ge=30, le=300)
    # The issuer and audience of our own access tokens; empty: derived from the request.
    issuer: str = ""
    # EC P-384 key signing our access tokens (PEM); none: generated in <data_dir>/keys.
    signing_key_file: Path | None = None
    clients: tuple[ClientConfig, ...] = ()
    issuers: tuple[IssuerConfig, ...] = ()
    api_keys: tuple[ApiKeyConfig, ...] = ()

    @model_validator(mode="after")
    def _unique_names(self) -> AuthConfig:
        ids = [c.client_id for c in self.clients] + [k.name for k in self.api_keys]
        if len(set(ids)) != len(ids):
            raise ValueError("client ids and API key names must be unique")
        return self


_NAME = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
LOCAL_BACKEND = "local"


class BackendAuthConfig(_Section):
    """How the gateway authenticates to a backend (outbound): nothing, OAuth2 client
    credentials, SMART Backend Services (private_key_jwt) or an API key header."""

    kind: Literal["none", "client-credentials", "smart-backend", "api-key"] = "none"
    client_id: str = ""
    client_secret: SecretStr | None = None
    # client-credentials: where the secret goes (RFC 6749 2.3.1).
    method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    private_key_file: Path | None = None
    # smart-backend: RS384 for an RSA key, ES384 for a P-384 key (default: from the key).
    algorithm: Literal["RS384", "ES384"] | None = None
    key_id: str = ""
    token_url: str = ""
    scopes: str = ""
    # Refresh this many seconds before the token expires.
    refresh_margin: float = Field(default=60.0, ge=0)
    # api-key: the header and its value.
    header: str = "X-API-Key"
    key: SecretStr | None = None

    @model_validator(mode="after")
    def _complete(self) -> BackendAuthConfig:
        if self.kind == "client-credentials" and not (
                self.client_id and self.client_secret and self.token_url):
            raise ValueError("client-credentials needs client_id, client_secret and token_url")
        if self.kind == "smart-backend" and not (
                self.client_id and self.private_key_file and self.token_url):
            raise ValueError("smart-backend needs client_id, private_key_file and token_url")
        if self.kind == "api-key" and self.key is None:
            raise ValueError("api-key needs key")
        return self


class BackendConfig(_Section):
    """One place writes and requests go: a remote FHIR server, an MLLP system, the store."""

    name: str = Field(pattern=_NAME)
    kind: Literal["fhir", "mllp", "local"]
    # fhir: the server's base URL; mllp: host and port.
    base_url: str = ""
    host: str = ""
    port: int = Field(default=0, ge=0, le=65535)
    auth: BackendAuthConfig = BackendAuthConfig()
    # Token bucket: "5000/hour", "50/minute", "10/second"; "" is unlimited.
    rate_limit: str = Field(default="", pattern=r"^(|\d+(\.\d+)?/(second|minute|hour|day))$")
    # Plain http:// to a non-loopback host, or TLS without verification, only with this.
    allow_insecure_http: bool = False
    verify_tls: bool = True
    tls: bool = False  # mllp: connect with TLS (fhir: from the https:// scheme)
    ca_file: Path | None = None
    client_cert_file: Path | None = None  # mTLS
    client_key_file: Path | None = None
    connect_timeout: float = Field(default=5.0, gt=0, le=120)
    read_timeout: float = Field(default=30.0, gt=0, le=600)
    max_concurrency: int = Field(default=8, ge=1, le=1024)  # the bulkhead
    # Retries of one idempotent request (facade) and backoff (full jitter) between them.
    max_retries: int = Field(default=2, ge=0, le=10)
    backoff_base: float = Field(default=0.2, ge=0)
    backoff_max: float = Field(default=30.0, gt=0)
    # Longest Retry-After honoured within one request; beyond it the caller gets the 503.
    max_retry_after: float = Field(default=5.0, ge=0)
    breaker_failures: int = Field(default=5, ge=1, le=1000)
    breaker_reset: float = Field(default=30.0, gt=0)
    # Outbox: attempts before a delivery is dead-lettered, and how many may wait.
    max_attempts: int = Field(default=12, ge=1, le=1000)
    retry_max_delay: float = Field(default=300.0, gt=0)
    outbox_cap: int = Field(default=100_000, ge=1)
    # FHIR facade: the read-through cache's lifetime in seconds (0: off) and its size.
    cache_ttl: float = Field(default=30.0, ge=0)
    cache_entries: int = Field(default=10_000, ge=0)
    # A vendor normalisation table under mappings/vendors/ (e.g. "epic"), "" for none.
    vendor: str = Field(default="", pattern=r"^[a-z0-9_-]{0,32}$")

    @model_validator(mode="after")
    def _addressed(self) -> BackendConfig:
        if self.kind == "fhir":
            if not self.base_url.startswith(("http://", "https://")):
                raise ValueError(f"backend '{self.name}': base_url must be an http(s) URL")
            if self.base_url.startswith("http://") and not (
                    self.allow_insecure_http or _loopback_url(self.base_url)):
                raise ValueError(f"backend '{self.name}': plain http:// needs "
                                 "allow_insecure_http = true (or a loopback host)")
        if self.kind == "mllp" and not (self.host and self.port):
            raise ValueError(f"backend '{self.name}': an mllp backend needs host and port")
        if not self.verify_tls and not self.allow_insecure_http:
            raise ValueError(f"backend '{self.name}': verify_tls = false needs "
                             "allow_insecure_http = true")
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError(f"backend '{self.name}': client_cert_file and client_key_file "
                             "go together")
        return self

    @property
    def insecure(self) -> bool:
        """Plain http or unverified TLS: allowed, and warned about at start-up."""
        return (self.kind == "fhir" and self.base_url.startswith("http://")
                and not _loopback_url(self.base_url)) or not self.verify_tls


def _loopback_url(url: str) -> bool:
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


class RouteMatch(_Section):
    """What a route applies to: HL7 messages (type, sender) or FHIR requests (type,
    interaction). Patterns are shell-style (`ADT^*`, `ORU^R0?`); "" matches anything."""

    message: str = ""
    sender: str = ""    # MSH-3 sending application
    facility: str = ""  # MSH-4 sending facility
    resource: str = ""
    interaction: Literal["", "read", "vread", "search", "history", "create", "update",
                         "delete", "write", "*"] = ""

    @model_validator(mode="after")
    def _one_kind(self) -> RouteMatch:
        hl7 = bool(self.message or self.sender or self.facility)
        fhir = bool(self.resource or self.interaction)
        if hl7 == fhir:
            raise ValueError("a route matches HL7 messages (message, sender, facility) or "
                             "FHIR requests (resource, interaction), not both or neither")
        return self


class RouteConfig(_Section):
    match: RouteMatch
    to: tuple[str, ...] = Field(min_length=1)


class ForwardConfig(_Section):
    """How the outbox delivers: the sweep for due retries and when delivered rows go."""

    poll_interval: float = Field(default=1.0, gt=0, le=60)
    keep_delivered_days: float = Field(default=7.0, ge=0)


class TelemetryConfig(_Section):
    exporter: Literal["none", "console", "otlp"] = "none"
    otlp_endpoint: str = "http://127.0.0.1:4318"
    service_name: str = "isthmus"
    # GET /metrics in the Prometheus text format (open, like /healthz; no PHI in it).
    prometheus: bool = True


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(_Section):
    server: ServerConfig = ServerConfig()
    mllp: MllpConfig = MllpConfig()
    store: StoreConfig = StoreConfig()
    mapping: MappingConfig = MappingConfig()
    audit: AuditConfig = AuditConfig()
    fhir: FhirConfig = FhirConfig()
    auth: AuthConfig = AuthConfig()
    # Minimum-necessary task profiles: profile -> resource type -> elements it may see
    # (["*"]: the whole resource). A type a profile does not list is refused.
    profiles: dict[str, dict[str, tuple[str, ...]]] = {}
    telemetry: TelemetryConfig = TelemetryConfig()
    log: LogConfig = LogConfig()
    backends: tuple[BackendConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    forward: ForwardConfig = ForwardConfig()

    @model_validator(mode="after")
    def _profiles_exist(self) -> Settings:
        named = [c.profile for c in self.auth.clients] + [
            i.profile for i in self.auth.issuers] + [k.profile for k in self.auth.api_keys]
        for profile in named:
            if profile is not None and profile not in self.profiles:
                raise ValueError(f"auth: profile '{profile}' is not defined under [profiles]")
        return self

    @model_validator(mode="after")
    def _routes_reach_backends(self) -> Settings:
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise ValueError("backends: names must be unique")
        known = set(names) | {LOCAL_BACKEND}
        kinds = {b.name: b.kind for b in self.backends}
        for index, route in enumerate(self.routes):
            for name in route.to:
                if name not in known:
                    raise ValueError(f"routes[{index}]: backend '{name}' is not defined "
                                     "under [[backends]]")
                if route.match.resource and kinds.get(name) == "mllp":
                    raise ValueError(f"routes[{index}]: FHIR requests cannot go to the "
                                     f"mllp backend '{name}'")
        return self


class ConfigError(Exception):
    """A configuration problem, naming the key and the reason."""


def load_settings(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings from file, environment and flag overrides (dotted keys)."""
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    source = "defaults"
    file_path = path or (Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None)
    if file_path is not None:
        data = _read_toml(file_path)
        source = str(file_path)
    for dotted, value in _env_overrides(env).items():
        _put(data, dotted, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _put(data, dotted, value)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV or "__" not in name:
            continue
        dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
        found[dotted] = _env_value(raw)
    return found


def _env_value(raw: str) -> Any:
    """Read an environment value as a TOML value when it is one (42, true, [..]), else text."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _put(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def _describe(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        reason = err["msg"]
        if err["type"] == "extra_forbidden":
            reason = "unknown setting"
        lines.append(f"config error: {key}: {reason} (from {source})")
    return "\n".join(lines)
