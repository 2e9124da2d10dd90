"""The audit trail on SQLite: an append-only, hash-chained table and its checkpoints.

One group-committing writer assigns sequence numbers and chain hashes, in order: while one
batch is on disk the next gathers, and each batch is linked to the head and written by one
multi-row INSERT (one transaction, one WAL sync). Another process appending to the same
file (the command line recording an export) shows up as a conflict on the sequence number;
the writer then checks the rows it did not write, reloads the head and links its batch
again. The interface it implements, `AuditStore`, is in `audit.py`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Literal

import aiosqlite

from gateway.store.audit import (
    AuditFilter,
    AuditRow,
    Chain,
    CheckpointRow,
    StoredAuditRow,
)
from gateway.store.errors import ChainConflict, StoreUnavailable
from gateway.store.group_commit import GroupCommitter
from gateway.store.sqlite import open_database

# Named as before the split from audit.py: operators filter logs on it.
log = logging.getLogger("gateway.store.audit")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_record (
    seq INTEGER PRIMARY KEY,
    recorded_at TEXT NOT NULL,
    action TEXT NOT NULL,
    client_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    patient_index BLOB,
    patient_id_index BLOB,
    body BLOB NOT NULL,
    hash BLOB NOT NULL,
    mac BLOB NOT NULL,
    mac_key TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_recorded_at ON audit_record (recorded_at);
CREATE INDEX IF NOT EXISTS audit_client ON audit_record (client_id);
-- One index for patients, on the identifier alone: random keys are the costly ones to
-- index, and a search by full reference narrows by this one and then by patient_index.
CREATE INDEX IF NOT EXISTS audit_patient_id ON audit_record (patient_id_index)
    WHERE patient_id_index IS NOT NULL;
CREATE TABLE IF NOT EXISTS audit_checkpoint (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    count INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    body BLOB NOT NULL,
    signature BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_checkpoint_count ON audit_checkpoint (count);
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Append-only: rows are never changed, and deleted only by a retention purge (which
-- raises the flag inside its own transaction). A guard against mistakes, not attackers:
-- the hash chain and the signed checkpoints are what detect tampering.
CREATE TRIGGER IF NOT EXISTS audit_record_no_update BEFORE UPDATE ON audit_record
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_record_no_delete BEFORE DELETE ON audit_record
WHEN coalesce((SELECT value FROM audit_meta WHERE key = 'purging'), '0') <> '1'
BEGIN SELECT RAISE(ABORT, 'audit records are removed only by the retention purge'); END;
"""

_COLUMNS = ("seq", "recorded_at", "action", "client_id", "outcome", "patient_index",
            "patient_id_index", "body", "hash", "mac", "mac_key")
_ROW_SQL = "(" + ",".join("?" * len(_COLUMNS)) + ")"
# SQLite allows 32766 bound parameters per statement.
_MAX_ROWS_PER_STATEMENT = 32766 // len(_COLUMNS)
_READ_COLUMNS = ", ".join(_COLUMNS)
_LINK_ATTEMPTS = 3
# Event-loop turns the writer lets pass before it takes a batch, so requests already read
# off their sockets queue their records into it: with 8 lock-step FHIR readers batches
# grow from ~3.6 to ~7.3 records a commit, and each commit (one thread hop, one WAL sync)
# costs ~230 us of CPU. Costs ~5 idle loop turns (microseconds) beside a ms-scale sync.
_SETTLE_TURNS = 5


