"""The embedded FHIR store's SQLite schema: current resources, every version, one index
table per kind of search value; the writer connection's set-up; rows to and from it.

Index rows exist only for the current, non-deleted version of a resource; triggers keep
that true (and archive every version) whatever statement changes the current row.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from gateway.store.data_dir import private_dir, private_file
from gateway.store.fhir import (
    DateIndex,
    IndexEntry,
    QuantityIndex,
    ReferenceIndex,
    StoredResource,
    StringIndex,
    TokenIndex,
)
from gateway.store.sealing import PLAIN, RowCodec, fhir_context

# The shared labels (`param` naming several parameters, "family name") the sealed store's
# string rows carry, recorded with the rows: a search finds rows by every label holding its
# parameter, also those a later search table no longer groups (blinding.py). Also made by
# the seal migration, on a store file older than it.
STRING_LABEL_TABLE = """
CREATE TABLE IF NOT EXISTS fhir_string_label (
    type TEXT NOT NULL, label TEXT NOT NULL, PRIMARY KEY (type, label)
) WITHOUT ROWID;
"""
SCHEMA = STRING_LABEL_TABLE + """
CREATE TABLE IF NOT EXISTS fhir_resource (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_updated TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (type, id)
);
CREATE INDEX IF NOT EXISTS fhir_resource_updated ON fhir_resource (type, last_updated);
CREATE TABLE IF NOT EXISTS fhir_version (
    seq INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_updated TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (type, id, version)
);
CREATE INDEX IF NOT EXISTS fhir_version_updated ON fhir_version (last_updated);
CREATE INDEX IF NOT EXISTS fhir_version_type_updated ON fhir_version (type, last_updated);

