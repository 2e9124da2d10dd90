"""PostgreSQL's search rows keyed by the resource's number (`rid`, issue 15): a database
migrated from version 4 with resources in it still finds and sorts them, an update keeps a
resource's rid, a new resource gets a fresh one; and so after `isthmus store copy`."""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.store.fhir import (
    DateIndex,
    IndexEntry,
    QuantityIndex,
    QuantityMatch,
    ReferenceIndex,
    ReferenceMatch,
    SearchQuery,
    SortKey,
    StoredResource,
    StringIndex,
    StringMatch,
    TokenIndex,
    TokenMatch,
    WriteOutcome,
    WriteRequest,
)
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.fhir_sqlite.schema import index_row
from gateway.store.pg import migrate as migrate_module
from gateway.store.pg.connect import Connection, PgSpec, connect, open_pool
from gateway.store.pg.copy import copy_sqlite
from gateway.store.pg.fhir import PgFhirStore
from gateway.store.pg.migrate import migrate
from gateway.store.pg.schema import MIGRATIONS
from support import builders, postgres

MRN = "urn:oid:1.2.3.4"
patient = partial(builders.patient, system=MRN)
INDEX_COLUMNS = {  # each index table's value columns, as migrations 1-4 made them
    "fhir_token": ("system", "code"), "fhir_string": ("normalized", "exact"),
    "fhir_date": ("low", "high"), "fhir_reference": ("target",),
    "fhir_quantity": ("value", "system", "code")}
TABLE_OF = {TokenIndex: "fhir_token", StringIndex: "fhir_string", DateIndex: "fhir_date",
            ReferenceIndex: "fhir_reference", QuantityIndex: "fhir_quantity"}


def index(resource_type: str, resource: dict[str, Any]) -> Sequence[IndexEntry]:
    """A small indexer: one parameter of each kind (the real one lives in gateway.fhir)."""
    rows: list[IndexEntry] = [TokenIndex("identifier", i.get("system"), i["value"])
                              for i in resource.get("identifier", [])]
    for name in resource.get("name", []):
        rows.append(StringIndex("family", name["family"].lower(), name["family"]))
    if "birthDate" in resource:
        day = resource["birthDate"]
        rows.append(DateIndex("birthdate", f"{day}T00:00:00.000000Z",
                              f"{day}T23:59:59.999999Z"))
    if "subject" in resource:
        rows.append(ReferenceIndex("subject", resource["subject"]["reference"]))
    if "valueQuantity" in resource:
        quantity = resource["valueQuantity"]
        rows.append(QuantityIndex("value-quantity", quantity["value"], quantity["system"],
                                  quantity["code"]))
    return rows


async def ids(store: PgFhirStore, resource_type: str, *matches: Any,
              sort: tuple[SortKey, ...] = ()) -> list[str]:
    clauses = tuple((match,) for match in matches)
    page = await store.search(SearchQuery(resource_type, clauses, sort))
    return [r.id for r in page.resources]


async def rid_of(connection: Connection, resource_type: str, id_: str) -> int:
    return int(await connection.fetchval(
        "SELECT rid FROM fhir_resource WHERE type = $1 AND id = $2", resource_type, id_))


async def create(store: PgFhirStore, resource: dict[str, Any]) -> StoredResource:
    [outcome] = await store.transact([WriteRequest("POST", resource["resourceType"],
                                                   resource=resource)])
    assert isinstance(outcome, WriteOutcome) and outcome.stored is not None
    return outcome.stored


# -- a database migrated from version 4 ---------------------------------------------------


