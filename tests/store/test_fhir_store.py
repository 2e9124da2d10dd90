"""The FHIR store on a real SQLite file and on PostgreSQL (each test runs on both, see
tests/support/postgres.py): versions, conditional writes, transactions, search and
history, as FHIR R4 http.html and search.html define them."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import copy
import re
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.ingest.merges import keep_merge_state
from gateway.store.errors import StoreUnavailable
from gateway.store.fhir import (
    Clause,
    DateIndex,
    DateMatch,
    HistoryQuery,
    IdMatch,
    IndexEntry,
    LastUpdatedMatch,
    MissingMatch,
    Prefix,
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
    WriteConflict,
    WriteOutcome,
    WriteRequest,
)
from gateway.store.fhir_sqlite import SqliteFhirStore
from gateway.store.pg.connect import open_pool
from gateway.store.pg.fhir import PgFhirStore
from support import builders, postgres

MRN = "urn:oid:1.2.3.4"
UCUM = builders.UCUM
INSTANT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

# This suite's data, from the shared builders: patients with an MRN in MRN, named Ann Smith
# unless a test says otherwise; observations of 5.4 mg unless a test says otherwise.
patient = partial(builders.patient, system=MRN, family="Smith", given=["Ann"])
observation = partial(builders.observation, quantity=(5.4, "mg"))


# -- a small indexer for Patient and Observation (the real one lives in gateway.fhir) -------


def date_range(text: str) -> tuple[str, str]:
    """'1985' -> the instants of 1985's first and last microsecond (and so for -MM, -DD)."""
    parts = [int(p) for p in text[:10].split("-")]
    year, month, day = parts + [0] * (3 - len(parts))
    low = date(year, month or 1, day or 1)
    if day:
        high = low
    elif month:
        high = date(year, month, calendar.monthrange(year, month)[1])
    else:
        high = date(year, 12, 31)
    return f"{low.isoformat()}T00:00:00.000000Z", f"{high.isoformat()}T23:59:59.999999Z"


def index(resource_type: str, resource: dict[str, Any]) -> Sequence[IndexEntry]:
    rows: list[IndexEntry] = []
    for identifier in resource.get("identifier", []):
        rows.append(TokenIndex("identifier", identifier.get("system"), identifier["value"]))
    if resource_type == "Patient":
        for name in resource.get("name", []):
            if "family" in name:
                rows.append(StringIndex("family", name["family"].lower(), name["family"]))
            for part in [name.get("family"), *name.get("given", [])]:
                if part:
                    rows.append(StringIndex("name", part.lower(), part))
        if "birthDate" in resource:
            rows.append(DateIndex("birthdate", *date_range(resource["birthDate"])))
        if "gender" in resource:
            rows.append(TokenIndex("gender", None, resource["gender"]))
    if resource_type == "Observation":
        reference = resource.get("subject", {}).get("reference", "")
        if re.fullmatch(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]+", reference):
            rows.append(ReferenceIndex("subject", reference))
        quantity = resource.get("valueQuantity")
        if quantity is not None:
            rows.append(QuantityIndex("value-quantity", quantity["value"],
                                      quantity.get("system"), quantity.get("code")))
    return rows


# -- helpers --------------------------------------------------------------------------------


AnyStore = SqliteFhirStore | PgFhirStore


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteFhirStore]:
    opened = await SqliteFhirStore.open(tmp_path / "fhir.db", index, synchronous="normal")
    yield opened
    await opened.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AnyStore]:
    if request.param == "sqlite":
        opened: AnyStore = await SqliteFhirStore.open(tmp_path / "fhir.db", index,
                                                      synchronous="normal")
        yield opened
        await opened.close()
        return
    spec = await postgres.new_schema()
    pool = await open_pool(spec)
    try:
        opened = await PgFhirStore.open(pool, index)
        yield opened
        await opened.close()
    finally:
        await pool.close()
        await postgres.drop_schema(spec)


def by_mrn(mrn: str, resource_type: str = "Patient") -> SearchQuery:
    return SearchQuery(resource_type, ((TokenMatch("identifier", MRN, mrn),),))


def body(stored: StoredResource | None) -> dict[str, Any]:
    assert stored is not None
    document: dict[str, Any] = orjson.loads(stored.body)
    return document


async def write(store: AnyStore, request: WriteRequest) -> WriteOutcome:
    [outcome] = await store.transact([request])
    assert isinstance(outcome, WriteOutcome)
    return outcome


async def create(store: AnyStore, resource: dict[str, Any]) -> StoredResource:
    outcome = await write(store, WriteRequest("POST", resource["resourceType"],
                                              resource=resource))
    assert outcome.status == 201 and outcome.stored is not None
    return outcome.stored


async def ids(store: AnyStore, resource_type: str, *clauses: Clause,
              sort: tuple[SortKey, ...] = ()) -> list[str]:
    page = await store.search(SearchQuery(resource_type, clauses, sort))
    return [r.id for r in page.resources]


# -- create, read, versions -----------------------------------------------------------------


