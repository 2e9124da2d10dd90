"""Connecting to PostgreSQL: the pool every store of one gateway shares, set up the way
they need it (the schema on the search path, a statement timeout).

asyncpg's pool hands each caller a connection of its own; a connection that broke (the
database restarted, a proxy dropped it) is replaced on the next acquire, so the gateway
recovers without a restart. Every failure to reach the database surfaces as one of
`DATABASE_ERRORS`, which the stores turn into StoreUnavailable (AR on MLLP, 503 on HTTP).
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from dataclasses import dataclass
from typing import Any

import asyncpg

from gateway.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

# What "the database is not there or not answering" looks like from asyncpg.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

Pool = Any  # asyncpg ships no type information: its pool and connections are Any here
Connection = Any


@dataclass(frozen=True, slots=True)
class PgSpec:
    """How to reach the database: the DSN, the schema the tables live in, the pool's size,
    timeouts in seconds, and TLS (an sslmode name or a context built from the settings)."""

    url: str
    schema: str = "public"
    pool_min_size: int = 2
    pool_max_size: int = 10
    connect_timeout: float = 5.0
    statement_timeout: float = 30.0
    ssl: ssl.SSLContext | str | None = None

    @property
    def where(self) -> str:
        """The database named for an operator: host, port and database, never the
        user's password."""
        return redact_url(self.url)


def redact_url(url: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user@host/db."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "postgresql://?"
    credentials, at, location = rest.rpartition("@")
    user = credentials.partition(":")[0]
    return f"{scheme}://{user}{at}{location}" if at else f"{scheme}://{location}"


def tls_context(mode: str, rootcert: str | None, cert: str | None,
                key: str | None) -> ssl.SSLContext | str:
    """libpq's sslmode as asyncpg takes it: the plain modes by name, the ones that send a
    client certificate or check the server's as a context."""
    if mode in ("disable", "allow", "prefer") and cert is None:
        return mode
    verify = mode in ("verify-ca", "verify-full")
    context = ssl.create_default_context(cafile=rootcert) if verify else (
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = mode == "verify-full"
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # require: encrypted, the server not checked
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


def advisory_key(*parts: str) -> int:
    """A signed 64-bit key for pg_advisory_*lock from text (a name, an identifier)."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def connect_kwargs(spec: PgSpec) -> dict[str, Any]:
    return {
        "dsn": spec.url,
        "timeout": spec.connect_timeout,
        "command_timeout": spec.statement_timeout,
        "ssl": spec.ssl,
        "server_settings": {
            "search_path": f'"{spec.schema}"',
            # Names the deployment in pg_stat_activity (and lets an operator end its
            # sessions apart from another's on the same server).
            "application_name": f"isthmus:{spec.schema}"[:63],
            "statement_timeout": str(int(spec.statement_timeout * 1000)),
            # A connection left idle in a transaction by a killed task does not hold
            # locks for ever.
            "idle_in_transaction_session_timeout": "60000",
        },
    }


async def connect(spec: PgSpec) -> Connection:
    """One connection of its own (migrations, the outbox's leases, the CLI)."""
    try:
        connection = await asyncpg.connect(**connect_kwargs(spec))
    except DATABASE_ERRORS as exc:
        raise StoreUnavailable(f"cannot connect to {spec.where}: {_reason(exc)}") from None
    return connection


async def open_pool(spec: PgSpec) -> Pool:
    """The shared pool; StoreUnavailable (naming host and database) if it cannot open."""
    try:
        return await asyncpg.create_pool(
            min_size=spec.pool_min_size, max_size=spec.pool_max_size,
            # A connection idle this long is closed: a pool never holds on to a socket a
            # load balancer in front of the database has silently dropped.
            max_inactive_connection_lifetime=300.0, **connect_kwargs(spec))
    except DATABASE_ERRORS as exc:
        raise StoreUnavailable(f"cannot connect to {spec.where}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """The error's class and, for the server's own errors, its SQLSTATE (no values)."""
    state = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__}" + (f" (SQLSTATE {state})" if state else "")


def unavailable(what: str, exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"{what}: {_reason(exc)}")
