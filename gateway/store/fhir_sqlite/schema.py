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
# The search index tables: one row per value a resource's current version is searched by.
# The lookup indexes end in rid so that a search reads the resources' numbers from the
# index alone; the `_resource` indexes find one resource's rows (to drop them, to sort).
# NOCASE on fhir_string (the text is lower-case already) lets SQLite answer
# LIKE 'prefix%' from the index. Also what the rid migration (`_keyed_by_rid`) makes.
INDEX_TABLES_SQL = """
CREATE TABLE IF NOT EXISTS fhir_token (
    rid INTEGER NOT NULL, type TEXT NOT NULL, param TEXT NOT NULL,
    system TEXT, code TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fhir_token_lookup ON fhir_token (type, param, code, system, rid);
CREATE INDEX IF NOT EXISTS fhir_token_resource ON fhir_token (rid, param);
CREATE TABLE IF NOT EXISTS fhir_string (
    rid INTEGER NOT NULL, type TEXT NOT NULL, param TEXT NOT NULL,
    normalized TEXT NOT NULL COLLATE NOCASE, exact TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fhir_string_lookup ON fhir_string (type, param, normalized, rid);
CREATE INDEX IF NOT EXISTS fhir_string_resource ON fhir_string (rid, param);
CREATE TABLE IF NOT EXISTS fhir_date (
    rid INTEGER NOT NULL, type TEXT NOT NULL, param TEXT NOT NULL,
    low TEXT NOT NULL, high TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fhir_date_lookup ON fhir_date (type, param, low, high, rid);
CREATE INDEX IF NOT EXISTS fhir_date_resource ON fhir_date (rid, param);
CREATE TABLE IF NOT EXISTS fhir_reference (
    rid INTEGER NOT NULL, type TEXT NOT NULL, param TEXT NOT NULL, target TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fhir_reference_lookup ON fhir_reference (type, param, target, rid);
CREATE INDEX IF NOT EXISTS fhir_reference_resource ON fhir_reference (rid, param);
CREATE TABLE IF NOT EXISTS fhir_quantity (
    rid INTEGER NOT NULL, type TEXT NOT NULL, param TEXT NOT NULL,
    value REAL NOT NULL, system TEXT, code TEXT
);
CREATE INDEX IF NOT EXISTS fhir_quantity_lookup ON fhir_quantity (type, param, value, rid);
CREATE INDEX IF NOT EXISTS fhir_quantity_resource ON fhir_quantity (rid, param);
"""
# Every version of every resource, and one change event per version, keyed by the
# resource's rid and the version: a new resource's keys go at the right edge of the unique
# indexes (an update's beside its resource's other versions), where a (type, uuid id,
# version) key landed on a random page and dirtied it (bench/apply_floor.py: about a fifth
# less CPU and a quarter fewer bytes written a message). type and id stay on the rows:
# versions and events are read out with them, and history by type goes by (type,
# last_updated). Also what the history migration (`_key_history_by_rid`) makes.
VERSION_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS fhir_version (
    seq INTEGER PRIMARY KEY,
    rid INTEGER NOT NULL,
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_updated TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (rid, version)
);
"""
VERSION_INDEXES_SQL = """
CREATE INDEX IF NOT EXISTS fhir_version_updated ON fhir_version (last_updated);
CREATE INDEX IF NOT EXISTS fhir_version_type_updated ON fhir_version (type, last_updated);
"""
EVENT_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS fhir_event (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    rid INTEGER NOT NULL,
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    action TEXT NOT NULL,
    at TEXT NOT NULL,
    UNIQUE (rid, version)
);
"""
SCHEMA = STRING_LABEL_TABLE + """
-- `rid`: the resource's number in this file, given when it is first written and kept by
-- every later version; its index rows name it by that. A new resource's is the next
-- number, so its index rows go at the right edge of each `_resource` index, not at the
-- random place its uuid would put them, and each index entry holds a small integer instead
-- of a uuid (bench/apply_floor.py: about half the CPU and a quarter of the bytes written
-- a message). An explicit INTEGER PRIMARY KEY: VACUUM (the seal migration) keeps it, as
-- it need not keep an implicit rowid.
CREATE TABLE IF NOT EXISTS fhir_resource (
    rid INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_updated TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (type, id)
);
-- Searches and counts read live resources only (deleted = 0): with it in the index, a count
-- of a type or its newest first read the index alone, not every row's page.
CREATE INDEX IF NOT EXISTS fhir_resource_updated ON fhir_resource (type, deleted, last_updated);
""" + VERSION_TABLE_SQL + VERSION_INDEXES_SQL + INDEX_TABLES_SQL + """
CREATE TABLE IF NOT EXISTS fhir_store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

-- One change event per new version, made by the triggers below in the statement that
-- writes the version (so in its transaction): a resend that changes nothing writes no
-- version and makes no event (gateway.store.events).
""" + EVENT_TABLE_SQL + """
CREATE TRIGGER IF NOT EXISTS fhir_resource_event_insert AFTER INSERT ON fhir_resource
BEGIN
    INSERT INTO fhir_event (rid, type, id, version, action, at)
    VALUES (new.rid, new.type, new.id, new.version,
            CASE WHEN new.deleted THEN 'deleted' ELSE 'created' END, new.last_updated);
END;
CREATE TRIGGER IF NOT EXISTS fhir_resource_event_update AFTER UPDATE ON fhir_resource
BEGIN
    INSERT INTO fhir_event (rid, type, id, version, action, at)
    VALUES (new.rid, new.type, new.id, new.version,
            CASE WHEN new.deleted THEN 'deleted' WHEN old.deleted THEN 'created'
                 ELSE 'updated' END, new.last_updated);
END;

-- Every current row written is also a version in the history, in the same statement.
CREATE TRIGGER IF NOT EXISTS fhir_resource_archive_insert AFTER INSERT ON fhir_resource
BEGIN
    INSERT INTO fhir_version (rid, type, id, version, last_updated, deleted, body)
    VALUES (new.rid, new.type, new.id, new.version, new.last_updated, new.deleted, new.body);
END;
-- A new current version makes the old one's index rows stale: they go before the new
-- version's rows are inserted (and a deletion has none).
CREATE TRIGGER IF NOT EXISTS fhir_resource_archive_update AFTER UPDATE ON fhir_resource
BEGIN
    INSERT INTO fhir_version (rid, type, id, version, last_updated, deleted, body)
    VALUES (new.rid, new.type, new.id, new.version, new.last_updated, new.deleted, new.body);
    DELETE FROM fhir_token WHERE rid = old.rid;
    DELETE FROM fhir_string WHERE rid = old.rid;
    DELETE FROM fhir_date WHERE rid = old.rid;
    DELETE FROM fhir_reference WHERE rid = old.rid;
    DELETE FROM fhir_quantity WHERE rid = old.rid;
END;
"""

