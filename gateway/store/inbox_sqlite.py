"""The durable inbox on SQLite: every accepted inbound message, committed before it is acknowledged.

Concurrent messages are group-committed: while one commit is on disk the next batch
gathers, and the whole batch is written by one multi-row INSERT (one transaction, one
WAL sync). Duplicates, keyed on sender application, sender facility and control id, are
detected by a unique index in the same statement, so a resend after a crash or restart
gets back the acknowledgement that was stored with the original. A duplicate key whose
content differs (a hash of the message without MSH-7) is not a resend but another message
under a reused control id: it is kept as a `conflict` row, never answered with the
original's ACK.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import aiosqlite
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
from gateway.store.raw_form import original
from gateway.store.sealing import PLAIN, RowCodec, inbox_context
from gateway.store.sqlite import open_database

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at TEXT NOT NULL,
    sending_application TEXT NOT NULL,
    sending_facility TEXT NOT NULL,
    control_id TEXT NOT NULL,
    message_type TEXT NOT NULL,
    version TEXT NOT NULL,
    peer TEXT NOT NULL,
    size INTEGER NOT NULL,
    status TEXT NOT NULL,
    raw BLOB NOT NULL,
    ack BLOB NOT NULL,
    -- Why translation failed: a location and a reason, never a value (no PHI).
    error TEXT NOT NULL DEFAULT '',
    -- NULL once the message is older than the duplicate window, so the key may recur.
    dedup_key TEXT UNIQUE,
    -- SHA-256 of the message without MSH-7: a resend matches it, a reused control id does
    -- not. NULL in rows stored before it existed (their duplicates are not compared).
    content_hash TEXT
);
CREATE INDEX IF NOT EXISTS inbox_received_at ON inbox (received_at);
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# The outbox lives beside the inbox, in the same file, and its rows are made by a trigger
# on the inbox INSERT: a message and its deliveries are committed by the one statement
# that stores it (one transaction, one sync), so nothing acknowledged can miss its
# deliveries and a duplicate (no insert) makes none.
_OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    inbox_id INTEGER NOT NULL,
    backend TEXT NOT NULL,
    -- A hash of the patient's identifier (never the identifier): deliveries with the same
    -- key go strictly in id order. '' when the message names no patient.
    patient_key TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    -- Unix time before which the next attempt must not start.
    next_at REAL NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    -- The last answer ("HTTP 503", "ACK AE", "timeout") and why it failed: no values.
    last_status TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    -- The W3C traceparent of the message's ingest span: deliveries are its children.
    trace TEXT NOT NULL DEFAULT '',
    UNIQUE (inbox_id, backend)
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (backend, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS outbox_status ON outbox (status, id);
-- Dead rows by patient: a dead row holds its patient's later rows (gateway.store.outbox).
CREATE INDEX IF NOT EXISTS outbox_dead ON outbox (backend, patient_key, id)
    WHERE status = 'dead';
CREATE TRIGGER IF NOT EXISTS inbox_to_outbox AFTER INSERT ON inbox
WHEN NEW.routes != '' BEGIN
    INSERT INTO outbox (inbox_id, backend, patient_key, created_at, updated_at, trace)
    SELECT NEW.id, value, NEW.patient_key, NEW.received_at, NEW.received_at, NEW.trace
    FROM json_each(NEW.routes);
END;
"""

_COLUMNS = ("received_at", "sending_application", "sending_facility", "control_id",
            "message_type", "version", "peer", "size", "status", "raw", "ack", "dedup_key",
            "error", "routes", "patient_key", "trace", "bundle", "content_hash")
_ROW_SQL = "(" + ",".join("?" * len(_COLUMNS)) + ")"
# One commit carries at most this many message bytes, so a run of large messages (up to
# the 10 MiB frame limit each) is written in several statements, not one huge one.
_MAX_BATCH_BYTES = 32 * 1024 * 1024
# SQLite allows 32766 bound parameters per statement.
_MAX_ROWS_PER_STATEMENT = 32766 // len(_COLUMNS)


