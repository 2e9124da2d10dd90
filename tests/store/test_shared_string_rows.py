"""A sealed store's string rows shared within a group of parameters (blinding.index_rows):
a value `family` and `name` both hold is one set of rows labelled "family name". Every
string search must find on it what it finds in clear, on rows written before labels (one
set per parameter) too, and the Patient of an ADT^A01 must take fewer rows."""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from gateway.app.tables import search_registry
from gateway.config import load_settings
from gateway.fhir.search import TABLE as SEARCH_TABLE
from gateway.fhir.search import SearchRegistry
from gateway.fhir.search.index import normalize
from gateway.mapping.tables import SHIPPED
from gateway.store.data_keys import KeySource, open_codec, parse_keys
from gateway.store.fhir import (
    Match,
    MissingMatch,
    SearchQuery,
    SortKey,
    StringIndex,
    StringMatch,
    WriteRequest,
)
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.fhir_sqlite.blinding import (
    PREFIX_ROWS,
    StringLabels,
    blind_query,
    index_rows,
)
from gateway.store.fhir_sqlite.schema import INDEX_INSERTS, RID_OF, SCHEMA
from gateway.store.fhir_sqlite.sql import select_sql
from gateway.store.seal_migration import seal_data_dir
from gateway.store.sealing import PLAIN, RowCodec, SealedCodec, fhir_context
from support.builders import patient

KEY = "k1 " + base64.b64encode(b"1" * 32).decode()
REGISTRY = search_registry(load_settings(None, environ={}))
STRING_PARAMS = ("name", "family", "given", "address", "address-city", "address-state",
                 "address-postalcode", "address-country")


def _sealed() -> SealedCodec:
    return SealedCodec(parse_keys(KEY, "test"), "k1")


# Parts that repeat across parameters: a family that is also a given name, a city that is
# also a line or a state, values shorter and longer than PREFIX_ROWS, the same text in
# another case (:exact tells them apart).
PATIENTS: dict[str, dict[str, Any]] = {
    "A": patient("MRNA", family="Smithson", given=["Ann", "Smithson"],
                 address=[{"line": ["12 Springfield Rd"], "city": "Springfield",
                           "state": "IL", "postalCode": "62704", "country": "US"}]),
    "B": patient("MRNB", family="Smith", given=["Springfield"],
                 address=[{"line": ["Main St", "Smithville"], "city": "Smithville",
                           "postalCode": "6270", "country": "USA", "state": "Il"}]),
    "C": patient("MRNC", family="Sm", given=["An"]),
    "D": patient("MRND", name=[{"text": "Dr Ann Smithsonian", "family": "Smithsonian"}],
                 address=[{"city": "Springfield", "state": "Springfield"}]),
    "E": patient("MRNE", address=[{"country": "US", "text": "US"}]),
    "F": patient("MRNF"),
}
STARTS = ("s", "sm", "smi", "smith", "smithso", "smithson", "smithsoni", "smithsonian",
          "smithsonianz", "spring", "springfi", "springfield", "springfield r", "12",
          "12 springfield", "6", "6270", "62704", "i", "il", "u", "us", "usa", "a", "an",
          "ann", "dr ann", "main", "main st", "x")
EXACTS = ("Smithson", "smithson", "Smith", "Springfield", "IL", "Il", "US", "Ann", "An",
          "12 Springfield Rd", "Smithville", "Dr Ann Smithsonian", "6270")


