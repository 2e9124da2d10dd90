"""The change notifications backends sent (inbound webhooks), kept until the resource they
name is fetched: one row per (backend, event id), so a replayed event changes nothing.

The edge records an event and answers 202; a fetcher claims due rows, fetches and stores
the resource, and marks the row. A row is `pending` until then (a failed fetch moves its
`next_at` on), and ends `done`, `gone` (the backend no longer has the resource) or
`failed` (refused for good, or out of attempts; listed for an operator). A claim holds a
row for a lease; a process that dies holding one leaves it to the next claim after the
lease (on SQLite at once: one process owns the data dir, so its claims end with it). The
resource reference is PHI (an id) and is sealed like the inbox's payloads.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import aiosqlite

from gateway.store.errors import StoreUnavailable
from gateway.store.sealing import PLAIN, RowCodec
from gateway.store.sqlite import open_database

WEBHOOKS_FILE = "webhooks.db"
Status = Literal["pending", "done", "gone", "failed"]
STATUSES: tuple[Status, ...] = ("pending", "done", "gone", "failed")
_REASON = 120  # a reason names a status or a rule; cut in case

_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_event (
    id INTEGER PRIMARY KEY,
    backend TEXT NOT NULL,
    event_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource BLOB NOT NULL,
    received_at TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    claimed_until REAL NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    finished_at TEXT,
    UNIQUE (backend, event_id)
);
CREATE INDEX IF NOT EXISTS webhook_event_due ON webhook_event (status, next_at);
"""


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One recorded event as the fetcher needs it."""

    id: int
    backend: str
    event_id: str
    kind: str
    resource_type: str
    resource: str  # 'Type/id' (opened)
    attempts: int  # fetches made before this one


@dataclass(frozen=True, slots=True)
class EventRow:
    """One event as an operator may see it (no resource id)."""

    id: int
    backend: str
    event_id: str
    kind: str
    resource_type: str
    status: str
    attempts: int
    reason: str


def webhook_context(backend: str, event_id: str) -> str:
    """The sealed resource reference's associated data: the row's identity."""
    return f"webhook\x1f{backend}\x1f{event_id}"


def now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class WebhookEvents(Protocol):
    """The recorded events (SQLite here, PostgreSQL in store/pg/webhooks.py)."""

    async def record(self, backend: str, event_id: str, kind: str, resource_type: str,
                     resource: str) -> bool:
        """Keep a new event; False if this backend's event id is already kept."""
        ...

    async def claim(self, limit: int, lease: float,
                    backend: str | None = None) -> list[WebhookEvent]:
        """Due pending events (of one backend, or of any), oldest first, held for `lease`
        seconds."""
        ...

    async def abandon(self, keep: Sequence[str], reason: str) -> int:
        """End as failed the pending events of every backend not in `keep` (one that left
        the config: nothing fetches them); how many."""
        ...

    async def finish(self, id: int, status: Status, reason: str = "") -> None: ...

    async def retry(self, id: int, delay: float, reason: str) -> None:
        """Count a failed fetch and try again in `delay` seconds."""
        ...

    async def next_due(self, backend: str | None = None) -> float | None:
        """Seconds until the next pending event (of one backend, or of any) is due (0:
        now), None: none pending."""
        ...

    async def rows(self, status: str | None = None, limit: int = 100) -> list[EventRow]: ...

    async def close(self) -> None: ...


