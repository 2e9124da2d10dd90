"""The ids of client assertions already used, on PostgreSQL: one table for every instance,
so an assertion used at one instance is refused at all of them (RFC 7523 §3 item 7)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gateway.store.errors import StoreUnavailable
from gateway.store.pg.connect import DATABASE_ERRORS, Pool

log = logging.getLogger(__name__)

_PURGE_EVERY = 256


class PgReplayStore:
    """Used assertion ids (SHA-256 keys) until they expire; the primary key decides."""

    def __init__(self, pool: Pool, clock: Callable[[], float] = time.time) -> None:
        self._pool = pool
        self._clock = clock
        self._inserts = 0

    async def unexpired(self) -> list[tuple[bytes, float]]:
        try:
            await self._pool.execute("DELETE FROM assertion_ids WHERE expires_at <= $1",
                                     self._clock())
            rows = await self._pool.fetch("SELECT key, expires_at FROM assertion_ids")
        except DATABASE_ERRORS as exc:
            raise StoreUnavailable(f"the assertion ids could not be read "
                                   f"({type(exc).__name__})") from None
        return [(bytes(key), float(expires_at)) for key, expires_at in rows]

    async def add(self, key: bytes, expires_at: float) -> bool:
        """Keep `key` until `expires_at`; False if some instance had kept it already
        (the assertion is a replay)."""
        try:
            inserted = await self._pool.fetchval(
                "INSERT INTO assertion_ids (key, expires_at) VALUES ($1, $2) "
                "ON CONFLICT (key) DO NOTHING RETURNING true", key, expires_at)
            self._inserts += 1
            if self._inserts % _PURGE_EVERY == 0:
                await self._pool.execute("DELETE FROM assertion_ids WHERE expires_at <= $1",
                                         self._clock())
        except DATABASE_ERRORS as exc:
            log.error("assertion id not stored: %s", type(exc).__name__)
            raise StoreUnavailable("the assertion id could not be stored") from None
        return bool(inserted)

    async def close(self) -> None:
        """Nothing of its own to close (the pool is closed by its owner)."""