class SqliteInbox:
    """Inbox on an aiosqlite (WAL) database with a single group-committing writer."""

    def __init__(self, db: aiosqlite.Connection, dedup_window: timedelta,
                 max_batch: int, codec: RowCodec = PLAIN) -> None:
        self._db = db
        self._codec = codec
        self._dedup_window = dedup_window
        self._committer: GroupCommitter[InboundMessage, Stored] = GroupCommitter(
            self._insert, name="inbox", logger=log,
            max_batch=min(max_batch, _MAX_ROWS_PER_STATEMENT),
            failure=lambda exc: StoreUnavailable("the inbox could not commit"),
            closed="the inbox is closing", size=lambda m: len(m.raw),
            max_bytes=_MAX_BATCH_BYTES)

    @classmethod
    async def open(cls, path: Path,
                   synchronous: Literal["normal", "full", "extra"] = "full",
                   dedup_window: timedelta = timedelta(days=7),
                   max_batch: int = 512, codec: RowCodec = PLAIN) -> SqliteInbox:
        # No statement cache: each multi-row INSERT (one per batch size) would keep SQLite's
        # copy of the messages it last bound (up to _MAX_BATCH_BYTES each) after the commit,
        # for as long as it stays cached: hundreds of MB after a burst of large messages.
        # Preparing the statement again costs ~40 us a commit, off the event loop.
        db = await open_database(path, synchronous, cached_statements=0)
        inbox = cls(db, dedup_window, max_batch, codec)
        try:
            await db.executescript(_SCHEMA)
            await _migrate(db)
            await db.executescript(_OUTBOX_SCHEMA)
            await inbox.expire_dedup_keys()
        except BaseException:
            await db.close()
            raise
        inbox._committer.start()
        return inbox

    # -- accepting ----------------------------------------------------------------------

    def submit(self, message: InboundMessage) -> asyncio.Future[Stored]:
        """Queue a message for the next group commit; the future resolves once durable."""
        return self._committer.submit(message)

    async def accept(self, message: InboundMessage) -> Stored:
        return await self.submit(message)

    async def _insert(self, messages: Sequence[InboundMessage]) -> list[Stored]:
        inserted = await self._insert_rows(messages)
        results: list[Stored] = []
        claimed: set[str] = set()
        for m in messages:
            key = m.dedup_key
            if key in inserted and key not in claimed:
                claimed.add(key)
                results.append(Stored(inserted[key], m.ack, duplicate=False))
            else:
                # Already stored: by an earlier batch, or earlier in this one.
                results.append(await self._original(m))
        return results

    async def _insert_rows(self, messages: Sequence[InboundMessage]) -> dict[str, int]:
        """Insert the rows whose keys are new; returns dedup key -> inbox id for those."""
        params: list[object] = []
        for m in messages:
            params.extend(_row(m, m.dedup_key, self._codec))
        # One statement in autocommit mode is one transaction: all rows or none.
        sql = (f"INSERT INTO inbox ({','.join(_COLUMNS)}) VALUES "
               + ",".join([_ROW_SQL] * len(messages))
               + " ON CONFLICT(dedup_key) DO NOTHING RETURNING id, dedup_key")
        rows = await self._db.execute_fetchall(sql, params)
        # aiosqlite's thread keeps its last call, this list with it, until the next one
        # comes: emptied, the messages go now rather than after the next statement.
        params.clear()
        return {str(key): int(row_id) for row_id, key in rows}

    async def _original(self, message: InboundMessage) -> Stored:
        """The stored row a duplicate repeats, or a fresh insert if its key has expired."""
        rows = list(await self._db.execute_fetchall(
            "SELECT id, ack, received_at, content_hash FROM inbox WHERE dedup_key = ?",
            (message.dedup_key,),
        ))
        if rows:
            row_id, ack, received_at, stored_hash = rows[0]
            if str(received_at) >= _timestamp(self._dedup_cutoff()):
                if stored_hash is None or not message.content_hash or (
                        stored_hash == message.content_hash):
                    return Stored(int(row_id), bytes(ack), duplicate=True)
                return await self._conflict(message)
            await self._db.execute("UPDATE inbox SET dedup_key = NULL WHERE id = ?", (row_id,))
        inserted = await self._insert_rows([message])
        return Stored(inserted[message.dedup_key], message.ack, duplicate=False)

    async def _conflict(self, message: InboundMessage) -> Stored:
        """Keep another message under a used key: a CONFLICT row with no dedup key and no
        deliveries (no routes: the trigger makes no outbox rows), its AE/CE stored with it.
        A resend of the same conflicting message gets that answer again, not a new row."""
        rows = list(await self._db.execute_fetchall(
            # The literal status lets SQLite use the partial index inbox_conflicts.
            "SELECT id, ack FROM inbox WHERE content_hash = ? AND status = 'conflict' "
            "AND received_at >= ? ORDER BY id LIMIT 1",
            (message.content_hash, _timestamp(self._dedup_cutoff()))))
        if rows:
            return Stored(int(rows[0][0]), bytes(rows[0][1]), duplicate=True, conflict=True)
        ack = message.conflict_ack() if message.conflict_ack is not None else message.ack
        kept = replace(message, status=CONFLICT, ack=ack, routes=(), bundle=None)
        inserted = list(await self._db.execute_fetchall(
            f"INSERT INTO inbox ({','.join(_COLUMNS)}) VALUES {_ROW_SQL} RETURNING id",
            _row(kept, None, self._codec)))
        return Stored(int(inserted[0][0]), ack, duplicate=False, conflict=True)

    # -- maintenance --------------------------------------------------------------------

    def _dedup_cutoff(self) -> datetime:
        return datetime.now(UTC) - self._dedup_window

    async def expire_dedup_keys(self) -> int:
        """Release the duplicate keys of messages older than the window; returns how many."""
        cursor = await self._db.execute(
            "UPDATE inbox SET dedup_key = NULL WHERE dedup_key IS NOT NULL AND received_at < ?",
            (_timestamp(self._dedup_cutoff()),),
        )
        return cursor.rowcount

    async def probe_writable(self) -> None:
        """A real (tiny) write, for readiness: raises StoreUnavailable if it fails."""
        try:
            await self._db.execute(
                "INSERT INTO store_meta (key, value) VALUES ('ready_probe', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (_timestamp(datetime.now(UTC)),),
            )
        except Exception as exc:
            raise StoreUnavailable(f"the inbox is not writable: {type(exc).__name__}") from None

    async def close(self) -> None:
        """Commit what is queued, then close the database."""
        await self._committer.close()
        await self._db.close()
        self._committer.summary("inbox", "messages")

    # -- reading ------------------------------------------------------------------------

    async def list(self, limit: int = 50, status: str | None = None) -> list[InboxEntry]:
        return await list_entries(self._db, limit, status)

    async def get(self, inbox_id: int) -> tuple[InboxEntry, bytes, bytes] | None:
        return await get_entry(self._db, inbox_id, self._codec)

    async def count(self) -> int:
        rows = list(await self._db.execute_fetchall("SELECT count(*) FROM inbox"))
        return int(rows[0][0])

    async def with_status(self, status: str, limit: int = 500,
                          after: int = 0) -> RawRows:
        """(id, raw, received at) of the oldest rows in one status, after an id."""
        rows = await self._db.execute_fetchall(
            f"SELECT id, raw, {_IDENTITY} FROM inbox WHERE status = ? AND id > ? "
            "ORDER BY id LIMIT ?", (status, after, limit))
        return _raw_rows(rows, self._codec)

    async def set_statuses(self, outcomes: Sequence[tuple[int, str, str]]) -> None:
        """Set (id, status, error) for several rows: one statement per distinct outcome.

        One statement each, never BEGIN ... COMMIT: this connection is shared with the
        group-committing writer, whose inserts must not ride in another transaction.
        """
        groups: dict[tuple[str, str], list[int]] = {}
        for row_id, status, error in outcomes:
            groups.setdefault((status, error), []).append(row_id)
        for (status, error), ids in groups.items():
            for start in range(0, len(ids), 30_000):
                chunk = ids[start:start + 30_000]
                await self._db.execute(
                    f"UPDATE inbox SET status = ?, error = ? WHERE id IN "
                    f"({','.join('?' * len(chunk))})", (status, error, *chunk))

    @property
    def connection(self) -> aiosqlite.Connection:
        """The inbox's connection, shared by the outbox (same file): single statements
        only, never BEGIN ... COMMIT (see set_statuses)."""
        return self._db

    @property
    def codec(self) -> RowCodec:
        """How this inbox seals its payloads; the outbox opens them with it."""
        return self._codec

    @property
    def batches_committed(self) -> int:
        return self._committer.batches


