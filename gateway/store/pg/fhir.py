"""The FHIR resource store on PostgreSQL: the embedded store's tables, query planner and
transaction writer, run against a database every instance shares.

A write is one database transaction on a pooled connection. The transaction writer of
gateway.store.fhir_sqlite (which resolves conditions, If-Match, If-None-Exist, versions
and index rows) is synchronous; it runs on a worker thread and each statement it issues
is handed back to the event loop's asyncpg connection (`_Bridge`), translated by
`dialect.postgres_sql`. Two instances never create two resources for one condition or
write two versions of one resource at once: the writer takes a transaction-scoped
advisory lock on each (type, id) it reads and on each condition before it searches it,
so the second waits for the first to commit and then sees its resource. Between applying
and committing, the caller's `before_commit` (the audit record) is awaited, as on SQLite.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from gateway.store.errors import StoreUnavailable
from gateway.store.fhir import (
    BeforeCommit,
    HistoryQuery,
    Indexer,
    Merge,
    MergeOutcome,
    SearchPage,
    SearchQuery,
    StoredResource,
    StoreStats,
    WriteConflict,
    WriteRequest,
)
from gateway.store.fhir_sqlite.schema import VERSION_COLUMNS, format_instant, parse_instant
from gateway.store.fhir_sqlite.sql import count_sql, select_sql
from gateway.store.fhir_sqlite.writes import Outcomes, TransactionWriter, _Entry
from gateway.store.pg.connect import (
    DATABASE_ERRORS,
    Connection,
    Pool,
    advisory_key,
    unavailable,
)
from gateway.store.pg.dialect import postgres_sql

log = logging.getLogger("gateway.store.pg")

_T = TypeVar("_T")


class _Rows:
    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def fetchall(self) -> list[Any]:
        return self._rows


class _Bridge:
    """A writer thread's view of one asyncpg connection: each statement runs on the
    event loop (which is free: it is awaiting this thread) and the thread waits for it."""

    def __init__(self, connection: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self._connection = connection
        self._loop = loop

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> _Rows:
        return _Rows(self._call(self._connection.fetch(postgres_sql(sql), *parameters)))

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> object:
        return self._call(self._connection.executemany(postgres_sql(sql), list(parameters)))

    def lock(self, keys: Iterable[int]) -> None:
        """Transaction-scoped advisory locks, taken in key order (no deadlock between two
        writers locking overlapping sets)."""
        ordered = sorted(set(keys))
        if ordered:
            self._call(self._connection.execute(
                "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k", ordered))

    def _call(self, coroutine: Awaitable[_T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()  # type: ignore[arg-type]


class _LockingWriter(TransactionWriter):
    """The embedded store's writer, serialising what it reads across instances."""

    def __init__(self, bridge: _Bridge, indexer: Indexer, last_stamp: datetime) -> None:
        super().__init__(bridge, indexer, last_stamp)
        self._bridge = bridge

    def _current_rows(self, keys: Sequence[tuple[str, str]],
                      ) -> dict[tuple[str, str], StoredResource]:
        self._bridge.lock(advisory_key("fhir", t, i) for t, i in keys)
        return super()._current_rows(keys)

    def _matches(self, entry: _Entry) -> list[StoredResource]:
        # A conditional create or update (an identifier search, as ingest writes them)
        # waits for any other transaction holding the same condition.
        condition = entry.request.condition
        assert condition is not None
        self._bridge.lock([advisory_key("fhir-condition", repr(condition))])
        return super()._matches(entry)

    @property
    def last_stamp(self) -> datetime:
        return self._last_stamp


