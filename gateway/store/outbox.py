"""The durable outbox: one row per (accepted message, remote backend), delivered in order.

The rows are made by a trigger on the inbox INSERT (see gateway.store.inbox), so this
module only reads and moves them between statuses: `pending` (waiting or due), then
`delivered`, or `dead` for an operator to look at; an operator may `retry` a dead row or
`drop` it (dropped rows are kept, never deleted). A dead row holds back its patient's
later rows for that backend (they stay pending, unread by `due`) until it is retried or
dropped: a patient's messages arrive in order or not at all. Every change is one statement on the
connection it is given: the gateway shares the inbox's autocommit connection (never
BEGIN ... COMMIT there), the CLI opens its own beside a running gateway.

What is listed here (`OutboxEntry`) carries no PHI: ids, backend, statuses, counts, the
message type and the control id; the payload is only ever read for delivery.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import aiosqlite

from gateway.store.errors import StoreUnavailable
from gateway.store.events import delivery_context
from gateway.store.raw_form import original
from gateway.store.sealing import PLAIN, RowCodec, SealError, inbox_context

PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"
DROPPED = "dropped"
STATUSES = (PENDING, DELIVERED, DEAD, DROPPED)
# The backend kind of change-event targets (webhooks, Subscriptions): their rows name an
# event (inbox_id = -event seq), their payloads are in `event_delivery`.
EVENT_KIND = "event"

log = logging.getLogger(__name__)

# Bound parameters per statement stay well under SQLite's 32766.
_CHUNK = 8_000


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A pending delivery as the dispatcher needs it, with its payload (raw HL7 for an
    mllp backend, the translated Bundle for a fhir backend; None when there is none)."""

    id: int
    inbox_id: int
    backend: str
    patient_key: str
    attempts: int
    next_at: float
    trace: str
    payload: bytes | None


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One outbox row as shown to operators: no PHI (no payload, no patient key)."""

    id: int
    inbox_id: int
    backend: str
    status: str
    attempts: int
    created_at: str
    updated_at: str
    next_at: float
    last_status: str
    error: str
    message_type: str
    control_id: str


_ROW_SQL = {
    # The payload column each backend kind is sent (the inbox column it is sealed as).
    "mllp": "raw",
    "fhir": "bundle",
}

# A pending row `o` that waits behind a dead row of its patient (same backend, an earlier
# id): per-patient order holds across a dead letter, a restart and an operator's retry.
# Rows naming no patient ('') are held by nothing. Served by the outbox_dead index.
_NOT_HELD = (
    "(o.patient_key = '' OR NOT EXISTS (SELECT 1 FROM outbox d WHERE d.status = 'dead' "
    "AND d.backend = o.backend AND d.patient_key = o.patient_key AND d.id < o.id))")

_ENTRY_SQL = (
    "SELECT o.id, o.inbox_id, o.backend, o.status, o.attempts, o.created_at, o.updated_at, "
    "o.next_at, o.last_status, o.error, "
    "CASE WHEN o.inbox_id < 0 THEN 'event' ELSE coalesce(i.message_type, '') END, "
    "coalesce(i.control_id, '') FROM outbox o LEFT JOIN inbox i ON i.id = o.inbox_id")


class OutboxStore(Protocol):
    """What the dispatcher asks of the outbox: `SqliteOutbox`, or PostgreSQL's
    (gateway.store.pg.outbox), shared by several instances."""

    async def lead(self, backend: str) -> bool:
        """Whether this process delivers `backend`'s rows now."""
        ...

    async def resign(self, backend: str) -> None:
        """This process no longer delivers `backend` (detached): another may take it."""
        ...

    async def pending_counts(self) -> dict[str, int]: ...

    async def count_pending(self, backend: str, through_id: int | None = None) -> int: ...

    async def count_due(self, backend: str, through_id: int) -> int: ...

    async def oldest_pending(self, backend: str) -> float | None: ...

    async def due(self, backend: str, kind: str, after_id: int,
                  limit: int) -> list[OutboxRow]: ...

    async def mark_delivered(self, rows: Sequence[tuple[int, str]]) -> None: ...

    async def reschedule(self, row_id: int, attempts: int, next_at: float,
                         last_status: str, error: str) -> None: ...

    async def dead(self, row_id: int, attempts: int, last_status: str, error: str) -> None: ...

    async def purge_delivered(self, before: datetime) -> int: ...


