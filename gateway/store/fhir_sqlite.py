"""The embedded FHIR resource store: versioned resources and their search indexes in SQLite.

Three connections to one WAL file. One plain sqlite3 writer, on a thread of its own,
applies every write: concurrent `transact` calls are group-committed, several calls in one
BEGIN IMMEDIATE ... COMMIT, each inside its own SAVEPOINT so that it stays atomic on its
own and a call that fails rolls back only itself; the whole group is one hop to that
thread. read() and vread() use a plain synchronous sqlite3 connection on the event loop
thread; search, count and history an aiosqlite read-only connection.

Index rows exist only for the current, non-deleted version of a resource; triggers keep
that true (and archive every version) whatever statement changes the current row.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import aiosqlite
import orjson

# For its side effect: it caps aiosqlite's logging, which would otherwise log every
# statement's parameters (patient data) at DEBUG.
import gateway.store.sqlite  # noqa: F401
from gateway.store.errors import StoreUnavailable
from gateway.store.fhir import (
    DateIndex,
    DateMatch,
    HistoryQuery,
    IdMatch,
    IndexEntry,
    Indexer,
    LastUpdatedMatch,
    Match,
    MissingMatch,
    Prefix,
    QuantityIndex,
    QuantityMatch,
    ReferenceIndex,
    ReferenceMatch,
    SearchPage,
    SearchQuery,
    SortKey,
    StoredResource,
    StoreStats,
    StringIndex,
    StringMatch,
    TokenIndex,
    TokenMatch,
    WriteConflict,
    WriteOutcome,
    WriteRequest,
)

log = logging.getLogger(__name__)

_SCHEMA = """
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

_UPSERT = (
    "INSERT INTO fhir_resource (type, id, version, last_updated, deleted, body) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (type, id) DO UPDATE SET "
    "version = excluded.version, last_updated = excluded.last_updated, "
    "deleted = excluded.deleted, body = excluded.body"
)
_INDEX_INSERTS = {
    TokenIndex: "INSERT INTO fhir_token (type, id, param, system, code) VALUES (?, ?, ?, ?, ?)",
    StringIndex: "INSERT INTO fhir_string (type, id, param, normalized, exact) "
                 "VALUES (?, ?, ?, ?, ?)",
    DateIndex: "INSERT INTO fhir_date (type, id, param, low, high) VALUES (?, ?, ?, ?, ?)",
    ReferenceIndex: "INSERT INTO fhir_reference (type, id, param, target) VALUES (?, ?, ?, ?)",
    QuantityIndex: "INSERT INTO fhir_quantity (type, id, param, value, system, code) "
                   "VALUES (?, ?, ?, ?, ?, ?)",
}
_INDEX_TABLES = ("fhir_token", "fhir_string", "fhir_date", "fhir_reference", "fhir_quantity")
_COLUMNS = "r.type, r.id, r.version, r.last_updated, r.deleted, r.body"
_VERSION_COLUMNS = "type, id, version, last_updated, deleted, body"

# FHIR R4 http.html#trules: DELETE, then POST, then PUT.
_METHOD_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2}
# FHIR R4 datatypes.html#id.
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_ONE_MICROSECOND = timedelta(microseconds=1)
_MAX_KEYS_PER_STATEMENT = 400
_Row = Sequence[Any]
_Sql = tuple[str, Sequence[object]]
Outcomes = list[WriteOutcome | WriteConflict]


@dataclass(slots=True)
class _Job:
    """One transact() call waiting for the next group commit."""

    writes: Sequence[WriteRequest]
    atomic: bool
    future: asyncio.Future[Outcomes]
    outcomes: Outcomes | None = None
    error: BaseException | None = None


@dataclass(slots=True, eq=False)
class _Entry:
    """One write being resolved: its final id, the version there now, and its outcome."""

    position: int  # index in the caller's list, named in conflicts
    request: WriteRequest
    resource: dict[str, Any] | None  # the caller's resource, copied (references rewritten)
    id: str | None = None
    current: StoredResource | None = None
    outcome: WriteOutcome | None = None
    # A POST whose If-None-Exist repeats an earlier create in the same call: it is that one.
    same_as: _Entry | None = None
    index: list[IndexEntry] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        assert self.id is not None
        return (self.request.resource_type, self.id)


