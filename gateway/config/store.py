"""Settings of what the gateway keeps: the data dir, the mapping tables, the audit trail."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from gateway.config.base import Section as _Section

# libpq's sslmode values: disable, allow and prefer may fall back to plain TCP; require
# encrypts without checking the server; verify-ca checks its certificate against
# sslrootcert; verify-full also checks the host name.
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


class StoreConfig(_Section):
    # `schema` in the file (the attribute has another name: pydantic models own `schema`);
    # by name too, so that a dumped Settings validates again.
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    # sqlite: the embedded files in data_dir (one gateway). postgresql: the database at
    # `url`, shared by every instance behind a load balancer (docs/deployment.md).
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    # postgresql://user[:password]@host:5432/db; a password belongs in ISTHMUS_STORE__URL.
    url: SecretStr | None = None
    # The tables live in this schema (created if absent); several deployments may share
    # one database with a schema each.
    schema_name: str = Field(default="public", alias="schema",
                             pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    pool_min_size: int = Field(default=2, ge=0, le=100)
    pool_max_size: int = Field(default=10, ge=1, le=500)
    # Seconds: to connect, and for any one statement (a hung database answers AR/503).
    connect_timeout: float = Field(default=5.0, gt=0, le=120)
    statement_timeout: float = Field(default=30.0, gt=0, le=3600)
    sslmode: SslMode = "prefer"
    sslrootcert: Path | None = None
    sslcert: Path | None = None
    sslkey: Path | None = None
    # The data dir still holds each instance's lock, keys and (sqlite) files.
    data_dir: Path = Path("./var")
    # SQLite WAL: 'full' fsyncs the WAL on every (group) commit and survives power loss;
    # 'normal' survives a process crash but may lose the last commits on power loss.
    synchronous: Literal["normal", "full", "extra"] = "full"
    dedup_window_days: float = Field(default=7.0, gt=0)
    max_batch: int = Field(default=512, ge=1, le=2000)
    # The data dir holds PHI: created 0700 with files 0600, and a start refuses a directory
    # others may open. true: a group may read (0750/0640, e.g. for a backup agent).
    allow_group_read: bool = False

    @model_validator(mode="after")
    def _url_for_postgresql(self) -> StoreConfig:
        if self.backend == "postgresql":
            url = self.url.get_secret_value() if self.url is not None else ""
            if not url.startswith(("postgresql://", "postgres://")):
                raise ValueError("store.backend = \"postgresql\" needs store.url = "
                                 "\"postgresql://user@host:5432/db\" (or ISTHMUS_STORE__URL)")
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("store.pool_min_size is larger than store.pool_max_size")
        for name in ("sslrootcert", "sslcert", "sslkey"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"store.{name}: {path} is not a readable file")
        if (self.sslcert is None) != (self.sslkey is None):
            raise ValueError("store.sslcert and store.sslkey go together")
        if self.sslmode in ("verify-ca", "verify-full") and self.sslrootcert is None:
            raise ValueError(f"store.sslmode = \"{self.sslmode}\" needs store.sslrootcert")
        return self


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