def _queries() -> list[SearchQuery]:
    queries: list[SearchQuery] = []
    for param in STRING_PARAMS:
        queries += [SearchQuery("Patient", ((StringMatch(param, v),),)) for v in STARTS]
        queries += [SearchQuery("Patient", ((_exact(param, v),),)) for v in EXACTS]
        queries += [SearchQuery("Patient", ((MissingMatch(param, m),),)) for m in (True, False)]
    # OR across parameters of one group and of two; AND of a long value and a short one.
    ors: list[tuple[Match, ...]] = [
        (StringMatch("family", "smith"), StringMatch("given", "spring")),
        (StringMatch("family", "springfield"), StringMatch("address-city", "smithv")),
        (_exact("given", "smithson"), MissingMatch("address-state", True)),
    ]
    queries += [SearchQuery("Patient", (clause,)) for clause in ors]
    queries.append(SearchQuery("Patient", ((StringMatch("name", "smithsonian"),),
                                           (StringMatch("address-state", "spr"),))))
    queries.append(SearchQuery("Patient", ((StringMatch("family", "smithso"),),
                                           (StringMatch("given", "ann"),))))
    return queries


def _exact(param: str, value: str) -> StringMatch:
    """`param:exact=value` as the search parser makes it (with its lookup key)."""
    return StringMatch(param, value, "exact", (normalize(value),))


def _old_layout(resource_type: str, id_: str, entries: Iterable[StringIndex],
                sealed: SealedCodec) -> list[tuple[object, ...]]:
    """The string rows as sealed stores wrote them before labels: a set per parameter,
    a prefix row skipped where another value of the same parameter gave it."""
    strings = []
    for entry in entries:
        prefixes = sealed.blind_prefixes(entry.normalized, "prefix", PREFIX_ROWS)
        strings.append((entry.param, prefixes, sealed.blind(entry.exact, "exact")))
    rows: list[tuple[object, ...]] = []
    held = {(param, prefixes[-1]) for param, prefixes, _ in strings}
    for param, prefixes, exact in strings:
        rows.append((resource_type, id_, param, prefixes[-1], exact))
        for prefix in prefixes[:-1]:
            if (param, prefix) not in held:
                held.add((param, prefix))
                rows.append((resource_type, id_, param, prefix, ""))
    return rows


def _rewrite_old(path: Path, sealed: SealedCodec, letters: Iterable[str],
                 letter_of: dict[str, str]) -> None:
    """The string rows of the resources of `letters` rewritten in the old layout."""
    with sqlite3.connect(path) as db:
        for resource_type, id_, version, body in db.execute(
                "SELECT type, id, version, body FROM fhir_resource").fetchall():
            if letter_of[id_] not in letters:
                continue
            document = json.loads(sealed.open(bytes(body),
                                              fhir_context(resource_type, id_, version)))
            entries = [e for e in REGISTRY.index(resource_type, document)
                       if isinstance(e, StringIndex)]
            db.execute(f"DELETE FROM fhir_string WHERE rid = {RID_OF}", (resource_type, id_))
            db.executemany(INDEX_INSERTS[StringIndex],
                           _old_layout(resource_type, id_, entries, sealed))


async def _open(path: Path, codec: RowCodec, registry: SearchRegistry = REGISTRY
                ) -> SqliteFhirStore:
    return await SqliteFhirStore.open(path, registry.index, codec=codec,
                                      string_groups=registry.string_groups())


async def _answers(path: Path, codec: RowCodec, letter_of: dict[str, str],
                   registry: SearchRegistry = REGISTRY,
                   queries: Iterable[SearchQuery] | None = None) -> list[tuple[str, int]]:
    store = await _open(path, codec, registry)
    try:
        out = []
        for query in _queries() if queries is None else queries:
            page = await store.search(query, total=True)
            found = "".join(sorted(letter_of[r.id] for r in page.resources))
            assert page.total == len(found) == await store.count(query), query
            out.append((found, len(found)))
        return out
    finally:
        await store.close()


async def _sorted(path: Path, codec: RowCodec, letter_of: dict[str, str]) -> list[str]:
    store = await _open(path, codec)
    try:
        out = []
        for param in STRING_PARAMS:
            for descending in (False, True):
                page = await store.search(SearchQuery(
                    "Patient", (), (SortKey(param, descending), SortKey("_id"))))
                out.append("".join(letter_of[r.id] for r in page.resources))
        return out
    finally:
        await store.close()


