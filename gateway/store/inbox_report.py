"""Read-only views of the inbox for the console: counts and filtered listings, no PHI.

Opened read-only beside a running gateway (WAL lets readers run beside its writer). The
filters are the operator's: status, message type, sender, control id and a time window,
none of them patient data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from gateway.store.inbox import InboxEntry

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


async def read_counts(path: Path, since: str) -> list[tuple[str, str, int]]:
    """(message type, status, count) of the rows received since `since` (ISO 8601)."""
    async with aiosqlite.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = await db.execute_fetchall(
            "SELECT message_type, status, count(*) FROM inbox WHERE received_at >= ? "
            "GROUP BY message_type, status ORDER BY message_type, status", (since,))
    return [(str(t), str(s), int(n)) for t, s, n in rows]


async def read_filtered(path: Path, wanted: InboxFilter) -> list[InboxEntry]:
    """The newest rows matching every filter given, newest first."""
    clauses: list[str] = []
    values: list[str | int] = []
    if wanted.status:
        clauses.append("status = ?")
        values.append(wanted.status)
    if wanted.message_type:
        clauses.append("message_type LIKE ?")
        values.append(wanted.message_type + "%")
    if wanted.sender:
        application, _, facility = wanted.sender.partition("/")
        clauses.append("sending_application = ?")
        values.append(application)
        if facility:
            clauses.append("sending_facility = ?")
            values.append(facility)
    if wanted.control_id:
        clauses.append("control_id = ?")
        values.append(wanted.control_id)
    if wanted.since:
        clauses.append("received_at >= ?")
        values.append(wanted.since)
    if wanted.until:
        clauses.append("received_at < ?")
        values.append(wanted.until)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    async with aiosqlite.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = await db.execute_fetchall(
            f"SELECT {_COLUMNS} FROM inbox {where} ORDER BY id DESC LIMIT ?",
            [*values, max(1, min(wanted.limit, 1000))])
    return [InboxEntry(*row) for row in rows]