async def test_create_sets_id_version_and_last_updated_and_keeps_other_meta(
        store: AnyStore) -> None:
    sent = patient("1", meta={"tag": [{"code": "hl7"}], "versionId": "99"})
    stored = await create(store, sent)

    document = body(stored)
    assert UUID.fullmatch(stored.id) and document["id"] == stored.id
    assert document["meta"]["versionId"] == "1" and stored.version == 1
    assert INSTANT.fullmatch(document["meta"]["lastUpdated"])
    assert document["meta"]["lastUpdated"] == stored.last_updated
    assert document["meta"]["tag"] == [{"code": "hl7"}]
    assert "id" not in sent and sent["meta"]["versionId"] == "99"  # the caller's dict
    assert await store.read("Patient", stored.id) == stored
    assert await store.vread("Patient", stored.id, 1) == stored
    assert await store.vread("Patient", stored.id, 2) is None
    assert await store.read("Patient", "no-such-id") is None
    assert await store.read("Observation", stored.id) is None


async def test_update_makes_version_2_with_later_last_updated(store: AnyStore) -> None:
    v1 = await create(store, patient("1"))
    outcome = await write(store, WriteRequest("PUT", "Patient", id=v1.id,
                                              resource=patient("1", family="Jones")))
    assert outcome.status == 200 and outcome.changed and outcome.stored is not None
    v2 = outcome.stored
    assert v2.version == 2 and body(v2)["meta"]["versionId"] == "2"
    assert v2.last_updated > v1.last_updated
    assert body(await store.read("Patient", v1.id))["name"][0]["family"] == "Jones"
    assert body(await store.vread("Patient", v1.id, 1))["name"][0]["family"] == "Smith"
    assert await ids(store, "Patient", (StringMatch("family", "smith"),)) == []
    assert await ids(store, "Patient", (StringMatch("family", "jones"),)) == [v1.id]


async def test_update_with_unchanged_content_adds_no_version(store: AnyStore) -> None:
    v1 = await create(store, patient("1"))
    resent = patient("1", id=v1.id, meta={"versionId": "7", "lastUpdated": "2001-01-01T00:00:00Z"})
    outcome = await write(store, WriteRequest("PUT", "Patient", id=v1.id, resource=resent))
    assert (outcome.status, outcome.changed, outcome.stored) == (200, False, v1)
    page = await store.history(HistoryQuery("Patient", v1.id))
    assert page.total == 1


async def test_a_carried_update_is_unchanged_when_it_says_what_the_record_says(
        store: AnyStore) -> None:
    # The carry (what an update keeps of the record: a merge's link) runs on the resource
    # as sent, before references to the call's entries are rewritten; an update that
    # already says what the record says, once rewritten, adds no version.
    linked = [{"other": {"reference": "Patient/gone"}, "type": "replaces"}]
    await write(store, WriteRequest("PUT", "Practitioner", id="dr-1",
                                    resource={"resourceType": "Practitioner"}))
    v1 = await write(store, WriteRequest("PUT", "Patient", id="kept", resource=patient(
        "k", generalPractitioner=[{"reference": "Practitioner/dr-1"}], link=linked)))

    def message(family: str) -> list[WriteRequest]:
        return [WriteRequest("PUT", "Practitioner", id="dr-1", full_url="urn:uuid:dr",
                             resource={"resourceType": "Practitioner"}),
                WriteRequest("PUT", "Patient", id="kept", carry=keep_merge_state,
                             resource=patient("k", family=family, generalPractitioner=[
                                 {"reference": "urn:uuid:dr"}]))]

    await store.transact(message("Smith"))  # the link carried, the same content again
    assert await store.read("Patient", "kept") == v1.stored
    _, changed = await store.transact(message("Jones"))
    assert isinstance(changed, WriteOutcome) and changed.stored is not None
    assert changed.stored.version == 2
    document = body(changed.stored)
    assert document["link"] == linked
    assert document["generalPractitioner"] == [{"reference": "Practitioner/dr-1"}]
    assert document["name"][0]["family"] == "Jones"


async def test_a_resend_with_a_decimal_in_another_key_order_adds_no_version(
        store: AnyStore) -> None:
    """The stored body is read with its decimals as written (0.1 the float is not 0.1 the
    FHIR decimal), whatever else it holds (every body holds a lastUpdated with a
    fraction)."""
    from decimal import Decimal

    first = {"resourceType": "Observation", "status": "final",
             "extension": [{"url": "urn:example:dose", "valueDecimal": Decimal("0.1")}]}
    created = await write(store, WriteRequest("PUT", "Observation", id="a3-589e-9694",
                                              resource=first))
    assert created.stored is not None
    reordered = {"extension": [{"valueDecimal": Decimal("0.1"), "url": "urn:example:dose"}],
                 "status": "final", "resourceType": "Observation"}
    outcome = await write(store, WriteRequest("PUT", "Observation", id="a3-589e-9694",
                                              resource=reordered,
                                              carry=lambda current, update: None))
    assert (outcome.changed, outcome.stored) == (False, created.stored)
    stored = await store.read("Observation", "a3-589e-9694")
    assert stored is not None and b'"valueDecimal":0.1' in stored.body


async def test_update_of_an_unknown_id_creates_it(store: AnyStore) -> None:
    outcome = await write(store, WriteRequest("PUT", "Patient", id="pat-1",
                                              resource=patient("1")))
    assert outcome.status == 201 and outcome.stored is not None
    assert outcome.stored.id == "pat-1" and outcome.stored.version == 1


