"""The outbox on PostgreSQL: every instance's deliveries in one table, each row delivered
by exactly one instance, each patient's rows in order.

Per backend, one instance at a time delivers: the one holding the backend's session-level
advisory lock on its lease connection (`lead`). That makes the backend's rate limit,
concurrency cap and per-patient order hold across instances with no more coordination
than the dispatcher already has in one process, and a standby takes over as soon as the
holder's connection goes (a crash, a kill -9, a network cut: PostgreSQL releases the
lock). The holder claims the rows it reads (`claimed_by`, FOR UPDATE SKIP LOCKED, reading
no further than a row it had to skip, and reading rows that committed behind its cursor,
see _DUE) and writes results only for rows it still holds, so a deposed holder that comes
back cannot overwrite what its successor recorded. New rows wake the holder by NOTIFY.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from gateway.store.outbox import OutboxEntry, OutboxRow
from gateway.store.pg.connect import Connection, PgSpec, Pool, advisory_key, connect

log = logging.getLogger(__name__)

_PAYLOAD = {"mllp": "i.raw", "fhir": "i.bundle"}
# Change-event targets (gateway.store.pg.events): the row names an event (inbox_id = -event
# seq), its payload is in event_delivery; sent as the event id, a newline, the body.
_EVENT_KIND = "event"
_SOURCES = {
    "inbox": "inbox i WHERE i.id = c.inbox_id",
    "event": "event_delivery i WHERE i.event_seq = -c.inbox_id AND i.backend = c.backend",
}
_NOT_HELD = (
    "(o.patient_key = '' OR NOT EXISTS (SELECT 1 FROM outbox d WHERE d.status = 'dead' "
    "AND d.backend = o.backend AND d.patient_key = o.patient_key AND d.id < o.id))")
_ENTRY_SQL = (
    "SELECT o.id, o.inbox_id, o.backend, o.status, o.attempts, o.created_at, o.updated_at, "
    "o.next_at, o.last_status, o.error, coalesce(i.message_type, ''), "
    "coalesce(i.control_id, '') FROM outbox o LEFT JOIN inbox i ON i.id = o.inbox_id")
# The rows to deliver next, claimed: those after the cursor, and those behind it that this
# instance never claimed. Ids are drawn at INSERT but rows become visible at COMMIT, so a
# row can appear behind the cursor (its instance committed after another's later row):
# it is read then, with nothing of its patient after it read before it (one patient's
# rows commit in id order, see gateway.store.pg.inbox, so a snapshot that holds a later
# row of the patient holds this one). A row locked by another transaction is skipped (SKIP
# LOCKED: the claim never waits), and so is every row after it, read again once it is
# free: skipping only it would let its patient's later rows go first (a lock held by an
# instance killed while claiming, whose statement is still ending, or by a deposed holder
# recording a result).
_DUE = (
    "WITH candidate AS (SELECT o.id FROM outbox o WHERE o.backend = $1 "
    "AND o.status = 'pending' AND (o.id > $2 OR o.claimed_by <> $4) AND {held} "
    "ORDER BY o.id LIMIT $3), "
    "free AS (SELECT f.id FROM outbox f WHERE f.id IN (SELECT id FROM candidate) "
    "AND f.status = 'pending' FOR UPDATE SKIP LOCKED), "
    "gap AS (SELECT min(id) AS id FROM candidate WHERE id NOT IN (SELECT id FROM free)) "
    "UPDATE outbox c SET claimed_by = $4 FROM {source} "
    "AND c.id IN (SELECT id FROM free) "
    "AND c.id < coalesce((SELECT id FROM gap), 9223372036854775807) "
    "RETURNING c.id, c.inbox_id, c.backend, c.patient_key, c.attempts, c.next_at, "
    "c.trace, {payload}")
CHANNEL = "isthmus_outbox"


class PgOutbox:
    """The outbox table on a pool, for the dispatcher (as instance `instance`) and for
    operators."""

    def __init__(self, pool: Pool, spec: PgSpec, instance: str) -> None:
        self._pool = pool
        self._spec = spec
        self._instance = instance
        self._lease: Connection | None = None
        self._held: set[str] = set()
        self._lease_lock = asyncio.Lock()
        self.on_new_rows: Callable[[], None] | None = None

    # -- who delivers -------------------------------------------------------------------

    async def lead(self, backend: str) -> bool:
        """Whether this instance delivers `backend`'s rows now (taking the lead if no one
        holds it). Raises if the database cannot be asked: then it does not lead."""
        async with self._lease_lock:
            try:
                return await self._lead(backend)
            except BaseException:
                await self._drop_lease()
                raise

    async def _lead(self, backend: str) -> bool:
        lease = self._lease
        if lease is None or lease.is_closed():
            self._held.clear()
            lease = self._lease = await connect(self._spec)
            await lease.add_listener(CHANNEL, self._notified)
        if backend in self._held:
            await lease.fetchval("SELECT 1")  # the session, and so the lock, is alive
            return True
        taken = bool(await lease.fetchval("SELECT pg_try_advisory_lock($1)",
                                          advisory_key("isthmus-outbox", self._spec.schema,
                                                       backend)))
        if taken:
            self._held.add(backend)
            log.info("outbox %s: this instance delivers it now", backend)
        return taken

    async def resign(self, backend: str) -> None:
        """Give up `backend`'s lead (its worker was detached: say, the event lead moved to
        another instance), so the instance that delivers it now can take it."""
        async with self._lease_lock:
            lease = self._lease
            if backend not in self._held or lease is None or lease.is_closed():
                return
            self._held.discard(backend)
            try:
                await lease.fetchval("SELECT pg_advisory_unlock($1)", advisory_key(
                    "isthmus-outbox", self._spec.schema, backend))
            except BaseException:
                await self._drop_lease()
                raise
            log.info("outbox %s: this instance no longer delivers it", backend)

    def _notified(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        # The channel is the database's; the payload names the schema whose rows are new.
        if payload == self._spec.schema and self.on_new_rows is not None:
            self.on_new_rows()

    async def _drop_lease(self) -> None:
        lease, self._lease = self._lease, None
        self._held.clear()
        if lease is not None and not lease.is_closed():
            lease.terminate()

    async def close(self) -> None:
        """Give up every lead (a standby takes over at once)."""
        async with self._lease_lock:
            lease, self._lease = self._lease, None
            self._held.clear()
            if lease is not None and not lease.is_closed():
                await lease.close()

    # -- what the dispatcher needs ------------------------------------------------------

    async def pending_counts(self) -> dict[str, int]:
        rows = await self._pool.fetch(
            "SELECT backend, count(*) FROM outbox WHERE status = 'pending' GROUP BY backend")
        return {str(backend): int(count) for backend, count in rows}

    async def count_pending(self, backend: str, through_id: int | None = None) -> int:
        return int(await self._pool.fetchval(
            "SELECT count(*) FROM outbox WHERE backend = $1 AND status = 'pending' "
            "AND id <= $2", backend, through_id if through_id is not None else 1 << 62))

    async def count_due(self, backend: str, through_id: int) -> int:
        return int(await self._pool.fetchval(
            f"SELECT count(*) FROM outbox o WHERE o.backend = $1 AND o.status = 'pending' "
            f"AND o.id <= $2 AND {_NOT_HELD}", backend, through_id))

    async def oldest_pending(self, backend: str) -> float | None:
        value = await self._pool.fetchval(
            "SELECT created_at FROM outbox WHERE backend = $1 AND status = 'pending' "
            "ORDER BY id LIMIT 1", backend)
        return _unix(str(value)) if value is not None else None

    async def due(self, backend: str, kind: str, after_id: int, limit: int) -> list[OutboxRow]:
        """Pending rows of a backend after an id (and any behind it that this instance
        has not claimed: committed late), claimed for this instance, in id order with
        their payloads (rows behind a dead row of their patient are left)."""
        if kind == _EVENT_KIND:
            source, column = _SOURCES["event"], "convert_to(i.event_id || E'\\n', 'UTF8') " \
                "|| i.payload"
        else:
            source, column = _SOURCES["inbox"], _PAYLOAD.get(kind, "")
            if not column:
                raise ValueError(f"no outbox payload for backend kind '{kind}'")
        rows = await self._pool.fetch(_DUE.format(held=_NOT_HELD, payload=column,
                                                  source=source),
                                      backend, after_id, limit, self._instance)
        found = [OutboxRow(int(r[0]), int(r[1]), str(r[2]), str(r[3]), int(r[4]), float(r[5]),
                           str(r[6]), None if r[7] is None else bytes(r[7])) for r in rows]
        return sorted(found, key=lambda row: row.id)

    async def mark_delivered(self, rows: Sequence[tuple[int, str]]) -> None:
        if not rows:
            return
        await self._pool.execute(
            "UPDATE outbox SET status = 'delivered', error = '', attempts = attempts + 1, "
            "last_status = d.last_status, updated_at = $3 FROM unnest($1::bigint[], "
            "$2::text[]) AS d(id, last_status) WHERE outbox.id = d.id "
            "AND outbox.status = 'pending' AND outbox.claimed_by = $4",
            [r[0] for r in rows], [r[1] for r in rows], _now(), self._instance)

    async def reschedule(self, row_id: int, attempts: int, next_at: float,
                         last_status: str, error: str) -> None:
        await self._pool.execute(
            "UPDATE outbox SET attempts = $1, next_at = $2, last_status = $3, error = $4, "
            "updated_at = $5 WHERE id = $6 AND status = 'pending' AND claimed_by = $7",
            attempts, next_at, last_status, error, _now(), row_id, self._instance)

    async def dead(self, row_id: int, attempts: int, last_status: str, error: str) -> None:
        await self._pool.execute(
            "UPDATE outbox SET status = 'dead', attempts = $1, last_status = $2, error = $3, "
            "updated_at = $4 WHERE id = $5 AND status = 'pending' AND claimed_by = $6",
            attempts, last_status, error, _now(), row_id, self._instance)

    # -- what operators do --------------------------------------------------------------

    async def list_entries(self, status: str | None = None, backend: str | None = None,
                           limit: int = 50) -> list[OutboxEntry]:
        rows = await self._pool.fetch(
            f"{_ENTRY_SQL} WHERE ($1::text IS NULL OR o.status = $1) "
            "AND ($2::text IS NULL OR o.backend = $2) ORDER BY o.id DESC LIMIT $3",
            status or None, backend or None, limit)
        return [_entry(row) for row in rows]

    async def get(self, row_id: int) -> OutboxEntry | None:
        row = await self._pool.fetchrow(f"{_ENTRY_SQL} WHERE o.id = $1", row_id)
        return _entry(row) if row is not None else None

    async def waits_for(self, row_id: int) -> int | None:
        value = await self._pool.fetchval(
            "SELECT min(d.id) FROM outbox o JOIN outbox d ON d.status = 'dead' "
            "AND d.backend = o.backend AND d.patient_key = o.patient_key AND d.id < o.id "
            "WHERE o.id = $1 AND o.status = 'pending' AND o.patient_key != ''", row_id)
        return int(value) if value is not None else None

    async def held_by(self, row_id: int) -> int:
        return int(await self._pool.fetchval(
            "SELECT count(*) FROM outbox d JOIN outbox o ON o.status = 'pending' "
            "AND o.backend = d.backend AND o.patient_key = d.patient_key AND o.id > d.id "
            "WHERE d.id = $1 AND d.status = 'dead' AND d.patient_key != ''", row_id))

    async def retry(self, ids: Sequence[int] | None, backend: str | None = None) -> int:
        if ids is None:
            result = await self._pool.execute(
                "UPDATE outbox SET status = 'pending', attempts = 0, next_at = 0, error = '', "
                "claimed_by = '', updated_at = $1 WHERE status = 'dead' "
                "AND ($2::text IS NULL OR backend = $2)",
                _now(), backend)
        else:
            result = await self._pool.execute(
                "UPDATE outbox SET status = 'pending', attempts = 0, next_at = 0, error = '', "
                "claimed_by = '', updated_at = $1 WHERE status IN ('dead', 'dropped') "
                "AND id = ANY($2::bigint[]) AND ($3::text IS NULL OR backend = $3)",
                _now(), [int(i) for i in ids], backend)
        return _changed(result)

    async def drop(self, ids: Sequence[int]) -> int:
        return _changed(await self._pool.execute(
            "UPDATE outbox SET status = 'dropped', updated_at = $1 "
            "WHERE status IN ('pending', 'dead') AND id = ANY($2::bigint[])",
            _now(), [int(i) for i in ids]))

    async def purge_delivered(self, before: datetime) -> int:
        return _changed(await self._pool.execute(
            "DELETE FROM outbox WHERE status = 'delivered' AND updated_at < $1",
            _timestamp(before)))


def _entry(row: Sequence[Any]) -> OutboxEntry:
    return OutboxEntry(int(row[0]), int(row[1]), str(row[2]), str(row[3]), int(row[4]),
                       str(row[5]), str(row[6]), float(row[7]), str(row[8]), str(row[9]),
                       str(row[10]), str(row[11]))


def _changed(status: str) -> int:
    """The row count of a command tag ('UPDATE 3')."""
    return int(str(status).rsplit(" ", 1)[-1])


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _now() -> str:
    return _timestamp(datetime.now(UTC))


def _unix(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