class SqliteOutbox:
    """The outbox table, over a connection to the inbox database (autocommit)."""

    def __init__(self, db: aiosqlite.Connection, codec: RowCodec = PLAIN) -> None:
        self._db = db
        self._codec = codec

    async def lead(self, backend: str) -> bool:
        """Always: the data dir's lock makes this the only gateway on the file."""
        return True

    async def resign(self, backend: str) -> None:
        """Nothing to give up: no other gateway uses the file."""

    # -- what the dispatcher needs ------------------------------------------------------

    async def pending_counts(self) -> dict[str, int]:
        """Pending rows per backend (those waiting for a retry included)."""
        rows = await self._db.execute_fetchall(
            "SELECT backend, count(*) FROM outbox WHERE status = 'pending' GROUP BY backend")
        return {str(backend): int(count) for backend, count in rows}

    async def count_pending(self, backend: str, through_id: int | None = None) -> int:
        """Pending rows of one backend, only those with id <= `through_id` if given."""
        if through_id is None:
            rows = list(await self._db.execute_fetchall(
                "SELECT count(*) FROM outbox WHERE backend = ? AND status = 'pending'",
                (backend,)))
        else:
            rows = list(await self._db.execute_fetchall(
                "SELECT count(*) FROM outbox WHERE backend = ? AND status = 'pending' "
                "AND id <= ?", (backend, through_id)))
        return int(rows[0][0])

    async def count_due(self, backend: str, through_id: int) -> int:
        """Pending rows of one backend with id <= `through_id` that `due` would read (none
        held behind a dead row): what the dispatcher should have in memory."""
        rows = list(await self._db.execute_fetchall(
            f"SELECT count(*) FROM outbox o WHERE o.backend = ? AND o.status = 'pending' "
            f"AND o.id <= ? AND {_NOT_HELD}", (backend, through_id)))
        return int(rows[0][0])

    async def oldest_pending(self, backend: str) -> float | None:
        """When the oldest pending row of a backend was created (unix time), or None."""
        rows = list(await self._db.execute_fetchall(
            "SELECT created_at FROM outbox WHERE backend = ? AND status = 'pending' "
            "ORDER BY id LIMIT 1", (backend,)))
        return _unix(str(rows[0][0])) if rows else None

    async def due(self, backend: str, kind: str, after_id: int, limit: int) -> list[OutboxRow]:
        """Pending rows of a backend after an id, in id order, with their payloads.

        Rows waiting for a retry are included (with their `next_at`): they hold back the
        later rows of their patient, which is the dispatcher's business. Rows behind a
        dead row of their patient are not: they wait for an operator.
        """
        if kind == EVENT_KIND:
            return await self._due_events(backend, after_id, limit)
        column = _ROW_SQL.get(kind)
        if column is None:
            raise ValueError(f"no outbox payload for backend kind '{kind}'")
        rows = await self._db.execute_fetchall(
            f"SELECT o.id, o.inbox_id, o.backend, o.patient_key, o.attempts, o.next_at, "
            f"o.trace, i.{column}, i.sending_application, i.sending_facility, i.control_id, "
            f"i.received_at FROM outbox o JOIN inbox i ON i.id = o.inbox_id "
            f"WHERE o.backend = ? AND o.status = 'pending' AND o.id > ? AND {_NOT_HELD} "
            f"ORDER BY o.id LIMIT ?", (backend, after_id, limit))
        return [OutboxRow(int(r[0]), int(r[1]), str(r[2]), str(r[3]), int(r[4]), float(r[5]),
                          str(r[6]), self._payload(int(r[0]), column, r[7], r[8:12]))
                for r in rows]

    async def _due_events(self, backend: str, after_id: int, limit: int) -> list[OutboxRow]:
        """An event target's pending rows (gateway.store.events): the payload is the event
        id, a newline, and the body."""
        rows = await self._db.execute_fetchall(
            f"SELECT o.id, o.inbox_id, o.backend, o.patient_key, o.attempts, o.next_at, "
            f"o.trace, e.event_id, e.payload FROM outbox o JOIN event_delivery e "
            f"ON e.event_seq = -o.inbox_id AND e.backend = o.backend "
            f"WHERE o.backend = ? AND o.status = 'pending' AND o.id > ? AND {_NOT_HELD} "
            f"ORDER BY o.id LIMIT ?", (backend, after_id, limit))
        found = []
        for r in rows:
            try:
                body: bytes | None = str(r[7]).encode() + b"\n" + self._codec.open(
                    bytes(r[8]), delivery_context(-int(r[1]), str(r[2])))
            except SealError as exc:
                log.error("outbox row %d: its payload does not open (%s); it is not sent",
                          int(r[0]), exc)
                body = None
            found.append(OutboxRow(int(r[0]), int(r[1]), str(r[2]), str(r[3]), int(r[4]),
                                   float(r[5]), str(r[6]), body))
        return found

    def _payload(self, row_id: int, column: str, value: bytes | None,
                 identity: Sequence[Any]) -> bytes | None:
        """A row's payload, opened; None (it cannot be sent: dead-lettered) when it does
        not open, so that one altered row never stalls its backend's queue."""
        if value is None:
            return None
        try:
            opened = self._codec.open(bytes(value), inbox_context(column, *map(str, identity)))
        except SealError as exc:
            log.error("outbox row %d: its payload does not open (%s); it is not sent", row_id,
                      exc)
            return None
        return original(opened) if column == "raw" else opened

    async def mark_delivered(self, rows: Sequence[tuple[int, str]]) -> None:
        """(id, last status) of rows delivered at their next attempt (`attempts` counts
        it): one statement per few thousand rows."""
        now = _timestamp(datetime.now(UTC))
        for start in range(0, len(rows), _CHUNK // 2):
            chunk = rows[start:start + _CHUNK // 2]
            values = ",".join(["(?,?)"] * len(chunk))
            params: list[object] = []
            for row_id, status in chunk:
                params.extend((row_id, status))
            params.append(now)
            await self._db.execute(
                f"WITH d(id, last_status) AS (VALUES {values}) "
                f"UPDATE outbox SET status = 'delivered', error = '', attempts = attempts + 1, "
                f"last_status = d.last_status, updated_at = ? FROM d "
                f"WHERE outbox.id = d.id AND outbox.status = 'pending'", params)

    async def reschedule(self, row_id: int, attempts: int, next_at: float,
                         last_status: str, error: str) -> None:
        """Another attempt at `next_at` (unix time); the row stays pending."""
        await self._db.execute(
            "UPDATE outbox SET attempts = ?, next_at = ?, last_status = ?, error = ?, "
            "updated_at = ? WHERE id = ? AND status = 'pending'",
            (attempts, next_at, last_status, error, _timestamp(datetime.now(UTC)), row_id))

    async def dead(self, row_id: int, attempts: int, last_status: str, error: str) -> None:
        """Dead-letter a row for an operator (`isthmus outbox retry` brings it back)."""
        await self._db.execute(
            "UPDATE outbox SET status = 'dead', attempts = ?, last_status = ?, error = ?, "
            "updated_at = ? WHERE id = ? AND status = 'pending'",
            (attempts, last_status, error, _timestamp(datetime.now(UTC)), row_id))

    # -- what operators do --------------------------------------------------------------

    async def list_entries(self, status: str | None = None, backend: str | None = None,
                           limit: int = 50) -> list[OutboxEntry]:
        """The newest rows first, optionally of one status and one backend."""
        where: list[str] = []
        params: list[object] = []
        if status:
            where.append("o.status = ?")
            params.append(status)
        if backend:
            where.append("o.backend = ?")
            params.append(backend)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self._db.execute_fetchall(
            f"{_ENTRY_SQL}{clause} ORDER BY o.id DESC LIMIT ?", (*params, limit))
        return [_entry(row) for row in rows]

    async def get(self, row_id: int) -> OutboxEntry | None:
        rows = list(await self._db.execute_fetchall(f"{_ENTRY_SQL} WHERE o.id = ?",
                                                    (row_id,)))
        return _entry(rows[0]) if rows else None

    async def waits_for(self, row_id: int) -> int | None:
        """The dead row a pending row waits behind (its patient's first dead row for the
        same backend), or None when nothing holds it."""
        rows = list(await self._db.execute_fetchall(
            "SELECT min(d.id) FROM outbox o JOIN outbox d ON d.status = 'dead' "
            "AND d.backend = o.backend AND d.patient_key = o.patient_key AND d.id < o.id "
            "WHERE o.id = ? AND o.status = 'pending' AND o.patient_key != ''", (row_id,)))
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def held_by(self, row_id: int) -> int:
        """How many pending rows of its patient wait behind a dead row."""
        rows = list(await self._db.execute_fetchall(
            "SELECT count(*) FROM outbox d JOIN outbox o ON o.status = 'pending' "
            "AND o.backend = d.backend AND o.patient_key = d.patient_key AND o.id > d.id "
            "WHERE d.id = ? AND d.status = 'dead' AND d.patient_key != ''", (row_id,)))
        return int(rows[0][0])

    async def retry(self, ids: Sequence[int] | None, backend: str | None = None) -> int:
        """Dead or dropped rows back to pending with a fresh attempt budget; `ids` None:
        every dead row (of `backend` if given). Returns how many rows changed."""
        now = _timestamp(datetime.now(UTC))
        sql = ("UPDATE outbox SET status = 'pending', attempts = 0, next_at = 0, "
               "error = '', updated_at = ? WHERE ")
        extra = " AND backend = ?" if backend else ""
        tail: tuple[object, ...] = (backend,) if backend else ()
        if ids is None:
            cursor = await self._db.execute(f"{sql}status = 'dead'{extra}", (now, *tail))
            return cursor.rowcount
        changed = 0
        for chunk in _chunks(ids):
            cursor = await self._db.execute(
                f"{sql}status IN ('dead', 'dropped') AND id IN "
                f"({','.join('?' * len(chunk))}){extra}", (now, *chunk, *tail))
            changed += cursor.rowcount
        return changed

    async def drop(self, ids: Sequence[int]) -> int:
        """Pending or dead rows set aside for good (kept, never deleted); how many."""
        now = _timestamp(datetime.now(UTC))
        changed = 0
        for chunk in _chunks(ids):
            cursor = await self._db.execute(
                f"UPDATE outbox SET status = 'dropped', updated_at = ? "
                f"WHERE status IN ('pending', 'dead') AND id IN ({','.join('?' * len(chunk))})",
                (now, *chunk))
            changed += cursor.rowcount
        return changed

    async def purge_delivered(self, before: datetime) -> int:
        """Delete delivered rows last updated before a moment; returns how many."""
        cursor = await self._db.execute(
            "DELETE FROM outbox WHERE status = 'delivered' AND updated_at < ?",
            (_timestamp(before),))
        return cursor.rowcount


# -- beside a running gateway (the CLI) -------------------------------------------------


@asynccontextmanager
async def open_outbox(path: Path, busy_timeout_ms: int = 10_000
                      ) -> AsyncIterator[SqliteOutbox]:
    """The outbox of an inbox database file, on a connection of its own (WAL, waiting for
    the gateway's writer rather than failing); StoreUnavailable when it has none."""
    if not path.exists():
        raise StoreUnavailable(f"no inbox database at {path}")
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        await db.execute("PRAGMA journal_mode=WAL")
        found = list(await db.execute_fetchall(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outbox'"))
        if not found:
            raise StoreUnavailable(f"the inbox database at {path} has no outbox yet")
        yield SqliteOutbox(db)
    finally:
        await db.close()


# -- helpers ----------------------------------------------------------------------------


def _entry(row: Sequence[Any]) -> OutboxEntry:
    return OutboxEntry(int(row[0]), int(row[1]), str(row[2]), str(row[3]), int(row[4]),
                       str(row[5]), str(row[6]), float(row[7]), str(row[8]), str(row[9]),
                       str(row[10]), str(row[11]))


def _chunks(ids: Sequence[int]) -> list[list[int]]:
    values = [int(i) for i in ids]
    return [values[i:i + _CHUNK] for i in range(0, len(values), _CHUNK)]


def _timestamp(moment: datetime) -> str:
    """UTC ISO 8601 with microseconds and a Z, as the inbox writes it (text order is
    time order)."""
    if moment.utcoffset() != timedelta(0):
        moment = moment.astimezone(UTC)
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _unix(text: str) -> float:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
