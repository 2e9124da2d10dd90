"""Merges in the FHIR store, on a real SQLite file and on PostgreSQL: the record merged
away stays, linked; references and identifiers move in one transaction; numbers keep
their digits; a survivor that does not exist fails the whole call."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from test_fhir_store import MRN, body, index, patient, write

from gateway.store.fhir import (
    IdMatch,
    IndexEntry,
    Merge,
    QuantityIndex,
    SearchQuery,
    TokenMatch,
    WriteConflict,
    WriteRequest,
)
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.pg.connect import open_pool
from gateway.store.pg.fhir import PgFhirStore
from support import builders, postgres

AnyStore = SqliteFhirStore | PgFhirStore


def indexer(resource_type: str, resource: dict[str, Any]) -> Sequence[IndexEntry]:
    """The store suite's indexer, taking FHIR decimals as the real one does."""
    return [replace(row, value=float(row.value)) if isinstance(row, QuantityIndex) else row
            for row in index(resource_type, resource)]


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AnyStore]:
    if request.param == "sqlite":
        opened: AnyStore = await SqliteFhirStore.open(tmp_path / "fhir.db", indexer,
                                                      synchronous="normal")
        yield opened
        await opened.close()
        return
    spec = await postgres.new_schema()
    pool = await open_pool(spec)
    try:
        opened = await PgFhirStore.open(pool, indexer)
        yield opened
        await opened.close()
    finally:
        await pool.close()
        await postgres.drop_schema(spec)


async def create(store: AnyStore, resource_type: str, resource: dict[str, Any]) -> str:
    stored = (await write(store, WriteRequest("POST", resource_type,
                                              resource=resource))).stored
    assert stored is not None
    return stored.id


def by_id(id_: str) -> SearchQuery:
    return SearchQuery("Patient", ((IdMatch(id_),),))


async def test_a_merge_moves_references_and_identifiers_keeping_decimals(
        store: AnyStore) -> None:
    old = await create(store, "Patient", patient("M-1"))
    new = await create(store, "Patient", patient("M-2"))
    reading = builders.observation(f"Patient/{old}", quantity=(Decimal("1.50"), "mg"))
    observed = await create(store, "Observation", reading)

    outcome = await store.merge(Merge("Patient", by_id(old), new))
    assert outcome.merged == (f"Patient/{old}",) and outcome.moved == 1

    moved = await store.read("Observation", observed)
    assert moved is not None and moved.version == 2
    assert b'"value":1.50' in moved.body  # the digits as written, not 1.5
    assert body(moved)["subject"] == {"reference": f"Patient/{new}"}
    gone = body(await store.read("Patient", old))
    assert gone["active"] is False and "identifier" not in gone
    assert gone["link"] == [{"other": {"reference": f"Patient/{new}"},
                             "type": "replaced-by"}]
    kept = body(await store.read("Patient", new))
    assert {"system": MRN, "value": "M-1", "use": "old"} in kept["identifier"]
    assert kept["link"] == [{"other": {"reference": f"Patient/{old}"}, "type": "replaces"}]
    found = await store.search(SearchQuery("Patient", ((TokenMatch("identifier", MRN, "M-1"),),)))
    assert [r.id for r in found.resources] == [new]


async def test_retired_identifiers_are_dropped(store: AnyStore) -> None:
    wrong = await create(store, "Patient", patient("WRONG-1"))
    right = await create(store, "Patient", patient("RIGHT-1"))
    await store.merge(Merge("Patient", by_id(wrong), right, retired=((MRN, "WRONG-1"),)))
    kept = body(await store.read("Patient", right))
    assert [i["value"] for i in kept["identifier"]] == ["RIGHT-1"]


async def test_a_merge_into_a_record_that_does_not_exist_changes_nothing(
        store: AnyStore) -> None:
    old = await create(store, "Patient", patient("M-1"))
    with pytest.raises(WriteConflict) as refused:
        await store.transact([WriteRequest("PUT", "Patient", old, patient("M-1", gender="male"))],
                             merges=[Merge("Patient", by_id(old), "nobody")])
    assert refused.value.status == 404
    unchanged = await store.read("Patient", old)
    assert unchanged is not None and unchanged.version == 1


async def test_merges_run_only_with_atomic_writes(store: AnyStore) -> None:
    with pytest.raises(ValueError, match="atomic"):
        await store.transact([], atomic=False, merges=[Merge("Patient", by_id("a"), "b")])


async def test_an_account_merge_marks_the_prior_account_inactive_without_links(
        store: SqliteFhirStore) -> None:
    """R4 Account has no `link` or `active` (ADT^A41): the record merged away says it by
    `status`, and the survivor gets the identifier, no `replaces` link."""
    def account(number: str) -> dict[str, Any]:
        return {"resourceType": "Account", "status": "active",
                "identifier": [{"system": MRN, "value": number}], "name": f"visits {number}"}
    old = await create(store, "Account", account("A-1"))
    new = await create(store, "Account", account("A-2"))
    query = SearchQuery("Account", ((TokenMatch("identifier", MRN, "A-1"),),))

    outcome = await store.merge(Merge("Account", query, new, kept="status"))
    assert outcome.merged == (f"Account/{old}",)
    gone = body(await store.read("Account", old))
    assert gone["status"] == "inactive"
    assert gone["name"] == "visits A-1"  # its other content stays
    assert "link" not in gone and "active" not in gone and "identifier" not in gone
    kept = body(await store.read("Account", new))
    assert kept["status"] == "active" and "link" not in kept
    assert {"system": MRN, "value": "A-1", "use": "old"} in kept["identifier"]
    # Merged again: the identifier finds only the survivor, nothing more changes.
    again = await store.merge(Merge("Account", query, new, kept="status"))
    assert again.merged == ()
    survivor = await store.read("Account", new)
    assert survivor is not None and survivor.version == 2
