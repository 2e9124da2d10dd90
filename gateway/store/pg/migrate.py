"""Applying the schema's migrations: at every start, under an advisory lock, so that N
instances starting together migrate once (the others wait, then find nothing to do)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.store.pg.connect import (
    DATABASE_ERRORS,
    Connection,
    PgSpec,
    advisory_key,
    connect,
)
from gateway.store.pg.connect import unavailable as _unavailable
from gateway.store.pg.schema import MIGRATIONS, Migration

_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL
)"""


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Where a database stands: the versions applied (with when), and those to apply."""

    applied: tuple[tuple[int, str, str], ...]
    pending: tuple[Migration, ...]

    @property
    def current(self) -> int:
        return max((version for version, _, _ in self.applied), default=0)


def _lock_key(schema: str) -> int:
    return advisory_key("isthmus-migrate", schema)


async def status(spec: PgSpec) -> SchemaStatus:
    """The migrations applied and pending (creating nothing)."""
    connection = await connect(spec)
    try:
        return await _status(connection, spec.schema)
    except DATABASE_ERRORS as exc:
        raise _unavailable(f"cannot read the schema of {spec.where}", exc) from None
    finally:
        await connection.close()


async def migrate(spec: PgSpec, *, dry_run: bool = False) -> list[Migration]:
    """Apply every pending migration in order, each in its own transaction, holding the
    schema's advisory lock throughout; returns what was (or, dry, would be) applied."""
    connection = await connect(spec)
    try:
        await connection.execute("SELECT pg_advisory_lock($1)", _lock_key(spec.schema))
        try:
            found = await _status(connection, spec.schema)
            if dry_run:
                return list(found.pending)
            await connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{spec.schema}"')
            await connection.execute(_LEDGER)
            for migration in found.pending:
                async with connection.transaction():
                    await connection.execute(migration.sql)
                    await connection.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at) "
                        "VALUES ($1, $2, $3)", migration.version, migration.name,
                        datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
            return list(found.pending)
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)",
                                     _lock_key(spec.schema))
    except DATABASE_ERRORS as exc:
        raise _unavailable(f"cannot migrate {spec.where}", exc) from None
    finally:
        await connection.close()


async def _status(connection: Connection, schema: str) -> SchemaStatus:
    exists = await connection.fetchval(
        "SELECT to_regclass($1) IS NOT NULL", f'"{schema}".schema_migrations')
    rows = await connection.fetch(
        "SELECT version, name, applied_at FROM schema_migrations ORDER BY version"
    ) if exists else []
    applied = tuple((int(r[0]), str(r[1]), str(r[2])) for r in rows)
    done = {version for version, _, _ in applied}
    return SchemaStatus(applied, tuple(m for m in MIGRATIONS if m.version not in done))