async def test_create_at_an_id_in_use_is_409_but_a_deleted_id_may_be_reused(
        store: AnyStore) -> None:
    await write(store, WriteRequest("PUT", "Patient", id="taken", resource=patient("1")))
    with pytest.raises(WriteConflict) as caught:
        await store.transact([WriteRequest("POST", "Patient", resource=patient("2", id="taken"))])
    assert caught.value.status == 409
    await write(store, WriteRequest("DELETE", "Patient", id="taken"))
    reused = await write(store, WriteRequest("POST", "Patient", resource=patient("2", id="taken")))
    assert reused.status == 201 and reused.stored is not None and reused.stored.version == 3


async def test_if_match_mismatch_is_412_without_values_in_the_reason(
        store: AnyStore) -> None:
    v1 = await create(store, patient("1", family="Sensitive"))
    with pytest.raises(WriteConflict) as caught:
        await store.transact([WriteRequest("PUT", "Patient", id=v1.id, if_match=2,
                                           resource=patient("1", family="Other"))])
    assert caught.value.status == 412 and caught.value.entry == 0
    assert caught.value.reason == "entry 0: If-Match version 2 does not match current version 1"
    assert "Sensitive" not in caught.value.reason
    ok = await write(store, WriteRequest("PUT", "Patient", id=v1.id, if_match=1,
                                         resource=patient("1", family="Other")))
    assert ok.stored is not None and ok.stored.version == 2


async def test_if_none_exist_creates_once_then_returns_the_match_then_412_on_many(
        store: AnyStore) -> None:
    conditional = WriteRequest("POST", "Patient", resource=patient("7"), condition=by_mrn("7"))
    first = await write(store, conditional)
    assert first.status == 201 and first.stored is not None
    again = await write(store, conditional)
    assert (again.status, again.changed, again.stored) == (200, False, first.stored)

    await create(store, patient("7"))  # a second record with the same MRN
    with pytest.raises(WriteConflict) as caught:
        await store.transact([conditional])
    assert caught.value.status == 412
    assert await store.count(by_mrn("7")) == 2


async def test_conditional_update_creates_updates_or_refuses(store: AnyStore) -> None:
    def put(family: str) -> WriteRequest:
        return WriteRequest("PUT", "Patient", resource=patient("8", family=family),
                            condition=by_mrn("8"))

    created = await write(store, put("Smith"))
    assert created.status == 201 and created.stored is not None
    updated = await write(store, put("Jones"))
    assert updated.status == 200 and updated.stored is not None
    assert (updated.stored.id, updated.stored.version) == (created.stored.id, 2)

    given = await write(store, WriteRequest("PUT", "Patient", resource=patient(
        "9", id="chosen"), condition=by_mrn("9")))
    assert given.stored is not None and given.stored.id == "chosen"

    await create(store, patient("8"))
    with pytest.raises(WriteConflict) as caught:
        await store.transact([put("Brown")])
    assert caught.value.status == 412


async def test_delete_leaves_a_deleted_version_and_history_shows_all_three(
        store: AnyStore) -> None:
    v1 = await create(store, patient("1"))
    await write(store, WriteRequest("PUT", "Patient", id=v1.id,
                                    resource=patient("1", family="Jones")))
    deleted = await write(store, WriteRequest("DELETE", "Patient", id=v1.id))
    assert (deleted.status, deleted.stored, deleted.changed) == (204, None, True)

    gone = await store.read("Patient", v1.id)
    assert gone is not None and gone.deleted and gone.version == 3 and gone.body == b""
    assert (await store.vread("Patient", v1.id, 3)) == gone
    assert body(await store.vread("Patient", v1.id, 1))["name"][0]["family"] == "Smith"
    history = await store.history(HistoryQuery("Patient", v1.id))
    assert history.total == 3
    assert [(r.version, r.deleted) for r in history.resources] == [
        (3, True), (2, False), (1, False)]
    assert await ids(store, "Patient", (TokenMatch("identifier", MRN, "1"),)) == []

    again = await write(store, WriteRequest("DELETE", "Patient", id=v1.id))
    assert (again.status, again.changed) == (204, False)
    revived = await write(store, WriteRequest("PUT", "Patient", id=v1.id,
                                              resource=patient("1")))
    assert revived.status == 201 and revived.stored is not None
    assert revived.stored.version == 4


async def test_conditional_delete(store: AnyStore) -> None:
    nothing = await write(store, WriteRequest("DELETE", "Patient", condition=by_mrn("1")))
    assert (nothing.status, nothing.changed) == (204, False)
    v1 = await create(store, patient("1"))
    done = await write(store, WriteRequest("DELETE", "Patient", condition=by_mrn("1")))
    assert done.changed
    gone = await store.read("Patient", v1.id)
    assert gone is not None and gone.deleted


# -- transactions and batches ---------------------------------------------------------------


