"""The embedded FHIR resource store: versioned resources and their search indexes in SQLite.

Three connections to one WAL file. One plain sqlite3 writer, on a thread of its own,
applies every write: concurrent `transact` calls are group-committed, several calls in one
BEGIN IMMEDIATE ... COMMIT, each inside its own SAVEPOINT so that it stays atomic on its
own and a call that fails rolls back only itself; applying the group is one hop to that
thread, committing it another, and between the two each call's `before_commit` (the
audit record) is awaited on the event loop: a group commits only once all of them are
done, so no write is readable before its record is durable. read() and vread() use a
plain synchronous sqlite3 connection on the event loop thread; search, count and history
an aiosqlite read-only connection.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import aiosqlite

# For its side effect: it caps aiosqlite's logging, which would otherwise log every
# statement's parameters (patient data) at DEBUG.
import gateway.store.sqlite  # noqa: F401
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
    StringGroups,
    WriteConflict,
    WriteRequest,
)
from gateway.store.fhir_sqlite.blinding import (
    NO_GROUPS,
    BlindQuery,
    StringLabels,
    blind_query,
)
from gateway.store.fhir_sqlite.schema import (
    Row,
    format_instant,
    open_writer,
    stored_resource,
)
from gateway.store.fhir_sqlite.sql import VREAD_SQL, count_sql, history_sql, select_sql
from gateway.store.fhir_sqlite.writes import Outcomes, TransactionWriter
from gateway.store.sealing import PLAIN, RowCodec

# Named as before the split into a package: operators filter logs on it.
log = logging.getLogger("gateway.store.fhir_sqlite")

Sql = tuple[str, Sequence[object]]

# SQLite virtual-machine steps a read may take on the event loop thread before it is
# interrupted and handed to the reader thread (~1 ms of work at the most).
_QUICK_STEPS = 20_000
# After this long without a write, the writer's page cache is handed back (see
# schema.WRITER_CACHE_KIB): a burst's pages do not stay held while nothing is written.
_IDLE_SHRINK_SECONDS = 2.0


def _recorded_labels(db: sqlite3.Connection) -> list[tuple[str, str]]:
    """(type, label) of every shared label the store's string rows carry."""
    return [(str(t), str(label)) for t, label in
            db.execute("SELECT type, label FROM fhir_string_label").fetchall()]


def _over_budget() -> int:
    return 1  # non-zero: interrupt the statement


@dataclass(slots=True)
class _Job:
    """One transact() call waiting for the next group commit."""

    writes: Sequence[WriteRequest]
    atomic: bool
    future: asyncio.Future[Outcomes]
    before_commit: BeforeCommit | None = None
    merges: Sequence[Merge] = ()
    outcomes: Outcomes | None = None
    merged: list[MergeOutcome] | None = None
    error: BaseException | None = None