-- The lookup indexes end in id so that a search reads the ids from the index alone.
CREATE TABLE IF NOT EXISTS fhir_token (
    type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
    system TEXT, code TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fhir_token_lookup ON fhir_token (type, param, code, system, id);
CREATE INDEX IF NOT EXISTS fhir_token_resource ON fhir_token (type, id, param);
-- NOCASE (the text is lower-case already) lets SQLite answer LIKE 'prefix%' from the index.
CREATE TABLE IF NOT EXISTS fhir_string (
    type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
    normalized TEXT NOT NULL COLLATE NOCASE, exact TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fhir_string_lookup ON fhir_string (type, param, normalized, id);
CREATE INDEX IF NOT EXISTS fhir_string_resource ON fhir_string (type, id, param);
CREATE TABLE IF NOT EXISTS fhir_date (
    type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
    low TEXT NOT NULL, high TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fhir_date_lookup ON fhir_date (type, param, low, high, id);
CREATE INDEX IF NOT EXISTS fhir_date_resource ON fhir_date (type, id, param);
CREATE TABLE IF NOT EXISTS fhir_reference (
    type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, target TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fhir_reference_lookup ON fhir_reference (type, param, target, id);
CREATE INDEX IF NOT EXISTS fhir_reference_resource ON fhir_reference (type, id, param);
CREATE TABLE IF NOT EXISTS fhir_quantity (
    type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
    value REAL NOT NULL, system TEXT, code TEXT
);
CREATE INDEX IF NOT EXISTS fhir_quantity_lookup ON fhir_quantity (type, param, value, id);
CREATE INDEX IF NOT EXISTS fhir_quantity_resource ON fhir_quantity (type, id, param);
CREATE TABLE IF NOT EXISTS fhir_store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

-- One change event per new version, made by the triggers below in the statement that
-- writes the version (so in its transaction): a resend that changes nothing writes no
-- version and makes no event (gateway.store.events).
CREATE TABLE IF NOT EXISTS fhir_event (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    action TEXT NOT NULL,
    at TEXT NOT NULL,
    UNIQUE (type, id, version)
);
CREATE TRIGGER IF NOT EXISTS fhir_resource_event_insert AFTER INSERT ON fhir_resource
BEGIN
    INSERT INTO fhir_event (type, id, version, action, at)
    VALUES (new.type, new.id, new.version,
            CASE WHEN new.deleted THEN 'deleted' ELSE 'created' END, new.last_updated);
END;
CREATE TRIGGER IF NOT EXISTS fhir_resource_event_update AFTER UPDATE ON fhir_resource
BEGIN
    INSERT INTO fhir_event (type, id, version, action, at)
    VALUES (new.type, new.id, new.version,
            CASE WHEN new.deleted THEN 'deleted' WHEN old.deleted THEN 'created'
                 ELSE 'updated' END, new.last_updated);
END;

-- Every current row written is also a version in the history, in the same statement.
CREATE TRIGGER IF NOT EXISTS fhir_resource_archive_insert AFTER INSERT ON fhir_resource
BEGIN
    INSERT INTO fhir_version (type, id, version, last_updated, deleted, body)
    VALUES (new.type, new.id, new.version, new.last_updated, new.deleted, new.body);
END;
-- A new current version makes the old one's index rows stale: they go before the new
-- version's rows are inserted (and a deletion has none).
CREATE TRIGGER IF NOT EXISTS fhir_resource_archive_update AFTER UPDATE ON fhir_resource
BEGIN
    INSERT INTO fhir_version (type, id, version, last_updated, deleted, body)
    VALUES (new.type, new.id, new.version, new.last_updated, new.deleted, new.body);
    DELETE FROM fhir_token WHERE type = old.type AND id = old.id;
    DELETE FROM fhir_string WHERE type = old.type AND id = old.id;
    DELETE FROM fhir_date WHERE type = old.type AND id = old.id;
    DELETE FROM fhir_reference WHERE type = old.type AND id = old.id;
    DELETE FROM fhir_quantity WHERE type = old.type AND id = old.id;
END;
"""

UPSERT = (
    "INSERT INTO fhir_resource (type, id, version, last_updated, deleted, body) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (type, id) DO UPDATE SET "
    "version = excluded.version, last_updated = excluded.last_updated, "
    "deleted = excluded.deleted, body = excluded.body"
)
INDEX_INSERTS = {
    TokenIndex: "INSERT INTO fhir_token (type, id, param, system, code) VALUES (?, ?, ?, ?, ?)",
    StringIndex: "INSERT INTO fhir_string (type, id, param, normalized, exact) "
                 "VALUES (?, ?, ?, ?, ?)",
    DateIndex: "INSERT INTO fhir_date (type, id, param, low, high) VALUES (?, ?, ?, ?, ?)",
    ReferenceIndex: "INSERT INTO fhir_reference (type, id, param, target) VALUES (?, ?, ?, ?)",
    QuantityIndex: "INSERT INTO fhir_quantity (type, id, param, value, system, code) "
                   "VALUES (?, ?, ?, ?, ?, ?)",
}
# Every write records the shared labels of its string rows (a few, most already there; the
# rows and the labels they need commit together: no row is under an unrecorded label).
RECORD_LABELS = "INSERT OR IGNORE INTO fhir_string_label (type, label) VALUES (?, ?)"
INDEX_TABLES = ("fhir_token", "fhir_string", "fhir_date", "fhir_reference", "fhir_quantity")
COLUMNS = "r.type, r.id, r.version, r.last_updated, r.deleted, r.body"
VERSION_COLUMNS = "type, id, version, last_updated, deleted, body"
Row = Sequence[Any]
# The writer's page cache, KiB. SQLite's default (2 MiB) is smaller than what one group
# commit of new patients touches on a sealed store (blind index values are random keys: a
# string's prefixes, 43 string rows of ~60 index rows a message since a value the
# parameters of one group share is written once (blinding.py; 80 of ~95 before), each
# lands on its own B-tree page), so pages were read again within a group. Pages are taken
# only as needed and handed back when the store goes idle (`PRAGMA shrink_memory`), so RSS
# returns after a burst.
WRITER_CACHE_KIB = 32 * 1024
# WAL frames after which a commit checkpoints: SQLite's default, kept on purpose. A group
# commit of new patients writes ~3,000-4,000 frames on a sealed store, so every commit
# checkpoints. 16,384 cut the apply's bytes written by 35 % and read by 70 %, but each
# of its fewer checkpoints wrote up to ~64 MiB and synced it on the disk the edge's inbox
# and audit commits sync on: the small ACK p99 of `bench/isolation.py` went from 25-34 ms
# to 44-54 ms alone (four alternated runs, bench/README.md "The apply worker's CPU"). The
# sender's ACK is what must not wait; the apply is behind either way.
WAL_AUTOCHECKPOINT_PAGES = 1000


def open_writer(path: Path, synchronous: Literal["normal", "full", "extra"],
                ) -> tuple[sqlite3.Connection, datetime]:
    """Writer thread: the writer connection, set up as `open_database` sets up its own
    (WAL, autocommit, `synchronous`, busy timeout), with the schema in place; and the
    latest lastUpdated stored, which new ones must follow."""
    private_dir(path.parent)
    private_file(path)  # owner-only, as open_database makes its files
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        db.execute("PRAGMA busy_timeout=5000")
        db.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        # Each call of a group commit runs in a SAVEPOINT, and SQLite keeps the original of
        # every page a savepoint changes in a sub-journal, by default a temporary *file*:
        # one pwrite per page, which was 30 % of the writer thread (py-spy --native) and
        # held the write lock 3-4x longer. In memory it costs at most one call's pages,
        # freed when the savepoint is released.
        db.execute("PRAGMA temp_store=MEMORY")
        db.executescript(SCHEMA)
        last = db.execute("SELECT max(last_updated) FROM fhir_version").fetchall()[0][0]
    except BaseException:
        db.close()
        raise
    # A clock stepped back across a restart must not give older lastUpdated values.
    return db, parse_instant(str(last)) if last else datetime.min.replace(tzinfo=UTC)


def index_row(resource_type: str, id: str, item: IndexEntry) -> tuple[object, ...]:
    match item:
        case TokenIndex(param, system, code):
            return (resource_type, id, param, system or None, code)
        case StringIndex(param, normalized, exact):
            return (resource_type, id, param, normalized, exact)
        case DateIndex(param, low, high):
            return (resource_type, id, param, low, high)
        case ReferenceIndex(param, target):
            return (resource_type, id, param, target)
        case QuantityIndex(param, value, system, code):
            return (resource_type, id, param, value, system, code)
    raise TypeError(f"not an index entry: {type(item).__name__}")


def stored_resource(row: Row, codec: RowCodec = PLAIN) -> StoredResource:
    """A row of `COLUMNS` (or `VERSION_COLUMNS`) as the store hands it out, its body
    opened by `codec`."""
    resource_type, id, version = str(row[0]), str(row[1]), int(row[2])
    return StoredResource(resource_type, id, version, str(row[3]), bool(row[4]),
                          codec.open(bytes(row[5]), fhir_context(resource_type, id, version)))


def format_instant(moment: datetime) -> str:
    """FHIR instant in UTC with microseconds: fixed width, so text order is time order."""
    # isoformat, not strftime: the same text for years 1000-9999, in a third less time
    # (every version written takes one).
    return moment.astimezone(UTC).isoformat(timespec="microseconds")[:26] + "Z"


def parse_instant(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)

