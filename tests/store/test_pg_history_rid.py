"""PostgreSQL's versions and change events keyed by the resource's number (`rid`, issue 15;
migration 6): a database migrated from version 5 with history in it reads every version,
history and event body as before; new versions and events are named by rid; and so after
`isthmus store copy` of an embedded store."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.store.events import ChangeEvent
from gateway.store.fhir import (
    HistoryQuery,
    IndexEntry,
    StoredResource,
    WriteOutcome,
    WriteRequest,
)
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.pg import migrate as migrate_module
from gateway.store.pg.connect import Connection, PgSpec, connect, open_pool
from gateway.store.pg.copy import copy_sqlite
from gateway.store.pg.events import PgEventLog
from gateway.store.pg.fhir import PgFhirStore
from gateway.store.pg.migrate import migrate
from gateway.store.pg.schema import MIGRATIONS
from support import builders, postgres

# (id, version, deleted, family): what the version-5 database holds, in the order written.
WRITTEN = (("young", 1, False, "Young"), ("baker", 1, False, "Baker"),
           ("young", 2, False, "Young-Li"), ("young", 3, True, "Young-Li"))


def no_index(resource_type: str, resource: dict[str, Any]) -> Sequence[IndexEntry]:
    return ()


def body(id_: str, version: int, family: str) -> bytes:
    return orjson.dumps({**builders.patient(family=family), "id": id_,
                         "meta": {"versionId": str(version)}})


async def write_as_version_5(connection: Connection) -> None:
    """WRITTEN, through the triggers as migration 5 left them (versions and events named
    by type and id)."""
    for n, (id_, version, deleted, family) in enumerate(WRITTEN):
        await connection.execute(
            "INSERT INTO fhir_resource (type, id, version, last_updated, deleted, body) "
            "VALUES ('Patient', $1, $2, $3, $4, $5) ON CONFLICT (type, id) DO UPDATE SET "
            "version = excluded.version, last_updated = excluded.last_updated, "
            "deleted = excluded.deleted, body = excluded.body",
            id_, version, f"2026-01-01T00:00:0{n}.000000Z", int(deleted),
            body(id_, version, family))


async def index_definitions(connection: Connection, table: str) -> list[str]:
    return [str(r[0]) for r in await connection.fetch(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() "
        "AND tablename = $1", table)]


async def assert_named_by_rid(connection: Connection) -> None:
    """Every version and event names by rid the resource its type and id name; the unique
    keys are (rid, version); no index holds the uuid."""
    for table in ("fhir_version", "fhir_event"):
        assert not await connection.fetchval(
            f"SELECT count(*) FROM {table} x LEFT JOIN fhir_resource r ON r.rid = x.rid "
            "WHERE r.rid IS NULL OR r.type <> x.type OR r.id <> x.id"), table
        definitions = await index_definitions(connection, table)
        assert any(d.startswith("CREATE UNIQUE INDEX") and d.endswith("(rid, version)")
                   for d in definitions), definitions
        assert not any(" id," in d or "(id" in d for d in definitions), definitions


def events_read(events: Sequence[ChangeEvent]) -> list[tuple[str, int, str, bytes]]:
    return [(e.id, e.version, e.action, e.body) for e in events]


async def test_migration_6_reads_every_version_history_and_event_as_before(
        monkeypatch: pytest.MonkeyPatch) -> None:
    postgres.require()
    spec = PgSpec(postgres.URL, schema=f"t_{secrets.token_hex(6)}", pool_min_size=1,
                  pool_max_size=4, connect_timeout=5, statement_timeout=30)
    monkeypatch.setattr(migrate_module, "MIGRATIONS", MIGRATIONS[:5])
    assert [m.version for m in await migrate(spec)] == [1, 2, 3, 4, 5]
    monkeypatch.undo()
    connection = await connect(spec)
    pool = None
    try:
        await write_as_version_5(connection)
        assert [m.version for m in await migrate(spec)] == [6, 7]
        await assert_named_by_rid(connection)
        pool = await open_pool(spec)
        store = await PgFhirStore.open(pool, no_index)
        log = PgEventLog(pool)
        for id_, version, deleted, family in WRITTEN:
            stored = await store.vread("Patient", id_, version)
            assert stored is not None and stored.deleted == deleted
            assert stored.body == body(id_, version, family)
        assert await store.vread("Patient", "young", 4) is None
        assert await store.vread("Patient", "never-written", 1) is None
        young = await store.history(HistoryQuery("Patient", "young"))
        assert [r.version for r in young.resources] == [3, 2, 1] and young.total == 3
        since = await store.history(HistoryQuery(
            "Patient", "young", since="2026-01-01T00:00:02.000000Z"))
        assert [r.version for r in since.resources] == [3, 2] and since.total == 2
        every = await store.history(HistoryQuery())
        assert [(r.id, r.version) for r in every.resources] == [
            ("young", 3), ("young", 2), ("baker", 1), ("young", 1)]
        assert events_read(await log.with_bodies(await log.after(0, 10))) == [
            ("young", 1, "created", body("young", 1, "Young")),
            ("baker", 1, "created", body("baker", 1, "Baker")),
            ("young", 2, "updated", body("young", 2, "Young-Li")),
            ("young", 3, "deleted", body("young", 2, "Young-Li"))]  # the deleted version's
        # A new version after the migration: named by the resource's rid, read by it.
        [outcome] = await store.transact([WriteRequest(
            "PUT", "Patient", id="baker", resource=builders.patient(family="Baker-Roe"))])
        assert isinstance(outcome, WriteOutcome) and outcome.stored is not None
        assert await store.vread("Patient", "baker", 2) == outcome.stored
        [event] = await log.with_bodies(await log.after(4, 10))
        assert (event.id, event.version, event.action, event.body) == (
            "baker", 2, "updated", outcome.stored.body)
        await assert_named_by_rid(connection)
        await store.close()
    finally:
        if pool is not None:
            await pool.close()
        await connection.close()
        await postgres.drop_schema(spec)


async def test_a_copy_carries_every_version_with_its_rid(tmp_path: Path) -> None:
    """`isthmus store copy` carries the versions' rids as they are: every version reads
    the same on PostgreSQL, and a version written after the copy follows them."""
    embedded = await SqliteFhirStore.open(tmp_path / "fhir.db", no_index, synchronous="normal")
    try:
        for request in (WriteRequest("PUT", "Patient", "young", builders.patient(family="A")),
                        WriteRequest("PUT", "Patient", "baker", builders.patient(family="B")),
                        WriteRequest("PUT", "Patient", "young", builders.patient(family="C")),
                        WriteRequest("DELETE", "Patient", "young")):
            [outcome] = await embedded.transact([request])
            assert isinstance(outcome, WriteOutcome) and outcome.changed
        written: list[StoredResource | None] = [
            await embedded.vread("Patient", id_, version)
            for id_, version in (("young", 1), ("young", 2), ("young", 3), ("baker", 1))]
        embedded_history = await embedded.history(HistoryQuery())
    finally:
        await embedded.close()
    spec = await postgres.new_schema()
    connection = await connect(spec)
    pool = await open_pool(spec)
    try:
        await copy_sqlite(tmp_path, connection)
        await connection.execute("DELETE FROM fhir_event")  # none copied; none to check
        store = await PgFhirStore.open(pool, no_index)
        for stored in written:
            assert stored is not None
            assert await store.vread("Patient", stored.id, stored.version) == stored
        assert written[2] is not None and written[2].deleted
        assert await store.history(HistoryQuery()) == embedded_history
        [outcome] = await store.transact([WriteRequest(
            "PUT", "Patient", "baker", builders.patient(family="D"))])
        assert isinstance(outcome, WriteOutcome) and outcome.stored is not None
        assert await store.vread("Patient", "baker", 2) == outcome.stored
        assert [r.version for r in (await store.history(
            HistoryQuery("Patient", "baker"))).resources] == [2, 1]
        await assert_named_by_rid(connection)
        await store.close()
    finally:
        await pool.close()
        await connection.close()
        await postgres.drop_schema(spec)