async def test_transaction_rewrites_urn_uuid_references_to_the_new_ids(
        store: AnyStore) -> None:
    urn = "urn:uuid:0b6d0e56-6c5e-4c3b-9d1e-1f1f1f1f1f1f"
    given = observation(urn, hasMember=[{"reference": urn}])
    as_given = copy.deepcopy(given)
    outcomes = await store.transact([
        WriteRequest("POST", "Observation", resource=given),
        WriteRequest("POST", "Patient", resource=patient("1"), full_url=urn),
    ])
    assert given == as_given  # the caller's resource, nested references too, unchanged
    obs, pat = outcomes
    assert isinstance(obs, WriteOutcome) and isinstance(pat, WriteOutcome)
    assert pat.status == obs.status == 201 and pat.stored and obs.stored
    target = f"Patient/{pat.stored.id}"
    assert body(obs.stored)["subject"] == {"reference": target}
    assert body(obs.stored)["hasMember"] == [{"reference": target}]
    assert await ids(store, "Observation", (ReferenceMatch("subject", target),)) == [
        obs.stored.id]


async def test_transaction_reference_to_a_patient_matched_by_if_none_exist(
        store: AnyStore) -> None:
    existing = await create(store, patient("42"))
    urn = "urn:uuid:5e0c4c79-3a52-4c4e-8b4f-000000000042"
    pat, obs = await store.transact([
        WriteRequest("POST", "Patient", resource=patient("42"), condition=by_mrn("42"),
                     full_url=urn),
        WriteRequest("POST", "Observation", resource=observation(urn)),
    ])
    assert isinstance(pat, WriteOutcome) and isinstance(obs, WriteOutcome)
    assert (pat.status, pat.changed, pat.stored) == (200, False, existing)
    assert body(obs.stored)["subject"]["reference"] == f"Patient/{existing.id}"


async def test_failing_transaction_entry_leaves_nothing_written(store: AnyStore) -> None:
    existing = await create(store, patient("1"))
    doomed = await create(store, patient("2"))
    with pytest.raises(WriteConflict) as caught:
        await store.transact([
            WriteRequest("POST", "Patient", resource=patient("3")),
            WriteRequest("PUT", "Patient", id=existing.id, resource=patient("1", family="Jones")),
            WriteRequest("DELETE", "Patient", id=doomed.id),  # applied first, then undone
            WriteRequest("PUT", "Patient", id="pat-4", if_match=4, resource=patient("4")),
        ])
    assert caught.value.status == 412 and caught.value.entry == 3
    assert (await store.history(HistoryQuery())).total == 2
    assert await store.read("Patient", existing.id) == existing
    assert await store.read("Patient", doomed.id) == doomed
    assert await ids(store, "Patient", (TokenMatch("identifier", MRN, "2"),)) == [doomed.id]
    assert await store.count(SearchQuery("Patient")) == 2


async def test_transaction_applies_delete_before_post_before_put(
        store: AnyStore) -> None:
    old = await create(store, patient("5"))
    put, post, delete = await store.transact([
        WriteRequest("PUT", "Patient", resource=patient("5", family="Jones"),
                     condition=by_mrn("5")),
        WriteRequest("POST", "Patient", resource=patient("6"), condition=by_mrn("5")),
        WriteRequest("DELETE", "Patient", id=old.id),
    ])
    assert isinstance(put, WriteOutcome) and isinstance(post, WriteOutcome)
    # The delete came first, so neither condition found the old record: both created.
    assert (delete.status, post.status, put.status) == (204, 201, 201)
    assert put.stored and post.stored and len({put.stored.id, post.stored.id, old.id}) == 3


async def test_two_entries_for_one_resource_fail_the_transaction(
        store: AnyStore) -> None:
    with pytest.raises(WriteConflict) as caught:
        await store.transact([
            WriteRequest("PUT", "Patient", id="a", resource=patient("1")),
            WriteRequest("PUT", "Patient", id="a", resource=patient("2")),
        ])
    assert caught.value.status == 400 and caught.value.entry == 1
    assert await store.read("Patient", "a") is None


async def test_repeated_if_none_exist_in_one_transaction_creates_one_resource(
        store: AnyStore) -> None:
    first, second = await store.transact([
        WriteRequest("POST", "Practitioner", resource={"identifier": [
            {"system": MRN, "value": "dr"}]}, condition=by_mrn("dr", "Practitioner")),
        WriteRequest("POST", "Practitioner", resource={"identifier": [
            {"system": MRN, "value": "dr"}]}, condition=by_mrn("dr", "Practitioner")),
    ])
    assert isinstance(first, WriteOutcome) and isinstance(second, WriteOutcome)
    assert (first.status, second.status, second.changed) == (201, 200, False)
    assert second.stored == first.stored
    assert await store.count(SearchQuery("Practitioner")) == 1


async def test_batch_entries_succeed_or_fail_on_their_own(store: AnyStore) -> None:
    existing = await create(store, patient("1"))
    outcomes = await store.transact([
        WriteRequest("POST", "Patient", resource=patient("2")),
        WriteRequest("PUT", "Patient", id=existing.id, if_match=9,
                     resource=patient("1", family="X")),
        WriteRequest("PUT", "Patient", id="pat-3", resource=patient("3")),
        WriteRequest("PUT", "Patient", resource=patient("4")),  # neither id nor condition
    ], atomic=False)
    ok, conflict, created, invalid = outcomes
    assert isinstance(ok, WriteOutcome) and ok.status == 201
    assert isinstance(conflict, WriteConflict) and (conflict.status, conflict.entry) == (412, 1)
    assert isinstance(created, WriteOutcome) and created.status == 201
    assert isinstance(invalid, WriteConflict) and (invalid.status, invalid.entry) == (400, 3)
    assert await store.count(SearchQuery("Patient")) == 3
    assert await store.read("Patient", existing.id) == existing


