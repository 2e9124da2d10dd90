"""The stores of one backend, for tests that run on both (`backend` fixture param)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.store.audit_sqlite import SqliteAuditStore
from gateway.store.inbox import InboundMessage
from gateway.store.inbox_sqlite import SqliteInbox
from gateway.store.outbox import SqliteOutbox
from gateway.store.pg.audit import PgAuditStore
from gateway.store.pg.connect import PgSpec, open_pool
from gateway.store.pg.inbox import PgInbox
from gateway.store.pg.outbox import PgOutbox
from gateway.store.pg.replay import PgReplayStore
from gateway.store.replay_sqlite import SqliteReplayStore
from support import postgres

BACKENDS = ["sqlite", "postgresql"]


def inbound(control_id: str, raw: bytes = b"MSH|raw", ack: bytes = b"ACK", *,
            sender: str = "APP", routes: tuple[str, ...] = (), patient_key: str = "",
            content_hash: str = "", days_ago: float = 0) -> InboundMessage:
    return InboundMessage(sender, "FAC", control_id, "ADT^A01", "2.5", "peer", raw, ack,
                          datetime.now(UTC) - timedelta(days=days_ago), routes=routes,
                          patient_key=patient_key, content_hash=content_hash,
                          conflict_ack=lambda: b"ACK-conflict")


@dataclass
class Backend:
    """Where one test's stores live: a temp dir, or a fresh schema with a pool."""

    name: str
    tmp: Path
    spec: PgSpec | None = None
    pool: Any = None

    async def inbox(self, window: timedelta = timedelta(days=7),
                    max_batch: int = 512) -> SqliteInbox | PgInbox:
        if self.pool is None:
            return await SqliteInbox.open(self.tmp / "inbox.db", "normal", window, max_batch)
        return await PgInbox.open(self.pool, window, max_batch)

    async def audit_store(self, max_batch: int = 1024) -> SqliteAuditStore | PgAuditStore:
        if self.pool is None:
            return await SqliteAuditStore.open(self.tmp / "audit.db", "normal", max_batch)
        return await PgAuditStore.open(self.pool, max_batch)

    async def replay_store(self) -> SqliteReplayStore | PgReplayStore:
        if self.pool is None:
            return await SqliteReplayStore.open(self.tmp / "auth.db", "normal")
        return PgReplayStore(self.pool)

    def outbox(self, inbox: SqliteInbox | PgInbox,
               instance: str = "a") -> SqliteOutbox | PgOutbox:
        if isinstance(inbox, SqliteInbox):
            return SqliteOutbox(inbox.connection)
        assert self.spec is not None
        return PgOutbox(self.pool, self.spec, instance)


@asynccontextmanager
async def backend(name: str, tmp: Path) -> AsyncIterator[Backend]:
    if name == "sqlite":
        yield Backend(name, tmp)
        return
    spec = await postgres.new_schema()
    pool = await open_pool(spec)
    try:
        yield Backend(name, tmp, spec, pool)
    finally:
        await pool.close()
        await postgres.drop_schema(spec)


@pytest.fixture(params=BACKENDS)
async def store_backend(request: pytest.FixtureRequest, tmp_path: Path
                        ) -> AsyncIterator[Backend]:
    """Each store test that takes it runs on SQLite and on PostgreSQL."""
    async with backend(request.param, tmp_path) as opened:
        yield opened
