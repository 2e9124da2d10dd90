"""The embedded FHIR store's index rows name their resource by its integer rid: a new
resource's is the next number, and a store file from before rid (index rows named by
type and id) is moved to it when it is opened, in one transaction, finding afterwards
everything it found before."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path
from typing import Literal

from gateway.app.tables import search_registry
from gateway.config import load_settings
from gateway.fhir.search.index import normalize
from gateway.store.data_keys import KeySource, open_codec
from gateway.store.fhir import (
    IdMatch,
    SearchQuery,
    SortKey,
    StringMatch,
    TokenMatch,
    WriteRequest,
)
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.fhir_sqlite.schema import INDEX_TABLES, INDEX_VALUE_COLUMNS
from gateway.store.fhir_sqlite.sql import count_sql, select_sql
from gateway.store.seal_migration import seal_data_dir
from support.builders import IDENTIFIER_SYSTEM, patient

REGISTRY = search_registry(load_settings(None, environ={}))
PEOPLE = {"MRN-R1": ("Okafor", "1961-02-03"), "MRN-R2": ("Brandt", "1972-04-05"),
          "MRN-R3": ("Aalto", "1983-06-07")}


async def _open(path: Path) -> SqliteFhirStore:
    return await SqliteFhirStore.open(path, REGISTRY.index)


async def _write(store: SqliteFhirStore, mrn: str, family: str, born: str) -> str:
    done = await store.transact([WriteRequest(
        "PUT", "Patient", resource=patient(mrn, family=family, birthDate=born),
        condition=_by_mrn(mrn))])
    assert done[0].stored is not None
    return done[0].stored.id


async def _people_written(path: Path) -> dict[str, str]:
    """PEOPLE written to a store at `path` (then closed): MRN -> resource id."""
    store = await _open(path)
    try:
        return {mrn: await _write(store, mrn, family, born)
                for mrn, (family, born) in PEOPLE.items()}
    finally:
        await store.close()


def _by_mrn(mrn: str) -> SearchQuery:
    return SearchQuery("Patient", ((TokenMatch("identifier", IDENTIFIER_SYSTEM, mrn),),))


def _by_family(family: str, mode: Literal["start", "exact"] = "start") -> SearchQuery:
    value = normalize(family) if mode == "start" else family
    return SearchQuery("Patient", ((StringMatch("family", value, mode),),))


async def _found(store: SqliteFhirStore, query: SearchQuery) -> list[str]:
    return [r.id for r in (await store.search(query)).resources]


def _columns(path: Path, table: str) -> list[str]:
    with sqlite3.connect(path) as db:
        return [str(row[1]) for row in db.execute(f"PRAGMA table_info({table})")]


def _index_rows(path: Path) -> set[tuple[object, ...]]:
    """Every index row, its resource named by type and id, whichever layout the file has."""
    rows: set[tuple[object, ...]] = set()
    with sqlite3.connect(path) as db:
        by_rid = "rid" in _columns(path, "fhir_token")
        for table, values in INDEX_VALUE_COLUMNS.items():
            picked = ", ".join(f"x.{c.strip()}" for c in values.split(","))
            source = (f"{table} x JOIN fhir_resource r ON r.rid = x.rid" if by_rid
                      else f"{table} x JOIN fhir_resource r ON r.type = x.type AND r.id = x.id")
            rows |= {(table, *row) for row in db.execute(
                f"SELECT r.type, r.id, x.param, {picked} FROM {source}")}
    return rows


def _as_before_rid(path: Path) -> None:
    """Rewrite the store file at `path` in the layout of stores from before rid: resources
    keyed by (type, id) alone, index rows naming them by type and id, and the triggers that
    dropped a resource's old index rows by type and id."""
    script = ["BEGIN;"]
    script += [f"DROP TRIGGER {name};" for name in (
        "fhir_resource_event_insert", "fhir_resource_event_update",
        "fhir_resource_archive_insert", "fhir_resource_archive_update")]
    for table, values in INDEX_VALUE_COLUMNS.items():
        picked = ", ".join(f"x.{c.strip()}" for c in values.split(","))
        lookup = "code, system" if table == "fhir_token" else values.split(",")[0]
        script += [
            f"CREATE TABLE {table}_old (type TEXT NOT NULL, id TEXT NOT NULL, "
            f"param TEXT NOT NULL, {values});",
            f"INSERT INTO {table}_old SELECT r.type, r.id, x.param, {picked} "
            f"FROM {table} x JOIN fhir_resource r ON r.rid = x.rid;",
            f"DROP TABLE {table};",
            f"ALTER TABLE {table}_old RENAME TO {table};",
            f"CREATE INDEX {table}_lookup ON {table} (type, param, {lookup}, id);",
            f"CREATE INDEX {table}_resource ON {table} (type, id, param);"]
    script += [
        "CREATE TABLE fhir_resource_old (type TEXT NOT NULL, id TEXT NOT NULL, "
        "version INTEGER NOT NULL, last_updated TEXT NOT NULL, deleted INTEGER NOT NULL, "
        "body BLOB NOT NULL, PRIMARY KEY (type, id));",
        "INSERT INTO fhir_resource_old SELECT type, id, version, last_updated, deleted, body "
        "FROM fhir_resource ORDER BY rid;",
        "DROP TABLE fhir_resource;",
        "ALTER TABLE fhir_resource_old RENAME TO fhir_resource;",
        "CREATE INDEX fhir_resource_updated ON fhir_resource (type, last_updated);",
        "CREATE TRIGGER fhir_resource_archive_update AFTER UPDATE ON fhir_resource BEGIN "
        "INSERT INTO fhir_version (type, id, version, last_updated, deleted, body) VALUES "
        "(new.type, new.id, new.version, new.last_updated, new.deleted, new.body); "
        + " ".join(f"DELETE FROM {t} WHERE type = old.type AND id = old.id;"
                   for t in INDEX_TABLES) + " END;",
        "COMMIT;"]
    with sqlite3.connect(path, isolation_level=None) as db:
        db.executescript("\n".join(script))


