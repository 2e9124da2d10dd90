"""The ids of client assertions already used, kept on disk until they expire.

RFC 7523 §3 item 7 / SMART Backend Services: an assertion's jti may be used once. The
token server checks ids in memory; this table is what a restart loads back, so an
assertion captured before a restart cannot be replayed after it. Keys are SHA-256
digests (fixed size, no client-chosen text in the file); each row goes when it expires.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import aiosqlite

from gateway.store.errors import StoreUnavailable
from gateway.store.sqlite import open_database

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS assertion_ids (
    key BLOB PRIMARY KEY,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS assertion_ids_expiry ON assertion_ids (expires_at);
"""
# Expired rows are deleted every this many inserts (and at open), so the table stays as
# small as the ids in flight without a DELETE on every token request.
_PURGE_EVERY = 256


class SqliteReplayStore:
    """Used assertion ids on their own small SQLite file (WAL, one row per id)."""

    def __init__(self, db: aiosqlite.Connection,
                 clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock
        self._inserts = 0

    @classmethod
    async def open(cls, path: Path,
                   synchronous: Literal["normal", "full", "extra"] = "full",
                   clock: Callable[[], float] = time.time) -> SqliteReplayStore:
        db = await open_database(path, synchronous)
        try:
            await db.executescript(_SCHEMA)
        except BaseException:
            await db.close()
            raise
        return cls(db, clock)

    async def unexpired(self) -> list[tuple[bytes, float]]:
        """The ids still in force (the expired ones are deleted on the way)."""
        now = self._clock()
        try:
            await self._db.execute("DELETE FROM assertion_ids WHERE expires_at <= ?", (now,))
            rows = await self._db.execute_fetchall(
                "SELECT key, expires_at FROM assertion_ids")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the assertion ids could not be read "
                                   f"({type(exc).__name__})") from None
        return [(bytes(key), float(expires_at)) for key, expires_at in rows]

    async def add(self, key: bytes, expires_at: float) -> None:
        """Keep `key` until `expires_at` (durable when this returns)."""
        try:
            # OR IGNORE: the same id after a crash between commit and answer is still one id.
            await self._db.execute(
                "INSERT OR IGNORE INTO assertion_ids (key, expires_at) VALUES (?, ?)",
                (key, expires_at))
            self._inserts += 1
            if self._inserts % _PURGE_EVERY == 0:
                await self._db.execute("DELETE FROM assertion_ids WHERE expires_at <= ?",
                                       (self._clock(),))
        except sqlite3.Error as exc:
            log.error("assertion id not stored: %s", type(exc).__name__)
            raise StoreUnavailable("the assertion id could not be stored") from None

    async def close(self) -> None:
        await self._db.close()
