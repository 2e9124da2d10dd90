"""The embedded FHIR store's index rows, versions and change events name their resource
by its integer rid: a new resource's is the next number, and a store file from before rid
(index rows named by type and id), or from before its versions and events were (named by
type, id and version), is moved to it when it is opened, in one transaction each, finding
and reading afterwards everything it found and read before."""

from __future__ import annotations

import base64
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from gateway.app.tables import search_registry
from gateway.config import load_settings
from gateway.fhir.search.index import normalize
from gateway.store.data_keys import KeySource, open_codec
from gateway.store.events import ChangeEvent, SqliteEventLog, _bodies_sql
from gateway.store.fhir import (
    HistoryQuery,
    IdMatch,
    SearchPage,
    SearchQuery,
    SortKey,
    StoredResource,
    StringMatch,
    TokenMatch,
    WriteRequest,
)
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.fhir_sqlite.schema import INDEX_TABLES, INDEX_VALUE_COLUMNS
from gateway.store.fhir_sqlite.sql import VREAD_SQL, count_sql, history_sql, select_sql
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
    keyed by (type, id) alone, index rows, versions and events naming them by type and id,
    and the triggers that dropped a resource's old index rows by type and id."""
    _as_before_history_rid(path)
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


def _as_before_history_rid(path: Path) -> None:
    """Rewrite the store file at `path` in the layout of stores whose versions and change
    events named their resource by (type, id) alone, UNIQUE (type, id, version), with the
    triggers that wrote them so; the events' AUTOINCREMENT high-water mark kept."""
    with sqlite3.connect(path, isolation_level=None) as db:
        triggers = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
                              "AND tbl_name = 'fhir_resource'").fetchall()
        high = db.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'fhir_event'").fetchall()
        script = ["BEGIN;"] + [f"DROP TRIGGER {name};" for name, _ in triggers] + [
            "CREATE TABLE fhir_version_old (seq INTEGER PRIMARY KEY, type TEXT NOT NULL, "
            "id TEXT NOT NULL, version INTEGER NOT NULL, last_updated TEXT NOT NULL, "
            "deleted INTEGER NOT NULL, body BLOB NOT NULL, UNIQUE (type, id, version));",
            "INSERT INTO fhir_version_old SELECT seq, type, id, version, last_updated, "
            "deleted, body FROM fhir_version ORDER BY seq;",
            "DROP TABLE fhir_version;",
            "ALTER TABLE fhir_version_old RENAME TO fhir_version;",
            "CREATE INDEX fhir_version_updated ON fhir_version (last_updated);",
            "CREATE INDEX fhir_version_type_updated ON fhir_version (type, last_updated);",
            "CREATE TABLE fhir_event_old (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, "
            "action TEXT NOT NULL, at TEXT NOT NULL, UNIQUE (type, id, version));",
            "INSERT INTO fhir_event_old SELECT seq, type, id, version, action, at "
            "FROM fhir_event ORDER BY seq;",
            "DROP TABLE fhir_event;",
            "ALTER TABLE fhir_event_old RENAME TO fhir_event;"]
        if high:
            script += ["DELETE FROM sqlite_sequence WHERE name = 'fhir_event';",
                       f"INSERT INTO sqlite_sequence (name, seq) VALUES ('fhir_event', "
                       f"{int(high[0][0])});"]
        script += [str(sql).replace("(rid, type,", "(type,").replace(
            "(new.rid, new.type,", "(new.type,") + ";" for _, sql in triggers]
        script.append("COMMIT;")
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
        first = await store.vread("Patient", ids["MRN-R1"], 1)  # sealed by the migration
        assert first is not None and b'"Okafor"' in first.body
        history = await store.history(HistoryQuery("Patient", ids["MRN-R1"]))
        assert [r.version for r in history.resources] == [2, 1]
        log = await SqliteEventLog.open(path, codec)
        try:
            events = await log.with_bodies(await log.after(0, 10))
        finally:
            await log.close()
        assert [(e.id, e.version) for e in events][-1] == (ids["MRN-R1"], 2)
        assert [e.body for e in events][0] == first.body
    finally:
        await store.close()
    _assert_history_named_by_rid(path)