class SqliteFhirStore:
    """FhirStore on one SQLite (WAL) file: a group-committing writer and two readers."""

    applies_in_call_order = True  # one writer thread takes the calls as they come

    def __init__(self, db: sqlite3.Connection, executor: ThreadPoolExecutor,
                 reader: aiosqlite.Connection, lookup: sqlite3.Connection, indexer: Indexer,
                 last_stamp: datetime, max_batch: int, codec: RowCodec = PLAIN,
                 labels: StringLabels = NO_GROUPS) -> None:
        self._db = db  # used only on the executor's one thread, which made it
        self._executor = executor
        self._reader = reader
        self._lookup = lookup
        # The writer thread's alone, like the connection it writes on.
        self._writes = TransactionWriter(db, indexer, last_stamp, codec, labels)
        self._labels = labels
        self._indexer = indexer  # for the rechecks of long starts-with values (blinding)
        self._codec = codec
        self._max_batch = max_batch
        self._pending: list[_Job] = []
        self._wakeup = asyncio.Event()
        self._read_lock = asyncio.Lock()  # one read transaction at a time on the reader
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._groups = 0
        self._jobs = 0
        self._cache_held = False  # groups written since the page cache was last shrunk
        # The last group's write transaction on the writer thread, BEGIN to COMMIT (for
        # /metrics: how long the write lock was held).
        self.write_seconds = 0.0

    @classmethod
    async def open(cls, path: Path, indexer: Indexer,
                   synchronous: Literal["normal", "full", "extra"] = "full",
                   max_batch: int = 64, codec: RowCodec = PLAIN,
                   string_groups: StringGroups | None = None) -> SqliteFhirStore:
        """The store on the file at `path`. A sealed one (`codec`) needs `string_groups`
        (`SearchRegistry.string_groups`): its string rows are shared within those groups,
        and a search must know them to find them, so no default could be right."""
        if codec.sealed and string_groups is None:
            raise ValueError("a sealed FHIR store needs the search table's string groups")
        # The writer connection is made on the thread that will use it, and only there.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fhir-writer")
        loop = asyncio.get_running_loop()
        try:
            db, last_stamp = await loop.run_in_executor(
                executor, open_writer, path, synchronous)
        except BaseException:
            executor.shutdown()
            raise
        try:
            recorded = await loop.run_in_executor(executor, _recorded_labels, db)
        except BaseException:
            await loop.run_in_executor(executor, db.close)
            executor.shutdown()
            raise
        labels = StringLabels(string_groups or {}, recorded)
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
        store = cls(db, executor, reader, lookup, indexer, last_stamp, max_batch, codec,
                    labels)
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
        return self._lookup_one(VREAD_SQL, (resource_type, id, version))

    def _lookup_one(self, sql: str, params: tuple[object, ...]) -> StoredResource | None:
        try:
            # fetchall, not fetchone: it steps the statement to its end, which resets it
            # and ends its read transaction (a half-read statement would pin the snapshot
            # and later reads on this connection would not see new commits).
            rows = self._lookup.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"the FHIR store could not be read: {type(exc).__name__}") from None
        return stored_resource(rows[0], self._codec) if rows else None

    # -- search and history ---------------------------------------------------------------

    async def search(self, query: SearchQuery, *, total: bool = False) -> SearchPage:
        """Current, non-deleted versions matching the query."""
        blinded = blind_query(query, self._codec, self._labels)
        if blinded.rechecks:
            found = await self._rechecked(blinded)
            end = None if query.count is None else query.offset + query.count
            return SearchPage(found[query.offset:end], len(found) if total else None)
        query, labels = blinded.query, blinded.labels
        rows, count = await self._read(
            select_sql(query, query.count, query.offset, labels=labels),
            count_sql(query, labels) if total else None)
        return SearchPage([stored_resource(row, self._codec) for row in rows], count)

    async def count(self, query: SearchQuery) -> int:
        blinded = blind_query(query, self._codec, self._labels)
        if blinded.rechecks:
            return len(await self._rechecked(blinded))
        rows, _ = await self._read(count_sql(blinded.query, blinded.labels))
        return int(rows[0][0])

    async def _rechecked(self, blinded: BlindQuery) -> list[StoredResource]:
        """Every resource a search with rechecks finds, in order, each checked: paging and
        the total come after the check, so they count only what matched."""
        rows, _ = await self._read(select_sql(blinded.query, None, 0, labels=blinded.labels))
        return blinded.recheck([stored_resource(row, self._codec) for row in rows],
                               self._indexer)

    def _quick(self, statement: Sql,
               count: Sql | None) -> tuple[list[Row], int | None] | None:
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
        page, count = history_sql(query)
        rows, total = await self._read(page, count)
        return SearchPage([stored_resource(row, self._codec) for row in rows], total)

    async def stats(self) -> StoreStats:
        """Counts for operators: current resources (deletions excluded) and all versions."""
        rows, versions = await self._read(
            ("SELECT type, count(*) FROM fhir_resource WHERE deleted = 0 GROUP BY type", []),
            ("SELECT count(*) FROM fhir_version", []))
        counts = {str(t): int(n) for t, n in rows}
        return StoreStats(sum(counts.values()), versions or 0, counts)

    async def _read(self, statement: Sql,
                    count: Sql | None = None) -> tuple[list[Row], int | None]:
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
                    rows: list[Row] = list(await self._reader.execute_fetchall(*statement))
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

    async def transact(self, writes: Sequence[WriteRequest], *, atomic: bool = True,
                       before_commit: BeforeCommit | None = None,
                       merges: Sequence[Merge] = ()) -> Outcomes:
        """Apply writes. atomic: all or nothing, raising the first WriteConflict (with its
        entry index). Not atomic: each entry on its own; a failed entry's slot holds its
        WriteConflict. `before_commit`, `merges`: see `FhirStore.transact`."""
        if not writes and not merges:
            return []
        outcomes, _ = await self._submit(writes, atomic, before_commit, merges)
        return outcomes

    async def merge(self, merge: Merge) -> MergeOutcome:
        """One merge on its own (`isthmus fhir merge`): what it did."""
        _, merged = await self._submit((), True, None, (merge,))
        return merged[0]

    async def _submit(self, writes: Sequence[WriteRequest], atomic: bool,
                      before_commit: BeforeCommit | None, merges: Sequence[Merge]
                      ) -> tuple[Outcomes, list[MergeOutcome]]:
        if self._closing:
            raise StoreUnavailable("the FHIR store is closing")
        if merges and not atomic:
            raise ValueError("merges run only with an atomic call's writes")
        future: asyncio.Future[Outcomes] = asyncio.get_running_loop().create_future()
        job = _Job(list(writes), atomic, future, before_commit, tuple(merges))
        self._pending.append(job)
        self._wakeup.set()
        outcomes = await future
        return outcomes, job.merged or []

    async def _write_loop(self) -> None:
        while True:
            if self._cache_held and not self._closing:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), _IDLE_SHRINK_SECONDS)
                except TimeoutError:
                    await self._shrink_cache()
                    continue
            else:
                await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                group = self._pending[:self._max_batch]
                del self._pending[:self._max_batch]
                await self._commit_group(group)
            if self._closing:
                return

    async def _commit_group(self, group: Sequence[_Job]) -> None:
        """Apply a group on the writer thread, await each call's `before_commit`, commit,
        then answer each caller."""
        jobs = [job for job in group if not job.future.done()]  # skip cancelled callers
        if not jobs:
            return
        loop = asyncio.get_running_loop()
        for job in jobs:
            job.outcomes, job.error = None, None  # a job put back runs afresh
        # Without hooks, apply and commit are one hop to the writer thread, as before.
        hooks = any(job.before_commit is not None for job in jobs)
        committed = await loop.run_in_executor(self._executor, self._apply_group_sync, jobs,
                                               not hooks)
        if committed and hooks:
            refused = await self._before_commit(jobs)
            if refused:
                # Writes are released into the group's transaction and cannot be undone
                # one by one: the whole group rolls back, the refused calls fail with their
                # hook's error and the others go first into the next group, where they run
                # (and are recorded) again.
                await loop.run_in_executor(self._executor, self._rollback)
                for job in refused:
                    if not job.future.done():
                        assert job.error is not None
                        job.future.set_exception(job.error)
                self._pending[:0] = [job for job in jobs if job not in refused]
                self._wakeup.set()
                return
            committed = await loop.run_in_executor(self._executor, self._commit_sync)
        if not committed:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(StoreUnavailable("the FHIR store could not commit"))
            return
        self._groups += 1
        self._jobs += len(jobs)
        self._cache_held = True
        for job in jobs:
            if job.future.done():
                continue
            if job.error is not None:
                job.future.set_exception(job.error)
            else:
                assert job.outcomes is not None
                job.future.set_result(job.outcomes)

    async def _before_commit(self, jobs: Sequence[_Job]) -> list[_Job]:
        """Await the hooks of the calls whose writes applied, all at once (their audit
        records then share a group commit); the calls whose hook raised."""
        hooked = []
        refused = []
        for job in jobs:
            if job.before_commit is None or job.error is not None or job.outcomes is None:
                continue
            try:
                hooked.append((job, job.before_commit(job.outcomes)))
            except Exception as exc:  # raised on the call, not awaited: refused alike (it
                # would otherwise end the writer, and every later call would wait for ever)
                job.error = exc
                refused.append(job)
        results = await asyncio.gather(*(hook for _, hook in hooked),
                                       return_exceptions=True)
        for (job, _), result in zip(hooked, results, strict=True):
            if isinstance(result, BaseException):
                job.error = result
                refused.append(job)
        return refused

    def _apply_group_sync(self, jobs: Sequence[_Job], commit: bool) -> bool:
        """Writer thread: several callers' writes in one transaction, committed or
        (`commit` False) left open for `_commit_sync`; whether they applied (if not, it is
        rolled back and nothing in the group is durable). A call that fails has its own
        writes undone, not the others'."""
        started = time.perf_counter()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            if not self._run_jobs_together(jobs):
                # A call failed: its writes are undone with everything before them, and
                # the group runs again with a savepoint per call (nearly never).
                self._db.execute("ROLLBACK")
                self._db.execute("BEGIN IMMEDIATE")
                for job in jobs:
                    self._run_job(job)
            if commit:
                self._db.execute("COMMIT")
                self.write_seconds = time.perf_counter() - started
        except Exception as exc:  # any database failure: nothing in the group is durable
            log.error("FHIR store write failed for a group of %d: %s", len(jobs),
                      type(exc).__name__)
            self._rollback()
            return False
        return True

    def _commit_sync(self) -> bool:
        """Writer thread: commit the group `_apply_group_sync` left open."""
        try:
            self._db.execute("COMMIT")
        except Exception as exc:  # any failure to commit: nothing in the group is durable
            log.error("FHIR store commit failed: %s", type(exc).__name__)
            self._rollback()
            return False
        return True

    async def _shrink_cache(self) -> None:
        """Idle: hand the writer's cached pages back (they are read again when needed)."""
        self._cache_held = False
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._db.execute, "PRAGMA shrink_memory")
        except sqlite3.Error as exc:  # only memory kept longer: the next idle spell retries
            self._cache_held = True
            log.warning("FHIR store could not release its page cache: %s", type(exc).__name__)

    def _rollback(self) -> None:
        if not self._db.in_transaction:
            return  # SQLite already rolled back (an I/O error, a full disk)
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("FHIR store rollback failed: %s", type(exc).__name__)

    def _run_jobs_together(self, jobs: Sequence[_Job]) -> bool:
        """The calls' writes one after another without a savepoint each; False at the
        first that fails (its error kept), with the transaction holding some of its
        writes: the caller rolls it back. A savepoint per call made SQLite copy every page
        a call changed into the sub-journal first (the blind index values are random
        keys: most of a message's pages), for a rollback nearly no call needs."""
        for job in jobs:
            job.outcomes, job.merged, job.error = None, None, None
            try:
                self._apply_job(job)
            except sqlite3.Error:
                raise
            except Exception as exc:  # the caller's conflict (or a bug in an indexer)
                job.error = exc
                return False
        return True

    def _apply_job(self, job: _Job) -> None:
        if job.atomic:
            job.merged = []
            job.outcomes = list(self._writes.apply(job.writes, 0, job.merges, job.merged))
        else:
            job.outcomes = self._apply_batch(job.writes)

    def _run_job(self, job: _Job) -> None:
        """One caller's writes in a savepoint: released if they apply, rolled back if not.
        A database error escapes, failing the whole group."""
        job.outcomes, job.merged, job.error = None, None, None
        self._db.execute("SAVEPOINT job")
        try:
            self._apply_job(job)
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
                outcomes.extend(self._writes.apply([write], position))
            except WriteConflict as conflict:
                self._db.execute("ROLLBACK TO entry")
                outcomes.append(conflict)
            self._db.execute("RELEASE entry")
        return outcomes

    @property
    def groups_committed(self) -> int:
        """Group commits so far (each carries one or more transact calls)."""
        return self._groups

    # -- lifecycle ------------------------------------------------------------------------

    async def probe_writable(self) -> None:
        """A real (tiny) write, for readiness: raises StoreUnavailable if it fails."""
        if self._closing:
            raise StoreUnavailable("the FHIR store is closing")
        # The writer thread runs one task at a time; between a group's apply and commit
        # (its records being kept) the probe's one statement joins that transaction.
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
            (format_instant(datetime.now(UTC)),))

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