async def _filled(path: Path, codec: RowCodec) -> dict[str, str]:
    """The patients written; id -> letter."""
    store = await _open(path, codec)
    try:
        letter_of = {}
        for letter, resource in PATIENTS.items():
            id_ = f"p-{letter.lower()}"  # the same in every store: ties sort alike
            done = await store.transact([WriteRequest("PUT", "Patient", id=id_,
                                                      resource={**resource, "id": id_})])
            assert done[0].stored is not None
            letter_of[done[0].stored.id] = letter
        return letter_of
    finally:
        await store.close()


@pytest.mark.parametrize("layout", ["shared", "old", "half old"])
async def test_every_string_search_finds_on_a_sealed_store_what_it_finds_in_clear(
        tmp_path: Path, layout: str) -> None:
    plain_letters = await _filled(tmp_path / "plain.db", PLAIN)
    expected = await _answers(tmp_path / "plain.db", PLAIN, plain_letters)
    # The searches find something: not all empty, not all everything.
    assert {found for found, _ in expected} >= {"", "A", "AB", "ABCD", "ABDE"}
    sealed = _sealed()
    letters = await _filled(tmp_path / "sealed.db", sealed)
    if layout != "shared":
        _rewrite_old(tmp_path / "sealed.db", sealed, "ABCDEF" if layout == "old" else "ACE",
                     letters)
    assert await _answers(tmp_path / "sealed.db", sealed, letters) == expected
    # A sort by a string parameter orders by blind values: the same order either layout.
    if layout == "half old":
        shared = tmp_path / "shared.db"
        shared_letters = await _filled(shared, sealed)
        assert await _sorted(tmp_path / "sealed.db", sealed, letters) == await _sorted(
            shared, sealed, shared_letters)


def _string_rows(resource: dict[str, Any], codec: RowCodec,
                 labels: StringLabels) -> list[tuple[object, ...]]:
    return index_rows("Patient", "p1", REGISTRY.index("Patient", resource), codec,
                      labels).get(StringIndex, [])


def test_a_value_several_parameters_hold_is_written_once_under_all_their_names() -> None:
    # The family is also a given name, the city also a line; "qz" is a prefix of "qzxab".
    resource = patient("MRN1", family="Qzxab", given=["Wqv", "Qzxab", "Qz"],
                       address=[{"line": ["Main"], "city": "Main", "postalCode": "12345",
                                 "country": "NZ"}])
    sealed = _sealed()
    rows = _string_rows(resource, sealed, StringLabels(REGISTRY.string_groups()))
    # name group: qzxab 5 (its "qz" once more, for family alone: name and given have the
    # value "qz"), qz 1 (its "q" is qzxab's), wqv 3; address group: main 4, 12345 5, nz 2.
    assert len(rows) == 20
    assert sorted(str(r[2]) for r in rows) == sorted(
        ["family given name"] * 4 + ["family"] + ["given name"] * 4
        + ["address address-city"] * 4 + ["address address-postalcode"] * 5
        + ["address address-country"] * 2)
    entries = [e for e in REGISTRY.index("Patient", resource) if isinstance(e, StringIndex)]
    assert len(_old_layout("Patient", "p1", entries, sealed)) == 43  # as written before
    # Without groups (a plain store has none to use): one set per parameter, as before.
    assert len(_string_rows(resource, sealed, StringLabels({}))) == 43
    assert len(_string_rows(resource, PLAIN, StringLabels(REGISTRY.string_groups()))) == len(
        entries)