UPSERT = (
    "INSERT INTO fhir_resource (type, id, version, last_updated, deleted, body) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (type, id) DO UPDATE SET "
    "version = excluded.version, last_updated = excluded.last_updated, "
    "deleted = excluded.deleted, body = excluded.body"
)
# An index row is bound as `index_row` makes it, (type, id, param, values...): the insert
# finds the resource's rid by its (type, id), written earlier in the same transaction.
RID_OF = "(SELECT rid FROM fhir_resource WHERE type = ?1 AND id = ?2)"
# A resource's versions are read by its rid, looked up by (type, id) bound in that order.
RESOURCE_RID = "(SELECT rid FROM fhir_resource WHERE type = ? AND id = ?)"
INDEX_INSERTS = {
    TokenIndex: f"INSERT INTO fhir_token (rid, type, param, system, code) "
                f"VALUES ({RID_OF}, ?1, ?3, ?4, ?5)",
    StringIndex: f"INSERT INTO fhir_string (rid, type, param, normalized, exact) "
                 f"VALUES ({RID_OF}, ?1, ?3, ?4, ?5)",
    DateIndex: f"INSERT INTO fhir_date (rid, type, param, low, high) "
               f"VALUES ({RID_OF}, ?1, ?3, ?4, ?5)",
    ReferenceIndex: f"INSERT INTO fhir_reference (rid, type, param, target) "
                    f"VALUES ({RID_OF}, ?1, ?3, ?4)",
    QuantityIndex: f"INSERT INTO fhir_quantity (rid, type, param, value, system, code) "
                   f"VALUES ({RID_OF}, ?1, ?3, ?4, ?5, ?6)",
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
        # A call of a group commit that fails is undone by running the group again with a
        # SAVEPOINT per call, and a non-atomic call has one per entry. SQLite keeps the
        # original of every page a savepoint changes in a sub-journal, by default a
        # temporary *file*: one pwrite per page, which was 30 % of the writer thread
        # (py-spy --native, when every call had its savepoint) and held the write lock 3-4x
        # longer. In memory it costs at most one call's pages, freed when the savepoint is
        # released.
        db.execute("PRAGMA temp_store=MEMORY")
        key_by_rid(db)
        db.executescript(SCHEMA)
        last = db.execute("SELECT max(last_updated) FROM fhir_version").fetchall()[0][0]
    except BaseException:
        db.close()
        raise
    # A clock stepped back across a restart must not give older lastUpdated values.
    return db, parse_instant(str(last)) if last else datetime.min.replace(tzinfo=UTC)


INDEX_VALUE_COLUMNS = {  # each index table's value columns, after rid, type and param
    "fhir_token": "system, code", "fhir_string": "normalized, exact",
    "fhir_date": "low, high", "fhir_reference": "target",
    "fhir_quantity": "value, system, code",
}
# The schema's triggers on fhir_resource: a migration drops them, `SCHEMA` makes them again.
_TRIGGERS = ("fhir_resource_event_insert", "fhir_resource_event_update",
             "fhir_resource_archive_insert", "fhir_resource_archive_update")


def key_by_rid(db: sqlite3.Connection) -> None:
    """A store file from before `rid` moved to it: its index rows first, then its versions
    and change events (nothing done to a file already there). Each step is one transaction;
    a file left between them (a crash) is a layout this release opens, and moves on."""
    if _named_by_id(db, "fhir_resource"):  # index rows named by (type, id)
        _key_by_rid(db)
    if _named_by_id(db, "fhir_version"):  # versions and change events likewise
        _key_history_by_rid(db)


def _named_by_id(db: sqlite3.Connection, table: str) -> bool:
    """Whether `table` is there without its `rid` column: a layout from before it."""
    columns = {str(row[1]) for row in db.execute(f"PRAGMA table_info({table})")}
    return bool(columns) and "rid" not in columns


def _run_in_one_transaction(db: sqlite3.Connection, script: list[str]) -> None:
    """`script`'s statements between BEGIN IMMEDIATE and COMMIT: all or nothing."""
    try:
        db.executescript("\n".join(["BEGIN IMMEDIATE;", *script, "COMMIT;"]))
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _key_by_rid(db: sqlite3.Connection) -> None:
    """Move a store from before `rid` to it, in one transaction (all or nothing): every
    resource gets its number in the order it was first written, and every index row names
    its resource by it. The triggers and the last-updated index go with the old table and
    `SCHEMA` makes them again."""
    script = [f"DROP TRIGGER IF EXISTS {name};" for name in _TRIGGERS]
    script.append("DROP INDEX IF EXISTS fhir_resource_updated;")
    script.append("ALTER TABLE fhir_resource RENAME TO fhir_resource_by_id;")
    for table in INDEX_TABLES:
        script.append(f"DROP INDEX IF EXISTS {table}_lookup;")
        script.append(f"DROP INDEX IF EXISTS {table}_resource;")
        script.append(f"ALTER TABLE {table} RENAME TO {table}_by_id;")
    script.append(SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS fhir_resource"):
                         SCHEMA.index("-- Searches and counts read live resources only")])
    script.append(INDEX_TABLES_SQL)
    script.append("INSERT INTO fhir_resource (type, id, version, last_updated, deleted, body) "
                  "SELECT type, id, version, last_updated, deleted, body "
                  "FROM fhir_resource_by_id ORDER BY rowid;")
    for table, columns in INDEX_VALUE_COLUMNS.items():
        values = ", ".join(f"x.{c.strip()}" for c in columns.split(","))
        # A row whose resource is gone (none should be) has nothing to name: left out.
        script.append(
            f"INSERT INTO {table} (rid, type, param, {columns}) "
            f"SELECT r.rid, x.type, x.param, {values} FROM {table}_by_id x "
            f"JOIN fhir_resource r ON r.type = x.type AND r.id = x.id ORDER BY x.rowid;")
        script.append(f"DROP TABLE {table}_by_id;")
    script.append("DROP TABLE fhir_resource_by_id;")
    _run_in_one_transaction(db, script)