# -- versions and change events ------------------------------------------------------------


async def _history_written(path: Path) -> dict[str, str]:
    """PEOPLE written to a store at `path` (then closed), with history: MRN-R1 renamed then
    deleted, MRN-R3 renamed. MRN -> resource id."""
    ids = await _people_written(path)
    store = await _open(path)
    try:
        await _write(store, "MRN-R1", "Okafor-Lee", "1961-02-03")
        await store.transact([WriteRequest("DELETE", "Patient", ids["MRN-R1"])])
        await _write(store, "MRN-R3", "Aalto-Berg", "1983-06-07")
    finally:
        await store.close()
    return ids


@dataclass(frozen=True)
class HistoryRead:
    """What a store reads of its history."""

    versions: dict[tuple[str, int], StoredResource | None]
    histories: list[SearchPage]
    events: list[ChangeEvent]


async def _history_read(path: Path, ids: dict[str, str]) -> HistoryRead:
    """Every version by vread (and one past the last), each instance's history (one also
    since an instant), the type's and the system's, and the change events with bodies."""
    store = await _open(path)
    log = await SqliteEventLog.open(path)
    try:
        versions: dict[tuple[str, int], StoredResource | None] = {}
        for id_ in ids.values():
            current = await store.read("Patient", id_)
            assert current is not None
            for version in range(1, current.version + 2):
                versions[(id_, version)] = await store.vread("Patient", id_, version)
        renamed = versions[(ids["MRN-R3"], 2)]
        assert renamed is not None
        queries = [HistoryQuery("Patient", id_) for id_ in ids.values()] + [
            HistoryQuery("Patient", ids["MRN-R3"], since=renamed.last_updated),
            HistoryQuery("Patient", count=2, offset=1), HistoryQuery("Patient"),
            HistoryQuery(), HistoryQuery("Patient", "never-written")]
        histories = [await store.history(query) for query in queries]
        events = await log.with_bodies(await log.after(0, 100))
    finally:
        await log.close()
        await store.close()
    return HistoryRead(versions, histories, events)


def _assert_history_named_by_rid(path: Path) -> None:
    """Every version and event names by its rid the resource its type and id name, and the
    tables' keys are (rid, version) with no index on the uuid."""
    with sqlite3.connect(path) as db:
        for table in ("fhir_version", "fhir_event"):
            assert not db.execute(
                f"SELECT count(*) FROM {table} x LEFT JOIN fhir_resource r ON r.rid = x.rid "
                "WHERE r.rid IS NULL OR r.type <> x.type OR r.id <> x.id").fetchone()[0]
            indexes = [(str(name), bool(unique)) for _, name, unique, *_ in db.execute(
                f"PRAGMA index_list({table})")]
            keys = {name: [str(c[2]) for c in db.execute(f"PRAGMA index_info('{name}')")]
                    for name, _ in indexes}
            assert [keys[name] for name, unique in indexes if unique] == [["rid", "version"]]
            assert not any("id" in columns for columns in keys.values()), keys


async def test_versions_and_events_name_their_resource_by_rid(tmp_path: Path) -> None:
    path = tmp_path / "fhir.db"
    ids = await _history_written(path)
    _assert_history_named_by_rid(path)
    read = await _history_read(path, ids)
    assert [(e.id, e.version, e.action) for e in read.events] == [
        (ids["MRN-R1"], 1, "created"), (ids["MRN-R2"], 1, "created"),
        (ids["MRN-R3"], 1, "created"), (ids["MRN-R1"], 2, "updated"),
        (ids["MRN-R1"], 3, "deleted"), (ids["MRN-R3"], 2, "updated")]
    # A deletion's event carries the body of the version it deleted.
    okafor_lee = read.versions[(ids["MRN-R1"], 2)]
    assert okafor_lee is not None and read.events[4].body == okafor_lee.body
    assert [r.version for r in read.histories[0].resources] == [3, 2, 1]
    with sqlite3.connect(path) as db, pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO fhir_version (rid, type, id, version, last_updated, deleted, "
                   "body) SELECT rid, type, 'another', version, last_updated, deleted, body "
                   "FROM fhir_version LIMIT 1")