def test_the_patient_of_an_adt_a01_takes_43_string_rows_not_80() -> None:
    # As bench/apply_lag.py's ADT^A01 names it.
    resource = patient("MRN1", family="FAMILYG0", given=["Given", "Middle"],
                       address=[{"line": ["1 Example Street"], "city": "Springfield",
                                 "state": "ST", "postalCode": "12345", "country": "USA"}])
    sealed = _sealed()
    rows = _string_rows(resource, sealed, StringLabels(REGISTRY.string_groups()))
    # familyg0 8, given 5, middle 6; the line 7 (its "1" is the postal code's), springfield
    # 8 (its "s" named for the state's "st" too), st 1, 12345 5, usa 3.
    assert len(rows) == 43
    assert ("Patient", "p1", "address address-city address-state",
            sealed.blind("s", "prefix"), "") in rows
    assert len(_string_rows(resource, sealed, StringLabels({}))) == 80


def test_the_string_groups_come_from_the_paths_of_the_table() -> None:
    groups = {t: sorted(sorted(g) for g in gs) for t, gs in REGISTRY.string_groups().items()}
    assert groups["Patient"] == [
        ["address", "address-city", "address-country", "address-postalcode",
         "address-state"],
        ["family", "given", "name"]]
    assert groups["Location"] == [["address", "address-city", "address-postalcode"]]
    assert "Organization" not in groups  # `name` alone: no group of one


def test_a_table_of_its_own_groups_by_paths_not_names(tmp_path: Path) -> None:
    table = tmp_path / "search-parameters.csv"
    table.write_text(
        "resource,name,type,path,targets,compartment\n"
        "Patient,person,string,name,,\n"
        "Patient,surname,string,name.family,,\n"
        "Patient,place,string,address|name.text,,\n"  # not wholly under `name`
        "Patient,town,string,address.city,,\n"
        "Patient,family,token,name.family,,\n", encoding="utf-8")
    groups = SearchRegistry.load(table).string_groups()["Patient"]
    assert sorted(sorted(g) for g in groups) == [["person", "surname"], ["place", "town"]]


def test_a_search_for_one_parameter_matches_every_label_of_its_group_holding_it() -> None:
    labels = StringLabels(REGISTRY.string_groups())
    assert sorted(labels.labels("Patient", "family")) == [
        "family", "family given", "family given name", "family name"]
    assert len(labels.labels("Patient", "address-city")) == 16
    assert all("address-city" in label.split(" ")
               for label in labels.labels("Patient", "address-city"))
    assert labels.labels("Organization", "name") == ("name",)
    assert labels.labels("Patient", "identifier") == ("identifier",)


@pytest.mark.parametrize("match", [StringMatch("family", "smith"),
                                   StringMatch("address-city", "springfield"),
                                   _exact("given", "Ann"), _exact("family", "Smithsonian")])
def test_a_labelled_string_search_is_driven_from_the_lookup_index(match: Match) -> None:
    blinded = blind_query(SearchQuery("Patient", ((match,),)), _sealed(),
                          StringLabels(REGISTRY.string_groups()))
    sql, params = select_sql(blinded.query, 10, 0, labels=blinded.labels)
    assert "param IN (" in sql
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(SCHEMA)
        plan = " | ".join(str(row[3]) for row in db.execute("EXPLAIN QUERY PLAN " + sql,
                                                             params))
    finally:
        db.close()
    # An IN list on param is one index search per label, as param = ? was one.
    if isinstance(match, StringMatch) and match.mode == "start":
        assert ("USING COVERING INDEX fhir_string_lookup (type=? AND param=? AND "
                "normalized>? AND normalized<?)") in plan, plan
    else:  # :exact goes to its value's rows in the index, not every row of the parameter
        assert "USING INDEX fhir_string_lookup (type=? AND param=? AND normalized=?)" in plan, \
            plan
    assert "SCAN fhir_string" not in plan, plan


async def test_a_sealed_store_is_not_opened_without_its_string_groups(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="string groups"):
        await SqliteFhirStore.open(tmp_path / "fhir.db", REGISTRY.index, codec=_sealed())


