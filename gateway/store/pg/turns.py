"""One patient's rows applied to the shared FHIR store in inbox order, across instances.

Each instance applies the rows it committed, after their ACKs and behind its own backlog.
A sender that has one patient's A01 acknowledged by instance A and then (reconnected
through the load balancer) the A08 by instance B has B apply the A08 at once while A's
A01 still waits: applied later, the A01 would write over it. So an apply takes the
patient's turn: a session-level advisory lock on the patient key, per schema, and under
it the patient's earlier rows still `translated` are applied first, whichever instance
committed them; the instance that committed one finds it applied when its turn comes. One
patient's rows commit in id order (the inbox takes their locks before it draws ids:
gateway.store.pg.inbox), so once a row is visible its earlier rows are too.

The lock is held on a connection of its own, outside any transaction: taking over a
patient's rows may take a while (each is a FHIR transaction on a pooled connection), and
a pooled connection held meanwhile could be the last one the pool has.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.store.inbox import TRANSLATED
from gateway.store.pg.connect import (
    DATABASE_ERRORS,
    Connection,
    PgSpec,
    connect,
    unavailable,
)

log = logging.getLogger(__name__)

_KEY = "hashtextextended('isthmus-apply:' || current_schema() || ':' || $1, 0)"
_PENDING = ("SELECT id FROM inbox WHERE patient_key = $1 AND status = 'translated' "
            "AND id <= $2 ORDER BY id")


class PgApplyTurns:
    """The apply turns (ApplyTurns) of one instance's applier."""

    def __init__(self, spec: PgSpec) -> None:
        self._spec = spec
        self._connection: Connection | None = None
        self._one = asyncio.Lock()  # one turn at a time on the connection

    @asynccontextmanager
    async def turn(self, inbox_id: int) -> AsyncIterator[list[int]]:
        async with self._one:
            key, pending = await self._take(inbox_id)
            try:
                yield pending
            finally:
                if key:
                    await self._give_back(key)

    async def _take(self, inbox_id: int) -> tuple[str, list[int]]:
        """The row's patient key ('' for none: no lock taken) and its pending rows."""
        try:
            if self._connection is None or self._connection.is_closed():
                self._connection = await connect(self._spec)
            db = self._connection
            row = await db.fetchrow("SELECT patient_key, status FROM inbox WHERE id = $1",
                                    inbox_id)
            if row is None:
                return "", []
            key, status = str(row[0]), str(row[1])
            if not key:
                return "", [inbox_id] if status == TRANSLATED else []
            await db.execute(f"SELECT pg_advisory_lock({_KEY})", key)
            return key, [int(r[0]) for r in await db.fetch(_PENDING, key, inbox_id)]
        except DATABASE_ERRORS as exc:
            await self._drop()  # a lock taken goes with the session
            raise unavailable("the inbox could not be read", exc) from None

    async def _give_back(self, key: str) -> None:
        db = self._connection
        if db is None:
            return
        try:
            await db.execute(f"SELECT pg_advisory_unlock({_KEY})", key)
        except DATABASE_ERRORS as exc:
            log.warning("apply turn: could not release a patient's lock (%s); the "
                        "connection is closed instead", type(exc).__name__)
            await self._drop()

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.terminate()

    async def close(self) -> None:
        async with self._one:
            connection, self._connection = self._connection, None
            if connection is not None:
                try:
                    await connection.close(timeout=5)
                except DATABASE_ERRORS:
                    connection.terminate()