async def test_a_new_resource_takes_the_next_rid_and_keeps_it_when_updated(
        tmp_path: Path) -> None:
    store = await _open(tmp_path / "fhir.db")
    try:
        ids = [await _write(store, mrn, family, born)
               for mrn, (family, born) in PEOPLE.items()]
        await _write(store, "MRN-R1", "Okafor-Lee", "1961-02-03")  # a new version
        assert await _found(store, _by_family("Okafor-Lee")) == [ids[0]]
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "fhir.db") as db:
        rids = dict(db.execute("SELECT id, rid FROM fhir_resource WHERE type = 'Patient'"))
        token_rids = {rid for (rid,) in db.execute("SELECT DISTINCT rid FROM fhir_token")}
    assert [rids[i] for i in ids] == sorted(rids[i] for i in ids)  # in the order written
    assert set(rids.values()) <= token_rids


async def test_a_store_from_before_rid_is_moved_and_finds_what_it_found(
        tmp_path: Path) -> None:
    path = tmp_path / "fhir.db"
    ids = await _people_written(path)
    written = _index_rows(path)
    _as_before_rid(path)
    assert "id" in _columns(path, "fhir_string") and "rid" not in _columns(path, "fhir_resource")
    assert _index_rows(path) == written

    store = await _open(path)
    try:
        assert "rid" in _columns(path, "fhir_string") and "id" not in _columns(path, "fhir_string")
        assert _index_rows(path) == written
        for mrn, (family, _) in PEOPLE.items():
            assert await _found(store, _by_mrn(mrn)) == [ids[mrn]]
            assert await _found(store, _by_family(family)) == [ids[mrn]]
            assert await _found(store, SearchQuery("Patient", ((IdMatch(ids[mrn]),),))) == [
                ids[mrn]]
        by_name = SearchQuery("Patient", sort=(SortKey("family"),))
        assert await _found(store, by_name) == [ids["MRN-R3"], ids["MRN-R2"], ids["MRN-R1"]]
        # A moved resource's new version drops its old index rows; a new one is found too.
        await _write(store, "MRN-R2", "Brandt-Ruiz", "1972-04-05")
        assert await _found(store, _by_family("Brandt-Ruiz")) == [ids["MRN-R2"]]
        assert await _found(store, _by_family("Brandt", "exact")) == []
        new_id = await _write(store, "MRN-R4", "Zeller", "1990-01-01")
        assert await _found(store, _by_family("Zeller")) == [new_id]
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        rids = dict(db.execute("SELECT id, rid FROM fhir_resource WHERE type = 'Patient'"))
    assert rids[new_id] > max(rids[i] for i in ids.values())


async def test_a_store_already_keyed_by_rid_is_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "fhir.db"
    for _ in range(2):
        store = await _open(path)
        try:
            await _write(store, "MRN-R1", "Okafor", "1961-02-03")
        finally:
            await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*), max(rid) FROM fhir_resource").fetchone() == (1, 1)


async def test_a_search_by_identifier_looks_its_rids_up_by_key(tmp_path: Path) -> None:
    """Every conditional update of an applied message runs one: it must read the few rids
    the token index gives, not every live Patient of the file (SQLite, without statistics,
    would rather take the (type, deleted, last_updated) index)."""
    path = tmp_path / "fhir.db"
    store = await _open(path)
    try:
        for n in range(30):
            await _write(store, f"MRN-P{n}", f"Family{n}", "1980-01-01")
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        for sql, params in (select_sql(_by_mrn("MRN-P7"), 2, 0), count_sql(_by_mrn("MRN-P7"))):
            plan = " / ".join(str(row[3]) for row in db.execute(
                f"EXPLAIN QUERY PLAN {sql}", params))
            assert "SEARCH r USING INTEGER PRIMARY KEY" in plan, plan
            assert "fhir_resource_updated" not in plan, plan


async def test_store_encrypt_on_a_store_from_before_rid_moves_it_and_finds_the_same(
        tmp_path: Path) -> None:
    """`isthmus store encrypt` opens the file itself, not through the store: it moves a
    file from before rid first, so the blind rows it writes name their resources by rid."""
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o700)
    path = data_dir / "fhir.db"
    ids = await _people_written(path)
    _as_before_rid(path)
    source = KeySource(default_file=data_dir / "keys" / "store-data.keys",
                       keys_text="k1 " + base64.b64encode(b"1" * 32).decode())
    seal_data_dir(data_dir, data_dir / "inbox.db", path, source, REGISTRY.string_groups())
    assert "rid" in _columns(path, "fhir_string")
    codec = open_codec(data_dir, source, enabled=True, databases=[path])
    assert codec.sealed
    store = await SqliteFhirStore.open(path, REGISTRY.index, codec=codec,
                                       string_groups=REGISTRY.string_groups())
    try:
        for mrn, (family, _) in PEOPLE.items():
            assert await _found(store, _by_mrn(mrn)) == [ids[mrn]]
            assert await _found(store, _by_family(family)) == [ids[mrn]]
        await _write(store, "MRN-R1", "Okafor-Lee", "1961-02-03")  # the triggers are back
        assert await _found(store, _by_family("Okafor-Lee")) == [ids["MRN-R1"]]
        assert await _found(store, _by_family("Okafor", "exact")) == []
    finally:
        await store.close()