_ENTRY_COLUMNS = ("id, received_at, sending_application, sending_facility, control_id, "
                  "message_type, version, peer, size, status, error")


async def list_entries(db: aiosqlite.Connection, limit: int,
                       status: str | None) -> list[InboxEntry]:
    if status:
        rows = await db.execute_fetchall(
            f"SELECT {_ENTRY_COLUMNS} FROM inbox WHERE status = ? ORDER BY id DESC LIMIT ?",
            (status, limit))
    else:
        rows = await db.execute_fetchall(
            f"SELECT {_ENTRY_COLUMNS} FROM inbox ORDER BY id DESC LIMIT ?", (limit,))
    return [InboxEntry(*row) for row in rows]


async def get_entry(db: aiosqlite.Connection, inbox_id: int,
                    codec: RowCodec = PLAIN) -> tuple[InboxEntry, bytes, bytes] | None:
    rows = list(await db.execute_fetchall(
        f"SELECT {_ENTRY_COLUMNS}, raw, ack FROM inbox WHERE id = ?", (inbox_id,)))
    if not rows:
        return None
    row = rows[0]
    entry = InboxEntry(*row[:11])
    raw = original(codec.open(bytes(row[11]), inbox_context(
        "raw", entry.sending_application, entry.sending_facility, entry.control_id,
        entry.received_at)))
    return entry, raw, bytes(row[12])