# -- search ---------------------------------------------------------------------------------


async def test_token_search_by_system_code_no_system_and_not(store: AnyStore) -> None:
    a = await create(store, patient("100", gender="female"))
    b = await create(store, {"resourceType": "Patient", "identifier": [{"value": "100"}],
                             "gender": "male"})
    c = await create(store, {"resourceType": "Patient"})
    both = {a.id, b.id}
    assert await ids(store, "Patient", (TokenMatch("identifier", MRN, "100"),)) == [a.id]
    assert set(await ids(store, "Patient", (TokenMatch("identifier", None, "100"),))) == both
    assert await ids(store, "Patient", (TokenMatch("identifier", "", "100"),)) == [b.id]
    assert await ids(store, "Patient", (TokenMatch("identifier", MRN, None),)) == [a.id]
    assert set(await ids(store, "Patient", (TokenMatch("gender", None, "male", negate=True),))
               ) == {a.id, c.id}
    assert await ids(store, "Patient", (TokenMatch("identifier", MRN, "999"),)) == []


async def test_string_search_start_contains_exact_escape_like_wildcards(
        store: AnyStore) -> None:
    underscore = await create(store, patient("1", family="O_Brien"))
    plain = await create(store, patient("2", family="Oxbrien"))
    percent = await create(store, patient("3", family="Fifty%Off"))
    await create(store, patient("4", family="Fiftyoff"))

    def family(value: str, mode: Any = "start") -> Clause:
        return (StringMatch("family", value, mode),)

    assert await ids(store, "Patient", family("o_")) == [underscore.id]
    assert set(await ids(store, "Patient", family("o"))) == {underscore.id, plain.id}
    assert await ids(store, "Patient", family("%", "contains")) == [percent.id]
    assert await ids(store, "Patient", family("y%o", "contains")) == [percent.id]
    assert await ids(store, "Patient", family("brien", "contains")) != []
    assert await ids(store, "Patient", family("brien")) == []
    assert await ids(store, "Patient", family("O_Brien", "exact")) == [underscore.id]
    assert await ids(store, "Patient", family("o_brien", "exact")) == []


@pytest.mark.parametrize(("prefix", "value", "found"), [
    ("eq", "1985", True),
    ("eq", "1985-06", False),  # 1985 is not within June
    ("ne", "1985", False),
    ("ne", "1985-06", True),
    ("ge", "1985-06-01", True),  # some of 1985 is on or after June 1st
    ("ge", "1986", False),
    ("lt", "1985-06-01", True),  # some of 1985 is before June 1st
    ("lt", "1985", False),
    ("le", "1984", False),
    ("le", "1985-01-01", True),
    ("gt", "1984", True),
    ("gt", "1985-12-31", False),
    ("sa", "1984", True),
    ("sa", "1985-01", False),
    ("eb", "1986", True),
    ("eb", "1985-12", False),
    ("ap", "1985-03-02", True),
    ("ap", "1990", False),
])
async def test_date_prefixes_on_a_birth_year(store: AnyStore, prefix: Prefix,
                                             value: str, found: bool) -> None:
    born = await create(store, patient("1", birthDate="1985"))
    await create(store, patient("2", birthDate="2001-07-04"))
    low, high = date_range(value)
    matches = await ids(store, "Patient", (DateMatch("birthdate", prefix, low, high),))
    assert (born.id in matches) == found


@pytest.mark.parametrize(("prefix", "value", "code", "expected"), [
    ("eq", 5.4, None, {"5.44", "5.4"}),  # within half the last digit: [5.35, 5.45)
    ("eq", 7, None, {"7"}),
    ("ne", 7, None, {"5.44", "5.4", "120"}),
    ("gt", 6, None, {"7", "120"}),
    ("ge", 7, None, {"7", "120"}),
    ("lt", 7, None, {"5.44", "5.4"}),
    ("le", 5.4, None, {"5.4"}),
    ("gt", 0, "mm[Hg]", {"120"}),
    ("ap", 110, None, {"120"}),
])
async def test_quantity_prefixes(store: AnyStore, prefix: Prefix, value: float,
                                 code: str | None, expected: set[str]) -> None:
    made = {}
    for number, unit in ((5.4, "mg"), (5.44, "mg"), (7, "mg"), (120, "mm[Hg]")):
        stored = await create(store, observation("Patient/p", quantity=(number, unit)))
        made[stored.id] = str(number)
    query = (QuantityMatch("value-quantity", prefix, value, UCUM if code else None, code),)
    assert {made[i] for i in await ids(store, "Observation", query)} == expected


