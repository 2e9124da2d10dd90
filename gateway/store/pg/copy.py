"""Moving an embedded deployment to PostgreSQL: every row of the SQLite files copied as it
is (ids, sequence numbers, chain hashes, MACs, checkpoints, the log's id), so the inbox
keeps its ACKs and dedup keys, the outbox its pending and dead rows, the FHIR store its
history, and the audit chain verifies afterwards exactly as before.

One transaction: the copy is all there or not at all. The triggers that would make rows
of their own (an inbox row's outbox rows, a resource's version) are off for it, since
those rows are copied too. The target must be migrated and empty; the source must not be
in use (the caller holds the data dir's lock).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.store.data_keys import read_marker
from gateway.store.errors import StoreError
from gateway.store.pg.connect import Connection

# (SQLite file, table, columns) in copy order; the columns are PostgreSQL's, all present in
# the SQLite table of the same name (the stores bring old files up to date when they open).
_TABLES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("inbox.db", "inbox", (
        "id", "received_at", "sending_application", "sending_facility", "control_id",
        "message_type", "version", "peer", "size", "status", "raw", "ack", "error",
        "dedup_key", "routes", "patient_key", "trace", "bundle", "content_hash")),
    ("inbox.db", "outbox", (
        "id", "inbox_id", "backend", "patient_key", "status", "attempts", "next_at",
        "created_at", "updated_at", "last_status", "error", "trace")),
    ("fhir.db", "fhir_resource", ("type", "id", "version", "last_updated", "deleted", "body")),
    ("fhir.db", "fhir_version", (
        "seq", "type", "id", "version", "last_updated", "deleted", "body")),
    ("fhir.db", "fhir_token", ("type", "id", "param", "system", "code")),
    ("fhir.db", "fhir_string", ("type", "id", "param", "normalized", "exact")),
    ("fhir.db", "fhir_date", ("type", "id", "param", "low", "high")),
    ("fhir.db", "fhir_reference", ("type", "id", "param", "target")),
    ("fhir.db", "fhir_quantity", ("type", "id", "param", "value", "system", "code")),
    ("audit.db", "audit_record", (
        "seq", "recorded_at", "action", "client_id", "outcome", "patient_index",
        "patient_id_index", "body", "hash", "mac", "mac_key")),
    ("audit.db", "audit_checkpoint", ("id", "count", "created_at", "body", "signature")),
    ("audit.db", "audit_meta", ("key", "value")),
    ("auth.db", "assertion_ids", ("key", "expires_at")),
)
# Tables that must be empty before a copy (a copy never merges two deployments).
_MUST_BE_EMPTY = ("inbox", "outbox", "fhir_resource", "fhir_version", "audit_record")
# Identity columns whose sequences continue after the copied ids.
_IDENTITIES = (("inbox", "id"), ("outbox", "id"), ("fhir_version", "seq"),
               ("audit_checkpoint", "id"))
_TRIGGERS = (("inbox", "inbox_to_outbox"), ("fhir_resource", "fhir_resource_archive"),
             ("fhir_resource", "fhir_resource_event"))
_BATCH = 2000


class CopyError(StoreError):
    """The copy cannot start or did not complete; nothing was written."""


@dataclass
class Copied:
    rows: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        r = self.rows
        return (f"{r.get('inbox', 0)} inbox messages, {r.get('outbox', 0)} outbox rows, "
                f"{r.get('fhir_resource', 0)} FHIR resources "
                f"({r.get('fhir_version', 0)} versions), {r.get('audit_record', 0)} audit "
                f"records, {r.get('audit_checkpoint', 0)} checkpoints")


async def copy_sqlite(data_dir: Path, connection: Connection) -> Copied:
    """Copy the data dir's SQLite files into the (migrated, empty) database."""
    if read_marker(data_dir) is not None:
        # Sealed values and blind indexes cannot be copied as they are: PostgreSQL keeps
        # plain JSON and index values (under the database's own encryption).
        raise CopyError("the data dir is sealed (encryption at rest); a copy to PostgreSQL "
                        "takes a plaintext data dir only, for now (docs/deployment.md)")
    for table in _MUST_BE_EMPTY:
        if await connection.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
            raise CopyError(f"the target's {table} table is not empty: a copy goes into a "
                            "new database (or schema) only")
    copied = Copied()
    async with connection.transaction():
        for table, trigger in _TRIGGERS:
            await connection.execute(f"ALTER TABLE {table} DISABLE TRIGGER {trigger}")
        # The meta rows the target made at migration or start (none but these) give way.
        await connection.execute("DELETE FROM audit_meta")
        for file, table, columns in _TABLES:
            path = data_dir / file
            if not path.exists():
                continue
            copied.rows[table] = await _copy_table(path, table, columns, connection)
        for table, trigger in _TRIGGERS:
            await connection.execute(f"ALTER TABLE {table} ENABLE TRIGGER {trigger}")
        for table, column in _IDENTITIES:
            await connection.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                f"coalesce((SELECT max({column}) FROM {table}), 0) + 1, false)")
    return copied


async def _copy_table(path: Path, table: str, columns: Sequence[str],
                      connection: Connection) -> int:
    source = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        exists = source.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                "AND name = ?", (table,)).fetchall()
        if not exists:
            return 0
        where = " WHERE key NOT IN ('ready_probe', 'purging')" if table == "audit_meta" else ""
        try:
            cursor = source.execute(f"SELECT {', '.join(columns)} FROM {table}{where}")
        except sqlite3.OperationalError as exc:
            raise CopyError(f"{path.name}: table {table} is not as this version writes it "
                            f"({exc}); start and stop this version's gateway on it first"
                            ) from None
        count = 0
        while rows := cursor.fetchmany(_BATCH):
            await connection.copy_records_to_table(
                table, records=[tuple(_value(v) for v in row) for row in rows],
                columns=list(columns))
            count += len(rows)
        return count
    finally:
        source.close()


def _value(value: object) -> object:
    return bytes(value) if isinstance(value, memoryview) else value