class SqliteWebhookEvents:
    """The events in their own small file in the data dir."""

    def __init__(self, db: aiosqlite.Connection, codec: RowCodec) -> None:
        self._db = db
        self._codec = codec

    @classmethod
    async def open(cls, path: Path, synchronous: Literal["normal", "full", "extra"] = "full",
                   codec: RowCodec = PLAIN) -> SqliteWebhookEvents:
        db = await open_database(path, synchronous)
        try:
            await db.executescript(_SCHEMA)
            # One process owns the data dir: a claim from before this start is void.
            await db.execute("UPDATE webhook_event SET claimed_until = 0 "
                             "WHERE claimed_until > 0")
        except BaseException:
            await db.close()
            raise
        return cls(db, codec)

    async def record(self, backend: str, event_id: str, kind: str, resource_type: str,
                     resource: str) -> bool:
        sealed = self._codec.seal(resource.encode(), webhook_context(backend, event_id))
        try:
            cursor = await self._db.execute(
                "INSERT INTO webhook_event (backend, event_id, kind, resource_type, "
                "resource, received_at, next_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (backend, event_id) DO NOTHING",
                (backend, event_id, kind, resource_type, sealed, now_text(), time.time()))
        except sqlite3.Error as exc:  # full disk, locked file: the sender tries again
            raise StoreUnavailable(f"webhook events unavailable ({type(exc).__name__})"
                                   ) from None
        return cursor.rowcount == 1

    async def claim(self, limit: int, lease: float,
                    backend: str | None = None) -> list[WebhookEvent]:
        now = time.time()
        rows = await self._db.execute_fetchall(
            "UPDATE webhook_event SET claimed_until = ? WHERE id IN ("
            " SELECT id FROM webhook_event WHERE status = 'pending' AND next_at <= ?"
            " AND claimed_until <= ? AND (? IS NULL OR backend = ?) ORDER BY id LIMIT ?) "
            "RETURNING id, backend, event_id, kind, resource_type, resource, attempts",
            (now + lease, now, now, backend, backend, limit))
        return sorted((self._event(row) for row in rows), key=lambda e: e.id)

    def _event(self, row: aiosqlite.Row) -> WebhookEvent:
        id, backend, event_id, kind, resource_type, sealed, attempts = row
        resource = self._codec.open(bytes(sealed), webhook_context(backend, event_id))
        return WebhookEvent(id, backend, event_id, kind, resource_type,
                            resource.decode(), attempts)

    async def finish(self, id: int, status: Status, reason: str = "") -> None:
        await self._db.execute(
            "UPDATE webhook_event SET status = ?, reason = ?, finished_at = ?, "
            "attempts = attempts + 1, claimed_until = 0 WHERE id = ?",
            (status, reason[:_REASON], now_text(), id))

    async def retry(self, id: int, delay: float, reason: str) -> None:
        await self._db.execute(
            "UPDATE webhook_event SET attempts = attempts + 1, next_at = ?, reason = ?, "
            "claimed_until = 0 WHERE id = ?", (time.time() + delay, reason[:_REASON], id))

    async def abandon(self, keep: Sequence[str], reason: str) -> int:
        marks = ", ".join("?" * len(keep))
        cursor = await self._db.execute(
            "UPDATE webhook_event SET status = 'failed', reason = ?, finished_at = ?, "
            f"claimed_until = 0 WHERE status = 'pending' AND backend NOT IN ({marks})",
            (reason[:_REASON], now_text(), *keep))
        return cursor.rowcount

    async def next_due(self, backend: str | None = None) -> float | None:
        rows = list(await self._db.execute_fetchall(
            "SELECT min(max(next_at, claimed_until)) FROM webhook_event "
            "WHERE status = 'pending' AND (? IS NULL OR backend = ?)", (backend, backend)))
        due = rows[0][0] if rows else None
        return None if due is None else max(0.0, float(due) - time.time())

    async def rows(self, status: str | None = None, limit: int = 100) -> list[EventRow]:
        where, args = ("WHERE status = ?", (status, limit)) if status else ("", (limit,))
        found = await self._db.execute_fetchall(
            "SELECT id, backend, event_id, kind, resource_type, status, attempts, reason "
            f"FROM webhook_event {where} ORDER BY id LIMIT ?", args)
        return [EventRow(*row) for row in found]

    async def close(self) -> None:
        await self._db.close()
