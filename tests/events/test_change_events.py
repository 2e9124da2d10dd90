"""Change events recorded by the store: one per new version, in the version's transaction,
whatever wrote it (REST-shaped writes, merges); none for a resend that changes nothing or
a write that rolled back. On SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.fhir.search import SearchRegistry
from gateway.mapping.tables import SHIPPED
from gateway.store.events import SqliteEventLog
from gateway.store.fhir import (
    FhirStore,
    IdMatch,
    Merge,
    SearchQuery,
    WriteConflict,
    WriteRequest,
)
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.pg.fhir import PgFhirStore
from support.backends import Backend

REGISTRY = SearchRegistry.load(SHIPPED / "search-parameters.csv")


def patient(mrn: str, family: str = "Synthetic") -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family}],
            "identifier": [{"system": "urn:mrn", "value": mrn}]}


class Events:
    """The events a store recorded, read the way its backend keeps them."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    async def all(self) -> list[tuple[str, str, int, str]]:
        if self._backend.pool is None:
            log = await SqliteEventLog.open(self._backend.tmp / "fhir.db")
            try:
                return [(e.resource_type, e.id, e.version, e.action)
                        for e in await log.after(0, 1000)]
            finally:
                await log.close()
        rows = await self._backend.pool.fetch(
            "SELECT type, id, version, action FROM fhir_event ORDER BY seq")
        return [(r[0], r[1], int(r[2]), r[3]) for r in rows]


@pytest.fixture
async def store(store_backend: Backend) -> AsyncIterator[FhirStore]:
    opened: FhirStore
    if store_backend.pool is None:
        opened = await SqliteFhirStore.open(store_backend.tmp / "fhir.db", REGISTRY.index,
                                            synchronous="normal")
    else:
        opened = await PgFhirStore.open(store_backend.pool, REGISTRY.index)
    yield opened
    await opened.close()


async def test_one_event_per_change_none_for_a_noop_resend(
        store: FhirStore, store_backend: Backend) -> None:
    [created] = await store.transact([WriteRequest("POST", "Patient", "e1", patient("1"))])
    assert not isinstance(created, WriteConflict)
    await store.transact([WriteRequest("PUT", "Patient", "e1", patient("1"))])  # no-op
    await store.transact([WriteRequest("PUT", "Patient", "e1", patient("1", "Other"))])
    await store.transact([WriteRequest("DELETE", "Patient", "e1")])
    await store.transact([WriteRequest("DELETE", "Patient", "e1")])  # already gone
    await store.transact([WriteRequest("PUT", "Patient", "e1", patient("1"))])
    assert await Events(store_backend).all() == [
        ("Patient", "e1", 1, "created"), ("Patient", "e1", 2, "updated"),
        ("Patient", "e1", 3, "deleted"), ("Patient", "e1", 4, "created")]


async def test_a_transaction_that_fails_records_no_event(
        store: FhirStore, store_backend: Backend) -> None:
    with pytest.raises(WriteConflict):
        await store.transact([
            WriteRequest("POST", "Patient", "ok", patient("2")),
            WriteRequest("PUT", "Patient", "missing", patient("3"), if_match=7)])
    assert await Events(store_backend).all() == []


async def test_a_merge_records_each_resource_it_changes(
        store: FhirStore, store_backend: Backend) -> None:
    await store.transact([WriteRequest("POST", "Patient", "old", patient("A")),
                          WriteRequest("POST", "Patient", "new", patient("B"))])
    await store.transact([WriteRequest("POST", "Observation", "o1", {
        "resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "subject": {"reference": "Patient/old"}})])
    await store.transact([], merges=[Merge("Patient", SearchQuery(
        "Patient", ((IdMatch("old"),),)), "new")])
    events = await Events(store_backend).all()
    assert events[3:] and set(events[3:]) == {
        ("Observation", "o1", 2, "updated"), ("Patient", "old", 2, "updated"),
        ("Patient", "new", 2, "updated")}