class AuditReader:
    """Read access to an audit database: checkpoints, ordered scans and searches."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def log_id(self) -> str | None:
        rows = list(await self._db.execute_fetchall(
            "SELECT value FROM audit_meta WHERE key = 'log_id'"))
        return str(rows[0][0]) if rows else None

    async def last(self) -> StoredAuditRow | None:
        rows = list(await self._db.execute_fetchall(
            f"SELECT {_READ_COLUMNS} FROM audit_record ORDER BY seq DESC LIMIT 1"))
        return _stored(rows[0]) if rows else None

    async def checkpoints(self, low: int = 0, high: int | None = None, *,
                          newest_first: bool = False,
                          limit: int | None = None) -> list[CheckpointRow]:
        """Checkpoints whose count is in [low, high], by count (then as stored)."""
        order = "DESC" if newest_first else "ASC"
        rows = await self._db.execute_fetchall(
            "SELECT id, count, created_at, body, signature FROM audit_checkpoint "
            f"WHERE count >= ? AND count <= ? ORDER BY count {order}, id {order} LIMIT ?",
            (low, (1 << 62) if high is None else high, -1 if limit is None else limit))
        return [CheckpointRow(int(r[0]), int(r[1]), str(r[2]), bytes(r[3]), bytes(r[4]))
                for r in rows]

    async def checkpoint_counts(self, low: int = 0, high: int | None = None) -> list[int]:
        rows = await self._db.execute_fetchall(
            "SELECT DISTINCT count FROM audit_checkpoint WHERE count >= ? AND count <= ? "
            "ORDER BY count", (low, (1 << 62) if high is None else high))
        return [int(r[0]) for r in rows]

    async def hash_at(self, seq: int) -> bytes | None:
        rows = list(await self._db.execute_fetchall(
            "SELECT hash FROM audit_record WHERE seq = ?", (seq,)))
        return bytes(rows[0][0]) if rows else None

    async def first_seq_at_or_after(self, recorded_at: str) -> int | None:
        rows = list(await self._db.execute_fetchall(
            "SELECT min(seq) FROM audit_record WHERE recorded_at >= ?", (recorded_at,)))
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def scan(self, from_seq: int = 1, to_seq: int | None = None,
                   page: int = 2000) -> AsyncIterator[StoredAuditRow]:
        """Every row from `from_seq` (to `to_seq`) in sequence order, a page at a time."""
        after = from_seq - 1
        upper = to_seq if to_seq is not None else (1 << 62)
        while True:
            rows = await self._db.execute_fetchall(
                f"SELECT {_READ_COLUMNS} FROM audit_record WHERE seq > ? AND seq <= ? "
                "ORDER BY seq LIMIT ?", (after, upper, page))
            batch = [_stored(r) for r in rows]
            for row in batch:
                yield row
            if len(batch) < page:
                return
            after = batch[-1].seq

    async def search(self, where: AuditFilter, after_seq: int = 0,
                     limit: int = 100) -> list[StoredAuditRow]:
        clauses = ["seq > ?"]
        params: list[object] = [after_seq]
        if where.max_seq is not None:
            clauses.append("seq <= ?")
            params.append(where.max_seq)
        if where.start is not None:
            clauses.append("recorded_at >= ?")
            params.append(where.start)
        if where.end is not None:
            clauses.append("recorded_at < ?")
            params.append(where.end)
        if where.action is not None:
            clauses.append("action = ?")
            params.append(where.action)
        if where.client_id is not None:
            if where.client_prefix is not None:
                # '}' follows '|' in ASCII: a range over 'APP|...' that can use the index.
                clauses.append("(client_id = ? OR (client_id >= ? AND client_id < ?))")
                params.extend((where.client_id, where.client_prefix + "|",
                               where.client_prefix + "}"))
            else:
                clauses.append("client_id = ?")
                params.append(where.client_id)
        if where.patient_id_indexes:
            clauses.append("patient_id_index IN (" + ",".join(
                "?" * len(where.patient_id_indexes)) + ")")
            params.extend(where.patient_id_indexes)
        if where.patient_indexes:
            clauses.append("patient_index IN (" + ",".join(
                "?" * len(where.patient_indexes)) + ")")
            params.extend(where.patient_indexes)
        params.append(limit)
        rows = await self._db.execute_fetchall(
            f"SELECT {_READ_COLUMNS} FROM audit_record WHERE {' AND '.join(clauses)} "
            "ORDER BY seq LIMIT ?", params)
        return [_stored(r) for r in rows]


class SqliteAuditStore:
    """The audit log on an aiosqlite (WAL) database with a single group-committing writer."""

    def __init__(self, db: aiosqlite.Connection, reader: AuditReader, log_id: str,
                 max_batch: int, path: Path) -> None:
        self._db = db
        self._reader = reader
        self._log_id = log_id
        self._path = path
        self._lock = asyncio.Lock()
        self._chain: Chain | None = None
        self._on_commit: Callable[[int, int], None] | None = None
        self._head: tuple[int, bytes] = (0, b"")
        self._committer: GroupCommitter[AuditRow, tuple[int, bytes]] = GroupCommitter(
            self._locked_insert, name="audit", logger=log,
            max_batch=min(max_batch, _MAX_ROWS_PER_STATEMENT),
            failure=_refusal, closed="the audit log is not open for writing",
            after=self._committed, settle=_SETTLE_TURNS)
        self._query_db: aiosqlite.Connection | None = None

    @classmethod
    async def open(cls, path: Path,
                   synchronous: Literal["normal", "full", "extra"] = "full",
                   max_batch: int = 1024) -> SqliteAuditStore:
        """Open (creating) the database; call `start` with the chain before submitting."""
        db = await open_database(path, synchronous)
        try:
            await db.executescript(_SCHEMA)
            # The log's identity seeds the chain, so two logs can never be spliced together.
            await db.execute("INSERT INTO audit_meta (key, value) VALUES ('log_id', ?) "
                             "ON CONFLICT(key) DO NOTHING", (secrets.token_hex(16),))
            reader = AuditReader(db)
            log_id = await reader.log_id()
            assert log_id is not None
        except BaseException:
            await db.close()
            raise
        return cls(db, reader, log_id, max_batch, path)

    @property
    def log_id(self) -> str:
        return self._log_id

    @property
    def path(self) -> Path:
        return self._path

    async def start(self, chain: Chain,
                    on_commit: Callable[[int, int], None] | None = None) -> None:
        """Load the head and start the writer. `on_commit(records, head)` follows each
        group commit (head 0 when it failed): one call a batch, not one a record."""
        self._chain = chain
        self._on_commit = on_commit
        last = await self._reader.last()
        self._head = (last.seq, last.hash) if last is not None else await self._purged_head(
            chain)
        self._committer.start()

    async def _purged_head(self, chain: Chain) -> tuple[int, bytes]:
        """Where an empty table continues: after a purge of everything, or at genesis."""
        rows = list(await self._db.execute_fetchall(
            "SELECT value FROM audit_meta WHERE key = 'purged_head'"))
        if rows:
            seq, _, hex_hash = str(rows[0][0]).partition(":")
            return int(seq), bytes.fromhex(hex_hash)
        return 0, chain.genesis

    @property
    def head(self) -> tuple[int, bytes]:
        """(sequence number, chain hash) of the last committed record."""
        return self._head

    # -- appending ----------------------------------------------------------------------

    def submit(self, row: AuditRow) -> asyncio.Future[tuple[int, bytes]]:
        """Queue a row for the next group commit; resolves to (seq, hash) once durable."""
        return self._committer.submit(row)

    async def _locked_insert(self, rows: Sequence[AuditRow]) -> list[tuple[int, bytes]]:
        async with self._lock:  # not beside a checkpoint or a purge
            return await self._insert(rows)

    def _committed(self, records: int, ok: bool) -> None:
        if self._on_commit is not None:
            self._on_commit(records, self._head[0] if ok else 0)

    async def _insert(self, rows: Sequence[AuditRow]) -> list[tuple[int, bytes]]:
        chain = self._chain
        assert chain is not None
        for _ in range(_LINK_ATTEMPTS):
            seq, prev = self._head
            params: list[object] = []
            links: list[tuple[int, bytes]] = []
            mac_key = chain.mac_key_id
            sealed = chain.extend(prev, seq + 1, [row.body for row in rows])
            for row, (prev, mac) in zip(rows, sealed, strict=True):
                seq += 1
                links.append((seq, prev))
                patient_index, patient_id_index = row.patient_index, row.patient_id_index
                # Bound as bytearray and plain str: sqlite3 binds those directly, while a
                # bytes or str-enum value goes through its adapter lookup first, whose
                # failed attribute lookups cost more than the INSERT's own work (~16,000
                # instructions a blob; 306k against 175k an 8-row batch). Same stored
                # values (a blob, the action's text).
                params.extend((
                    seq, row.recorded_at, str(row.action), row.client_id, row.outcome,
                    None if patient_index is None else bytearray(patient_index),
                    None if patient_id_index is None else bytearray(patient_id_index),
                    bytearray(row.body), bytearray(prev), bytearray(mac), mac_key))
            sql = (f"INSERT INTO audit_record ({','.join(_COLUMNS)}) VALUES "
                   + ",".join([_ROW_SQL] * len(rows)))
            try:
                # One statement in autocommit mode is one transaction: all rows or none.
                await self._db.execute_fetchall(sql, params)
            except sqlite3.IntegrityError:
                # Another process appended first: take its rows into our head and relink.
                await self._follow(chain)
                continue
            self._head = (seq, prev)
            return links
        raise StoreUnavailable("the audit log kept changing under the writer")

    async def sync_head(self) -> tuple[int, bytes]:
        """Take rows other processes appended into the head (checked); returns the head."""
        async with self._lock:
            if self._chain is not None:
                await self._follow(self._chain)
        return self._head

    async def _follow(self, chain: Chain) -> None:
        """Advance the head over rows another writer appended, checking each one."""
        seq, prev = self._head
        async for row in self._reader.scan(seq + 1):
            if row.seq != seq + 1:
                raise ChainConflict(f"audit record {seq + 1} is missing")
            link = chain.link(prev, row.seq, row.body)
            if link != row.hash or row.mac_key != chain.mac_key_id or chain.mac(link) != row.mac:
                raise ChainConflict(f"audit record {row.seq} written by another process "
                                    "does not verify")
            seq, prev = row.seq, link
        self._head = (seq, prev)

    async def add_checkpoint(self, count: int, created_at: str, body: bytes,
                             signature: bytes) -> int:
        async with self._lock:
            rows = list(await self._db.execute_fetchall(
                "INSERT INTO audit_checkpoint (count, created_at, body, signature) "
                "VALUES (?, ?, ?, ?) RETURNING id", (count, created_at, body, signature)))
            return int(rows[0][0])

    async def purge(self, through_seq: int, count: int, created_at: str, body: bytes,
                    signature: bytes) -> int:
        """Delete records up to `through_seq` and store the checkpoint that anchors the rest.

        One transaction: the signed checkpoint carrying the hash of the last purged record
        and the deletion are both there or both not. Checkpoints that only covered purged
        records go too: nothing is left for them to vouch for.
        """
        async with self._lock:
            purged_hash = await self._reader.hash_at(through_seq)
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                await self._db.execute(
                    "INSERT INTO audit_meta (key, value) VALUES ('purging', '1') "
                    "ON CONFLICT(key) DO UPDATE SET value = '1'")
                cursor = await self._db.execute(
                    "DELETE FROM audit_record WHERE seq <= ?", (through_seq,))
                deleted = cursor.rowcount
                await cursor.close()
                await self._db.execute("DELETE FROM audit_checkpoint WHERE count <= ?",
                                       (through_seq,))
                await self._db.execute(
                    "INSERT INTO audit_checkpoint (count, created_at, body, signature) "
                    "VALUES (?, ?, ?, ?)", (count, created_at, body, signature))
                if purged_hash is not None:
                    await self._db.execute(
                        "INSERT INTO audit_meta (key, value) VALUES ('purged_head', ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (f"{through_seq}:{purged_hash.hex()}",))
                await self._db.execute("UPDATE audit_meta SET value = '0' "
                                       "WHERE key = 'purging'")
                await self._db.execute("COMMIT")
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            return int(deleted)

    async def probe_writable(self) -> None:
        """A real (tiny) write, for readiness: raises StoreUnavailable if it fails."""
        try:
            await self._db.execute(
                "INSERT INTO audit_meta (key, value) VALUES ('ready_probe', '1') "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value")
        except Exception as exc:
            raise StoreUnavailable(
                f"the audit log is not writable: {type(exc).__name__}") from None

    async def stop_writer(self) -> None:
        """Commit what is queued and take no more; checkpoints can still be added."""
        await self._committer.close()

    async def close(self) -> None:
        """Commit what is queued, then close the database."""
        await self.stop_writer()
        if self._query_db is not None:
            await self._query_db.close()
        await self._db.close()
        self._committer.summary("audit log", "records")

    # -- reading ------------------------------------------------------------------------
    # Searches and scans run on their own connection (WAL readers do not block the writer),
    # so a reviewer's export never holds up the commits that acknowledgements wait for.

    async def _query(self) -> AuditReader:
        if self._query_db is None:
            self._query_db = await aiosqlite.connect(f"file:{self._path}?mode=ro", uri=True)
        return AuditReader(self._query_db)

    async def checkpoints(self, low: int = 0, high: int | None = None, *,
                          newest_first: bool = False,
                          limit: int | None = None) -> list[CheckpointRow]:
        reader = await self._query()
        return await reader.checkpoints(low, high, newest_first=newest_first, limit=limit)

    async def checkpoint_counts(self, low: int = 0, high: int | None = None) -> list[int]:
        reader = await self._query()
        return await reader.checkpoint_counts(low, high)

    async def last_row(self) -> StoredAuditRow | None:
        return await self._reader.last()

    async def hash_at(self, seq: int) -> bytes | None:
        return await self._reader.hash_at(seq)

    async def first_seq_at_or_after(self, recorded_at: str) -> int | None:
        return await self._reader.first_seq_at_or_after(recorded_at)

    async def scan(self, from_seq: int = 1, to_seq: int | None = None,
                   page: int = 2000) -> AsyncIterator[StoredAuditRow]:
        reader = await self._query()
        async for row in reader.scan(from_seq, to_seq, page):
            yield row

    async def search(self, where: AuditFilter, after_seq: int = 0,
                     limit: int = 100) -> list[StoredAuditRow]:
        reader = await self._query()
        return await reader.search(where, after_seq, limit)

    @property
    def batches_committed(self) -> int:
        return self._committer.batches


def _stored(r: sqlite3.Row) -> StoredAuditRow:
    return StoredAuditRow(
        int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]),
        None if r[5] is None else bytes(r[5]), None if r[6] is None else bytes(r[6]),
        bytes(r[7]), bytes(r[8]), bytes(r[9]), str(r[10]))


async def open_reader(path: Path) -> tuple[aiosqlite.Connection, AuditReader]:
    """A read-only connection to an audit database (safe beside a running gateway)."""
    db = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True)
    return db, AuditReader(db)


def _refusal(exc: Exception) -> Exception:
    """What the callers of a batch that could not commit are told (and refuse access)."""
    return StoreUnavailable(str(exc) if isinstance(exc, ChainConflict)
                            else "the audit log could not commit")
