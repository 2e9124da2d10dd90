"""Moving an embedded deployment to PostgreSQL: every row of the SQLite files copied as it
is (ids, sequence numbers, chain hashes, MACs, checkpoints, the log's id), so the inbox
keeps its ACKs and dedup keys, the outbox its pending and dead rows, the FHIR store its
history (and each resource its number, `rid`, which its versions and search rows name it
by), and the audit chain verifies afterwards exactly as before.

One transaction: the copy is all there or not at all. The triggers that would make rows
of their own (an inbox row's outbox rows, a resource's version) are off for it, since
those rows are copied too. The target must be migrated and empty; the source must not be
in use (the caller holds the data dir's lock).

A sealed data dir (encryption at rest, docs/encryption.md) is opened on the way: PostgreSQL
keeps plain values under the database's own encryption. Every sealed message, Bundle and
resource version is opened with the data dir's keys (a value that does not open stops the
copy); the outbox's patient keys, blind indexes in the data dir, are made again from the
messages (and checked against the blind ones); the token and string search rows, blind
too, are made again from the resources (named by their rids), with the other search rows
beside them. The audit trail seals its PHI with its own keys and is copied as it is.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from gateway.store.data_keys import read_marker
from gateway.store.errors import StoreError
from gateway.store.fhir import (
    DateIndex,
    IndexEntry,
    Indexer,
    QuantityIndex,
    ReferenceIndex,
    StringIndex,
    TokenIndex,
)
from gateway.store.fhir_sqlite.schema import index_row
from gateway.store.inbox_sqlite import blind_patient
from gateway.store.pg.connect import Connection
from gateway.store.raw_form import original
from gateway.store.sealing import RowCodec, SealError, fhir_context, inbox_context

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
    ("fhir.db", "fhir_resource", (
        "rid", "type", "id", "version", "last_updated", "deleted", "body")),
    ("fhir.db", "fhir_version", (
        "seq", "type", "id", "version", "last_updated", "deleted", "body", "rid")),
    ("fhir.db", "fhir_token", ("rid", "type", "param", "system", "code")),
    ("fhir.db", "fhir_string", ("rid", "type", "param", "normalized", "exact")),
    ("fhir.db", "fhir_date", ("rid", "type", "param", "low", "high")),
    ("fhir.db", "fhir_reference", ("rid", "type", "param", "target")),
    ("fhir.db", "fhir_quantity", ("rid", "type", "param", "value", "system", "code")),
    ("audit.db", "audit_record", (
        "seq", "recorded_at", "action", "client_id", "outcome", "patient_index",
        "patient_id_index", "body", "hash", "mac", "mac_key")),
    ("audit.db", "audit_checkpoint", ("id", "count", "created_at", "body", "signature")),
    ("audit.db", "audit_meta", ("key", "value")),
    ("auth.db", "assertion_ids", ("key", "expires_at")),
)
# Tables that must be empty before a copy (a copy never merges two deployments).
_MUST_BE_EMPTY = ("inbox", "outbox", "fhir_resource", "fhir_version", "audit_record")
# Identity columns whose sequences continue after the copied ids (else the next insert
# is given a copied one and collides).
_IDENTITIES = (("inbox", "id"), ("outbox", "id"), ("fhir_resource", "rid"),
               ("fhir_version", "seq"), ("audit_checkpoint", "id"))
_TRIGGERS = (("inbox", "inbox_to_outbox"), ("fhir_resource", "fhir_resource_archive"),
             ("fhir_resource", "fhir_resource_event"))
_BATCH = 2000
# The search tables a sealed data dir's rows are not copied from: made from the resources.
_INDEX_TABLES = ("fhir_token", "fhir_string", "fhir_date", "fhir_reference",
                 "fhir_quantity")
_Record = tuple[object, ...]


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


@dataclass(frozen=True)
class Unsealing:
    """What copying a sealed data dir takes: the codec that opens it (its keys), the
    search indexer (the registry's), and how a stored message names its patient (the
    outbox's ordering key, `gateway.ingest.patient_key` of the parsed message)."""

    codec: RowCodec
    indexer: Indexer
    patient_key: Callable[[bytes], str]


async def copy_sqlite(data_dir: Path, connection: Connection,
                      unsealing: Unsealing | None = None) -> Copied:
    """Copy the data dir's SQLite files into the (migrated, empty) database; a sealed data
    dir is opened with `unsealing`."""
    opener: _Opener | None = None
    if read_marker(data_dir) is not None:
        if unsealing is None or not unsealing.codec.sealed:
            raise CopyError("the data dir is sealed (encryption at rest) and no data keys "
                            "were given to open it (docs/encryption.md)")
        opener = _Opener(unsealing)
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
            if not path.exists() or (opener is not None and table in _INDEX_TABLES):
                continue
            copied.rows[table] = await _copy_table(path, table, columns, connection, opener)
        for table, trigger in _TRIGGERS:
            await connection.execute(f"ALTER TABLE {table} ENABLE TRIGGER {trigger}")
        for table, column in _IDENTITIES:
            await connection.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                f"coalesce((SELECT max({column}) FROM {table}), 0) + 1, false)")
    return copied


