"""The audit trail on PostgreSQL: one hash chain for every instance.

Each instance group-commits its records as on SQLite, but appending is serialised across
instances by a transaction-scoped advisory lock: inside it the writer reads the last row,
and if another instance appended since its own last batch it checks those rows (chain
hash and MAC, as the SQLite store checks another process's rows) before linking its batch
after them. So there is one chain, with no gap and no fork, and `isthmus audit verify`
reads and judges it exactly as it does an audit.db.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import asyncpg

from gateway.store.audit import AuditFilter, AuditRow, Chain, CheckpointRow, StoredAuditRow
from gateway.store.errors import ChainConflict, StoreUnavailable
from gateway.store.group_commit import GroupCommitter
from gateway.store.pg.connect import DATABASE_ERRORS, Connection, Pool, advisory_key, unavailable

log = logging.getLogger("gateway.store.audit")

_COLUMNS = ("seq", "recorded_at", "action", "client_id", "outcome", "patient_index",
            "patient_id_index", "body", "hash", "mac", "mac_key")
_TYPES = ("int8", "text", "text", "text", "text", "bytea", "bytea", "bytea", "bytea", "bytea",
          "text")
_READ = ", ".join(_COLUMNS)
_INSERT = (f"INSERT INTO audit_record ({_READ}) SELECT * FROM unnest("
           + ", ".join(f"${i}::{t}[]" for i, t in enumerate(_TYPES, 1)) + ")")
# The fast path: only while no instance holds the append lock (it takes it for the
# statement), and only right after our head row as it is.
_INSERT_AFTER = (_INSERT + f" WHERE pg_try_advisory_xact_lock(${len(_COLUMNS) + 3}) "
                 f"AND EXISTS (SELECT 1 FROM audit_record WHERE seq = ${len(_COLUMNS) + 1} "
                 f"AND hash = ${len(_COLUMNS) + 2})")
_APPEND_LOCK = advisory_key("isthmus-audit-append")
_TOP = 1 << 62


class PgAuditReader:
    """Read access to the audit tables (also what `isthmus audit verify` reads)."""

    def __init__(self, db: Pool | Connection) -> None:
        self._db = db

    async def log_id(self) -> str | None:
        value = await self._db.fetchval("SELECT value FROM audit_meta WHERE key = 'log_id'")
        return str(value) if value is not None else None

    async def last(self) -> StoredAuditRow | None:
        row = await self._db.fetchrow(
            f"SELECT {_READ} FROM audit_record ORDER BY seq DESC LIMIT 1")
        return _stored(row) if row is not None else None

    async def checkpoints(self, low: int = 0, high: int | None = None, *,
                          newest_first: bool = False,
                          limit: int | None = None) -> list[CheckpointRow]:
        order = "DESC" if newest_first else "ASC"
        rows = await self._db.fetch(
            "SELECT id, count, created_at, body, signature FROM audit_checkpoint "
            f"WHERE count >= $1 AND count <= $2 ORDER BY count {order}, id {order} LIMIT $3",
            low, _TOP if high is None else high, limit)
        return [CheckpointRow(int(r[0]), int(r[1]), str(r[2]), bytes(r[3]), bytes(r[4]))
                for r in rows]

    async def checkpoint_counts(self, low: int = 0, high: int | None = None) -> list[int]:
        rows = await self._db.fetch(
            "SELECT DISTINCT count FROM audit_checkpoint WHERE count >= $1 AND count <= $2 "
            "ORDER BY count", low, _TOP if high is None else high)
        return [int(r[0]) for r in rows]

    async def hash_at(self, seq: int) -> bytes | None:
        value = await self._db.fetchval("SELECT hash FROM audit_record WHERE seq = $1", seq)
        return bytes(value) if value is not None else None

    async def first_seq_at_or_after(self, recorded_at: str) -> int | None:
        value = await self._db.fetchval(
            "SELECT min(seq) FROM audit_record WHERE recorded_at >= $1", recorded_at)
        return int(value) if value is not None else None

    async def scan(self, from_seq: int = 1, to_seq: int | None = None,
                   page: int = 2000) -> AsyncIterator[StoredAuditRow]:
        after = from_seq - 1
        upper = to_seq if to_seq is not None else _TOP
        while True:
            rows = await self._db.fetch(
                f"SELECT {_READ} FROM audit_record WHERE seq > $1 AND seq <= $2 "
                "ORDER BY seq LIMIT $3", after, upper, page)
            batch = [_stored(r) for r in rows]
            for row in batch:
                yield row
            if len(batch) < page:
                return
            after = batch[-1].seq

    async def search(self, where: AuditFilter, after_seq: int = 0,
                     limit: int = 100) -> list[StoredAuditRow]:
        params: list[object] = [after_seq]

        def bind(value: object) -> str:
            params.append(value)
            return f"${len(params)}"

        clauses = ["seq > $1"]
        if where.max_seq is not None:
            clauses.append(f"seq <= {bind(where.max_seq)}")
        if where.start is not None:
            clauses.append(f"recorded_at >= {bind(where.start)}")
        if where.end is not None:
            clauses.append(f"recorded_at < {bind(where.end)}")
        if where.action is not None:
            clauses.append(f"action = {bind(where.action)}")
        if where.client_id is not None:
            if where.client_prefix is not None:
                clauses.append(f"(client_id = {bind(where.client_id)} OR (client_id >= "
                               f"{bind(where.client_prefix + '|')} AND client_id < "
                               f"{bind(where.client_prefix + '}')}))")
            else:
                clauses.append(f"client_id = {bind(where.client_id)}")
        if where.patient_id_indexes:
            clauses.append(
                f"patient_id_index = ANY({bind(list(where.patient_id_indexes))}::bytea[])")
        if where.patient_indexes:
            clauses.append(f"patient_index = ANY({bind(list(where.patient_indexes))}::bytea[])")
        rows = await self._db.fetch(
            f"SELECT {_READ} FROM audit_record WHERE {' AND '.join(clauses)} "
            f"ORDER BY seq LIMIT {bind(limit)}", *params)
        return [_stored(r) for r in rows]


class PgAuditStore:
    """AuditStore on a PostgreSQL pool; appends serialised across instances."""

    def __init__(self, pool: Pool, log_id: str, max_batch: int) -> None:
        self._pool = pool
        self._reader = PgAuditReader(pool)
        self._log_id = log_id
        self._lock = asyncio.Lock()
        self._chain: Chain | None = None
        self._on_commit: Callable[[int, int], None] | None = None
        self._head: tuple[int, bytes] = (0, b"")
        self._committer: GroupCommitter[AuditRow, tuple[int, bytes]] = GroupCommitter(
            self._locked_insert, name="audit", logger=log, max_batch=max_batch,
            failure=_refusal, closed="the audit log is not open for writing",
            after=self._committed)

    @classmethod
    async def open(cls, pool: Pool, max_batch: int = 1024) -> PgAuditStore:
        try:
            # The first instance names the log; the others read its name.
            await pool.execute("INSERT INTO audit_meta (key, value) VALUES ('log_id', $1) "
                               "ON CONFLICT (key) DO NOTHING", secrets.token_hex(16))
            log_id = await PgAuditReader(pool).log_id()
        except DATABASE_ERRORS as exc:
            raise unavailable("the audit trail could not be opened", exc) from None
        assert log_id is not None
        return cls(pool, log_id, max_batch)

    @property
    def log_id(self) -> str:
        return self._log_id

    async def start(self, chain: Chain,
                    on_commit: Callable[[int, int], None] | None = None) -> None:
        self._chain = chain
        self._on_commit = on_commit
        self._head = await self._stored_head(self._pool, chain)
        self._committer.start()

    async def _stored_head(self, db: Pool | Connection, chain: Chain) -> tuple[int, bytes]:
        last = await PgAuditReader(db).last()
        if last is not None:
            return last.seq, last.hash
        value = await db.fetchval("SELECT value FROM audit_meta WHERE key = 'purged_head'")
        if value is not None:
            seq, _, hex_hash = str(value).partition(":")
            return int(seq), bytes.fromhex(hex_hash)
        return 0, chain.genesis

    @property
    def head(self) -> tuple[int, bytes]:
        return self._head

    async def last_row(self) -> StoredAuditRow | None:
        return await self._reader.last()

    async def checkpoints(self, low: int = 0, high: int | None = None, *,
                          newest_first: bool = False,
                          limit: int | None = None) -> list[CheckpointRow]:
        return await self._reader.checkpoints(low, high, newest_first=newest_first,
                                              limit=limit)

    async def checkpoint_counts(self, low: int = 0, high: int | None = None) -> list[int]:
        return await self._reader.checkpoint_counts(low, high)

    async def hash_at(self, seq: int) -> bytes | None:
        return await self._reader.hash_at(seq)

    async def first_seq_at_or_after(self, recorded_at: str) -> int | None:
        return await self._reader.first_seq_at_or_after(recorded_at)

    async def scan(self, from_seq: int = 1, to_seq: int | None = None,
                   page: int = 2000) -> AsyncIterator[StoredAuditRow]:
        async for row in self._reader.scan(from_seq, to_seq, page):
            yield row

    async def search(self, where: AuditFilter, after_seq: int = 0,
                     limit: int = 100) -> list[StoredAuditRow]:
        return await self._reader.search(where, after_seq, limit)

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
        """Link and write a batch after the head. Fast path: one statement, which writes
        nothing if another instance holds the append lock or appended after our head (the
        primary key on seq refuses it, as the SQLite store's does); then, under the lock,
        follow their rows (checking each) and link again."""
        chain = self._chain
        assert chain is not None
        seq, prev = self._head
        if seq:
            columns, links = _link(chain, seq, prev, rows)
            try:
                # Only after our head row as it is (not after a purge that removed it).
                result = await self._pool.execute(_INSERT_AFTER, *columns, seq, prev,
                                                  _APPEND_LOCK)
            except asyncpg.UniqueViolationError:
                result = "INSERT 0 0"
            if result != "INSERT 0 0":
                self._head = links[-1]
                return links
        async with self._pool.acquire() as db, db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock($1)", _APPEND_LOCK)
            seq, prev = await self._follow(db, chain)
            columns, links = _link(chain, seq, prev, rows)
            await db.execute(_INSERT, *columns)
        self._head = links[-1]
        return links

    async def _follow(self, db: Connection, chain: Chain) -> tuple[int, bytes]:
        """The head to link after: ours, advanced over the rows other instances appended
        since (each checked), inside the append lock; past a purge another instance made
        of rows we had not seen, from the head that purge recorded."""
        seq, prev = self._head
        last = await db.fetchval("SELECT max(seq) FROM audit_record")
        if last is not None and int(last) <= seq:
            return self._head
        purged = await db.fetchval("SELECT value FROM audit_meta WHERE key = 'purged_head'")
        if purged is not None:
            purged_seq, _, hex_hash = str(purged).partition(":")
            if int(purged_seq) > seq:
                seq, prev = int(purged_seq), bytes.fromhex(hex_hash)
        async for row in PgAuditReader(db).scan(seq + 1):
            if row.seq != seq + 1:
                raise ChainConflict(f"audit record {seq + 1} is missing")
            link = chain.link(prev, row.seq, row.body)
            if link != row.hash or row.mac_key != chain.mac_key_id or chain.mac(link) != row.mac:
                raise ChainConflict(f"audit record {row.seq} written by another instance "
                                    "does not verify (do all instances share the audit "
                                    "signing key?)")
            seq, prev = row.seq, link
        self._head = (seq, prev)
        return self._head

    async def sync_head(self) -> tuple[int, bytes]:
        async with self._lock:
            if self._chain is not None:
                async with self._pool.acquire() as db:
                    await self._follow(db, self._chain)
        return self._head

    async def add_checkpoint(self, count: int, created_at: str, body: bytes,
                             signature: bytes) -> int:
        value = await self._pool.fetchval(
            "INSERT INTO audit_checkpoint (count, created_at, body, signature) "
            "VALUES ($1, $2, $3, $4) RETURNING id", count, created_at, body, signature)
        return int(value)

    async def purge(self, through_seq: int, count: int, created_at: str, body: bytes,
                    signature: bytes) -> int:
        """Delete records up to `through_seq` with the checkpoint that anchors the rest,
        in one transaction, under the append lock."""
        async with self._lock, self._pool.acquire() as db, db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock($1)", _APPEND_LOCK)
            purged_hash = await PgAuditReader(db).hash_at(through_seq)
            await db.execute("SET LOCAL isthmus.audit_purging = 'on'")
            result = await db.execute("DELETE FROM audit_record WHERE seq <= $1", through_seq)
            await db.execute("DELETE FROM audit_checkpoint WHERE count <= $1", through_seq)
            await db.execute(
                "INSERT INTO audit_checkpoint (count, created_at, body, signature) "
                "VALUES ($1, $2, $3, $4)", count, created_at, body, signature)
            if purged_hash is not None:
                await db.execute(
                    "INSERT INTO audit_meta (key, value) VALUES ('purged_head', $1) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    f"{through_seq}:{purged_hash.hex()}")
            return int(str(result).rsplit(" ", 1)[-1])

    async def probe_writable(self) -> None:
        try:
            await self._pool.execute(
                "INSERT INTO audit_meta (key, value) VALUES ('ready_probe', '1') "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
        except DATABASE_ERRORS as exc:
            raise unavailable("the audit log is not writable", exc) from None

    async def stop_writer(self) -> None:
        await self._committer.close()

    async def close(self) -> None:
        """Commit what is queued (the pool is closed by its owner)."""
        await self.stop_writer()
        self._committer.summary("audit log", "records")

    @property
    def batches_committed(self) -> int:
        return self._committer.batches


def _link(chain: Chain, seq: int, prev: bytes, rows: Sequence[AuditRow]
          ) -> tuple[list[list[object]], list[tuple[int, bytes]]]:
    """The batch's columns (for _INSERT) and (seq, chain hash) of each row, after
    (seq, prev)."""
    columns: list[list[object]] = [[] for _ in _COLUMNS]
    links: list[tuple[int, bytes]] = []
    mac_key = chain.mac_key_id
    sealed = chain.extend(prev, seq + 1, [r.body for r in rows])
    for row, (link, mac) in zip(rows, sealed, strict=True):
        seq += 1
        links.append((seq, link))
        for column, value in zip(columns, (
                seq, row.recorded_at, row.action, row.client_id, row.outcome,
                row.patient_index, row.patient_id_index, row.body, link, mac, mac_key),
                strict=True):
            column.append(value)
    return columns, links


def _stored(r: Any) -> StoredAuditRow:
    return StoredAuditRow(
        int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]),
        None if r[5] is None else bytes(r[5]), None if r[6] is None else bytes(r[6]),
        bytes(r[7]), bytes(r[8]), bytes(r[9]), str(r[10]))


def _refusal(exc: Exception) -> Exception:
    """What the callers of a batch that could not commit are told (and refuse access)."""
    return StoreUnavailable(str(exc) if isinstance(exc, ChainConflict)
                            else "the audit log could not commit")