async def write_as_version_4(connection: Connection, resource_type: str, id_: str,
                             resource: dict[str, Any], *, deleted: bool = False) -> None:
    """A current resource and its search rows as the gateway wrote them at version 4:
    index rows named by (type, id)."""
    body = orjson.dumps({**resource, "id": id_, "meta": {"versionId": "1"}})
    await connection.execute(
        "INSERT INTO fhir_resource (type, id, version, last_updated, deleted, body) "
        "VALUES ($1, $2, 1, '2026-01-01T00:00:00.000000Z', $3, $4)",
        resource_type, id_, int(deleted), body)
    if deleted:
        return
    for entry in index(resource_type, resource):
        table = TABLE_OF[type(entry)]
        columns = ("type", "id", "param", *INDEX_COLUMNS[table])
        values = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
        await connection.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({values})",
            *index_row(resource_type, id_, entry))


@dataclass
class Migrated:
    store: PgFhirStore
    connection: Connection


@pytest.fixture
async def migrated(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Migrated]:
    """A schema the previous release (migrations 1-4) made and filled, then migrated by
    this one: three patients (one deleted), two observations, and a search row whose
    resource is gone."""
    postgres.require()
    spec = PgSpec(postgres.URL, schema=f"t_{secrets.token_hex(6)}", pool_min_size=1,
                  pool_max_size=8, connect_timeout=5, statement_timeout=30)
    # The previous release knew only migrations 1-4.
    monkeypatch.setattr(migrate_module, "MIGRATIONS", MIGRATIONS[:4])
    assert [m.version for m in await migrate(spec)] == [1, 2, 3, 4]
    monkeypatch.undo()
    connection = await connect(spec)
    pool = None
    try:
        await write_as_version_4(connection, "Patient", "young", patient(
            "MRN-Y", family="Young", birthDate="1990-05-01"))
        await write_as_version_4(connection, "Patient", "baker", patient(
            "MRN-B", family="Baker", birthDate="1950-02-03"))
        await write_as_version_4(connection, "Patient", "gone", patient(
            "MRN-G", family="Gone"), deleted=True)
        for id_, value in (("obs-10", 10.0), ("obs-9.5", 9.5)):
            await write_as_version_4(connection, "Observation", id_, builders.observation(
                "Patient/young", quantity=(value, "mg")))
        await connection.execute(
            "INSERT INTO fhir_token (type, id, param, system, code) "
            "VALUES ('Patient', 'never-written', 'identifier', $1, 'MRN-Y')", MRN)
        assert [m.version for m in await migrate(spec)] == [5, 6, 7]
        pool = await open_pool(spec)
        store = await PgFhirStore.open(pool, index)
        yield Migrated(store, connection)
        await store.close()
    finally:
        if pool is not None:
            await pool.close()
        await connection.close()
        await postgres.drop_schema(spec)