# What names an inbox row in the associated data of its sealed columns (sealing.py).
_IDENTITY = "sending_application, sending_facility, control_id, received_at"


def _row(m: InboundMessage, dedup_key: str | None, codec: RowCodec) -> tuple[object, ...]:
    """One message's values, in _COLUMNS order, its payloads sealed by `codec`."""
    received = _timestamp(m.received_at)
    # The stored form (raw_form.py): compressed when the large-frame process made it.
    raw = codec.seal(m.stored_raw, inbox_context(
        "raw", m.sending_application, m.sending_facility, m.control_id, received))
    bundle = None if m.bundle is None else codec.seal(m.bundle, inbox_context(
        "bundle", m.sending_application, m.sending_facility, m.control_id, received))
    return (received, m.sending_application, m.sending_facility,
            m.control_id, m.message_type, m.version, m.peer, len(m.raw), m.status,
            raw, m.ack, dedup_key, m.error,
            orjson.dumps(m.routes).decode() if m.routes else "",
            blind_patient(m.patient_key, codec), m.trace, bundle, m.content_hash or None)


def blind_patient(key: str, codec: RowCodec) -> str:
    """The outbox's per-patient ordering key as stored: a blind index when sealed (the
    plain key is an unkeyed hash of an identifier, which a guess could confirm)."""
    return codec.blind(key, "patient") if key else ""


def _raw_rows(rows: Any, codec: RowCodec) -> RawRows:
    """(id, raw, received at) from rows of (id, raw, *_IDENTITY), opened by `codec`."""
    return [(int(row_id), original(codec.open(bytes(raw), inbox_context(
                "raw", str(app), str(facility), str(control), str(received)))),
             _parse_timestamp(str(received)))
            for row_id, raw, app, facility, control, received in rows]


def _timestamp(moment: datetime) -> str:
    """UTC ISO 8601 with microseconds: fixed width, so text order is time order."""
    if moment.utcoffset() != _ZERO:
        moment = moment.astimezone(UTC)
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


_ZERO = timedelta(0)


async def read_entries(path: Path, limit: int = 50, status: str | None = None) -> list[InboxEntry]:
    """List inbox entries from a database file, read-only (safe beside a running gateway)."""
    async with aiosqlite.connect(f"file:{path}?mode=ro", uri=True) as db:
        return await list_entries(db, limit, status)


