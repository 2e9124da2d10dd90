"""What the console reads and does in the inbox and outbox, on either backend: counts and
filtered listings (no PHI), one message with its ACK, replays recorded, deliveries listed,
retried or dropped.

`InboxReport` is the interface; `SqliteInboxReport` reads the embedded files beside a
running gateway (read-only connections where it only reads: WAL lets readers run beside
its writer), `gateway.store.pg.report.PgInboxReport` the database. The filters are the
operator's: status, message type, sender, control id and a time window, none of them
patient data."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosqlite

from gateway.store.inbox import InboxEntry, RawRows, Replayed
from gateway.store.inbox_sqlite import read_entry, read_raw, record_outcomes
from gateway.store.outbox import OutboxEntry, open_outbox
from gateway.store.sealing import RowCodec

_COLUMNS = ("id, received_at, sending_application, sending_facility, control_id, "
            "message_type, version, peer, size, status, error")


@dataclass(frozen=True, slots=True)
class InboxFilter:
    status: str = ""
    message_type: str = ""
    sender: str = ""  # MSH-3, or MSH-3/MSH-4
    control_id: str = ""
    since: str = ""  # ISO 8601: received at or after
    until: str = ""  # ISO 8601: received before
    limit: int = 100


class InboxReport(Protocol):
    """The console's view of the inbox and outbox."""

    async def counts(self, since: str) -> list[tuple[str, str, int]]:
        """(message type, status, count) of the rows received since `since` (ISO 8601)."""
        ...

    async def filtered(self, wanted: InboxFilter) -> list[InboxEntry]: ...

    async def entry(self, inbox_id: int) -> tuple[InboxEntry, bytes, bytes] | None:
        """A row with its message and ACK (opened, when sealed)."""
        ...

    async def raw(self, ids: Sequence[int]) -> RawRows: ...

    async def record_outcomes(self, outcomes: Sequence[Replayed]) -> None: ...

    async def deliveries(self, status: str | None, backend: str | None,
                         limit: int) -> list[OutboxEntry]: ...

    async def retry(self, ids: Sequence[int]) -> int: ...

    async def drop(self, ids: Sequence[int]) -> int: ...


def filter_sql(wanted: InboxFilter, bind: Callable[[str | int], str]) -> str:
    """The WHERE clause (or '') of a filter; `bind(value)` adds a parameter and returns
    its placeholder ('?' on SQLite, '$n' on PostgreSQL)."""
    clauses: list[str] = []
    if wanted.status:
        clauses.append(f"status = {bind(wanted.status)}")
    if wanted.message_type:
        clauses.append(f"message_type LIKE {bind(wanted.message_type + '%')}")
    if wanted.sender:
        application, _, facility = wanted.sender.partition("/")
        clauses.append(f"sending_application = {bind(application)}")
        if facility:
            clauses.append(f"sending_facility = {bind(facility)}")
    if wanted.control_id:
        clauses.append(f"control_id = {bind(wanted.control_id)}")
    if wanted.since:
        clauses.append(f"received_at >= {bind(wanted.since)}")
    if wanted.until:
        clauses.append(f"received_at < {bind(wanted.until)}")
    return f"WHERE {' AND '.join(clauses)}" if clauses else ""


def limit_of(wanted: InboxFilter) -> int:
    return max(1, min(wanted.limit, 1000))


ENTRY_COLUMNS = _COLUMNS
COUNTS_SQL = ("SELECT message_type, status, count(*) FROM inbox WHERE received_at >= {since} "
              "GROUP BY message_type, status ORDER BY message_type, status")


class SqliteInboxReport:
    """The console's view of the embedded inbox file; `codec()` opens its messages."""

    def __init__(self, path: Path, codec: Callable[[], RowCodec]) -> None:
        self._path = path
        self._codec = codec

    async def counts(self, since: str) -> list[tuple[str, str, int]]:
        return await read_counts(self._path, since)

    async def filtered(self, wanted: InboxFilter) -> list[InboxEntry]:
        return await read_filtered(self._path, wanted)

    async def entry(self, inbox_id: int) -> tuple[InboxEntry, bytes, bytes] | None:
        return await read_entry(self._path, inbox_id, self._codec())

    async def raw(self, ids: Sequence[int]) -> RawRows:
        return await read_raw(self._path, ids, codec=self._codec())

    async def record_outcomes(self, outcomes: Sequence[Replayed]) -> None:
        await record_outcomes(self._path, outcomes, self._codec())

    async def deliveries(self, status: str | None, backend: str | None,
                         limit: int) -> list[OutboxEntry]:
        async with open_outbox(self._path) as outbox:
            return list(await outbox.list_entries(status, backend, limit))

    async def retry(self, ids: Sequence[int]) -> int:
        async with open_outbox(self._path) as outbox:
            return await outbox.retry(ids)

    async def drop(self, ids: Sequence[int]) -> int:
        async with open_outbox(self._path) as outbox:
            return await outbox.drop(ids)


async def read_counts(path: Path, since: str) -> list[tuple[str, str, int]]:
    """(message type, status, count) of the rows received since `since` (ISO 8601)."""
    async with aiosqlite.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = await db.execute_fetchall(COUNTS_SQL.format(since="?"), (since,))
    return [(str(t), str(s), int(n)) for t, s, n in rows]


async def read_filtered(path: Path, wanted: InboxFilter) -> list[InboxEntry]:
    """The newest rows matching every filter given, newest first."""
    values: list[str | int] = []

    def bind(value: str | int) -> str:
        values.append(value)
        return "?"

    where = filter_sql(wanted, bind)
    async with aiosqlite.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = await db.execute_fetchall(
            f"SELECT {_COLUMNS} FROM inbox {where} ORDER BY id DESC LIMIT ?",
            [*values, limit_of(wanted)])
    return [InboxEntry(*row) for row in rows]
