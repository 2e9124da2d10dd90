"""Settings of where messages go: backends, routes, the outbox."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from gateway.config.base import Section as _Section
from gateway.config.webhooks import InboundWebhookConfig

_NAME = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
LOCAL_BACKEND = "local"
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


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
    # fhir: other host names of the same server ("host" or "host:port"); a link in an
    # answer on one of them is the server's own, like one on base_url.
    aliases: tuple[str, ...] = Field(default=(), max_length=32)
    # fhir: what the facade does with an answer that is not valid R4: "repair" the
    # vendor table's known quirks and refuse what is still invalid (502), "pass" it on
    # (counted), "reject" it (502 naming the element).
    validation: Literal["repair", "pass", "reject"] = "pass"
    # fhir: the change notifications it sends to POST /webhooks/<name> (docs/webhooks-in.md).
    webhook: InboundWebhookConfig | None = None

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
        for alias in self.aliases:
            if not _HOST.fullmatch(alias):
                raise ValueError(f"backend '{self.name}': an alias is a host name, "
                                 "optionally with :port (no scheme, no path)")
        if self.webhook is not None and self.kind != "fhir":
            raise ValueError(f"backend '{self.name}': only a fhir backend sends webhooks "
                             "(the gateway fetches what changed from it)")
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