async def test_missing_id_last_updated_and_clauses(store: AnyStore) -> None:
    a = await create(store, patient("1", birthDate="1970", gender="male"))
    b = await create(store, patient("2", gender="female"))
    c = await create(store, patient("3", family="Jones", birthDate="1980"))

    assert await ids(store, "Patient", (MissingMatch("birthdate", True),)) == [b.id]
    assert set(await ids(store, "Patient", (MissingMatch("birthdate", False),))) == {a.id, c.id}
    assert await ids(store, "Patient", (MissingMatch("gender", True),)) == [c.id]
    assert set(await ids(store, "Patient", (IdMatch(a.id), IdMatch(c.id)))) == {a.id, c.id}
    after_a = (LastUpdatedMatch("gt", a.last_updated, a.last_updated),)
    assert set(await ids(store, "Patient", after_a)) == {b.id, c.id}
    # OR within a clause, AND across clauses.
    either = (TokenMatch("gender", None, "male"), StringMatch("family", "jones"))
    assert set(await ids(store, "Patient", either)) == {a.id, c.id}
    assert await ids(store, "Patient", either, (MissingMatch("birthdate", False),),
                     (TokenMatch("gender", None, "male", negate=True),)) == [c.id]
    assert await ids(store, "Patient", ()) == []  # a clause of no values matches nothing


async def test_sort_puts_resources_without_a_value_last(store: AnyStore) -> None:
    made = {}
    for family in ("brown", "Adams", "clark"):
        made[family.lower()] = (await create(store, patient(family, family=family))).id
    nameless = (await create(store, {"resourceType": "Patient"})).id

    ascending = await ids(store, "Patient", sort=(SortKey("family"),))
    assert ascending == [made["adams"], made["brown"], made["clark"], nameless]
    descending = await ids(store, "Patient", sort=(SortKey("family", descending=True),))
    assert descending == [made["clark"], made["brown"], made["adams"], nameless]
    by_id = await ids(store, "Patient", sort=(SortKey("_id"),))
    assert by_id == sorted(by_id)
    newest_first = await ids(store, "Patient", sort=(SortKey("_lastUpdated", True),))
    assert newest_first == [nameless, made["clark"], made["adams"], made["brown"]]


async def test_paging_is_stable_and_total_is_counted(store: AnyStore) -> None:
    await store.transact([WriteRequest("POST", "Patient", resource=patient(
        str(i), family=("Same" if i % 3 else f"F{i:02d}"), birthDate="1990"))
        for i in range(25)])
    sort = (SortKey("family"),)
    everything = await ids(store, "Patient", sort=sort)
    pages: list[str] = []
    for offset in range(0, 25, 7):
        page = await store.search(SearchQuery("Patient", sort=sort, count=7, offset=offset),
                                  total=True)
        assert page.total == 25
        pages.extend(r.id for r in page.resources)
    assert pages == everything and len(set(pages)) == 25

    empty = await store.search(SearchQuery("Patient", count=0), total=True)
    assert empty.resources == [] and empty.total == 25
    untotalled = await store.search(SearchQuery("Patient", count=1))
    assert untotalled.total is None and len(untotalled.resources) == 1
    born = ((DateMatch("birthdate", "eq", *date_range("1990")),),)
    assert await store.count(SearchQuery("Patient", born)) == 25


# -- history --------------------------------------------------------------------------------


async def test_history_since_type_and_system_levels(store: AnyStore) -> None:
    a = await create(store, patient("1"))
    b = await create(store, patient("2"))
    obs = await create(store, observation(f"Patient/{a.id}"))
    a2 = await write(store, WriteRequest("PUT", "Patient", id=a.id,
                                         resource=patient("1", family="X")))
    assert a2.stored is not None

    system = await store.history(HistoryQuery())
    assert [(r.id, r.version) for r in system.resources] == [
        (a.id, 2), (obs.id, 1), (b.id, 1), (a.id, 1)]
    assert system.total == 4
    since = await store.history(HistoryQuery("Patient", since=b.last_updated))
    assert [(r.id, r.version) for r in since.resources] == [(a.id, 2), (b.id, 1)]
    assert since.total == 2
    paged = await store.history(HistoryQuery(count=1, offset=1))
    assert [r.id for r in paged.resources] == [obs.id] and paged.total == 4
    instance = await store.history(HistoryQuery("Patient", a.id, since=a2.stored.last_updated))
    assert [r.version for r in instance.resources] == [2]


# -- concurrency, durability, lifecycle -----------------------------------------------------


async def test_concurrent_transactions_all_land_and_reads_work_meanwhile(
        store: AnyStore) -> None:
    known = await create(store, patient("known"))

    async def message(n: int) -> list[WriteOutcome | WriteConflict]:
        urn = f"urn:uuid:00000000-0000-4000-8000-{n:012d}"
        return await store.transact([
            WriteRequest("PUT", "Patient", resource=patient(f"m{n}"), condition=by_mrn(f"m{n}"),
                         full_url=urn),
            WriteRequest("POST", "Observation", resource=observation(urn, quantity=(n, "mg"))),
        ])

    reads = 0
    done = asyncio.Event()

    async def reader() -> None:
        nonlocal reads
        while not done.is_set():
            assert await store.read("Patient", known.id) == known
            reads += 1
            await asyncio.sleep(0)  # let the writers run between reads

    reading = asyncio.create_task(reader())
    groups_before = store.groups_committed if isinstance(store, SqliteFhirStore) else 0
    results = await asyncio.gather(*(message(n) for n in range(50)))
    done.set()
    await reading

    assert reads > 0
    if isinstance(store, SqliteFhirStore):  # PostgreSQL: a transaction per call
        assert store.groups_committed - groups_before < 50  # several calls shared a commit
    for n, (pat, obs) in enumerate(results):
        assert isinstance(pat, WriteOutcome) and isinstance(obs, WriteOutcome)
        assert pat.stored is not None and obs.stored is not None
        assert await store.read("Patient", pat.stored.id) == pat.stored
        assert body(obs.stored)["subject"]["reference"] == f"Patient/{pat.stored.id}"
        assert await ids(store, "Patient", (TokenMatch("identifier", MRN, f"m{n}"),)) == [
            pat.stored.id]
    assert await store.count(SearchQuery("Observation")) == 50


