"""Opening the embedded SQLite database the way every store in this package needs it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import aiosqlite

from gateway.store.data_dir import private_dir, private_file

# aiosqlite logs every statement with its parameters at DEBUG: those parameters are whole
# messages, so its logger is capped whatever level the operator chooses.
logging.getLogger("aiosqlite").setLevel(logging.WARNING)


async def open_database(
    path: Path, synchronous: Literal["normal", "full", "extra"] = "full", *,
    cached_statements: int = 128,
) -> aiosqlite.Connection:
    """Open (creating, owner-only) a WAL database in autocommit mode.

    Autocommit: each statement is its own transaction, so a multi-row INSERT commits
    atomically in one round trip to the database thread. WAL lets readers (the CLI, health
    checks) run beside the writer. `synchronous` decides when the WAL reaches the disk:
    FULL syncs on every commit (survives power loss), NORMAL only at checkpoints (survives
    a process crash, may lose the last commits on power loss).

    `cached_statements` (sqlite3's statement cache): a cached statement keeps SQLite's copy
    of every blob last bound to it until it runs again, so a store that binds large blobs
    (the inbox: whole messages) passes 0 to let each copy go with its statement.
    """
    # Owner-only (PHI): the -wal and -shm files SQLite makes take the database file's mode.
    private_dir(path.parent)
    private_file(path)
    db = await aiosqlite.connect(path, isolation_level=None,
                                cached_statements=cached_statements)
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        await db.execute("PRAGMA busy_timeout=5000")
    except BaseException:
        await db.close()  # its thread would otherwise keep the process alive
        raise
    return db
