"""The durable inbox on PostgreSQL, shared by every instance of the gateway.

As on SQLite: concurrent messages are group-committed (while one batch is in flight the
next gathers), a batch is one INSERT (rows passed as arrays and unnested), and the ACK is
stored with its message. A batch holding rows owed to remote backends is one transaction
that first takes an advisory lock per patient, so one patient's rows commit in id order
whichever instances insert them (the outbox delivers them in that order).
Duplicates are decided by the database: the unique constraint on the dedup key (sender
application, facility, control id) lets exactly one of two instances that receive the
same message at once insert it; the other finds the stored row and answers with its ACK.
The outbox rows are made by a trigger in the same statement (schema.py), so nothing
acknowledged misses its deliveries on any instance.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import orjson

from gateway.store.errors import StoreUnavailable
from gateway.store.group_commit import GroupCommitter
from gateway.store.inbox import (
    CONFLICT,
    REPLAYABLE,
    InboundMessage,
    InboxEntry,
    RawRows,
    Replayed,
    Stored,
)
from gateway.store.pg.connect import DATABASE_ERRORS, Connection, Pool, unavailable

log = logging.getLogger(__name__)

# (column, array type) in insert order.
_COLUMNS = (
    ("received_at", "text"), ("sending_application", "text"), ("sending_facility", "text"),
    ("control_id", "text"), ("message_type", "text"), ("version", "text"), ("peer", "text"),
    ("size", "int4"), ("status", "text"), ("raw", "bytea"), ("ack", "bytea"),
    ("dedup_key", "text"), ("error", "text"), ("routes", "text"), ("patient_key", "text"),
    ("trace", "text"), ("bundle", "bytea"), ("content_hash", "text"))
_NAMES = ", ".join(name for name, _ in _COLUMNS)
_UNNEST = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(_COLUMNS, 1))
_INSERT = (f"INSERT INTO inbox ({_NAMES}) SELECT * FROM unnest({_UNNEST}) "
           "ON CONFLICT (dedup_key) DO NOTHING RETURNING id, dedup_key")
_INSERT_ONE = (f"INSERT INTO inbox ({_NAMES}) VALUES "
               f"({', '.join(f'${i}' for i in range(1, len(_COLUMNS) + 1))}) RETURNING id")
_MAX_BATCH_BYTES = 32 * 1024 * 1024
_ENTRY_COLUMNS = ("id, received_at, sending_application, sending_facility, control_id, "
                  "message_type, version, peer, size, status, error")

# Per-patient order across instances: outbox rows are delivered in id order per patient,
# so for one patient commit order must be id order. Ids are drawn at INSERT, so a
# transaction takes its patients' locks before inserting; another instance's insert for
# the same patient then waits until this one commits, and draws a higher id. Locks are
# taken in key order (no deadlock between two batches), held to the end of the
# transaction, and named per schema (several deployments on one server do not wait for
# each other).
_LOCK = ("SELECT pg_advisory_xact_lock(key) FROM (SELECT DISTINCT hashtextextended("
         "'isthmus-patient:' || current_schema() || ':' || patient, 0) AS key "
         "FROM unnest($1::text[]) AS patient WHERE patient <> '' ORDER BY key) AS keys")


class PgInbox:
    """Inbox on a PostgreSQL pool with one group-committing writer per instance."""

    def __init__(self, pool: Pool, dedup_window: timedelta = timedelta(days=7),
                 max_batch: int = 512) -> None:
        self._pool = pool
        self._dedup_window = dedup_window
        self._committer: GroupCommitter[InboundMessage, Stored] = GroupCommitter(
            self._insert, name="inbox", logger=log, max_batch=max_batch,
            failure=lambda exc: StoreUnavailable("the inbox could not commit"),
            closed="the inbox is closing", size=lambda m: len(m.raw),
            max_bytes=_MAX_BATCH_BYTES)

    @classmethod
    async def open(cls, pool: Pool, dedup_window: timedelta = timedelta(days=7),
                   max_batch: int = 512) -> PgInbox:
        inbox = cls(pool, dedup_window, max_batch)
        try:
            await inbox.expire_dedup_keys()
        except DATABASE_ERRORS as exc:
            raise unavailable("the inbox could not be opened", exc) from None
        inbox._committer.start()
        return inbox

    # -- accepting ----------------------------------------------------------------------

    def submit(self, message: InboundMessage) -> asyncio.Future[Stored]:
        """Queue a message for the next group commit; the future resolves once durable."""
        return self._committer.submit(message)

    async def accept(self, message: InboundMessage) -> Stored:
        return await self.submit(message)

    async def _insert(self, messages: Sequence[InboundMessage]) -> list[Stored]:
        """One batch; with patients to keep in order (rows owed to remote backends), in
        one transaction that takes their locks first (see _LOCK)."""
        patients = [m.patient_key for m in messages if m.patient_key]
        async with self._pool.acquire() as db:
            if not patients:  # nothing is delivered from these rows: no order to keep
                return await self._store(db, messages)
            async with db.transaction():
                await db.execute(_LOCK, patients)
                return await self._store(db, messages)

    async def _store(self, db: Connection, messages: Sequence[InboundMessage]
                     ) -> list[Stored]:
        inserted = await self._insert_rows(db, messages)
        results: list[Stored] = []
        claimed: set[str] = set()
        for m in messages:
            key = m.dedup_key
            if key in inserted and key not in claimed:
                claimed.add(key)
                results.append(Stored(inserted[key], m.ack, duplicate=False))
            else:
                # Stored before: by an earlier batch, this one, or another instance.
                results.append(await self._original(db, m))
        return results

    async def _insert_rows(self, db: Connection, messages: Sequence[InboundMessage]
                           ) -> dict[str, int]:
        columns: list[list[object]] = [[] for _ in _COLUMNS]
        for m in messages:
            for column, value in zip(columns, _values(m, m.dedup_key), strict=True):
                column.append(value)
        rows = await db.fetch(_INSERT, *columns)
        return {str(row[1]): int(row[0]) for row in rows}

    async def _original(self, db: Connection, message: InboundMessage) -> Stored:
        """The stored row a duplicate repeats, or a fresh insert if its key has expired."""
        row = await db.fetchrow(
            "SELECT id, ack, received_at, content_hash FROM inbox WHERE dedup_key = $1",
            message.dedup_key)
        if row is not None:
            row_id, ack, received_at, stored_hash = row
            if str(received_at) >= _timestamp(self._dedup_cutoff()):
                if stored_hash is None or not message.content_hash or (
                        stored_hash == message.content_hash):
                    return Stored(int(row_id), bytes(ack), duplicate=True)
                return await self._conflict(db, message)
            await db.execute(
                "UPDATE inbox SET dedup_key = NULL WHERE id = $1", row_id)
        inserted = await self._insert_rows(db, [message])
        if message.dedup_key not in inserted:  # another instance took it meanwhile
            return await self._original(db, message)
        return Stored(inserted[message.dedup_key], message.ack, duplicate=False)

    async def _conflict(self, db: Connection, message: InboundMessage) -> Stored:
        """Another message under a used key: kept as a CONFLICT row (no key, no routes)."""
        row = await db.fetchrow(
            "SELECT id, ack FROM inbox WHERE content_hash = $1 AND status = 'conflict' "
            "AND received_at >= $2 ORDER BY id LIMIT 1",
            message.content_hash, _timestamp(self._dedup_cutoff()))
        if row is not None:
            return Stored(int(row[0]), bytes(row[1]), duplicate=True, conflict=True)
        ack = message.conflict_ack() if message.conflict_ack is not None else message.ack
        kept = replace(message, status=CONFLICT, ack=ack, routes=(), bundle=None)
        row_id = await db.fetchval(_INSERT_ONE, *_values(kept, None))
        return Stored(int(row_id), ack, duplicate=False, conflict=True)

    # -- maintenance --------------------------------------------------------------------

    def _dedup_cutoff(self) -> datetime:
        return datetime.now(UTC) - self._dedup_window

    async def expire_dedup_keys(self) -> int:
        """Release the duplicate keys of messages older than the window; returns how many."""
        result = await self._pool.execute(
            "UPDATE inbox SET dedup_key = NULL WHERE dedup_key IS NOT NULL "
            "AND received_at < $1", _timestamp(self._dedup_cutoff()))
        return int(str(result).rsplit(" ", 1)[-1])

    async def probe_writable(self) -> None:
        """A real (tiny) write, for readiness: raises StoreUnavailable if it fails."""
        try:
            await self._pool.execute(
                "INSERT INTO store_meta (key, value) VALUES ('ready_probe', $1) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                _timestamp(datetime.now(UTC)))
        except DATABASE_ERRORS as exc:
            raise unavailable("the inbox is not writable", exc) from None

    async def close(self) -> None:
        """Commit what is queued; the pool is closed by whoever opened it."""
        await self._committer.close()
        self._committer.summary("inbox", "messages")

    # -- reading ------------------------------------------------------------------------

    async def list(self, limit: int = 50, status: str | None = None) -> list[InboxEntry]:
        if status:
            rows = await self._pool.fetch(
                f"SELECT {_ENTRY_COLUMNS} FROM inbox WHERE status = $1 "
                "ORDER BY id DESC LIMIT $2", status, limit)
        else:
            rows = await self._pool.fetch(
                f"SELECT {_ENTRY_COLUMNS} FROM inbox ORDER BY id DESC LIMIT $1", limit)
        return [InboxEntry(*row) for row in rows]

    async def get(self, inbox_id: int) -> tuple[InboxEntry, bytes, bytes] | None:
        row = await self._pool.fetchrow(
            f"SELECT {_ENTRY_COLUMNS}, raw, ack FROM inbox WHERE id = $1", inbox_id)
        if row is None:
            return None
        return InboxEntry(*list(row)[:11]), bytes(row[11]), bytes(row[12])

    async def count(self) -> int:
        return int(await self._pool.fetchval("SELECT count(*) FROM inbox"))

    async def with_status(self, status: str, limit: int = 500, after: int = 0) -> RawRows:
        rows = await self._pool.fetch(
            "SELECT id, raw, received_at FROM inbox WHERE status = $1 AND id > $2 "
            "ORDER BY id LIMIT $3", status, after, limit)
        return [(int(r[0]), bytes(r[1]), _parse(str(r[2]))) for r in rows]

    async def raw_rows(self, ids: Sequence[int] | None,
                       statuses: Sequence[str] = REPLAYABLE) -> RawRows:
        """(id, raw, received at) for the given ids, or every row in `statuses`."""
        if ids is not None:
            rows = await self._pool.fetch(
                "SELECT id, raw, received_at FROM inbox WHERE id = ANY($1::bigint[]) "
                "ORDER BY id", list(ids))
        else:
            rows = await self._pool.fetch(
                "SELECT id, raw, received_at FROM inbox WHERE status = ANY($1::text[]) "
                "ORDER BY id", list(statuses))
        return [(int(r[0]), bytes(r[1]), _parse(str(r[2]))) for r in rows]

    async def set_statuses(self, outcomes: Sequence[tuple[int, str, str]]) -> None:
        """Set (id, status, error) for several rows in one statement."""
        if not outcomes:
            return
        await self._pool.execute(
            "UPDATE inbox SET status = o.status, error = o.error FROM unnest("
            "$1::bigint[], $2::text[], $3::text[]) AS o(id, status, error) "
            "WHERE inbox.id = o.id", [o[0] for o in outcomes], [o[1] for o in outcomes],
            [o[2] for o in outcomes])

    async def record_outcomes(self, outcomes: Sequence[Replayed]) -> None:
        """Record replays in one transaction: status and error, and for a row now owed to
        remote backends its Bundle and its outbox rows (an existing row is kept)."""
        now = _timestamp(datetime.now(UTC))
        async with self._pool.acquire() as db, db.transaction():
            await db.execute(_LOCK, [o.patient_key for o in outcomes if o.routes])
            await db.executemany("UPDATE inbox SET status = $1, error = $2 WHERE id = $3",
                                 [(o.status, o.error, o.inbox_id) for o in outcomes])
            routed = [o for o in outcomes if o.routes]
            await db.executemany(
                "UPDATE inbox SET bundle = $1, patient_key = $2 WHERE id = $3",
                [(o.bundle, o.patient_key, o.inbox_id) for o in routed])
            await db.executemany(
                "INSERT INTO outbox (inbox_id, backend, patient_key, created_at, "
                "updated_at) VALUES ($1, $2, $3, $4, $4) "
                "ON CONFLICT (inbox_id, backend) DO NOTHING",
                [(o.inbox_id, backend, o.patient_key, now)
                 for o in routed for backend in o.routes])

    @property
    def pool(self) -> Pool:
        return self._pool

    @property
    def batches_committed(self) -> int:
        return self._committer.batches


def _values(m: InboundMessage, dedup_key: str | None) -> tuple[object, ...]:
    """One message's values, in _COLUMNS order."""
    return (_timestamp(m.received_at), m.sending_application, m.sending_facility,
            m.control_id, m.message_type, m.version, m.peer, len(m.raw), m.status,
            m.raw, m.ack, dedup_key, m.error,
            orjson.dumps(m.routes).decode() if m.routes else "", m.patient_key,
            m.trace, m.bundle, m.content_hash or None)


def _timestamp(moment: datetime) -> str:
    """UTC ISO 8601 with microseconds, as the SQLite inbox writes it."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