async def test_store_encrypt_writes_the_shared_rows_and_finds_what_it_found_in_clear(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o700)
    letters = await _filled(data_dir / "fhir.db", PLAIN)
    expected = await _answers(data_dir / "fhir.db", PLAIN, letters)
    source = KeySource(default_file=data_dir / "keys" / "store-data.keys", keys_text=KEY)
    counts, _ = seal_data_dir(data_dir, data_dir / "inbox.db", data_dir / "fhir.db", source,
                              REGISTRY.string_groups())
    codec = open_codec(data_dir, source, enabled=True, databases=[data_dir / "fhir.db"])
    assert codec.sealed
    assert await _answers(data_dir / "fhir.db", codec, letters) == expected
    with sqlite3.connect(data_dir / "fhir.db") as db:
        labels = {str(p) for (p,) in db.execute("SELECT DISTINCT param FROM fhir_string")}
        strings = db.execute("SELECT count(*) FROM fhir_string").fetchall()[0][0]
        tokens = db.execute("SELECT count(*) FROM fhir_token").fetchall()[0][0]
    assert "family given name" in labels and "address address-city" in labels
    with sqlite3.connect(data_dir / "fhir.db") as db:
        recorded = {str(label) for (label,) in db.execute(
            "SELECT label FROM fhir_string_label WHERE type = 'Patient'")}
    assert recorded == {label for label in labels if " " in label}
    assert counts.index_rows == strings + tokens
    # As many rows as the store itself writes for the same patients.
    written = sum(len(_string_rows(resource, codec, StringLabels(REGISTRY.string_groups())))
                  for resource in PATIENTS.values())
    assert strings == written


async def test_rows_shared_under_a_larger_group_are_found_after_the_table_drops_a_member(
        tmp_path: Path) -> None:
    # Written while `given` and `address-state` were in the groups: "family given name",
    # "address address-city address-state" (the labels are recorded with the rows).
    sealed = _sealed()
    letters = await _filled(tmp_path / "sealed.db", sealed)
    dropped = ("given", "address-state")
    kept = [query for query in _queries()
            if all(m.param not in dropped for clause in query.clauses for m in clause)]
    expected = await _answers(tmp_path / "sealed.db", sealed, letters, queries=kept)
    assert {found for found, _ in expected} >= {"A", "AB", "ABD"}
    # A site's table without them: their rows must still answer `family`, `name`, ...
    shipped = SHIPPED / SEARCH_TABLE
    table = tmp_path / "search-parameters.csv"
    table.write_text("".join(
        line for line in shipped.read_text(encoding="utf-8").splitlines(keepends=True)
        if not line.startswith(tuple(f"Patient,{param}," for param in dropped))),
        encoding="utf-8")
    smaller = SearchRegistry.load(table)
    assert sorted(sorted(g) for g in smaller.string_groups()["Patient"]) == [
        ["address", "address-city", "address-country", "address-postalcode"],
        ["family", "name"]]
    assert await _answers(tmp_path / "sealed.db", sealed, letters, smaller, kept) == expected


async def test_exact_finds_rows_of_the_first_sealed_layout_the_whole_value_blinded(
        tmp_path: Path) -> None:
    """Stores sealed before prefix rows stopped at PREFIX_ROWS carry a long value's :exact
    blind on the blind of the whole value: :exact still finds it through the index."""
    sealed = _sealed()
    letters = await _filled(tmp_path / "sealed.db", sealed)
    id_ = next(id_ for id_, letter in letters.items() if letter == "D")
    with sqlite3.connect(tmp_path / "sealed.db") as db:
        db.execute(f"DELETE FROM fhir_string WHERE rid = {RID_OF}", ("Patient", id_))
        db.execute(INDEX_INSERTS[StringIndex],
                   ("Patient", id_, "family", sealed.blind("smithsonian", "prefix"),
                    sealed.blind("Smithsonian", "exact")))
    found = await _answers(tmp_path / "sealed.db", sealed, letters, queries=[
        SearchQuery("Patient", ((_exact("family", "Smithsonian"),),)),
        SearchQuery("Patient", ((_exact("family", "smithsonian"),),))])
    assert found == [("D", 1), ("", 0)]
