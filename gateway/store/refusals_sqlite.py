"""MLLP messages refused (AR/AE before storage), remembered without their content.

A refused message is not stored: the sender keeps it and may resend. Operators still need
to see that it happened and why, so each refusal leaves a bounded, PHI-free row: when,
from which peer and sender (MSH-3/MSH-4), under which control id and message type, the
ACK code, and the ERR codes with their locations (`PID-7`). Never the message, a field
value or an error text (a reason can quote the value it refuses).

Rows are written off the answer's path, in batches, on their own small SQLite file; only
the newest `keep` rows are kept. Losing the last second of rows in a crash is accepted:
the audit trail holds every refusal durably; this is the operator's quick view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiosqlite

from gateway.store.sqlite import open_database

log = logging.getLogger(__name__)

REFUSALS_FILE = "refusals.db"
DEFAULT_KEEP = 10_000
_FLUSH_SECONDS = 0.5
_MAX_PENDING = 10_000
_TEXT = 64  # every text column is cut to this: none is free text, but senders choose them

_SCHEMA = """
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY,
    refused_at TEXT NOT NULL,
    peer TEXT NOT NULL,
    sending_application TEXT NOT NULL,
    sending_facility TEXT NOT NULL,
    control_id TEXT NOT NULL,
    message_type TEXT NOT NULL,
    ack_code TEXT NOT NULL,
    errors TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refused message, as the operator may see it (no content, no values)."""

    refused_at: str  # ISO 8601, UTC
    peer: str
    sending_application: str
    sending_facility: str
    control_id: str
    message_type: str
    ack_code: str
    # (HL7 table 0357 code, location such as "PID-7" or "" for the message as a whole)
    errors: tuple[tuple[int, str], ...]

    def errors_text(self) -> str:
        """`207@MSH-12 101@PID-3`: the codes and where, as `inbox list` shows them."""
        return " ".join(f"{code}@{where}" if where else str(code) for code, where in self.errors)


@dataclass(frozen=True, slots=True)
class RefusalRow:
    id: int
    refusal: Refusal


class SqliteRefusals:
    """The refusals file: `add` queues (never waits), a background task writes batches."""

    def __init__(self, db: aiosqlite.Connection, keep: int) -> None:
        self._db = db
        self._keep = keep
        self._pending: list[Refusal] = []
        self._dropped = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._writer = asyncio.get_running_loop().create_task(self._write_batches())

    @classmethod
    async def open(cls, path: Path, synchronous: Literal["normal", "full", "extra"] = "full",
                   keep: int = DEFAULT_KEEP) -> SqliteRefusals:
        db = await open_database(path, synchronous)
        try:
            await db.executescript(_SCHEMA)
        except BaseException:
            await db.close()
            raise
        return cls(db, keep)

    def add(self, refusal: Refusal) -> None:
        """Remember a refusal; under a flood the oldest unwritten ones are dropped first."""
        if len(self._pending) >= _MAX_PENDING:
            del self._pending[0]
            self._dropped += 1
        self._pending.append(_bounded(refusal))
        if len(self._pending) >= 256:
            self._wake.set()

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        await self._db.close()

    async def _write_batches(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _FLUSH_SECONDS)
            self._wake.clear()
            batch, self._pending = self._pending, []
            if batch:
                await self._write(batch)
            if self._dropped:
                log.warning("%d refusal records dropped (a flood of refused messages)",
                            self._dropped)
                self._dropped = 0
            if self._closing and not self._pending:
                return

    async def _write(self, batch: Sequence[Refusal]) -> None:
        try:
            await self._db.executemany(
                "INSERT INTO refusals (refused_at, peer, sending_application, "
                "sending_facility, control_id, message_type, ack_code, errors) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.refused_at, r.peer, r.sending_application, r.sending_facility,
                  r.control_id, r.message_type, r.ack_code, r.errors_text()) for r in batch])
            await self._db.execute(
                "DELETE FROM refusals WHERE id <= (SELECT max(id) FROM refusals) - ?",
                (self._keep,))
            await self._db.commit()
        except sqlite3.Error as exc:
            # The audit trail has each refusal durably; this view may miss a batch.
            log.warning("%d refusal records not written (%s)", len(batch), type(exc).__name__)


def _bounded(refusal: Refusal) -> Refusal:
    return Refusal(refusal.refused_at[:_TEXT], refusal.peer[:_TEXT],
                   refusal.sending_application[:_TEXT], refusal.sending_facility[:_TEXT],
                   refusal.control_id[:_TEXT], refusal.message_type[:_TEXT],
                   refusal.ack_code[:2], tuple((code, where[:_TEXT])
                                                for code, where in refusal.errors[:8]))


async def read_refusals(path: Path, limit: int) -> list[RefusalRow]:
    """The newest `limit` refusals, newest first (for `isthmus inbox list --status refused`)."""
    async with aiosqlite.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = await db.execute_fetchall(
            "SELECT id, refused_at, peer, sending_application, sending_facility, control_id, "
            "message_type, ack_code, errors FROM refusals ORDER BY id DESC LIMIT ?", (limit,))
    return [RefusalRow(int(row[0]), Refusal(
        str(row[1]), str(row[2]), str(row[3]), str(row[4]), str(row[5]), str(row[6]),
        str(row[7]), _parse_errors(str(row[8])))) for row in rows]


def _parse_errors(text: str) -> tuple[tuple[int, str], ...]:
    found = []
    for item in text.split():
        code, _, where = item.partition("@")
        if code.isdigit():
            found.append((int(code), where))
    return tuple(found)