class PgFhirStore:
    """FhirStore on a PostgreSQL pool: one transaction per transact() call."""

    # Up to `threads` transactions at once: which takes a record's lock first is chance.
    applies_in_call_order = False

    def __init__(self, pool: Pool, indexer: Indexer, last_stamp: datetime,
                 threads: int) -> None:
        self._pool = pool
        self._indexer = indexer
        self._last_stamp = last_stamp
        self._executor = ThreadPoolExecutor(max_workers=threads,
                                            thread_name_prefix="fhir-pg-writer")
        # At most `threads` write transactions hold pool connections at once: the rest of
        # the pool stays free for the inbox and the audit trail, whose commits ACKs wait
        # for (a burst of FHIR writes must not hold up MLLP acknowledgements).
        self._writers = asyncio.Semaphore(threads)
        self._closing = False
        self._transactions = 0

    @classmethod
    async def open(cls, pool: Pool, indexer: Indexer, threads: int = 4) -> PgFhirStore:
        """`threads`: write transactions at once (each on a thread and a pooled
        connection); keep it below the pool's size."""
        try:
            last = await pool.fetchval("SELECT max(last_updated) FROM fhir_version")
        except DATABASE_ERRORS as exc:
            raise unavailable("the FHIR store could not be opened", exc) from None
        stamp = parse_instant(str(last)) if last else datetime.min.replace(tzinfo=UTC)
        return cls(pool, indexer, stamp, threads)

    # -- reading ----------------------------------------------------------------------------

    async def read(self, resource_type: str, id: str) -> StoredResource | None:
        return await self._one(
            "SELECT type, id, version, last_updated, deleted, body FROM fhir_resource "
            "WHERE type = $1 AND id = $2", resource_type, id)

    async def vread(self, resource_type: str, id: str, version: int) -> StoredResource | None:
        return await self._one(
            f"SELECT {VERSION_COLUMNS} FROM fhir_version WHERE rid = (SELECT rid FROM "
            "fhir_resource WHERE type = $1 AND id = $2) AND version = $3",
            resource_type, id, version)

    async def _one(self, sql: str, *args: object) -> StoredResource | None:
        try:
            row = await self._pool.fetchrow(sql, *args)
        except DATABASE_ERRORS as exc:
            raise unavailable("the FHIR store could not be read", exc) from None
        return _stored(row) if row is not None else None

    async def search(self, query: SearchQuery, *, total: bool = False) -> SearchPage:
        sql, params = select_sql(query, query.count, query.offset)
        counted = count_sql(query) if total else None
        rows, count = await self._read((postgres_sql(sql), params), counted)
        return SearchPage([_stored(row) for row in rows], count)

    async def count(self, query: SearchQuery) -> int:
        sql, params = count_sql(query)
        rows, _ = await self._read((postgres_sql(sql), params))
        return int(rows[0][0])

    async def history(self, query: HistoryQuery) -> SearchPage:
        if query.id is not None and query.resource_type is None:
            raise ValueError("instance history needs the resource type")
        where: list[str] = []
        params: list[object] = []
        if query.id is not None:  # by the resource's rid, the version table's key
            params += [query.resource_type, query.id]
            where.append("rid = (SELECT rid FROM fhir_resource WHERE type = $1 AND id = $2)")
        elif query.resource_type is not None:
            params.append(query.resource_type)
            where.append("type = $1")
        if query.since is not None:
            params.append(query.since)
            where.append(f"last_updated >= ${len(params)}")
        condition = f" WHERE {' AND '.join(where)}" if where else ""
        n = len(params)
        page = (f"SELECT {VERSION_COLUMNS} FROM fhir_version{condition} "
                f"ORDER BY last_updated DESC, seq DESC LIMIT ${n + 1} OFFSET ${n + 2}",
                [*params, query.count, query.offset])
        rows, total = await self._read(
            page, (f"SELECT count(*) FROM fhir_version{condition}", params), translate=False)
        return SearchPage([_stored(row) for row in rows], total)

    async def stats(self) -> StoreStats:
        rows, versions = await self._read(
            ("SELECT type, count(*) FROM fhir_resource WHERE deleted = 0 GROUP BY type", []),
            ("SELECT count(*) FROM fhir_version", []), translate=False)
        counts = {str(t): int(n) for t, n in rows}
        return StoreStats(sum(counts.values()), versions or 0, counts)

    async def _read(self, statement: tuple[str, Sequence[object]],
                    count: tuple[str, Sequence[object]] | None = None, *,
                    translate: bool = True) -> tuple[list[Any], int | None]:
        """Rows of one statement and, if asked, a count from the same snapshot."""
        try:
            if count is None:
                return list(await self._pool.fetch(statement[0], *statement[1])), None
            count_text = postgres_sql(count[0]) if translate else count[0]
            async with self._pool.acquire() as db, db.transaction(
                    isolation="repeatable_read", readonly=True):
                rows = list(await db.fetch(statement[0], *statement[1]))
                total = await db.fetchval(count_text, *count[1])
            return rows, int(total)
        except DATABASE_ERRORS as exc:
            raise unavailable("the FHIR store could not be read", exc) from None

    # -- writing ------------------------------------------------------------------------

    async def transact(self, writes: Sequence[WriteRequest], *, atomic: bool = True,
                       before_commit: BeforeCommit | None = None,
                       merges: Sequence[Merge] = ()) -> Outcomes:
        """Apply writes and merges (see FhirStore.transact) in one database transaction."""
        return await self._transact(writes, atomic, before_commit, tuple(merges), None)

    async def merge(self, merge: Merge) -> MergeOutcome:
        """One merge on its own (`isthmus fhir merge`): what it did."""
        merged: list[MergeOutcome] = []
        await self._transact((), True, None, (merge,), merged)
        return merged[0]

    async def _transact(self, writes: Sequence[WriteRequest], atomic: bool,
                        before_commit: BeforeCommit | None, merges: tuple[Merge, ...],
                        merged: list[MergeOutcome] | None) -> Outcomes:
        if self._closing:
            raise StoreUnavailable("the FHIR store is closing")
        if merges and not atomic:
            raise ValueError("merges run only with an atomic call's writes")
        if not writes and not merges:
            return []
        loop = asyncio.get_running_loop()
        try:
            async with self._writers, self._pool.acquire() as db:
                transaction = db.transaction()
                await transaction.start()
                try:
                    work = loop.run_in_executor(self._executor, self._apply_sync,
                                                _Bridge(db, loop), list(writes), atomic,
                                                merges, merged)
                    try:
                        outcomes = await asyncio.shield(work)
                    except asyncio.CancelledError:
                        # The caller went away: the thread is still using the connection,
                        # which must be idle before it is rolled back and returned.
                        await asyncio.wait([work])
                        raise
                    if before_commit is not None:
                        await before_commit(outcomes)
                except BaseException:
                    await transaction.rollback()
                    raise
                await transaction.commit()
        except DATABASE_ERRORS as exc:
            log.error("FHIR store write failed: %s", type(exc).__name__)
            raise unavailable("the FHIR store could not commit", exc) from None
        self._transactions += 1
        return outcomes

    def _apply_sync(self, bridge: _Bridge, writes: list[WriteRequest], atomic: bool,
                    merges: tuple[Merge, ...] = (),
                    merged: list[MergeOutcome] | None = None) -> Outcomes:
        """Writer thread: resolve and write the call's entries inside its transaction (a
        merge's outcome appended to `merged`)."""
        writer = _LockingWriter(bridge, self._indexer, self._last_stamp)
        try:
            if atomic:
                return list(writer.apply(writes, 0, merges, merged))
            outcomes: Outcomes = []
            for position, write in enumerate(writes):
                bridge.execute("SAVEPOINT entry")
                try:
                    outcomes.extend(writer.apply([write], position))
                except WriteConflict as conflict:
                    bridge.execute("ROLLBACK TO SAVEPOINT entry")
                    outcomes.append(conflict)
                bridge.execute("RELEASE SAVEPOINT entry")
            return outcomes
        finally:
            # lastUpdated only moves forward within this instance (across instances the
            # clocks are the hosts': keep them in sync with NTP).
            self._last_stamp = max(self._last_stamp, writer.last_stamp)

    # -- lifecycle ------------------------------------------------------------------------

    async def probe_writable(self) -> None:
        if self._closing:
            raise StoreUnavailable("the FHIR store is closing")
        try:
            await self._pool.execute(
                "INSERT INTO fhir_store_meta (key, value) VALUES ('ready_probe', $1) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                format_instant(datetime.now(UTC)))
        except DATABASE_ERRORS as exc:
            raise unavailable("the FHIR store is not writable", exc) from None

    async def close(self) -> None:
        """Take no more writes; those in flight finish (the pool is closed by its owner)."""
        if self._closing:
            return
        self._closing = True
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        if self._transactions:
            log.info("FHIR store closed: %d transactions", self._transactions)


def _stored(row: Sequence[Any]) -> StoredResource:
    return StoredResource(str(row[0]), str(row[1]), int(row[2]), str(row[3]), bool(row[4]),
                          bytes(row[5]))