async def test_concurrent_if_none_exist_creates_exactly_one(store: AnyStore) -> None:
    request = WriteRequest("POST", "Patient", resource=patient("race"),
                           condition=by_mrn("race"))
    results = await asyncio.gather(*(store.transact([request]) for _ in range(20)))
    statuses = sorted(r[0].status for r in results if isinstance(r[0], WriteOutcome))
    assert statuses == [200] * 19 + [201]
    assert await store.count(by_mrn("race")) == 1


async def test_a_failing_call_does_not_undo_others_in_its_group(store: AnyStore) -> None:
    good = [store.transact([WriteRequest("PUT", "Patient", id=f"ok-{n}",
                                         resource=patient(str(n)))]) for n in range(5)]
    bad = store.transact([WriteRequest("PUT", "Patient", id="bad", resource=patient("b")),
                          WriteRequest("PUT", "Patient", id="x", if_match=3,
                                       resource=patient("x"))])
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert isinstance(results[-1], WriteConflict)
    assert all(isinstance(r, list) for r in results[:-1])
    assert await store.count(SearchQuery("Patient")) == 5
    assert await store.read("Patient", "bad") is None


async def test_a_failing_call_amid_its_group_leaves_the_others_as_if_alone(
        store: AnyStore) -> None:
    # Calls before and after the failing one, a later one updating what an earlier one
    # created: each applies as it would have on its own, in submission order (SQLite's
    # group commit; PostgreSQL runs each call as a transaction of its own, in any order).
    if not isinstance(store, SqliteFhirStore):
        pytest.skip("calls share a transaction only in the SQLite store")
    first = store.transact([WriteRequest("PUT", "Patient", id="p-1", resource=patient("1"))])
    bad = store.transact([WriteRequest("PUT", "Patient", id="bad", resource=patient("b")),
                          WriteRequest("PUT", "Patient", id="x", if_match=3,
                                       resource=patient("x"))])
    again = store.transact([WriteRequest("PUT", "Patient", id="p-1",
                                         resource=patient("1", family="Later"))])
    created = store.transact([WriteRequest("POST", "Patient", resource=patient("2"),
                                           condition=by_mrn("2"))])
    results = await asyncio.gather(first, bad, again, created, return_exceptions=True)
    assert isinstance(results[1], WriteConflict) and results[1].status == 412
    [one], [two], [three] = results[0], results[2], results[3]
    assert isinstance(one, WriteOutcome) and one.stored is not None
    assert one.status == 201 and one.stored.version == 1
    assert isinstance(two, WriteOutcome) and two.stored is not None
    assert two.status == 200 and two.stored.version == 2
    assert isinstance(three, WriteOutcome) and three.status == 201
    assert await store.read("Patient", "bad") is None
    current = await store.read("Patient", "p-1")
    assert current is not None and current.version == 2
    assert body(current)["name"][0]["family"] == "Later"
    assert await store.count(SearchQuery("Patient")) == 2


class NotRecorded(Exception):
    """What an audit hook raises when the record cannot be kept."""


async def test_before_commit_runs_before_anyone_can_read_the_write(
        store: AnyStore) -> None:
    seen: list[object] = []

    async def record(outcomes: list[WriteOutcome | WriteConflict]) -> None:
        [outcome] = outcomes
        assert isinstance(outcome, WriteOutcome) and outcome.stored is not None
        seen.append(await store.read("Patient", outcome.stored.id))  # not committed yet

    [outcome] = await store.transact([WriteRequest("POST", "Patient",
                                                   resource=patient("hooked"))],
                                     before_commit=record)
    assert seen == [None]
    assert isinstance(outcome, WriteOutcome) and outcome.stored is not None
    assert await store.read("Patient", outcome.stored.id) == outcome.stored