async def _copy_table(path: Path, table: str, columns: Sequence[str],
                      connection: Connection, opener: _Opener | None = None) -> int:
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
            records = [tuple(_value(v) for v in row) for row in rows]
            if opener is not None:
                records = opener.rows(table, records)
            elif table == "inbox":  # PostgreSQL stores the message as received
                records = [(*r[:10], original(_bytes(r[10])), *r[11:]) for r in records]
            await connection.copy_records_to_table(table, records=records,
                                                   columns=list(columns))
            if opener is not None:
                await opener.write_index(connection)
            count += len(rows)
        return count
    finally:
        source.close()


def _value(value: object) -> object:
    return bytes(value) if isinstance(value, memoryview) else value


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise CopyError("an inbox row's raw column holds no bytes")
    return value


class _Opener:
    """A sealed data dir's rows made plain, table by table, in copy order (the inbox
    before the outbox, whose patient keys come from it)."""

    def __init__(self, unsealing: Unsealing) -> None:
        self._codec = unsealing.codec
        self._indexer = unsealing.indexer
        self._patient_key = unsealing.patient_key
        self._inbox_keys: dict[int, tuple[str, str]] = {}  # id -> (blind, plain)
        self._index: dict[str, list[_Record]] = {}

    def rows(self, table: str, records: list[_Record]) -> list[_Record]:
        if table == "inbox":
            return [self._inbox(r) for r in records]
        if table == "outbox":
            return [self._outbox(r) for r in records]
        if table in ("fhir_resource", "fhir_version"):
            return [self._resource(table, r) for r in records]
        return records

    def _inbox(self, r: _Record) -> _Record:
        # _TABLES' inbox columns: id 0, received_at 1, application 2, facility 3, control
        # id 4, raw 10, patient_key 15, bundle 17.
        row_id, names = int(str(r[0])), (str(r[2]), str(r[3]), str(r[4]), str(r[1]))
        raw = original(self._open(r[10], inbox_context("raw", *names), f"inbox row {row_id}"))
        bundle = None if r[17] is None else self._open(
            r[17], inbox_context("bundle", *names), f"inbox row {row_id}")
        blind = str(r[15] or "")
        plain = self._patient_key(raw) if blind else ""
        if blind_patient(plain, self._codec) != blind:
            raise CopyError(f"inbox row {row_id}: its patient key does not match its message "
                            "(made with another index key?)")
        self._inbox_keys[row_id] = (blind, plain)
        return (*r[:10], raw, *r[11:15], plain, r[16], bundle, *r[18:])

    def _outbox(self, r: _Record) -> _Record:
        # _TABLES' outbox columns: id 0, inbox_id 1, patient_key 3.
        blind = str(r[3] or "")
        if not blind:
            return r
        stored = self._inbox_keys.get(int(str(r[1])))
        if stored is None or stored[0] != blind:
            raise CopyError(f"outbox row {r[0]}: its patient key is not its inbox row's")
        return (*r[:3], stored[1], *r[4:])

    def _resource(self, table: str, r: _Record) -> _Record:
        # _TABLES' columns: fhir_resource's rid 0, fhir_version's seq 0, then both type 1,
        # id 2, version 3, last_updated 4, deleted 5, body 6 (and fhir_version's rid 7).
        resource_type, id_, version = str(r[1]), str(r[2]), int(str(r[3]))
        body = self._open(r[6], fhir_context(resource_type, id_, version),
                          f"{resource_type}/{id_} version {version}")
        if table == "fhir_resource" and not r[5]:
            self._add_index(int(str(r[0])), resource_type, id_, body)
        return (*r[:6], body, *r[7:])

    def _add_index(self, rid: int, resource_type: str, id_: str, body: bytes) -> None:
        """The search rows of a current resource, as the store's writer makes them: named
        by the resource's rid (copied as it is), in `_TABLES`' index columns."""
        entries: list[IndexEntry] = list(dict.fromkeys(
            self._indexer(resource_type, orjson.loads(body))))
        for entry in entries:
            # index_row's (type, id, param, values...), the writer's bound row, as stored.
            _, _, *named = index_row(resource_type, id_, entry)
            table = _INDEX_TABLE_OF[type(entry)]
            self._index.setdefault(table, []).append((rid, resource_type, *named))

    async def write_index(self, connection: Connection) -> None:
        index, self._index = self._index, {}
        for table, records in index.items():
            await connection.copy_records_to_table(table, records=records,
                                                   columns=list(_INDEX_COLUMNS[table]))

    def _open(self, value: object, context: str, where: str) -> bytes:
        if not isinstance(value, bytes):
            raise CopyError(f"{where}: a sealed column holds no bytes")
        try:
            return self._codec.open(value, context)
        except SealError as exc:
            raise CopyError(f"{where}: {exc}") from None


_INDEX_TABLE_OF: dict[type, str] = {
    TokenIndex: "fhir_token", StringIndex: "fhir_string", DateIndex: "fhir_date",
    ReferenceIndex: "fhir_reference", QuantityIndex: "fhir_quantity"}
_INDEX_COLUMNS = {table: columns for _, table, columns in _TABLES if table in _INDEX_TABLES}