async def test_a_store_with_history_named_by_id_is_moved_and_reads_what_it_read(
        tmp_path: Path) -> None:
    path = tmp_path / "fhir.db"
    ids = await _history_written(path)
    before = await _history_read(path, ids)
    # The newest event purged (the pump handled it): its seq must not be drawn again.
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM fhir_event WHERE seq = (SELECT max(seq) FROM fhir_event)")
    purged = before.events[-1].seq
    _as_before_history_rid(path)
    assert "rid" not in _columns(path, "fhir_version") + _columns(path, "fhir_event")

    after = await _history_read(path, ids)
    assert "rid" in _columns(path, "fhir_version") and "rid" in _columns(path, "fhir_event")
    _assert_history_named_by_rid(path)
    assert after.versions == before.versions
    assert after.histories == before.histories
    assert after.events == before.events[:-1]
    store = await _open(path)
    log = await SqliteEventLog.open(path)
    try:  # the triggers write rids again: a new version, its event after the purged one
        await _write(store, "MRN-R2", "Brandt-Ruiz", "1972-04-05")
        [event] = await log.with_bodies(await log.after(purged - 1, 10))
        renamed = await store.vread("Patient", ids["MRN-R2"], 2)
        assert renamed is not None and event.seq == purged + 1 and event.body == renamed.body
        assert await store.vread("Patient", ids["MRN-R2"], 1) == before.versions[
            (ids["MRN-R2"], 1)]
    finally:
        await log.close()
        await store.close()
    _assert_history_named_by_rid(path)


async def test_a_version_without_its_resource_stops_the_move_and_leaves_the_file(
        tmp_path: Path) -> None:
    """No statement deletes a current row; a version without one (a damaged file) has no
    rid to take: the move fails as a whole rather than drop it from the history."""
    path = tmp_path / "fhir.db"
    await _history_written(path)
    _as_before_history_rid(path)
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO fhir_version (type, id, version, last_updated, deleted, body) "
                   "VALUES ('Patient', 'never-current', 1, '2026-01-01T00:00:00.000000Z', "
                   "0, x'7b7d')")
    with pytest.raises(sqlite3.IntegrityError):
        await _open(path)
    assert "rid" not in _columns(path, "fhir_version") + _columns(path, "fhir_event")
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM fhir_version").fetchone()[0] == 7
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'trigger'"
                          ).fetchone()[0] == 4

async def test_a_version_history_and_event_bodies_are_read_by_key(tmp_path: Path) -> None:
    """vread, instance history and the pump's bodies look the version table up by (rid,
    version), the resource's rid by (type, id): no scan of the versions."""
    path = tmp_path / "fhir.db"
    ids = await _history_written(path)
    instance = HistoryQuery("Patient", ids["MRN-R1"], since="2000-01-01T00:00:00.000000Z")
    statements = [(VREAD_SQL, ["Patient", ids["MRN-R1"], 2]), *history_sql(instance),
                  (_bodies_sql(2), [1, 1, 2, 1])]
    with sqlite3.connect(path) as db:
        for sql, params in statements:
            plan = " / ".join(str(row[3]) for row in db.execute(
                f"EXPLAIN QUERY PLAN {sql}", params))
            assert "USING INDEX sqlite_autoindex_fhir_version_1 (rid=?" in plan or (
                "USING COVERING INDEX sqlite_autoindex_fhir_version_1 (rid=?" in plan), plan
            assert "SCAN fhir_version" not in plan and "SCAN v" not in plan, plan
        type_plan = " / ".join(str(row[3]) for row in db.execute(
            f"EXPLAIN QUERY PLAN {history_sql(HistoryQuery('Patient'))[0][0]}",
            history_sql(HistoryQuery("Patient"))[0][1]))
        assert "fhir_version_type_updated" in type_plan, type_plan