async def test_migration_5_keeps_every_search_row_findable_by_the_resources_rid(
        migrated: Migrated) -> None:
    store, db = migrated.store, migrated.connection
    assert await ids(store, "Patient", TokenMatch("identifier", MRN, "MRN-Y")) == ["young"]
    assert await ids(store, "Patient", StringMatch("family", "bak")) == ["baker"]
    assert await ids(store, "Patient", TokenMatch("identifier", MRN, "MRN-G")) == []
    assert sorted(await ids(store, "Observation", ReferenceMatch(
        "subject", "Patient/young"))) == ["obs-10", "obs-9.5"]
    assert await ids(store, "Observation", QuantityMatch(
        "value-quantity", "gt", 9.7)) == ["obs-10"]
    # Every row names its resource by rid now; the one whose resource never was is gone.
    for table in INDEX_COLUMNS:
        columns = {r[0] for r in await db.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = $1", table)}
        assert "rid" in columns and "id" not in columns, table
        assert not await db.fetchval(
            f"SELECT count(*) FROM {table} x LEFT JOIN fhir_resource r ON r.rid = x.rid "
            "WHERE r.rid IS NULL OR r.type <> x.type"), table
    assert await db.fetchval("SELECT count(*) FROM fhir_token WHERE code = 'MRN-Y'") == 1


async def test_migration_5_sorts_by_each_kind_of_value(migrated: Migrated) -> None:
    store = migrated.store
    assert await ids(store, "Patient", sort=(SortKey("family"),)) == ["baker", "young"]
    assert await ids(store, "Patient", sort=(SortKey("birthdate", True),)) == [
        "young", "baker"]
    # Numbers as numbers (text would put "10" before "9.5").
    assert await ids(store, "Observation", sort=(SortKey("value-quantity"),)) == [
        "obs-9.5", "obs-10"]


async def test_an_update_after_migration_5_keeps_the_rid_and_drops_the_old_rows(
        migrated: Migrated) -> None:
    store, db = migrated.store, migrated.connection
    before = await rid_of(db, "Patient", "young")
    [outcome] = await store.transact([WriteRequest("PUT", "Patient", id="young", resource=(
        patient("MRN-Y2", family="Young", birthDate="1990-05-01")))])
    assert isinstance(outcome, WriteOutcome) and outcome.status == 200
    assert await rid_of(db, "Patient", "young") == before
    assert await ids(store, "Patient", TokenMatch("identifier", MRN, "MRN-Y")) == []
    assert await ids(store, "Patient", TokenMatch("identifier", MRN, "MRN-Y2")) == ["young"]
    assert await db.fetchval("SELECT count(*) FROM fhir_token WHERE rid = $1", before) == 1


async def test_a_resource_created_after_migration_5_gets_a_fresh_rid_and_is_found(
        migrated: Migrated) -> None:
    store, db = migrated.store, migrated.connection
    highest = int(await db.fetchval("SELECT max(rid) FROM fhir_resource"))
    made = await create(store, patient("MRN-M", family="Miller", birthDate="1970-07-07"))
    assert await rid_of(db, "Patient", made.id) > highest
    assert await ids(store, "Patient", TokenMatch("identifier", MRN, "MRN-M")) == [made.id]
    assert await ids(store, "Patient", sort=(SortKey("family"),)) == [
        "baker", made.id, "young"]


# -- a copy of an embedded store ----------------------------------------------------------


async def test_a_resource_written_after_a_copy_gets_a_fresh_rid_and_is_found(
        tmp_path: Path) -> None:
    """`isthmus store copy` carries each resource's rid and its search rows as they are,
    and moves the identity past them: the next resource neither collides nor is lost."""
    embedded = await SqliteFhirStore.open(tmp_path / "fhir.db", index, synchronous="normal")
    try:
        copied: dict[str, StoredResource] = {}
        for mrn, family in (("MRN-1", "Young"), ("MRN-2", "Baker")):
            [outcome] = await embedded.transact([WriteRequest(
                "POST", "Patient", resource=patient(mrn, family=family))])
            assert isinstance(outcome, WriteOutcome) and outcome.stored is not None
            copied[mrn] = outcome.stored
    finally:
        await embedded.close()
    with closing(sqlite3.connect(tmp_path / "fhir.db")) as source:
        source_rids = dict(source.execute("SELECT id, rid FROM fhir_resource").fetchall())
    spec = await postgres.new_schema()
    connection = await connect(spec)
    pool = await open_pool(spec)
    try:
        await copy_sqlite(tmp_path, connection)
        store = await PgFhirStore.open(pool, index)
        for stored in copied.values():
            assert await rid_of(connection, "Patient", stored.id) == source_rids[stored.id]
        for mrn, stored in copied.items():
            assert await ids(store, "Patient", TokenMatch("identifier", MRN, mrn)) == [
                stored.id]
        highest = int(await connection.fetchval("SELECT max(rid) FROM fhir_resource"))
        made = await create(store, patient("MRN-3", family="Miller"))
        assert await rid_of(connection, "Patient", made.id) > highest
        assert await ids(store, "Patient", TokenMatch("identifier", MRN, "MRN-3")) == [
            made.id]
        assert await ids(store, "Patient", sort=(SortKey("family"),)) == [
            copied["MRN-2"].id, made.id, copied["MRN-1"].id]
        await store.close()
    finally:
        await pool.close()
        await connection.close()
        await postgres.drop_schema(spec)