async def read_entry(path: Path, inbox_id: int,
                     codec: RowCodec = PLAIN) -> tuple[InboxEntry, bytes, bytes] | None:
    async with aiosqlite.connect(f"file:{path}?mode=ro", uri=True) as db:
        return await get_entry(db, inbox_id, codec)


async def _migrate(db: aiosqlite.Connection) -> None:
    """Bring an inbox made by an older version up to this schema (columns only added)."""
    columns = {str(row[1]) for row in await db.execute_fetchall("PRAGMA table_info(inbox)")}
    if "error" not in columns:
        await db.execute("ALTER TABLE inbox ADD COLUMN error TEXT NOT NULL DEFAULT ''")
    for column, declaration in (("routes", "TEXT NOT NULL DEFAULT ''"),
                                ("patient_key", "TEXT NOT NULL DEFAULT ''"),
                                ("trace", "TEXT NOT NULL DEFAULT ''"), ("bundle", "BLOB"),
                                ("content_hash", "TEXT")):
        if column not in columns:
            await db.execute(f"ALTER TABLE inbox ADD COLUMN {column} {declaration}")
    # Only conflict rows are looked up by hash (a resend of a conflicting message), so
    # the index holds those alone and costs the hot path's inserts nothing.
    await db.execute("CREATE INDEX IF NOT EXISTS inbox_conflicts ON inbox (content_hash) "
                     "WHERE status = 'conflict'")


async def read_raw(path: Path, ids: Sequence[int] | None,
                   statuses: Sequence[str] = REPLAYABLE, codec: RowCodec = PLAIN) -> RawRows:
    """(id, raw message, received at) for the given ids, or for every row in `statuses`
    (ids None)."""
    async with aiosqlite.connect(f"file:{path}?mode=ro", uri=True) as db:
        if ids is not None:
            marks = ",".join("?" * len(ids))
            rows = await db.execute_fetchall(
                f"SELECT id, raw, {_IDENTITY} FROM inbox WHERE id IN ({marks}) ORDER BY id",
                list(ids))
        else:
            marks = ",".join("?" * len(statuses))
            rows = await db.execute_fetchall(
                f"SELECT id, raw, {_IDENTITY} FROM inbox WHERE status IN ({marks}) "
                "ORDER BY id", list(statuses))
        return _raw_rows(rows, codec)


async def record_outcomes(path: Path, outcomes: Sequence[Replayed],
                          codec: RowCodec = PLAIN) -> None:
    """Record replays in one transaction (beside a live gateway): status and error, and
    for a row now owed to remote backends its Bundle and their outbox rows (a row that
    already has one for a backend keeps it: the UNIQUE key ignores the second)."""
    async with aiosqlite.connect(path, timeout=30) as db:
        await db.executemany("UPDATE inbox SET status = ?, error = ? WHERE id = ?",
                             [(o.status, o.error, o.inbox_id) for o in outcomes])
        routed = [o for o in outcomes if o.routes]
        identities = await _identities(db, [o.inbox_id for o in routed])
        await db.executemany(
            "UPDATE inbox SET bundle = ?, patient_key = ? WHERE id = ?",
            [(None if o.bundle is None else codec.seal(o.bundle, inbox_context(
                "bundle", *identities[o.inbox_id])), blind_patient(o.patient_key, codec),
              o.inbox_id) for o in routed])
        now = _timestamp(datetime.now(UTC))
        await db.executemany(
            "INSERT INTO outbox (inbox_id, backend, patient_key, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (inbox_id, backend) DO NOTHING",
            [(o.inbox_id, backend, blind_patient(o.patient_key, codec), now, now)
             for o in routed for backend in o.routes])
        await db.commit()


async def _identities(db: aiosqlite.Connection,
                      ids: Sequence[int]) -> dict[int, tuple[str, str, str, str]]:
    found: dict[int, tuple[str, str, str, str]] = {}
    for start in range(0, len(ids), 30_000):
        chunk = list(ids[start:start + 30_000])
        rows = await db.execute_fetchall(
            f"SELECT id, {_IDENTITY} FROM inbox WHERE id IN ({','.join('?' * len(chunk))})",
            chunk)
        found.update({int(r[0]): (str(r[1]), str(r[2]), str(r[3]), str(r[4])) for r in rows})
    return found


def _parse_timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