def _open_writer(path: Path, synchronous: Literal["normal", "full", "extra"],
                 ) -> tuple[sqlite3.Connection, datetime]:
    """Writer thread: the writer connection, set up as `open_database` sets up its own
    (WAL, autocommit, `synchronous`, busy timeout), with the schema in place; and the
    latest lastUpdated stored, which new ones must follow."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        last = db.execute("SELECT max(last_updated) FROM fhir_version").fetchall()[0][0]
    except BaseException:
        db.close()
        raise
    # A clock stepped back across a restart must not give older lastUpdated values.
    return db, _parse_instant(str(last)) if last else datetime.min.replace(tzinfo=UTC)


class SqliteFhirStore:
    """FhirStore on one SQLite (WAL) file: a group-committing writer and two readers."""

    def __init__(self, db: sqlite3.Connection, executor: ThreadPoolExecutor,
                 reader: aiosqlite.Connection, lookup: sqlite3.Connection, indexer: Indexer,
                 last_stamp: datetime, max_batch: int) -> None:
        self._db = db  # used only on the executor's one thread, which made it
        self._executor = executor
        self._reader = reader
        self._lookup = lookup
        self._indexer = indexer
        self._last_stamp = last_stamp  # the writer thread's alone
        self._max_batch = max_batch
        self._pending: list[_Job] = []
        self._wakeup = asyncio.Event()
        self._read_lock = asyncio.Lock()  # one read transaction at a time on the reader
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._groups = 0
        self._jobs = 0

    @classmethod
    async def open(cls, path: Path, indexer: Indexer,
                   synchronous: Literal["normal", "full", "extra"] = "full",
                   max_batch: int = 64) -> SqliteFhirStore:
        # The writer connection is made on the thread that will use it, and only there.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fhir-writer")
        loop = asyncio.get_running_loop()
        try:
            db, last_stamp = await loop.run_in_executor(
                executor, _open_writer, path, synchronous)
        except BaseException:
            executor.shutdown()
            raise
        reader: aiosqlite.Connection | None = None
        lookup: sqlite3.Connection | None = None
        try:
            uri = f"{path.resolve().as_uri()}?mode=ro"  # percent-encoded: any file name
            reader = await aiosqlite.connect(uri, uri=True, isolation_level=None)
            await reader.execute("PRAGMA busy_timeout=5000")
            # Autocommit (isolation_level None): each SELECT is its own read transaction,
            # so a read always sees the latest commit.
            lookup = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=0.5)
        except BaseException:
            if lookup is not None:
                lookup.close()
            if reader is not None:
                await reader.close()
            await loop.run_in_executor(executor, db.close)
            executor.shutdown()
            raise
        store = cls(db, executor, reader, lookup, indexer, last_stamp, max_batch)
        store._writer = asyncio.create_task(store._write_loop(), name="fhir-store-writer")
        return store

    # -- reading: the hot path ------------------------------------------------------------

    # read() and vread() are primary-key lookups that take a few microseconds, less than
    # handing a statement to aiosqlite's thread and back, so they run on a plain sqlite3
    # connection right here on the event loop thread. WAL readers never wait for the
    # writer, so this cannot stall the loop behind a write.

    async def read(self, resource_type: str, id: str) -> StoredResource | None:
        """The current version (possibly a deletion marker), or None if never stored."""
        return self._lookup_one(
            "SELECT type, id, version, last_updated, deleted, body FROM fhir_resource "
            "WHERE type = ? AND id = ?", (resource_type, id))

    async def vread(self, resource_type: str, id: str, version: int) -> StoredResource | None:
        return self._lookup_one(
            f"SELECT {_VERSION_COLUMNS} FROM fhir_version "
            "WHERE type = ? AND id = ? AND version = ?", (resource_type, id, version))

    def _lookup_one(self, sql: str, params: tuple[object, ...]) -> StoredResource | None:
        try:
            # fetchall, not fetchone: it steps the statement to its end, which resets it
            # and ends its read transaction (a half-read statement would pin the snapshot
            # and later reads on this connection would not see new commits).
            rows = self._lookup.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"the FHIR store could not be read: {type(exc).__name__}") from None
        return _stored(rows[0]) if rows else None

    # -- search and history ---------------------------------------------------------------

    async def search(self, query: SearchQuery, *, total: bool = False) -> SearchPage:
        """Current, non-deleted versions matching the query."""
        rows, count = await self._read(_select_sql(query, query.count, query.offset),
                                       _count_sql(query) if total else None)
        return SearchPage([_stored(row) for row in rows], count)

    async def count(self, query: SearchQuery) -> int:
        rows, _ = await self._read(_count_sql(query))
        return int(rows[0][0])

    def _quick(self, statement: _Sql,
               count: _Sql | None) -> tuple[list[_Row], int | None] | None:
        """The read on the event loop thread if it finishes within a small budget of
        SQLite steps (an indexed search: tens of microseconds, less than a thread hop);
        None if it would take longer, so it goes to the reader thread instead and never
        stalls the loop."""
        lookup = self._lookup
        lookup.set_progress_handler(_over_budget, _QUICK_STEPS)
        try:
            if count is None:
                return lookup.execute(*statement).fetchall(), None
            lookup.execute("BEGIN")
            try:
                rows = lookup.execute(*statement).fetchall()
                total = lookup.execute(*count).fetchall()
            finally:
                lookup.execute("COMMIT")
            return rows, int(total[0][0])
        except sqlite3.OperationalError:
            if lookup.in_transaction:
                lookup.execute("ROLLBACK")
            return None  # interrupted by the budget (or busy): the reader thread decides
        finally:
            lookup.set_progress_handler(None, 0)

    async def history(self, query: HistoryQuery) -> SearchPage:
        """Versions newest first; total always set."""
        if query.id is not None and query.resource_type is None:
            raise ValueError("instance history needs the resource type")
        where: list[str] = []
        params: list[object] = []
        if query.resource_type is not None:
            where.append("type = ?")
            params.append(query.resource_type)
        if query.id is not None:
            where.append("id = ?")
            params.append(query.id)
        if query.since is not None:
            where.append("last_updated >= ?")
            params.append(query.since)
        condition = f" WHERE {' AND '.join(where)}" if where else ""
        # seq follows commit order, so it breaks ties between equal instants newest first.
        page = (f"SELECT {_VERSION_COLUMNS} FROM fhir_version{condition} "
                "ORDER BY last_updated DESC, seq DESC LIMIT ? OFFSET ?",
                [*params, query.count, query.offset])
        rows, total = await self._read(
            page, (f"SELECT count(*) FROM fhir_version{condition}", params))
        return SearchPage([_stored(row) for row in rows], total)

    async def stats(self) -> StoreStats:
        """Counts for operators: current resources (deletions excluded) and all versions."""
        rows, versions = await self._read(
            ("SELECT type, count(*) FROM fhir_resource WHERE deleted = 0 GROUP BY type", []),
            ("SELECT count(*) FROM fhir_version", []))
        counts = {str(t): int(n) for t, n in rows}
        return StoreStats(sum(counts.values()), versions or 0, counts)

    async def _read(self, statement: _Sql,
                    count: _Sql | None = None) -> tuple[list[_Row], int | None]:
        """Rows of one statement and, if asked, a count from the same snapshot (so a page
        and its total agree). The lock keeps one read transaction at a time on the reader:
        a statement slipped into another's would see that one's older snapshot."""
        try:
            quick = self._quick(statement, count)
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"the FHIR store could not be read: {type(exc).__name__}") from None
        if quick is not None:
            return quick
        async with self._read_lock:
            try:
                if count is None:
                    return list(await self._reader.execute_fetchall(*statement)), None
                await self._reader.execute("BEGIN")
                try:
                    rows: list[_Row] = list(await self._reader.execute_fetchall(*statement))
                    total = list(await self._reader.execute_fetchall(*count))
                finally:
                    await self._reader.execute("COMMIT")
                return rows, int(total[0][0])
            except (sqlite3.Error, ValueError) as exc:  # ValueError: connection closed
                raise StoreUnavailable(
                    f"the FHIR store could not be read: {type(exc).__name__}") from None

    # -- writing --------------------------------------------------------------------------

    # A whole group commit (BEGIN IMMEDIATE, a savepoint per call, COMMIT) runs as one
    # synchronous function on the writer thread: one hop there and back per group, not
    # one per statement. The futures are resolved back here on the event loop.

    async def transact(self, writes: Sequence[WriteRequest], *,
                       atomic: bool = True) -> Outcomes:
        """Apply writes. atomic: all or nothing, raising the first WriteConflict (with its
        entry index). Not atomic: each entry on its own; a failed entry's slot holds its
        WriteConflict."""
        if self._closing:
            raise StoreUnavailable("the FHIR store is closing")
        if not writes:
            return []
        future: asyncio.Future[Outcomes] = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(list(writes), atomic, future))
        self._wakeup.set()
        return await future

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                group = self._pending[:self._max_batch]
                del self._pending[:self._max_batch]
                await self._commit_group(group)
            if self._closing:
                return

    async def _commit_group(self, group: Sequence[_Job]) -> None:
        """Commit a group on the writer thread, then answer each caller."""
        jobs = [job for job in group if not job.future.done()]  # skip cancelled callers
        if not jobs:
            return
        loop = asyncio.get_running_loop()
        committed = await loop.run_in_executor(self._executor, self._commit_group_sync, jobs)
        if not committed:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(StoreUnavailable("the FHIR store could not commit"))
            return
        self._groups += 1
        self._jobs += len(jobs)
        for job in jobs:
            if job.future.done():
                continue
            if job.error is not None:
                job.future.set_exception(job.error)
            else:
                assert job.outcomes is not None
                job.future.set_result(job.outcomes)

    def _commit_group_sync(self, jobs: Sequence[_Job]) -> bool:
        """Writer thread: several callers' writes in one transaction, each in its own
        savepoint; whether it committed (if not, nothing in the group is durable)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for job in jobs:
                self._run_job(job)
            self._db.execute("COMMIT")
        except Exception as exc:  # any failure to commit: nothing in the group is durable
            log.error("FHIR store commit failed for a group of %d: %s", len(jobs),
                      type(exc).__name__)
            self._rollback()
            return False
        return True

    def _rollback(self) -> None:
        if not self._db.in_transaction:
            return  # SQLite already rolled back (an I/O error, a full disk)
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("FHIR store rollback failed: %s", type(exc).__name__)

    def _run_job(self, job: _Job) -> None:
        """One caller's writes in a savepoint: released if they apply, rolled back if not.
        A database error escapes, failing the whole group."""
        self._db.execute("SAVEPOINT job")
        try:
            if job.atomic:
                job.outcomes = list(self._apply(job.writes, 0))
            else:
                job.outcomes = self._apply_batch(job.writes)
        except sqlite3.Error:
            raise
        except Exception as exc:  # the caller's conflict (or a bug in an indexer): theirs
            self._db.execute("ROLLBACK TO job")
            job.error = exc
        self._db.execute("RELEASE job")

    def _apply_batch(self, writes: Sequence[WriteRequest]) -> Outcomes:
        outcomes: Outcomes = []
        for position, write in enumerate(writes):
            self._db.execute("SAVEPOINT entry")
            try:
                outcomes.extend(self._apply([write], position))
            except WriteConflict as conflict:
                self._db.execute("ROLLBACK TO entry")
                outcomes.append(conflict)
            self._db.execute("RELEASE entry")
        return outcomes

    def _apply(self, writes: Sequence[WriteRequest], first: int) -> list[WriteOutcome]:
        """Resolve and write entries as one FHIR transaction; the caller's savepoint makes
        it atomic. `first` is the position of writes[0] in the caller's list."""
        entries = [_prepare(first + i, write) for i, write in enumerate(writes)]
        ordered = sorted(entries, key=lambda e: _METHOD_ORDER[e.request.method])
        claimed: dict[tuple[str, str], int] = {}
        current = self._current_rows([
            (e.request.resource_type, target) for e in entries
            if (target := e.request.id or (e.resource or {}).get("id"))])

        deletes = [e for e in ordered if e.request.method == "DELETE"]
        for entry in deletes:
            self._resolve_delete(entry, current)
            _claim(entry, claimed)
        self._write([e for e in deletes if e.outcome is None])

        upserts = [e for e in ordered if e.request.method != "DELETE"]
        created: dict[SearchQuery, _Entry] = {}
        for entry in upserts:
            self._resolve_upsert(entry, current, created)
            _claim(entry, claimed)

        # FHIR R4 http.html#trules: references to an entry's fullUrl become its final id.
        targets = {e.request.full_url: f"{e.request.resource_type}/{e.id}"
                   for e in entries if e.request.full_url and e.id is not None}
        if targets:
            for entry in upserts:
                _rewrite_references(entry.resource, targets)
        self._write([e for e in upserts if e.outcome is None and e.same_as is None])

        outcomes: list[WriteOutcome] = []
        for entry in entries:
            if entry.same_as is not None:
                assert entry.same_as.outcome is not None
                entry.outcome = WriteOutcome(200, entry.same_as.outcome.stored, changed=False)
            assert entry.outcome is not None
            outcomes.append(entry.outcome)
        return outcomes

    def _resolve_delete(self, entry: _Entry,
                              current: Mapping[tuple[str, str], StoredResource]) -> None:
        request = entry.request
        if request.condition is not None:
            matches = self._matches(entry)
            if not matches:
                entry.outcome = WriteOutcome(204, None, changed=False)
                return
            entry.id, entry.current = matches[0].id, matches[0]
        else:
            assert request.id is not None
            entry.id = request.id
            entry.current = current.get(entry.key)
        _check_if_match(entry)
        if entry.current is None or entry.current.deleted:
            entry.outcome = WriteOutcome(204, None, changed=False)

    def _resolve_upsert(self, entry: _Entry,
                              current: Mapping[tuple[str, str], StoredResource],
                              created: dict[SearchQuery, _Entry]) -> None:
        request = entry.request
        assert entry.resource is not None
        given: str | None = entry.resource.get("id")
        if request.condition is not None:
            matches = self._matches(entry)
            if matches and request.method == "POST":  # If-None-Exist found it: no write
                entry.id = matches[0].id
                entry.outcome = WriteOutcome(200, matches[0], changed=False)
                return
            if matches:
                if given is not None and given != matches[0].id:
                    raise WriteConflict(400, f"entry {entry.position}: the resource id does "
                                        "not match the resource the condition found",
                                        entry.position)
                entry.id, entry.current = matches[0].id, matches[0]
                _check_if_match(entry)
                return
            if request.method == "POST":
                if request.condition in created:
                    entry.same_as = created[request.condition]
                    entry.id = entry.same_as.id
                    return
                created[request.condition] = entry
        entry.id = request.id or given or str(uuid.uuid4())
        entry.current = current.get(entry.key)
        if request.method == "POST" and entry.current is not None and not entry.current.deleted:
            raise WriteConflict(409, f"entry {entry.position}: a resource with this id "
                                "already exists", entry.position)
        _check_if_match(entry)

    def _matches(self, entry: _Entry) -> list[StoredResource]:
        """The (at most two) resources an entry's condition finds; 412 if several."""
        assert entry.request.condition is not None
        query = entry.request.condition
        if query.resource_type != entry.request.resource_type:
            raise WriteConflict(400, f"entry {entry.position}: the condition searches "
                                "another resource type", entry.position)
        sql, params = _select_sql(query, 2, 0, ordered=False)
        rows = [_stored(row) for row in self._db.execute(sql, params).fetchall()]
        if len(rows) > 1:
            rule = "If-None-Exist" if entry.request.method == "POST" else "the condition"
            raise WriteConflict(412, f"entry {entry.position}: {rule} matches more than one "
                                "resource", entry.position)
        return rows

    def _current_rows(
        self, keys: Sequence[tuple[str, str]],
    ) -> dict[tuple[str, str], StoredResource]:
        """The current rows for several (type, id) keys, read on the writer (so inside
        this transaction) in as few statements as possible."""
        found: dict[tuple[str, str], StoredResource] = {}
        by_type: dict[str, list[str]] = {}
        for resource_type, id_ in dict.fromkeys(keys):
            by_type.setdefault(resource_type, []).append(id_)
        # One statement per type: `type = ? AND id IN (...)` is a primary-key search;
        # a row-value `(type, id) IN (VALUES ...)` would scan the whole table.
        for resource_type, ids in by_type.items():
            for start in range(0, len(ids), _MAX_KEYS_PER_STATEMENT):
                chunk = ids[start:start + _MAX_KEYS_PER_STATEMENT]
                rows = self._db.execute(_current_rows_sql(len(chunk)),
                                        [resource_type, *chunk]).fetchall()
                for row in rows:
                    stored = _stored(row)
                    found[(stored.resource_type, stored.id)] = stored
        return found

    def _write(self, entries: Sequence[_Entry]) -> None:
        """Give each entry its new version (or find it unchanged) and write them all."""
        rows: list[tuple[object, ...]] = []
        index_rows: dict[type[IndexEntry], list[tuple[object, ...]]] = {}
        for entry in entries:
            stored = self._next_version(entry)
            if stored is None:
                continue
            rows.append((stored.resource_type, stored.id, stored.version, stored.last_updated,
                         int(stored.deleted), stored.body))
            for item in entry.index:
                index_rows.setdefault(type(item), []).append(
                    _index_row(stored.resource_type, stored.id, item))
        if not rows:
            return
        # The triggers archive each row as a version and drop the old index rows first.
        self._db.executemany(_UPSERT, rows)
        for kind, values in index_rows.items():
            self._db.executemany(_INDEX_INSERTS[kind], values)

    def _next_version(self, entry: _Entry) -> StoredResource | None:
        """The version this entry writes, its outcome set; None if its content is unchanged."""
        resource_type = entry.request.resource_type
        assert entry.id is not None
        current = entry.current
        live = current is not None and not current.deleted
        if entry.request.method == "DELETE":
            assert current is not None
            stamp = self._stamp(current.last_updated)
            stored = StoredResource(resource_type, entry.id, current.version + 1, stamp, True,
                                    b"")
            entry.outcome = WriteOutcome(204, None)
            return stored
        assert entry.resource is not None
        document = _document(resource_type, entry.id, entry.resource)
        if current is not None and live and _same_content(current.body, document):
            # A resent message: same content, so no new version (FHIR R4 allows this).
            entry.outcome = WriteOutcome(200, current, changed=False)
            return None
        version = current.version + 1 if current is not None else 1
        stamp = self._stamp(current.last_updated if current is not None else None)
        meta = document["meta"]
        document["meta"] = {"versionId": str(version), "lastUpdated": stamp, **meta}
        entry.index = list(dict.fromkeys(self._indexer(resource_type, document)))
        stored = StoredResource(resource_type, entry.id, version, stamp, False,
                                orjson.dumps(document, default=_decimal))
        entry.outcome = WriteOutcome(200 if live else 201, stored)
        return stored

    def _stamp(self, after: str | None) -> str:
        """Now, as a FHIR instant later than any given before and than `after`."""
        floor = self._last_stamp
        if after is not None:
            floor = max(floor, _parse_instant(after))
        now = datetime.now(UTC)
        if now <= floor:
            now = floor + _ONE_MICROSECOND
        self._last_stamp = now
        return _format_instant(now)

    @property
    def groups_committed(self) -> int:
        """Group commits so far (each carries one or more transact calls)."""
        return self._groups

    # -- lifecycle ------------------------------------------------------------------------

    async def probe_writable(self) -> None:
        """A real (tiny) write, for readiness: raises StoreUnavailable if it fails."""
        if self._closing:
            raise StoreUnavailable("the FHIR store is closing")
        # The writer thread runs one task at a time: never inside a group's transaction.
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._probe_sync)
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"the FHIR store is not writable: {type(exc).__name__}") from None

    def _probe_sync(self) -> None:
        self._db.execute(
            "INSERT INTO fhir_store_meta (key, value) VALUES ('ready_probe', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (_format_instant(datetime.now(UTC)),))

    async def close(self) -> None:
        """Commit what is queued, then close every connection; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
        self._lookup.close()
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
        finally:
            self._executor.shutdown()  # its queue is empty: this only joins the thread
            await self._reader.close()
        if self._groups:
            log.info("FHIR store closed: %d transactions in %d group commits (%.1f per "
                     "commit)", self._jobs, self._groups, self._jobs / self._groups)


# -- writes: pure helpers -------------------------------------------------------------------


def _prepare(position: int, request: WriteRequest) -> _Entry:
    """Check an entry's shape and copy its resource (the caller's dict is never changed)."""
    def bad(reason: str) -> WriteConflict:
        return WriteConflict(400, f"entry {position}: {reason}", position)

    if request.method not in _METHOD_ORDER:
        raise bad("the method is not POST, PUT or DELETE")
    if request.id is not None and not _ID.fullmatch(request.id):
        raise bad("the id is not a valid FHIR id")
    if request.method == "DELETE":
        if (request.id is None) == (request.condition is None):
            raise bad("a delete needs either an id or a condition")
        return _Entry(position, request, None)
    if request.method == "PUT" and (request.id is None) == (request.condition is None):
        raise bad("an update needs either an id or a condition")
    if not isinstance(request.resource, dict):
        raise bad(f"{request.method} needs a resource")
    try:
        resource = _json_copy(request.resource)
    except TypeError:
        raise bad("the resource is not JSON") from None
    if resource.setdefault("resourceType", request.resource_type) != request.resource_type:
        raise bad("the resourceType does not match the request")
    given = resource.get("id")
    if given is not None and (not isinstance(given, str) or not _ID.fullmatch(given)):
        raise bad("the resource id is not a valid FHIR id")
    if request.method == "PUT" and request.id is not None and given not in (None, request.id):
        raise bad("the resource id does not match the request id")
    if not isinstance(resource.get("meta", {}), dict):
        raise bad("meta is not an object")
    return _Entry(position, request, resource)


def _claim(entry: _Entry, claimed: dict[tuple[str, str], int]) -> None:
    """FHIR R4 http.html#trules: two entries resolving to one resource fail the transaction
    (a matched If-None-Exist only reads, so it claims nothing)."""
    if entry.id is None or entry.same_as is not None or (
            entry.request.method == "POST" and entry.outcome is not None):
        return
    other = claimed.setdefault(entry.key, entry.position)
    if other != entry.position:
        raise WriteConflict(400, f"entry {entry.position}: resolves to the same resource as "
                            f"entry {other}", entry.position)


def _check_if_match(entry: _Entry) -> None:
    expected = entry.request.if_match
    if expected is None:
        return
    current = entry.current
    if current is None or current.deleted:
        raise WriteConflict(412, f"entry {entry.position}: If-Match version {expected} but "
                            "the resource does not exist", entry.position)
    if current.version != expected:
        raise WriteConflict(412, f"entry {entry.position}: If-Match version {expected} does "
                            f"not match current version {current.version}", entry.position)


def _document(resource_type: str, id: str, resource: Mapping[str, Any]) -> dict[str, Any]:
    """The resource as it will be served: resourceType, id and meta first; meta without
    versionId and lastUpdated (the store sets those)."""
    meta = {k: v for k, v in (resource.get("meta") or {}).items()
            if k not in ("versionId", "lastUpdated")}
    document: dict[str, Any] = {"resourceType": resource_type, "id": id, "meta": meta}
    document.update((k, v) for k, v in resource.items()
                    if k not in ("resourceType", "id", "meta"))
    return document


def _current_rows_sql(count: int) -> str:
    """The current rows of `count` ids of one type (a primary-key search)."""
    return (f"SELECT {_COLUMNS} FROM fhir_resource r WHERE r.type = ? "
            f"AND r.id IN ({','.join('?' * count)})")


def _same_content(body: bytes, document: Mapping[str, Any]) -> bool:
    """Whether a stored version says what `document` says (store meta aside). Decimals are
    compared as written ("1.50" against Decimal('1.50')), not as floats: 0.1 the float is
    not 0.100 the FHIR decimal."""
    stored = json.loads(body, parse_float=Decimal) if _FLOATISH.search(body) else (
        orjson.loads(body))
    return _content(stored) == _content(document)


# A digit then a fraction or exponent: the body holds a number a float would not keep.
_FLOATISH = re.compile(rb"[0-9](?:\.[0-9]|[eE][-+]?[0-9])")


def _content(document: Mapping[str, Any]) -> dict[str, Any]:
    """What a version says, apart from the store's versionId and lastUpdated."""
    content = dict(document)
    meta = {k: v for k, v in (content.pop("meta", None) or {}).items()
            if k not in ("versionId", "lastUpdated")}
    if meta:
        content["meta"] = meta
    return content


