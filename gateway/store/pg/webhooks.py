"""The inbound webhook events on PostgreSQL: one table for every instance; a claim takes
rows with FOR UPDATE SKIP LOCKED, so two instances never fetch one event at once, and a
lease, so an instance that dies holding rows leaves them to the others."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from gateway.store.errors import StoreUnavailable
from gateway.store.pg.connect import DATABASE_ERRORS, Pool
from gateway.store.sealing import PLAIN, RowCodec
from gateway.store.webhooks import (
    EventRow,
    Status,
    WebhookEvent,
    now_text,
    webhook_context,
)

_REASON = 120


class PgWebhookEvents:
    """WebhookEvents (store/webhooks.py) over the shared pool."""

    def __init__(self, pool: Pool, codec: RowCodec = PLAIN) -> None:
        self._pool = pool
        self._codec = codec

    async def _run(self, call: str, sql: str, *args: Any) -> Any:
        try:
            return await getattr(self._pool, call)(sql, *args)
        except DATABASE_ERRORS as exc:
            raise StoreUnavailable(f"webhook events unavailable ({type(exc).__name__})"
                                   ) from None

    async def record(self, backend: str, event_id: str, kind: str, resource_type: str,
                     resource: str) -> bool:
        sealed = self._codec.seal(resource.encode(), webhook_context(backend, event_id))
        inserted = await self._run(
            "fetchval",
            "INSERT INTO webhook_event (backend, event_id, kind, resource_type, resource, "
            "received_at, next_at) VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT (backend, event_id) DO NOTHING RETURNING true",
            backend, event_id, kind, resource_type, sealed, now_text(), time.time())
        return bool(inserted)

    async def claim(self, limit: int, lease: float,
                    backend: str | None = None) -> list[WebhookEvent]:
        now = time.time()
        rows = await self._run(
            "fetch",
            "UPDATE webhook_event SET claimed_until = $1 WHERE id IN ("
            " SELECT id FROM webhook_event WHERE status = 'pending' AND next_at <= $2"
            " AND claimed_until <= $2 AND ($4::text IS NULL OR backend = $4)"
            " ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) "
            "RETURNING id, backend, event_id, kind, resource_type, resource, attempts",
            now + lease, now, limit, backend)
        events = []
        for row in rows:
            resource = self._codec.open(bytes(row["resource"]),
                                        webhook_context(row["backend"], row["event_id"]))
            events.append(WebhookEvent(row["id"], row["backend"], row["event_id"],
                                       row["kind"], row["resource_type"], resource.decode(),
                                       row["attempts"]))
        return sorted(events, key=lambda e: e.id)

    async def finish(self, id: int, status: Status, reason: str = "") -> None:
        await self._run(
            "execute",
            "UPDATE webhook_event SET status = $1, reason = $2, finished_at = $3, "
            "attempts = attempts + 1, claimed_until = 0 WHERE id = $4",
            status, reason[:_REASON], now_text(), id)

    async def retry(self, id: int, delay: float, reason: str) -> None:
        await self._run(
            "execute",
            "UPDATE webhook_event SET attempts = attempts + 1, next_at = $1, reason = $2, "
            "claimed_until = 0 WHERE id = $3", time.time() + delay, reason[:_REASON], id)

    async def abandon(self, keep: Sequence[str], reason: str) -> int:
        """Nothing, on the shared database: while a config change rolls out, instances
        differ in their backends, and a backend this one lacks may be another's. Such
        events stay pending (`isthmus webhooks list --status pending`)."""
        return 0

    async def next_due(self, backend: str | None = None) -> float | None:
        due = await self._run(
            "fetchval", "SELECT min(greatest(next_at, claimed_until)) FROM webhook_event "
            "WHERE status = 'pending' AND ($1::text IS NULL OR backend = $1)", backend)
        return None if due is None else max(0.0, float(due) - time.time())

    async def rows(self, status: str | None = None, limit: int = 100) -> list[EventRow]:
        columns = "id, backend, event_id, kind, resource_type, status, attempts, reason"
        if status:
            found = await self._run("fetch", f"SELECT {columns} FROM webhook_event "
                                    "WHERE status = $1 ORDER BY id LIMIT $2", status, limit)
        else:
            found = await self._run("fetch", f"SELECT {columns} FROM webhook_event "
                                    "ORDER BY id LIMIT $1", limit)
        return [EventRow(*tuple(row)) for row in found]

    async def close(self) -> None:
        """Nothing of its own to close (the pool is closed by its owner)."""
