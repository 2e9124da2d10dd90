"""Settings of who may call: SMART clients, trusted token issuers, API keys."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from gateway.config.base import Section as _Section


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