def _rewrite_references(node: Any, targets: Mapping[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                if value in targets:
                    node[key] = targets[value]
            else:
                _rewrite_references(value, targets)
    elif isinstance(node, list):
        for item in node:
            _rewrite_references(item, targets)


def _index_row(resource_type: str, id: str, item: IndexEntry) -> tuple[object, ...]:
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


def _stored(row: _Row) -> StoredResource:
    return StoredResource(str(row[0]), str(row[1]), int(row[2]), str(row[3]), bool(row[4]),
                          bytes(row[5]))


def _format_instant(moment: datetime) -> str:
    """FHIR instant in UTC with microseconds: fixed width, so text order is time order."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# SQLite virtual-machine steps a read may take on the event loop thread before it is
# interrupted and handed to the reader thread (~1 ms of work at the most).
_QUICK_STEPS = 20_000


def _over_budget() -> int:
    return 1  # non-zero: interrupt the statement


def _parse_instant(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


# -- search: SearchQuery to SQL, values always bound ----------------------------------------


def _select_sql(query: SearchQuery, limit: int | None, offset: int,
                ordered: bool = True) -> tuple[str, list[object]]:
    """The page's SELECT; unordered for a condition, which only counts up to `limit`."""
    params: list[object] = []
    where, driven = _where(query, params)
    order = f" ORDER BY {_order(query.sort, params, driven)}" if ordered else ""
    params.extend((-1 if limit is None else limit, offset))
    return (f"SELECT {_COLUMNS} FROM fhir_resource r WHERE {where}{order} "
            "LIMIT ? OFFSET ?", params)


def _count_sql(query: SearchQuery) -> tuple[str, list[object]]:
    params: list[object] = []
    where, _ = _where(query, params)
    return f"SELECT count(*) FROM fhir_resource r WHERE {where}", params


def _where(query: SearchQuery, params: list[object]) -> tuple[str, bool]:
    """Clauses AND-ed, each clause's matches OR-ed; and whether some clause is an
    `r.id IN (...)` that can drive the search (its ids looked up by key)."""
    params.append(query.resource_type)
    parts = ["r.type = ?", "r.deleted = 0"]
    driven = False
    for clause in query.clauses:
        if not clause:
            parts.append("0")  # OR over no values matches nothing
            continue
        clause_params: list[object] = []
        sql = [_match_sql(query.resource_type, m, clause_params) for m in clause]
        if all(negate is False for negate, _ in sql):
            # One IN over the union, rather than ORs, which SQLite cannot drive from.
            parts.append(f"r.id IN ({' UNION ALL '.join(sub for _, sub in sql)})")
            driven = True
        else:
            parts.append("(" + " OR ".join(
                f"r.id {'NOT IN' if negate else 'IN'} ({sub})" for negate, sub in sql) + ")")
        params.extend(clause_params)
    return " AND ".join(parts), driven


def _match_sql(resource_type: str, match: Match, params: list[object]) -> tuple[bool, str]:
    """A subquery for the ids of the resources a match holds for, and whether the match
    is negated (the resource must not be among them)."""
    match match:
        case IdMatch(id):
            params.append(id)
            return False, "SELECT ?"
        case LastUpdatedMatch(prefix, low, high):
            params.append(resource_type)
            condition = _range_sql("last_updated", "last_updated", prefix, low, high, params)
            return False, f"SELECT id FROM fhir_resource WHERE type = ? AND {condition}"
        case MissingMatch(param, missing):
            parts = []
            for table in _INDEX_TABLES:
                parts.append(f"SELECT id FROM {table} WHERE type = ? AND param = ?")
                params.extend((resource_type, param))
            return missing, " UNION ALL ".join(parts)
    params.extend((resource_type, match.param))
    table, condition, negate = _index_condition(match, params)
    return negate, f"SELECT id FROM {table} WHERE type = ? AND param = ? AND {condition}"


def _index_condition(match: Match, params: list[object]) -> tuple[str, str, bool]:
    """The index table, the condition on its row, and whether the match is negated."""
    match match:
        case TokenMatch(_, system, code, negate):
            parts = ["1"]
            if code is not None:
                parts.append("code = ?")
                params.append(code)
            if system == "":
                parts.append("system IS NULL")
            elif system is not None:
                parts.append("system = ?")
                params.append(system)
            return "fhir_token", " AND ".join(parts), negate
        case StringMatch(_, value, mode):
            if mode == "exact":
                params.append(value)
                return "fhir_string", "exact = ?", False
            pattern = _like_escape(value) + "%"
            params.append(pattern if mode == "start" else "%" + pattern)
            return "fhir_string", "normalized LIKE ? ESCAPE '\\'", False
        case DateMatch(_, prefix, low, high):
            return "fhir_date", _range_sql("low", "high", prefix, low, high, params), False
        case ReferenceMatch(_, target):
            params.append(target)
            return "fhir_reference", "target = ?", False
        case QuantityMatch(_, prefix, value, system, code):
            parts = [_number_sql(prefix, value, params)]
            if system is not None:
                parts.append("system = ?")
                params.append(system)
            if code is not None:
                parts.append("code = ?")
                params.append(code)
            return "fhir_quantity", " AND ".join(parts), False
    raise TypeError(f"not a search match: {type(match).__name__}")


def _range_sql(low_col: str, high_col: str, prefix: Prefix, low: str, high: str,
               params: list[object]) -> str:
    """FHIR R4 search.html#prefix on ranges: the index range [low_col, high_col] against
    the search value's range [low, high]."""
    match prefix:
        case "eq" | "ne":
            params.extend((low, high))
            within = f"({low_col} >= ? AND {high_col} <= ?)"
            return within if prefix == "eq" else f"NOT {within}"
        case "lt":
            params.append(low)
            return f"{low_col} < ?"
        case "le":
            params.append(high)
            return f"{low_col} <= ?"
        case "gt":
            params.append(high)
            return f"{high_col} > ?"
        case "ge":
            params.append(low)
            return f"{high_col} >= ?"
        case "sa":
            params.append(high)
            return f"{low_col} > ?"
        case "eb":
            params.append(low)
            return f"{high_col} < ?"
        case "ap":  # approximately: taken as overlapping
            params.extend((high, low))
            return f"({low_col} <= ? AND {high_col} >= ?)"
    raise ValueError(f"unknown prefix {prefix!r}")


def _number_sql(prefix: Prefix, value: float, params: list[object]) -> str:
    """FHIR R4 search.html#number: eq and ne are within half the last significant digit
    of the value as written; ap within 10%."""
    match prefix:
        case "eq" | "ne":
            step = _half_step(value)
            params.extend((value - step, value + step))
            within = "(value >= ? AND value < ?)"
            return within if prefix == "eq" else f"NOT {within}"
        case "lt" | "eb":
            params.append(value)
            return "value < ?"
        case "le":
            params.append(value)
            return "value <= ?"
        case "gt" | "sa":
            params.append(value)
            return "value > ?"
        case "ge":
            params.append(value)
            return "value >= ?"
        case "ap":
            margin = abs(value) * 0.1
            params.extend((value - margin, value + margin))
            return "(value >= ? AND value <= ?)"
    raise ValueError(f"unknown prefix {prefix!r}")


def _half_step(value: float) -> float:
    """Half the last significant digit of the shortest text for `value` (5.4 -> 0.05);
    integral values count as written without decimals (100 -> 0.5)."""
    text = repr(abs(value))
    mantissa, _, exponent = text.partition("e")
    digits, _, decimals = mantissa.partition(".")
    if decimals == "0":
        decimals = ""
    return 0.5 * 10.0 ** (int(exponent or 0) - len(decimals))


def _order(sort: Iterable[SortKey], params: list[object], driven: bool) -> str:
    terms: list[str] = []
    for key in sort:
        direction = "DESC" if key.descending else "ASC"
        if key.param == "_id":
            terms.append(f"r.id {direction}")
        elif key.param == "_lastUpdated":
            terms.append(f"r.last_updated {direction}")
        else:
            terms.append(f"{_sort_value(key, params)} {direction} NULLS LAST")
    # Always last: a total order, so that paging never repeats or skips a resource. When a
    # clause can drive the search, the unary + keeps SQLite from scanning every resource of
    # the type in last-updated order instead (fine for a few, ruinous for an identifier).
    terms.extend(("+r.last_updated DESC" if driven else "r.last_updated DESC", "r.id"))
    return ", ".join(terms)


def _sort_value(key: SortKey, params: list[object]) -> str:
    """The parameter's smallest index value (largest when descending), whichever kind of
    index holds it: strings by normalized text, dates by range, tokens by code."""
    pick = "max" if key.descending else "min"
    columns = (("fhir_string", "normalized"), ("fhir_date", "high" if key.descending else "low"),
               ("fhir_token", "code"), ("fhir_reference", "target"), ("fhir_quantity", "value"))
    parts = []
    for table, column in columns:
        # Without statistics SQLite may pick the lookup index (type, param, ...) and read
        # every row of the parameter for each resource; the resource's own rows are few.
        parts.append(f"(SELECT {pick}({column}) FROM {table} x INDEXED BY {table}_resource "
                     "WHERE x.type = r.type AND x.id = r.id AND x.param = ?)")
        params.append(key.param)
    return f"coalesce({', '.join(parts)})"


def _like_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _json_copy(value: Any) -> Any:
    """A deep copy of JSON-shaped data; Decimals stay Decimals (FHIR decimals keep their
    digits: '1.50' is not 1.5). Anything else that is not JSON raises TypeError."""
    if isinstance(value, dict):
        return {str(k): _json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_copy(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool | Decimal):
        return value
    raise TypeError(type(value).__name__)


def _decimal(value: Any) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value).encode())
    raise TypeError(type(value).__name__)
