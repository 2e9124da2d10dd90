"""Change events of the FHIR store, and the event deliveries queued in the outbox.

The store's triggers add one `fhir_event` row per new version (created, updated, deleted)
in the statement that writes the version, whatever path wrote it; a resend that changes
nothing writes no version and so no event. `SqliteEventLog` reads them in order, with the
version's body (for a deletion, the body of the version it deleted). `SqliteEventQueue`
puts deliveries into the outbox of the inbox database: one outbox row per (event, target)
with `inbox_id` = -event seq (so the outbox's UNIQUE (inbox_id, backend) makes a second
enqueue of the same event a no-op), its payload sealed in `event_delivery`, and the
cursor of events handled, all in one transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import aiosqlite

from gateway.store.errors import StoreUnavailable
from gateway.store.sealing import PLAIN, RowCodec, fhir_context

Action = Literal["created", "updated", "deleted"]

_CURSOR_KEY = "events_cursor"
_ACTIONS: dict[str, Action] = {"created": "created", "updated": "updated",
                               "deleted": "deleted"}

_READ_SQL = "SELECT seq, type, id, version, action, at, rid FROM fhir_event WHERE seq > ? " \
    "ORDER BY seq LIMIT ?"
# Versions' bodies by (rid, version): the version table's unique key.
_BODIES_PER_STATEMENT = 300


def _bodies_sql(count: int) -> str:
    values = ",".join(["(?,?)"] * count)
    return (f"WITH k(rid, version) AS (VALUES {values}) "
            "SELECT v.rid, v.version, v.body FROM k JOIN fhir_version v "
            "ON v.rid = k.rid AND v.version = k.version")

# Beside the outbox, in the inbox database. A delivered row's payload goes with its row
# when the housekeeping purges it.
QUEUE_SCHEMA = """
CREATE TABLE IF NOT EXISTS event_delivery (
    event_seq INTEGER NOT NULL,
    backend TEXT NOT NULL,
    event_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (event_seq, backend)
);
CREATE TRIGGER IF NOT EXISTS outbox_event_purge AFTER DELETE ON outbox
WHEN old.inbox_id < 0 BEGIN
    DELETE FROM event_delivery WHERE event_seq = -old.inbox_id AND backend = old.backend;
END;
"""


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One change to the FHIR store: a new version of one resource."""

    seq: int
    resource_type: str
    id: str
    version: int
    action: Action
    at: str  # the version's lastUpdated
    # The resource's number in the store that wrote the event (`fhir_resource.rid`): the
    # body is read by (rid, version), the version table's key. Never sent.
    rid: int
    # The version's JSON; for a deletion, the deleted version's (b"" if there was none).
    # Read only for the events someone listens to (`SqliteEventLog.bodies`).
    body: bytes = b""

    @property
    def body_version(self) -> int:
        """The version whose body tells what the event is about."""
        return self.version - 1 if self.action == "deleted" else self.version

    @property
    def event_id(self) -> str:
        """Stable across redeliveries, restarts and copies: this version of this resource."""
        return f"{self.resource_type}/{self.id}/_history/{self.version}"


def action_of(text: str) -> Action:
    return _ACTIONS[text]


@dataclass(frozen=True, slots=True)
class QueuedDelivery:
    """One event for one target, ready for the outbox."""

    event_seq: int
    backend: str
    event_id: str
    patient_key: str  # blinded as the outbox stores it; '' when no patient
    payload: bytes


class EventLog(Protocol):
    """The store's change events in order (SQLite here, PostgreSQL in gateway.store.pg)."""

    async def after(self, seq: int, limit: int) -> list[ChangeEvent]:
        """Events after `seq`, oldest first, without their bodies."""
        ...

    async def with_bodies(self, events: Sequence[ChangeEvent]) -> list[ChangeEvent]:
        """The same events with their bodies (b"" for a version that is not there)."""
        ...

    async def last_seq(self) -> int:
        """The last event a reader may take now."""
        ...


class EventQueue(Protocol):
    """Where event deliveries are queued, with the cursor of events handled."""

    async def cursor(self) -> int | None:
        """The last event handled; None before the first start."""
        ...

    async def enqueue(self, deliveries: Sequence[QueuedDelivery], through: int) -> None:
        """Queue deliveries and move the cursor to `through`, atomically."""
        ...


def delivery_context(event_seq: int, backend: str) -> str:
    """An event delivery's sealed payload: one event for one target."""
    return f"event_delivery\x1f{event_seq}\x1f{backend}"


