"""Change events on PostgreSQL: the `fhir_event` rows read in commit-safe order, and the
event deliveries queued in the shared outbox (the PostgreSQL twins of gateway.store.events).

Several instances write the store, and a transaction's seq is drawn at INSERT but seen at
COMMIT: a reader going by seq alone would pass a lower seq that commits late. So the log
returns only events of transactions older than every running one (`txid <
pg_snapshot_xmin(pg_current_snapshot())`): no transaction that could still add a lower
seq is running, and a cursor by seq never skips one. Bodies are not sealed on PostgreSQL
(the database's own protection applies), so payloads are stored as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

from gateway.store.events import ChangeEvent, QueuedDelivery, action_of
from gateway.store.pg.connect import DATABASE_ERRORS, Pool, unavailable

_CURSOR_KEY = "events_cursor"
_STABLE = "txid < pg_snapshot_xmin(pg_current_snapshot())"
_READ_SQL = (f"SELECT seq, type, id, version, action, at, rid FROM fhir_event WHERE seq > $1 "
             f"AND {_STABLE} ORDER BY seq LIMIT $2")
# Versions' bodies by (rid, version): the version table's unique key.
_BODIES_SQL = (
    "SELECT v.rid, v.version, v.body FROM unnest($1::bigint[], $2::int[]) "
    "AS k(rid, version) JOIN fhir_version v ON v.rid = k.rid AND v.version = k.version")


class PgEventLog:
    """The FHIR store's change events on a pool, in seq order, committed ones only."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def after(self, seq: int, limit: int) -> list[ChangeEvent]:
        try:
            rows = await self._pool.fetch(_READ_SQL, seq, limit)
        except DATABASE_ERRORS as exc:
            raise unavailable("the change events could not be read", exc) from None
        return [ChangeEvent(int(r[0]), str(r[1]), str(r[2]), int(r[3]), action_of(str(r[4])),
                            str(r[5]), int(r[6])) for r in rows]

    async def with_bodies(self, events: Sequence[ChangeEvent]) -> list[ChangeEvent]:
        if not events:
            return []
        keys = [(e.rid, e.body_version) for e in events]
        unique = list(dict.fromkeys(keys))
        try:
            rows = await self._pool.fetch(_BODIES_SQL, [k[0] for k in unique],
                                          [k[1] for k in unique])
        except DATABASE_ERRORS as exc:
            raise unavailable("the change events could not be read", exc) from None
        found = {(int(r[0]), int(r[1])): bytes(r[2]) for r in rows}
        return [replace(e, body=found.get(k, b"")) for e, k in zip(events, keys, strict=True)]

    async def last_seq(self) -> int:
        """The last event a reader may take now."""
        try:
            return int(await self._pool.fetchval(
                f"SELECT coalesce(max(seq), 0) FROM fhir_event WHERE {_STABLE}"))
        except DATABASE_ERRORS as exc:
            raise unavailable("the change events could not be read", exc) from None

    async def purge(self, before: datetime) -> int:
        """Delete events older than `before` that the pump has handled (at or behind the
        cursor; every one when no pump ever ran); their deliveries live on in the
        outbox. An identity never draws a purged seq again."""
        try:
            status = await self._pool.execute(
                "DELETE FROM fhir_event WHERE at < $1 AND seq <= coalesce((SELECT "
                "value::bigint FROM store_meta WHERE key = $2), 9223372036854775807)",
                _timestamp(before), _CURSOR_KEY)
        except DATABASE_ERRORS as exc:
            raise unavailable("the change events could not be purged", exc) from None
        return int(str(status).rsplit(" ", 1)[-1])

    async def close(self) -> None:
        """The pool is the application's."""


class PgEventQueue:
    """Event deliveries into the shared outbox: rows, payloads and the cursor in one
    transaction; the outbox's delivering instance hears of them by NOTIFY."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def cursor(self) -> int | None:
        try:
            value = await self._pool.fetchval(
                "SELECT value FROM store_meta WHERE key = $1", _CURSOR_KEY)
        except DATABASE_ERRORS as exc:
            raise unavailable("the event cursor could not be read", exc) from None
        return None if value is None else int(value)

    async def enqueue(self, deliveries: Sequence[QueuedDelivery], through: int) -> None:
        now = _timestamp(datetime.now(UTC))
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                if deliveries:
                    await connection.executemany(
                        "INSERT INTO outbox (inbox_id, backend, patient_key, created_at, "
                        "updated_at) VALUES ($1, $2, $3, $4, $4) "
                        "ON CONFLICT (inbox_id, backend) DO NOTHING",
                        [(-d.event_seq, d.backend, d.patient_key, now) for d in deliveries])
                    await connection.executemany(
                        "INSERT INTO event_delivery (event_seq, backend, event_id, payload) "
                        "VALUES ($1, $2, $3, $4) ON CONFLICT (event_seq, backend) DO NOTHING",
                        [(d.event_seq, d.backend, d.event_id, d.payload)
                         for d in deliveries])
                    await connection.execute(
                        "SELECT pg_notify('isthmus_outbox', current_schema())")
                # Only forward: a cursor is never moved back by a late writer.
                await connection.execute(
                    "INSERT INTO store_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) "
                    "DO UPDATE SET value = excluded.value "
                    "WHERE store_meta.value::bigint < excluded.value::bigint",
                    _CURSOR_KEY, str(through))
        except DATABASE_ERRORS as exc:
            raise unavailable("event deliveries could not be queued", exc) from None

    async def close(self) -> None:
        """The pool is the application's."""


def _timestamp(moment: datetime) -> str:
    """As the outbox and the FHIR store write instants."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
