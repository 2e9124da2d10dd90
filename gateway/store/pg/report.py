"""The console's view of the inbox and outbox in PostgreSQL (`InboxReport`): what every
instance received and owes, read and changed through the shared pool."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.store.inbox import InboxEntry, RawRows, Replayed
from gateway.store.inbox_report import (
    COUNTS_SQL,
    ENTRY_COLUMNS,
    InboxFilter,
    filter_sql,
    limit_of,
)
from gateway.store.outbox import OutboxEntry
from gateway.store.pg.connect import PgSpec, Pool
from gateway.store.pg.inbox import PgInbox
from gateway.store.pg.outbox import PgOutbox


class PgInboxReport:
    """InboxReport on a pool. Reads and operator actions only: it starts no writer and
    delivers nothing (the outbox it uses never asks to lead)."""

    def __init__(self, pool: Pool, spec: PgSpec) -> None:
        self._pool = pool
        self._inbox = PgInbox(pool)
        self._outbox = PgOutbox(pool, spec, "console")

    async def counts(self, since: str) -> list[tuple[str, str, int]]:
        rows = await self._pool.fetch(COUNTS_SQL.format(since="$1"), since)
        return [(str(t), str(s), int(n)) for t, s, n in rows]

    async def filtered(self, wanted: InboxFilter) -> list[InboxEntry]:
        values: list[str | int] = []

        def bind(value: str | int) -> str:
            values.append(value)
            return f"${len(values)}"

        where = filter_sql(wanted, bind)
        rows = await self._pool.fetch(
            f"SELECT {ENTRY_COLUMNS} FROM inbox {where} ORDER BY id DESC "
            f"LIMIT {bind(limit_of(wanted))}", *values)
        return [InboxEntry(*row) for row in rows]

    async def entry(self, inbox_id: int) -> tuple[InboxEntry, bytes, bytes] | None:
        return await self._inbox.get(inbox_id)

    async def raw(self, ids: Sequence[int]) -> RawRows:
        return await self._inbox.raw_rows(ids)

    async def record_outcomes(self, outcomes: Sequence[Replayed]) -> None:
        await self._inbox.record_outcomes(outcomes)

    async def deliveries(self, status: str | None, backend: str | None,
                         limit: int) -> list[OutboxEntry]:
        return await self._outbox.list_entries(status, backend, limit)

    async def retry(self, ids: Sequence[int]) -> int:
        return await self._outbox.retry(ids)

    async def drop(self, ids: Sequence[int]) -> int:
        return await self._outbox.drop(ids)
