"""Settings of the two listeners: the HTTP server, MLLP and its TLS, the FHIR API."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from gateway.config.base import Section as _Section


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
        # Imported here: the DN parser loads cryptography's x509, which a command that
        # reads the settings but never a certificate (`isthmus translate`) need not pay.
        from gateway.edge.dn import parse as parse_dn

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
    # Search parameters the server does not know: FHIR's default is to ignore them (and
    # leave them out of the self link); "strict" refuses them with 400. A request's
    # `Prefer: handling=strict|lenient` overrides this either way.
    search_handling: Literal["lenient", "strict"] = "lenient"