class SqliteEventLog:
    """The FHIR store's change events, read in order on a read-only connection."""

    def __init__(self, db: aiosqlite.Connection, codec: RowCodec = PLAIN) -> None:
        self._db = db
        self._codec = codec

    @classmethod
    async def open(cls, path: Path, codec: RowCodec = PLAIN) -> SqliteEventLog:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        await db.execute("PRAGMA busy_timeout=5000")
        return cls(db, codec)

    async def after(self, seq: int, limit: int) -> list[ChangeEvent]:
        """Events after `seq`, oldest first, without their bodies."""
        try:
            rows = await self._db.execute_fetchall(_READ_SQL, (seq, limit))
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"the change events could not be read: {type(exc).__name__}") from None
        return [ChangeEvent(int(r[0]), str(r[1]), str(r[2]), int(r[3]), _ACTIONS[str(r[4])],
                            str(r[5]), int(r[6])) for r in rows]

    async def with_bodies(self, events: Sequence[ChangeEvent]) -> list[ChangeEvent]:
        """The same events with their bodies (b"" for a version that is not there)."""
        if not events:
            return []
        keys = [(e.rid, e.body_version) for e in events]
        named = {key: (e.resource_type, e.id) for e, key in zip(events, keys, strict=True)}
        unique = list(named)
        found: dict[tuple[int, int], bytes] = {}
        try:
            for start in range(0, len(unique), _BODIES_PER_STATEMENT):
                chunk = unique[start:start + _BODIES_PER_STATEMENT]
                params = [value for key in chunk for value in key]
                for row in await self._db.execute_fetchall(_bodies_sql(len(chunk)), params):
                    key = (int(row[0]), int(row[1]))
                    found[key] = self._codec.open(
                        bytes(row[2]), fhir_context(*named[key], key[1]))
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"the change events could not be read: {type(exc).__name__}") from None
        return [replace(e, body=found.get(k, b"")) for e, k in zip(events, keys, strict=True)]

    async def last_seq(self) -> int:
        rows = list(await self._db.execute_fetchall("SELECT coalesce(max(seq), 0) "
                                                    "FROM fhir_event"))
        return int(rows[0][0])

    async def close(self) -> None:
        await self._db.close()


class SqliteEventQueue:
    """Event deliveries into the outbox of the inbox database, on a connection of its own
    (one transaction per batch: rows, payloads and the cursor together)."""

    def __init__(self, db: aiosqlite.Connection, codec: RowCodec = PLAIN) -> None:
        self._db = db
        self._codec = codec

    @classmethod
    async def open(cls, path: Path, codec: RowCodec = PLAIN) -> SqliteEventQueue:
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await db.execute("PRAGMA busy_timeout=10000")
            await db.executescript(QUEUE_SCHEMA)
        except BaseException:
            await db.close()
            raise
        return cls(db, codec)

    async def cursor(self) -> int | None:
        """The last event handled; None before the first start (nothing handled yet)."""
        rows = list(await self._db.execute_fetchall(
            "SELECT value FROM store_meta WHERE key = ?", (_CURSOR_KEY,)))
        return int(rows[0][0]) if rows else None

    async def enqueue(self, deliveries: Sequence[QueuedDelivery], through: int) -> None:
        """Queue deliveries and move the cursor to `through`, atomically; a delivery
        already queued (the same event for the same target) is left as it is."""
        now = _timestamp(datetime.now(UTC))
        try:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                await self._db.executemany(
                    "INSERT INTO outbox (inbox_id, backend, patient_key, created_at, "
                    "updated_at) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (inbox_id, backend) DO NOTHING",
                    [(-d.event_seq, d.backend, d.patient_key, now, now) for d in deliveries])
                await self._db.executemany(
                    "INSERT INTO event_delivery (event_seq, backend, event_id, payload) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (event_seq, backend) DO NOTHING",
                    [(d.event_seq, d.backend, d.event_id, self._codec.seal(
                        d.payload, delivery_context(d.event_seq, d.backend)))
                     for d in deliveries])
                await self._db.execute(
                    "INSERT INTO store_meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (_CURSOR_KEY, str(through)))
                await self._db.execute("COMMIT")
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"event deliveries could not be queued: {type(exc).__name__}") from None

    async def close(self) -> None:
        await self._db.close()


def _timestamp(moment: datetime) -> str:
    """As the outbox writes it (gateway.store.outbox)."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(
        timespec="microseconds") + "Z"


async def purge_sqlite_events(fhir_path: Path, inbox_path: Path, before: datetime) -> int:
    """Delete change events older than `before` that the pump has handled (at or behind
    the cursor in the inbox database; every one when no pump ever ran). Their deliveries
    live on in the outbox. AUTOINCREMENT: a purged seq is never drawn again."""
    try:
        async with aiosqlite.connect(inbox_path) as inbox:
            await inbox.execute("PRAGMA busy_timeout=10000")
            rows = list(await inbox.execute_fetchall(
                "SELECT value FROM store_meta WHERE key = ?", (_CURSOR_KEY,)))
        through = int(rows[0][0]) if rows else None
        async with aiosqlite.connect(fhir_path) as db:
            await db.execute("PRAGMA busy_timeout=10000")
            cursor = await db.execute(
                "DELETE FROM fhir_event WHERE at < ? AND (? IS NULL OR seq <= ?)",
                (_timestamp(before), through, through))
            await db.commit()
            return int(cursor.rowcount)
    except sqlite3.Error as exc:
        raise StoreUnavailable(
            f"the change events could not be purged: {type(exc).__name__}") from None