def _key_history_by_rid(db: sqlite3.Connection) -> None:
    """Move a store whose versions and change events are named by (type, id) to naming
    them by rid too, in one transaction: every row is copied, seq kept, with its
    resource's rid. No statement deletes a current row, so every version has one; a row
    that had none would fail the NOT NULL and leave the file as it was (a history is not
    dropped). The event table's AUTOINCREMENT high-water mark moves with it: a purged
    seq is never drawn again. The triggers go and `SCHEMA` makes them again."""
    has_events = bool(db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'fhir_event'").fetchall())
    named = "LEFT JOIN fhir_resource r ON r.type = x.type AND r.id = x.id ORDER BY x.seq;"
    script = [f"DROP TRIGGER IF EXISTS {name};" for name in _TRIGGERS]
    script += ["DROP INDEX IF EXISTS fhir_version_updated;",
               "DROP INDEX IF EXISTS fhir_version_type_updated;",
               "ALTER TABLE fhir_version RENAME TO fhir_version_by_id;",
               VERSION_TABLE_SQL,
               "INSERT INTO fhir_version (seq, rid, type, id, version, last_updated, deleted, "
               "body) SELECT x.seq, r.rid, x.type, x.id, x.version, x.last_updated, "
               f"x.deleted, x.body FROM fhir_version_by_id x {named}",
               "DROP TABLE fhir_version_by_id;",
               VERSION_INDEXES_SQL]
    if has_events:
        script += ["ALTER TABLE fhir_event RENAME TO fhir_event_by_id;",
                   EVENT_TABLE_SQL,
                   "INSERT INTO fhir_event (seq, rid, type, id, version, action, at) "
                   "SELECT x.seq, r.rid, x.type, x.id, x.version, x.action, x.at "
                   f"FROM fhir_event_by_id x {named}",
                   "DELETE FROM sqlite_sequence WHERE name = 'fhir_event';",
                   "UPDATE sqlite_sequence SET name = 'fhir_event' "
                   "WHERE name = 'fhir_event_by_id';",
                   "DROP TABLE fhir_event_by_id;"]
    _run_in_one_transaction(db, script)


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