async def test_a_before_commit_that_raises_rolls_back_only_its_own_call(
        store: AnyStore) -> None:
    calls: dict[str, int] = {"kept": 0}

    async def refuse(outcomes: list[WriteOutcome | WriteConflict]) -> None:
        raise NotRecorded

    async def keep(outcomes: list[WriteOutcome | WriteConflict]) -> None:
        calls["kept"] += 1

    refused = store.transact([WriteRequest("PUT", "Patient", id="refused",
                                           resource=patient("r"))], before_commit=refuse)
    kept = store.transact([WriteRequest("PUT", "Patient", id="kept", resource=patient("k"))],
                          before_commit=keep)
    plain = store.transact([WriteRequest("PUT", "Patient", id="plain", resource=patient("p"))])
    results = await asyncio.gather(refused, kept, plain, return_exceptions=True)
    assert isinstance(results[0], NotRecorded)
    assert await store.read("Patient", "refused") is None
    assert await store.read("Patient", "kept") is not None
    assert await store.read("Patient", "plain") is not None
    # SQLite: the others shared its group, rolled back with it, and were made again on
    # their own. PostgreSQL: each call is a transaction of its own, hooked once.
    assert calls["kept"] == (2 if isinstance(store, SqliteFhirStore) else 1)


async def test_a_before_commit_that_raises_when_called_refuses_its_call_and_no_other(
        store: AnyStore) -> None:
    def refuse_at_once(outcomes: list[WriteOutcome | WriteConflict]) -> Awaitable[None]:
        raise NotRecorded  # before any awaitable is made

    with pytest.raises(NotRecorded):
        await store.transact([WriteRequest("PUT", "Patient", id="refused",
                                           resource=patient("r"))],
                             before_commit=refuse_at_once)
    assert await store.read("Patient", "refused") is None
    # The writer goes on: the next call is applied and committed.
    await asyncio.wait_for(store.transact([WriteRequest(
        "PUT", "Patient", id="after", resource=patient("a"))]), 10)
    assert await store.read("Patient", "after") is not None


async def test_reopened_file_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "fhir.db"
    first = await SqliteFhirStore.open(path, index)
    stored = await create(first, patient("1", birthDate="1985"))
    await write(first, WriteRequest("DELETE", "Patient", id=stored.id))
    kept = await create(first, patient("2", family="Kept"))
    await first.probe_writable()
    await first.close()
    await first.close()  # idempotent
    with pytest.raises(StoreUnavailable):
        await first.read("Patient", kept.id)
    with pytest.raises(StoreUnavailable):
        await first.transact([WriteRequest("POST", "Patient", resource=patient("3"))])
    with pytest.raises(StoreUnavailable):
        await first.probe_writable()

    again = await SqliteFhirStore.open(path, index)
    try:
        assert await again.read("Patient", kept.id) == kept
        gone = await again.read("Patient", stored.id)
        assert gone is not None and gone.deleted
        assert (await again.history(HistoryQuery())).total == 3
        assert await ids(again, "Patient", (StringMatch("family", "kept"),)) == [kept.id]
        updated = await write(again, WriteRequest("PUT", "Patient", id=kept.id,
                                                  resource=patient("2", family="New")))
        assert updated.stored is not None and updated.stored.last_updated > kept.last_updated
        await again.probe_writable()
    finally:
        await again.close()


@pytest.mark.parametrize("budget", [1, 20_000])
async def test_a_search_over_the_quick_budget_goes_to_the_reader_thread_with_the_same_answer(
        sqlite_store: SqliteFhirStore, monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    """Budget 1 interrupts every statement on the event loop thread (the fallback runs);
    the default lets an indexed search finish there. Both give the same page and total."""
    import gateway.store.fhir_sqlite.store as sqlite_module

    for n in range(30):
        await create(sqlite_store, patient(f"Q{n:03d}", family="Quick" if n % 3 else "Slow"))
    monkeypatch.setattr(sqlite_module, "_QUICK_STEPS", budget)
    query = SearchQuery("Patient", ((StringMatch("family", "quick"),),), count=5, offset=5)
    page = await sqlite_store.search(query, total=True)
    assert page.total == 20 and len(page.resources) == 5
    assert await sqlite_store.count(query) == 20
    [found] = (await sqlite_store.search(by_mrn("Q007"))).resources
    assert body(found)["identifier"][0]["value"] == "Q007"
    history = await sqlite_store.history(HistoryQuery("Patient", found.id))
    assert history.total == 1


async def test_the_writer_finds_current_rows_by_primary_key_not_by_a_scan(
        sqlite_store: SqliteFhirStore, tmp_path: Path) -> None:
    """Every transaction reads its entries' current rows: a table scan there would make
    each message slower as the store grows."""
    import sqlite3

    from gateway.store.fhir_sqlite.sql import current_rows_sql as _current_rows_sql

    with sqlite3.connect(tmp_path / "fhir.db") as db:
        plan = db.execute("EXPLAIN QUERY PLAN " + _current_rows_sql([3, 1]),
                          ["Patient", "a", "b", "c", "Encounter", "d"]).fetchall()
    details = " ".join(str(row[-1]) for row in plan)
    assert details.count("USING INDEX") == 2 and "SCAN" not in details, details


async def test_a_cancelled_write_is_all_or_nothing_and_the_store_goes_on(
        store: AnyStore) -> None:
    """A caller that goes away mid-transaction (a client disconnect cancels its task)."""
    task = asyncio.create_task(store.transact([
        WriteRequest("PUT", "Patient", id=f"c{n}", resource=patient(f"C{n}"))
        for n in range(200)]))
    await asyncio.sleep(0.02)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert await store.count(SearchQuery("Patient")) in (0, 200)
    after = await create(store, patient("after"))
    assert await store.read("Patient", after.id) == after
