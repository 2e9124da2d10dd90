"""The FHIR R4 REST edge at /fhir, driven over real HTTP on 127.0.0.1: with aiohttp (to see
status, headers and bytes) and with the FHIR client library fhirpy (to see that an ordinary
client works with us). Only synthetic data; CANARY marks values that must never come back in
an error or reach the audit trail in the clear.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import pytest
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhirpy import AsyncFHIRClient
from fhirpy.base.exceptions import ResourceNotFound

from conftest import RunningGateway
from gateway.audit.query import AuditQuery
from gateway.audit.record import Action
from gateway.audit.sealed import parse_body
from gateway.edge.audit_http import AUDIT
from support.builders import IDENTIFIER_SYSTEM, LOINC, encounter, observation, patient
from support.fhir import (
    API_KEY,
    API_KEY_NAME,
    FHIR_JSON,
    api_key_config,
    fhir_session,
    start_fhir_gateway,
)

SYSTEM = IDENTIFIER_SYSTEM  # the builders' synthetic identifier namespace
CANARY = "CANARYZX9Q"  # stands for patient data in bad input
CANARY_WORD = "Canaryzxq"  # the same, where only letters fit (a type in the URL)
T = TypeVar("T")


# -- plumbing ---------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def issue(self) -> dict[str, Any]:
        """The single issue of an OperationOutcome answer."""
        outcome = self.json
        assert outcome["resourceType"] == "OperationOutcome", outcome
        assert len(outcome["issue"]) == 1
        issue: dict[str, Any] = outcome["issue"][0]
        return issue


async def call(http: aiohttp.ClientSession, method: str, path: str, *,
               body: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None,
               **kwargs: Any) -> Answer:
    sent = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
    if data is not None:
        sent.setdefault("Content-Type", FHIR_JSON)
    async with http.request(method, path, data=data, headers=sent, **kwargs) as response:
        return Answer(response.status, {k.lower(): v for k, v in response.headers.items()},
                      await response.read())


async def create(http: aiohttp.ClientSession, resource: dict[str, Any]) -> dict[str, Any]:
    answer = await call(http, "POST", f"/fhir/{resource['resourceType']}", body=resource)
    assert answer.status == 201, answer.body
    created: dict[str, Any] = answer.json
    return created


async def count(http: aiohttp.ClientSession, query: str) -> int:
    """How many resources a search (`Type?params`) matches, by _summary=count."""
    answer = await call(http, "GET", f"/fhir/{query}&_summary=count")
    assert answer.status == 200, answer.body
    total: int = answer.json["total"]
    return total


def labels(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    """The identifier labels of a searchset's entries of one search mode, in order."""
    return [entry["resource"]["identifier"][0]["value"] for entry in bundle.get("entry", [])
            if entry.get("search", {}).get("mode") == mode]


def link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((item["url"] for item in bundle.get("link", [])
                 if item["relation"] == relation), None)


def local(url: str) -> str:
    """An absolute link of ours as a path the session can request."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def assert_no_canary(answer: Answer) -> None:
    for canary in (CANARY, CANARY_WORD):
        assert canary.lower().encode() not in answer.body.lower()
    assert not any(CANARY in value for value in answer.headers.values())


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    running = await start_fhir_gateway(tmp_path / "var")
    yield running
    await running.runner.cleanup()


@pytest.fixture
async def http(gw: RunningGateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with fhir_session(gw) as session:
        yield session


@pytest.fixture
def fhir(gw: RunningGateway) -> AsyncFHIRClient:
    return AsyncFHIRClient(f"{gw.http_url}/fhir", authorization=f"ApiKey {API_KEY}")


# -- metadata ---------------------------------------------------------------------------------


async def test_metadata_is_an_open_valid_r4_capability_statement(gw: RunningGateway) -> None:
    async with fhir_session(gw, key=None) as anonymous:
        answer = await call(anonymous, "GET", "/fhir/metadata")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith(FHIR_JSON)
    CapabilityStatement.model_validate(answer.json)  # raises if R4 refuses it
    statement = answer.json
    assert statement["fhirVersion"] == "4.0.1"
    [rest] = statement["rest"]
    resources = {r["type"]: r for r in rest["resource"]}

    def names(type_: str, element: str, key: str) -> set[str]:
        return {item[key] if key else item for item in resources[type_].get(element, [])}

    assert names("Patient", "searchParam", "name") >= {
        "_id", "identifier", "name", "family", "given", "birthdate", "gender", "phone",
        "email", "address-postalcode"}
    assert names("Patient", "interaction", "code") >= {
        "read", "vread", "update", "delete", "create", "search-type", "history-instance"}
    for type_ in ("Observation", "Encounter", "Appointment"):
        assert "patient" in names(type_, "searchParam", "name")
    assert "Observation:patient" in names("Observation", "searchInclude", "")
    # _revinclude is served, so it is declared on the type it reaches back to.
    assert names("Patient", "searchRevInclude", "") >= {
        "Observation:patient", "Encounter:patient", "Appointment:patient"}
    assert "Patient:general-practitioner" in names("Practitioner", "searchRevInclude", "")
    assert {i["code"] for i in rest["interaction"]} == {"batch", "transaction"}


async def test_a_protected_route_without_credentials_is_401(gw: RunningGateway) -> None:
    async with fhir_session(gw, key=None) as anonymous:
        answer = await call(anonymous, "GET", "/fhir/Patient")
    assert answer.status == 401
    assert answer.issue()["code"] == "login"
    assert "www-authenticate" in answer.headers


# -- create, read, vread, update, delete, history -----------------------------------------------


async def test_create_answers_201_with_location_etag_and_last_modified(
        http: aiohttp.ClientSession, gw: RunningGateway) -> None:
    answer = await call(http, "POST", "/fhir/Patient",
                        body=patient("crud-1", id="client-chosen", birthDate="1970-01-15"))
    assert answer.status == 201
    created = answer.json
    # FHIR R4 http.html#create: the server assigns the id, ignoring one the client sent.
    assert created["id"] != "client-chosen"
    assert created["meta"]["versionId"] == "1"
    assert answer.headers["etag"] == 'W/"1"'
    assert answer.headers["location"] == (
        f"{gw.http_url}/fhir/Patient/{created['id']}/_history/1")
    modified = parsedate_to_datetime(answer.headers["last-modified"])
    updated = datetime.fromisoformat(created["meta"]["lastUpdated"].replace("Z", "+00:00"))
    assert modified == updated.replace(microsecond=0)
    assert abs((datetime.now(UTC) - modified).total_seconds()) < 60


async def test_reads_serve_exactly_the_stored_bytes(http: aiohttp.ClientSession) -> None:
    created = await call(http, "POST", "/fhir/Patient",
                         body=patient("bytes-1", name=[{"family": "Lévesque"}]))
    id_ = created.json["id"]
    first = await call(http, "GET", f"/fhir/Patient/{id_}")
    second = await call(http, "GET", f"/fhir/Patient/{id_}")
    assert first.status == second.status == 200
    assert first.body == second.body == created.body
    assert first.headers["etag"] == 'W/"1"'
    assert first.headers["last-modified"] == created.headers["last-modified"]
    not_modified = await call(http, "GET", f"/fhir/Patient/{id_}",
                              headers={"If-None-Match": 'W/"1"'})
    assert not_modified.status == 304


async def test_update_makes_a_new_version_and_vread_serves_the_old_one(
        http: aiohttp.ClientSession) -> None:
    created = (await call(http, "POST", "/fhir/Patient", body=patient("upd-1", gender="female"))
               ).json
    id_ = created["id"]
    changed = {**created, "gender": "other"}
    answer = await call(http, "PUT", f"/fhir/Patient/{id_}", body=changed)
    assert answer.status == 200
    assert answer.json["meta"]["versionId"] == "2"
    assert answer.headers["etag"] == 'W/"2"'
    assert "location" not in answer.headers  # only a create names a Location
    assert answer.json["meta"]["lastUpdated"] > created["meta"]["lastUpdated"]
    current = await call(http, "GET", f"/fhir/Patient/{id_}")
    assert current.json["gender"] == "other" and current.body == answer.body
    old = await call(http, "GET", f"/fhir/Patient/{id_}/_history/1")
    assert old.status == 200
    assert old.json["gender"] == "female"
    assert old.json["meta"]["versionId"] == "1"
    assert old.headers["etag"] == 'W/"1"'
    missing = await call(http, "GET", f"/fhir/Patient/{id_}/_history/9")
    assert missing.status == 404


async def test_update_of_an_unknown_id_creates_it(http: aiohttp.ClientSession) -> None:
    answer = await call(http, "PUT", "/fhir/Patient/chosen-id-1",
                        body=patient("upsert-1", id="chosen-id-1"))
    assert answer.status == 201
    assert answer.json["id"] == "chosen-id-1"
    assert answer.headers["location"].endswith("/fhir/Patient/chosen-id-1/_history/1")


async def test_delete_then_read_is_410_and_the_deletion_is_a_version(
        http: aiohttp.ClientSession) -> None:
    id_ = (await create(http, patient("del-1")))["id"]
    deleted = await call(http, "DELETE", f"/fhir/Patient/{id_}")
    assert deleted.status == 204
    assert deleted.body == b""
    gone = await call(http, "GET", f"/fhir/Patient/{id_}")
    assert gone.status == 410
    assert gone.issue()["code"] == "deleted"
    still = await call(http, "GET", f"/fhir/Patient/{id_}/_history/1")
    assert still.status == 200
    assert (await call(http, "GET", f"/fhir/Patient/{id_}/_history/2")).status == 410
    history = (await call(http, "GET", f"/fhir/Patient/{id_}/_history")).json
    assert [e["response"]["etag"] for e in history["entry"]] == ['W/"2"', 'W/"1"']
    assert history["entry"][0]["request"]["method"] == "DELETE"
    assert "resource" not in history["entry"][0]
    found = (await call(http, "GET", f"/fhir/Patient?_id={id_}")).json
    assert found.get("entry", []) == []
    # An update brings it back as a new version (and, being no longer live, a create).
    back = await call(http, "PUT", f"/fhir/Patient/{id_}", body=patient("del-1", id=id_))
    assert back.status == 201
    assert back.json["meta"]["versionId"] == "3"
    assert (await call(http, "GET", f"/fhir/Patient/{id_}")).status == 200


async def test_instance_history_lists_versions_newest_first(
        http: aiohttp.ClientSession) -> None:
    created = await create(http, patient("hist-1", gender="female"))
    id_ = created["id"]
    for gender in ("male", "other"):
        answer = await call(http, "PUT", f"/fhir/Patient/{id_}",
                            body={**created, "gender": gender})
        assert answer.status == 200
    answer = await call(http, "GET", f"/fhir/Patient/{id_}/_history")
    assert answer.status == 200
    history = answer.json
    assert history["resourceType"] == "Bundle" and history["type"] == "history"
    assert history["total"] == 3
    entries = history["entry"]
    assert [e["resource"]["meta"]["versionId"] for e in entries] == ["3", "2", "1"]
    assert [e["resource"]["gender"] for e in entries] == ["other", "male", "female"]
    assert [e["request"]["method"] for e in entries] == ["PUT", "PUT", "POST"]
    assert entries[0]["request"]["url"] == f"Patient/{id_}"
    assert entries[2]["request"]["url"] == "Patient"
    assert all(e["response"]["status"].startswith("200") for e in entries)
    assert [e["response"]["etag"] for e in entries] == ['W/"3"', 'W/"2"', 'W/"1"']
    stamps = [e["response"]["lastModified"] for e in entries]
    assert stamps == sorted(stamps, reverse=True)


async def test_type_history_lists_every_version_of_the_type(
        http: aiohttp.ClientSession) -> None:
    first = await create(http, patient("thist-1"))
    second = await create(http, patient("thist-2"))
    await call(http, "PUT", f"/fhir/Patient/{first['id']}", body={**first, "gender": "male"})
    await create(http, observation(f"Patient/{first['id']}", label="thist-obs", loinc="8867-4",
                                   effectiveDateTime="2024-03-01"))
    answer = await call(http, "GET", "/fhir/Patient/_history")
    assert answer.status == 200
    history = answer.json
    assert history["type"] == "history" and history["total"] == 3
    seen = [(e["resource"]["id"], e["resource"]["meta"]["versionId"])
            for e in history["entry"]]
    assert seen == [(first["id"], "2"), (second["id"], "1"), (first["id"], "1")]


async def test_history_since_takes_an_instant_with_an_offset(
        http: aiohttp.ClientSession) -> None:
    created = await create(http, patient("since-1"))
    stamp = datetime.fromisoformat(created["meta"]["lastUpdated"].replace("Z", "+00:00"))
    await call(http, "PUT", f"/fhir/Patient/{created['id']}", body={**created, "gender": "male"})
    # The same instant, an hour before it and an hour after it, written at UTC+02:00.
    for shift, versions in ((0, ["2", "1"]), (-1, ["2", "1"]), (1, [])):
        moment = stamp.astimezone(timezone(timedelta(hours=2))) + timedelta(hours=shift)
        since = moment.isoformat(timespec="microseconds")
        history = (await call(http, "GET", f"/fhir/Patient/{created['id']}/_history",
                              params={"_since": since})).json
        found = [e["resource"]["meta"]["versionId"] for e in history.get("entry", [])]
        assert found == versions, since


@pytest.mark.parametrize("since", [f"{CANARY}", "2024-13-45", "yesterday"])
async def test_history_since_that_is_no_instant_is_400(http: aiohttp.ClientSession,
                                                      since: str) -> None:
    answer = await call(http, "GET", "/fhir/Patient/_history", params={"_since": since})
    assert answer.status == 400
    assert answer.issue()["expression"] == ["_since"]
    assert_no_canary(answer)


async def test_history_pages_with_count(http: aiohttp.ClientSession) -> None:
    created = await create(http, patient("hpage-1"))
    for gender in ("male", "female", "other"):
        await call(http, "PUT", f"/fhir/Patient/{created['id']}",
                   body={**created, "gender": gender})
    versions: list[str] = []
    path: str | None = f"/fhir/Patient/{created['id']}/_history?_count=3"
    while path is not None:
        page = (await call(http, "GET", path)).json
        versions += [e["resource"]["meta"]["versionId"] for e in page["entry"]]
        following = link(page, "next")
        path = local(following) if following else None
    assert versions == ["4", "3", "2", "1"]


async def test_an_update_that_changes_nothing_adds_no_version(
        http: aiohttp.ClientSession) -> None:
    created = await create(http, patient("same-1", gender="male"))
    answer = await call(http, "PUT", f"/fhir/Patient/{created['id']}", body=created)
    assert answer.status == 200
    assert answer.json["meta"]["versionId"] == "1"
    assert answer.headers["etag"] == 'W/"1"'


async def test_the_store_sets_version_and_last_updated_not_the_client(
        http: aiohttp.ClientSession) -> None:
    sent = patient("meta-1", meta={"versionId": "99", "lastUpdated": "2000-01-01T00:00:00Z",
                                   "tag": [{"system": "urn:synthetic", "code": "t1"}]})
    created = await create(http, sent)
    assert created["meta"]["versionId"] == "1"
    assert created["meta"]["lastUpdated"] > "2020"
    assert created["meta"]["tag"] == [{"system": "urn:synthetic", "code": "t1"}]


async def test_configured_base_url_names_locations_and_links(tmp_path: Path) -> None:
    public = "https://gw.example.org/fhir"
    overrides: dict[str, Any] = {"fhir.base_url": public}
    running = await start_fhir_gateway(tmp_path / "var", **overrides)
    try:
        async with fhir_session(running) as session:
            first = await call(session, "POST", "/fhir/Patient", body=patient("base-1"))
            await create(session, patient("base-2"))
            assert first.headers["location"] == (
                f"{public}/Patient/{first.json['id']}/_history/1")
            page = (await call(session, "GET", "/fhir/Patient?_count=1")).json
        assert page["entry"][0]["fullUrl"].startswith(f"{public}/Patient/")
        assert link(page, "next") == f"{public}/Patient?_count=1&_offset=1"
    finally:
        await running.runner.cleanup()


async def test_fhirpy_creates_reads_searches_updates_and_deletes(
        fhir: AsyncFHIRClient) -> None:
    created = fhir.resource("Patient", identifier=[{"system": SYSTEM, "value": "fhirpy-1"}],
                            name=[{"family": "Okonkwo", "given": ["Ada"]}],
                            birthDate="1981-07-04", gender="female")
    await created.save()
    assert created.id and created["meta"]["versionId"] == "1"

    read = await fhir.reference("Patient", created.id).to_resource()
    assert read["name"][0]["family"] == "Okonkwo"

    found = await fhir.resources("Patient").search(
        identifier=f"{SYSTEM}|fhirpy-1").fetch_all()
    assert [p.id for p in found] == [created.id]
    assert [p.id for p in await fhir.resources("Patient").search(
        family="okonk", birthdate="1981-07-04").fetch()] == [created.id]

    read["gender"] = "unknown"
    await read.save()
    assert read["meta"]["versionId"] == "2"
    assert (await fhir.get("Patient", created.id))["gender"] == "unknown"

    # Conditional update through the client: PUT /Patient?identifier=...
    replacement = fhir.resource("Patient", identifier=[{"system": SYSTEM, "value": "fhirpy-1"}],
                                gender="male")
    updated, was_created = await fhir.resources("Patient").search(
        identifier=f"{SYSTEM}|fhirpy-1").update(replacement)
    assert not was_created and updated.id == created.id
    assert updated["meta"]["versionId"] == "3"

    await read.delete()  # type: ignore[no-untyped-call]
    with pytest.raises(ResourceNotFound):
        await fhir.get("Patient", created.id)
    assert await fhir.resources("Patient").search(identifier=f"{SYSTEM}|fhirpy-1").fetch() == []


# -- conditional interactions -------------------------------------------------------------------


@pytest.mark.parametrize(("existing", "status"), [(0, 201), (1, 200), (2, 412)])
async def test_if_none_exist(http: aiohttp.ClientSession, existing: int, status: int) -> None:
    ids = [(await create(http, patient("cond-1")))["id"] for _ in range(existing)]
    answer = await call(http, "POST", "/fhir/Patient", body=patient("cond-1", gender="male"),
                        headers={"If-None-Exist": f"identifier={SYSTEM}|cond-1"})
    assert answer.status == status, answer.body
    if status == 201:
        assert answer.json["gender"] == "male"
    elif status == 200:  # the existing one, untouched
        assert answer.json["id"] == ids[0]
        assert answer.json["meta"]["versionId"] == "1"
        assert "gender" not in answer.json
    else:
        assert answer.issue()["code"] == "conflict"
    assert await count(http, f"Patient?identifier={SYSTEM}|cond-1") == max(existing, 1)


@pytest.mark.parametrize(("existing", "status"), [(0, 201), (1, 200), (2, 412)])
async def test_conditional_update(http: aiohttp.ClientSession, existing: int,
                                  status: int) -> None:
    ids = [(await create(http, patient("cupd-1")))["id"] for _ in range(existing)]
    answer = await call(http, "PUT", f"/fhir/Patient?identifier={SYSTEM}|cupd-1",
                        body=patient("cupd-1", gender="male"))
    assert answer.status == status, answer.body
    if status == 201:
        assert answer.json["meta"]["versionId"] == "1"
        assert answer.headers["location"].endswith(f"/Patient/{answer.json['id']}/_history/1")
    elif status == 200:
        assert answer.json["id"] == ids[0]
        assert answer.json["meta"]["versionId"] == "2"
        assert answer.json["gender"] == "male"
    else:
        for id_ in ids:  # neither was changed
            assert "gender" not in (await call(http, "GET", f"/fhir/Patient/{id_}")).json


@pytest.mark.parametrize(("if_match", "status"), [('W/"1"', 200), ('W/"7"', 412),
                                                  ('"1"', 200)])
async def test_update_with_if_match(http: aiohttp.ClientSession, if_match: str,
                                    status: int) -> None:
    created = await create(http, patient("ifm-1"))
    answer = await call(http, "PUT", f"/fhir/Patient/{created['id']}",
                        body={**created, "gender": "male"}, headers={"If-Match": if_match})
    assert answer.status == status, answer.body
    current = (await call(http, "GET", f"/fhir/Patient/{created['id']}")).json
    assert current["meta"]["versionId"] == ("2" if status == 200 else "1")
    if status == 412:
        assert answer.issue()["code"] == "conflict"


async def test_delete_with_a_stale_if_match_is_412(http: aiohttp.ClientSession) -> None:
    created = await create(http, patient("ifm-del"))
    answer = await call(http, "DELETE", f"/fhir/Patient/{created['id']}",
                        headers={"If-Match": 'W/"2"'})
    assert answer.status == 412
    assert (await call(http, "GET", f"/fhir/Patient/{created['id']}")).status == 200


@pytest.mark.parametrize(("existing", "status"), [(0, 204), (1, 204), (2, 412)])
async def test_conditional_delete(http: aiohttp.ClientSession, existing: int,
                                  status: int) -> None:
    ids = [(await create(http, patient("cdel-1")))["id"] for _ in range(existing)]
    bystander = (await create(http, patient("cdel-2")))["id"]
    answer = await call(http, "DELETE", f"/fhir/Patient?identifier={SYSTEM}|cdel-1")
    assert answer.status == status, answer.body
    expected = 410 if status == 204 else 200
    for id_ in ids:
        assert (await call(http, "GET", f"/fhir/Patient/{id_}")).status == expected
    assert (await call(http, "GET", f"/fhir/Patient/{bystander}")).status == 200


async def test_concurrent_conditional_creates_make_one_resource(
        http: aiohttp.ClientSession) -> None:
    answers = await asyncio.gather(*(
        call(http, "POST", "/fhir/Patient", body=patient("race-1"),
             headers={"If-None-Exist": f"identifier={SYSTEM}|race-1"}) for _ in range(8)))
    assert sorted(a.status for a in answers) == [200] * 7 + [201]
    assert len({a.json["id"] for a in answers}) == 1
    assert await count(http, f"Patient?identifier={SYSTEM}|race-1") == 1


async def test_concurrent_updates_with_one_if_match_let_one_win(
        http: aiohttp.ClientSession) -> None:
    created = await create(http, patient("race-2"))
    answers = await asyncio.gather(*(
        call(http, "PUT", f"/fhir/Patient/{created['id']}",
             body={**created, "name": [{"family": f"Writer{n}"}]},
             headers={"If-Match": 'W/"1"'}) for n in range(6)))
    assert sorted(a.status for a in answers) == [200] + [412] * 5
    current = (await call(http, "GET", f"/fhir/Patient/{created['id']}")).json
    assert current["meta"]["versionId"] == "2"


# -- Prefer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT"])
@pytest.mark.parametrize("prefer", ["minimal", "OperationOutcome", "representation", None])
async def test_prefer_return(http: aiohttp.ClientSession, method: str,
                             prefer: str | None) -> None:
    headers = {"Prefer": f"return={prefer}"} if prefer else {}
    if method == "POST":
        answer = await call(http, "POST", "/fhir/Patient", body=patient("prefer-1"),
                            headers=headers)
        status, version = 201, "1"
    else:
        created = await create(http, patient("prefer-1"))
        answer = await call(http, "PUT", f"/fhir/Patient/{created['id']}",
                            body={**created, "gender": "male"}, headers=headers)
        status, version = 200, "2"
    assert answer.status == status
    assert answer.headers["etag"] == f'W/"{version}"'
    assert "last-modified" in answer.headers
    assert ("location" in answer.headers) == (method == "POST")
    if prefer == "minimal":
        assert answer.body == b""
    elif prefer == "OperationOutcome":
        issue = answer.issue()
        assert issue["severity"] == "information"
    else:
        assert answer.json["resourceType"] == "Patient"
        assert answer.json["meta"]["versionId"] == version


# -- search -------------------------------------------------------------------------------------


@dataclass
class Seeded:
    http: aiohttp.ClientSession
    ids: dict[str, str]  # label -> id

    async def search(self, path: str, **kwargs: Any) -> dict[str, Any]:
        answer = await call(self.http, "GET", path.format(**self.ids), **kwargs)
        assert answer.status == 200, answer.body
        assert answer.json["type"] == "searchset"
        bundle: dict[str, Any] = answer.json
        return bundle


PATIENTS = {
    "pat-a": {"name": [{"family": "Zephyrson", "given": ["Alma", "Beth"]}],
              "birthDate": "1970-01-15", "gender": "female",
              "telecom": [{"system": "phone", "value": "555-0100"},
                          {"system": "email", "value": "alma@example.org"}],
              "address": [{"postalCode": "90210"}]},
    "pat-b": {"name": [{"family": "Zephyrsonne", "given": ["Cora"]}],
              "birthDate": "1975-05-05", "gender": "female",
              "telecom": [{"system": "email", "value": "cora@example.org"}],
              "address": [{"postalCode": "90211"}]},
    "pat-c": {"name": [{"family": "Quillby", "given": ["Dov"]}],
              "birthDate": "1985-06-30", "gender": "male",
              "telecom": [{"system": "phone", "value": "555-0199"}],
              "address": [{"postalCode": "10001"}]},
    **{f"pat-f{n}": {"name": [{"family": "Fillmore", "given": [f"F{n}"]}],
                     "birthDate": f"2001-01-0{n}", "gender": "unknown"} for n in range(1, 5)},
}


async def seed(http: aiohttp.ClientSession) -> dict[str, str]:
    """Seven patients; observations, encounters and appointments of pat-a and pat-c."""
    ids: dict[str, str] = {}
    for label, elements in PATIENTS.items():
        ids[label] = (await create(http, patient(label, **elements)))["id"]
    a, c = f"Patient/{ids['pat-a']}", f"Patient/{ids['pat-c']}"
    others = [
        observation(a, label="obs-1", loinc="8867-4", effectiveDateTime="2024-03-01T10:00:00Z"),
        observation(a, label="obs-2", loinc="8310-5", status="preliminary",
                    effectiveDateTime="2024-03-05T08:00:00Z"),
        observation(c, label="obs-3", loinc="8867-4", effectiveDateTime="2024-04-01T12:00:00Z"),
        encounter(a, label="enc-1",
                  period={"start": "2024-03-01T09:00:00Z", "end": "2024-03-01T11:00:00Z"}),
        encounter(c, label="enc-2", status="in-progress", class_code="IMP",
                  period={"start": "2024-05-01T09:00:00Z"}),
        {"resourceType": "Appointment", "identifier": [{"system": SYSTEM, "value": "appt-1"}],
         "status": "booked", "start": "2024-06-01T09:00:00Z", "end": "2024-06-01T09:30:00Z",
         "participant": [{"actor": {"reference": a}, "status": "accepted"}]},
        {"resourceType": "Appointment", "identifier": [{"system": SYSTEM, "value": "appt-2"}],
         "status": "cancelled", "start": "2024-07-01T09:00:00Z", "end": "2024-07-01T09:30:00Z",
         "participant": [{"actor": {"reference": c}, "status": "declined"}]},
    ]
    for resource in others:
        ids[resource["identifier"][0]["value"]] = (await create(http, resource))["id"]
    return ids


class GatewayThread:
    """A gateway serving from its own thread and event loop, so one seeded gateway can
    answer a whole module's read-only searches (pytest-aiohttp loops are per test)."""

    def __init__(self, data_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running = self.run(start_fhir_gateway(data_dir))

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def stop(self) -> None:
        try:
            self.run(self.running.runner.cleanup())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture(scope="module")
def search_gateway(tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[tuple[RunningGateway, dict[str, str]]]:
    """One seeded gateway for the module's searches: they only read."""
    server = GatewayThread(tmp_path_factory.mktemp("search") / "var")

    async def seeded_ids() -> dict[str, str]:
        async with fhir_session(server.running) as session:
            return await seed(session)

    try:
        yield server.running, server.run(seeded_ids())
    finally:
        server.stop()


@pytest.fixture
async def seeded(search_gateway: tuple[RunningGateway, dict[str, str]]
                 ) -> AsyncIterator[Seeded]:
    running, ids = search_gateway
    async with fhir_session(running) as session:
        yield Seeded(session, ids)


@pytest.fixture
def search_fhir(search_gateway: tuple[RunningGateway, dict[str, str]]) -> AsyncFHIRClient:
    return AsyncFHIRClient(f"{search_gateway[0].http_url}/fhir",
                           extra_headers={"X-API-Key": API_KEY})


@pytest.mark.parametrize(("query", "expected"), [
    ("Patient?_id={pat-a}", ["pat-a"]),
    ("Patient?_id={pat-a},{pat-c}", ["pat-a", "pat-c"]),
    (f"Patient?identifier={SYSTEM}|pat-b", ["pat-b"]),
    ("Patient?identifier=pat-b", ["pat-b"]),
    ("Patient?identifier=urn:other|pat-b", []),
    ("Patient?name=zephyr", ["pat-a", "pat-b"]),
    ("Patient?name=alma", ["pat-a"]),
    ("Patient?family=ZEPHYRSON", ["pat-a", "pat-b"]),
    ("Patient?family:exact=Zephyrson", ["pat-a"]),
    ("Patient?family:exact=zephyrson", []),
    ("Patient?given=beth", ["pat-a"]),
    ("Patient?given=cora&family=zeph", ["pat-b"]),
    ("Patient?birthdate=1970-01-15", ["pat-a"]),
    ("Patient?birthdate=1975", ["pat-b"]),
    ("Patient?birthdate=lt1980&family=zeph", ["pat-a", "pat-b"]),
    ("Patient?gender=male", ["pat-c"]),
    ("Patient?gender=female,male", ["pat-a", "pat-b", "pat-c"]),
    ("Patient?phone=555-0100", ["pat-a"]),
    ("Patient?phone=5550199", ["pat-c"]),
    ("Patient?email=alma@example.org", ["pat-a"]),
    ("Patient?email=555-0100", []),
    ("Patient?address-postalcode=90210", ["pat-a"]),
    ("Patient?address-postalcode=9021", ["pat-a", "pat-b"]),
    ("Patient?email:missing=false", ["pat-a", "pat-b"]),
    ("Patient?phone:missing=true&gender=female", ["pat-b"]),
    ("Observation?patient=Patient/{pat-a}", ["obs-1", "obs-2"]),
    ("Observation?patient={pat-c}", ["obs-3"]),
    ("Observation?subject=Patient/{pat-c}", ["obs-3"]),
    (f"Observation?code={LOINC}|8867-4", ["obs-1", "obs-3"]),
    ("Observation?code=8310-5", ["obs-2"]),
    ("Observation?status=preliminary", ["obs-2"]),
    ("Observation?status:not=preliminary", ["obs-1", "obs-3"]),
    ("Observation?date=2024-03-01", ["obs-1"]),
    ("Observation?date=eq2024-03", ["obs-1", "obs-2"]),
    ("Observation?date=ne2024-03-01", ["obs-2", "obs-3"]),
    ("Observation?date=lt2024-03-05", ["obs-1"]),
    ("Observation?date=le2024-03-05", ["obs-1", "obs-2"]),
    ("Observation?date=gt2024-03-05", ["obs-3"]),
    ("Observation?date=ge2024-03-05", ["obs-2", "obs-3"]),
    ("Observation?date=ge2024-03-02&date=lt2024-04", ["obs-2"]),
    ("Observation?patient={pat-a}&status=final", ["obs-1"]),
    ("Encounter?patient={pat-a}", ["enc-1"]),
    ("Encounter?subject=Patient/{pat-c}", ["enc-2"]),
    ("Encounter?status=in-progress", ["enc-2"]),
    ("Encounter?date=2024-03-01", ["enc-1"]),
    ("Encounter?date=ge2024-04", ["enc-2"]),
    ("Appointment?patient={pat-c}", ["appt-2"]),
    ("Appointment?status=booked", ["appt-1"]),
    ("Appointment?date=lt2024-06-15", ["appt-1"]),
    ("Appointment?date=2024-07-01&patient={pat-c}", ["appt-2"]),
])
async def test_search_parameter(seeded: Seeded, query: str, expected: list[str]) -> None:
    bundle = await seeded.search("/fhir/" + query)
    assert sorted(labels(bundle)) == expected


async def test_paging_through_next_links_sees_every_patient_once(seeded: Seeded) -> None:
    patients = [label for label in seeded.ids if label.startswith("pat-")]
    seen: list[str] = []
    path: str | None = "/fhir/Patient?_count=2"
    pages = 0
    while path is not None:
        bundle = await seeded.search(path)
        entries = labels(bundle)
        assert len(entries) <= 2
        seen += entries
        pages += 1
        assert pages <= len(patients)
        following = link(bundle, "next")
        path = local(following) if following else None
    assert sorted(seen) == sorted(patients)
    assert pages == (len(patients) + 1) // 2


async def test_fhirpy_fetch_all_follows_the_paging_links(
        seeded: Seeded, search_fhir: AsyncFHIRClient) -> None:
    found = await search_fhir.resources("Patient").limit(3).fetch_all()
    assert sorted(p.id for p in found) == sorted(
        id_ for label, id_ in seeded.ids.items() if label.startswith("pat-"))


@pytest.mark.parametrize(("sort", "expected"), [
    ("date", ["obs-1", "obs-2", "obs-3"]),
    ("-date", ["obs-3", "obs-2", "obs-1"]),
])
async def test_sort(seeded: Seeded, sort: str, expected: list[str]) -> None:
    assert labels(await seeded.search(f"/fhir/Observation?_sort={sort}")) == expected


@pytest.mark.parametrize(("sort", "expected"), [
    ("birthdate", ["pat-a", "pat-b", "pat-c"]),
    ("-birthdate", ["pat-c", "pat-b", "pat-a"]),
])
async def test_sort_patients(seeded: Seeded, sort: str, expected: list[str]) -> None:
    bundle = await seeded.search(f"/fhir/Patient?gender=male,female&_sort={sort}")
    assert labels(bundle) == expected


async def test_sort_by_a_token_groups_its_values_then_sorts_within(seeded: Seeded) -> None:
    # In a sealed data dir a token sorts by its blind index: the groups come in an order
    # that depends on the key (docs/encryption.md), each group sorted by the next key.
    bundle = await seeded.search("/fhir/Patient?gender=male,female&_sort=-gender,birthdate")
    assert labels(bundle) in (["pat-c", "pat-a", "pat-b"], ["pat-a", "pat-b", "pat-c"])


async def test_include_adds_the_referenced_patient(seeded: Seeded) -> None:
    bundle = await seeded.search("/fhir/Observation?code=8310-5&_include=Observation:patient")
    assert labels(bundle) == ["obs-2"]
    assert labels(bundle, "include") == ["pat-a"]


async def test_revinclude_adds_the_observations_of_the_patient(seeded: Seeded) -> None:
    bundle = await seeded.search("/fhir/Patient?_id={pat-a}&_revinclude=Observation:patient")
    assert labels(bundle) == ["pat-a"]
    assert sorted(labels(bundle, "include")) == ["obs-1", "obs-2"]


async def test_summary_count_answers_the_total_only(seeded: Seeded) -> None:
    bundle = await seeded.search("/fhir/Patient?family=zephyrson&_summary=count")
    assert bundle["total"] == 2
    assert "entry" not in bundle


async def test_total_accurate_counts_beyond_the_page(seeded: Seeded) -> None:
    bundle = await seeded.search("/fhir/Patient?_count=2&_total=accurate")
    assert bundle["total"] == len(PATIENTS)
    assert len(bundle["entry"]) == 2


async def test_elements_keeps_only_those_and_tags_subsetted(seeded: Seeded) -> None:
    bundle = await seeded.search("/fhir/Patient?_id={pat-a}&_elements=name,gender")
    [entry] = bundle["entry"]
    resource = entry["resource"]
    assert set(resource) == {"resourceType", "id", "meta", "name", "gender"}
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
            "code": "SUBSETTED"} in resource["meta"]["tag"]
    read = await call(seeded.http, "GET", "/fhir/Patient/{}?_elements=birthDate".format(
        seeded.ids["pat-a"]))
    assert set(read.json) == {"resourceType", "id", "meta", "birthDate"}
    assert read.json["meta"]["tag"][-1]["code"] == "SUBSETTED"


@pytest.mark.parametrize("elements", ["effective,subject", "effectiveDateTime,subject"])
async def test_elements_on_a_read_names_a_choice_element_like_a_search(
        seeded: Seeded, elements: str) -> None:
    id_ = seeded.ids["obs-1"]
    read = await call(seeded.http, "GET", f"/fhir/Observation/{id_}?_elements={elements}")
    found = await seeded.search(f"/fhir/Observation?_id={id_}&_elements={elements}")
    assert read.status == 200
    # Observation.status and .code are 1..1 in R4: kept with what was asked for.
    assert set(read.json) == {"resourceType", "id", "meta", "effectiveDateTime", "subject",
                              "status", "code"}
    assert read.json == found["entry"][0]["resource"]


async def test_elements_on_a_read_refuses_an_unknown_element(seeded: Seeded) -> None:
    answer = await call(seeded.http, "GET",
                        f"/fhir/Patient/{seeded.ids['pat-a']}?_elements={CANARY}")
    assert answer.status == 400
    assert answer.issue()["expression"] == ["_elements"]
    assert_no_canary(answer)


@pytest.mark.parametrize("query", [
    "family=zeph&_sort=birthdate",
    "gender=male&_revinclude=Observation:patient",
    "birthdate=ge1975&_count=1&_total=accurate",
])
async def test_post_search_answers_like_get(seeded: Seeded, query: str) -> None:
    by_get = await call(seeded.http, "GET", f"/fhir/Patient?{query}")
    by_post = await call(seeded.http, "POST", "/fhir/Patient/_search", raw=query.encode(),
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert by_get.status == by_post.status == 200
    assert by_post.json.get("entry") == by_get.json.get("entry")
    assert by_post.json.get("total") == by_get.json.get("total")
    assert by_get.json.get("entry")


async def test_search_through_fhirpy_with_modifiers(
        seeded: Seeded, search_fhir: AsyncFHIRClient) -> None:
    exact = await search_fhir.resources("Patient").search(family__exact="Zephyrson").fetch()
    assert [p.id for p in exact] == [seeded.ids["pat-a"]]
    observations = await search_fhir.resources("Observation").search(
        patient=seeded.ids["pat-a"], date__ge="2024-03-02").fetch()
    assert [o.id for o in observations] == [seeded.ids["obs-2"]]


async def test_post_search_next_link_pages_the_same_search(seeded: Seeded) -> None:
    answer = await call(seeded.http, "POST", "/fhir/Patient/_search",
                        raw=b"family=zeph&_sort=birthdate&_count=1",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status == 200
    seen = labels(answer.json)
    following = link(answer.json, "next")
    while following is not None:
        bundle = await seeded.search(local(following))
        seen += labels(bundle)
        following = link(bundle, "next")
    assert seen == ["pat-a", "pat-b"]


async def test_search_in_a_batch_links_to_the_searched_type(seeded: Seeded) -> None:
    sent = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient?family=zeph&_sort=birthdate&_count=1"}}]}
    answer = await call(seeded.http, "POST", "/fhir", body=sent)
    assert answer.status == 200, answer.body
    [entry] = answer.json["entry"]
    page = entry["resource"]
    assert labels(page) == ["pat-a"]
    assert urlsplit(link(page, "self") or "").path == "/fhir/Patient"
    following = link(page, "next")
    assert following is not None
    assert labels(await seeded.search(local(following))) == ["pat-b"]


async def test_lenient_handling_ignores_an_unknown_parameter(seeded: Seeded) -> None:
    strict = await call(seeded.http, "GET", "/fhir/Patient?family=quill&unknown-param=1",
                        headers={"Prefer": "handling=strict"})
    assert strict.status == 400
    for prefer in ({}, {"Prefer": "handling=lenient"}):  # lenient is the default
        bundle = await seeded.search("/fhir/Patient?family=quill&unknown-param=1",
                                     headers=prefer)
        assert labels(bundle) == ["pat-c"]


# -- batch and transaction ----------------------------------------------------------------------


def bundle_of(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post_entry(resource: dict[str, Any], full_url: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"resource": resource,
                             "request": {"method": "POST", "url": resource["resourceType"]}}
    if full_url:
        entry["fullUrl"] = full_url
    return entry


async def test_transaction_rewrites_urn_uuid_references(http: aiohttp.ClientSession) -> None:
    urn = "urn:uuid:1b0a3c7e-5d1f-4f8e-9a51-3f6f4c1d2e10"
    sent = bundle_of(
        "transaction",
        post_entry(observation(urn, label="tx-obs", loinc="8867-4",
                               effectiveDateTime="2024-03-01"),
                   "urn:uuid:0d6e7c52-3a0c-4b7f-8b43-6d2f7e9c1a55"),
        post_entry(patient("tx-pat"), urn))
    answer = await call(http, "POST", "/fhir", body=sent)
    assert answer.status == 200, answer.body
    result = answer.json
    assert result["type"] == "transaction-response"
    obs_entry, pat_entry = result["entry"]
    assert [e["response"]["status"] for e in result["entry"]] == ["201 Created", "201 Created"]
    patient_id = pat_entry["resource"]["id"]
    assert pat_entry["response"]["location"] == f"Patient/{patient_id}/_history/1"
    assert obs_entry["resource"]["subject"]["reference"] == f"Patient/{patient_id}"
    stored = await call(http, "GET", f"/fhir/Observation/{obs_entry['resource']['id']}")
    assert stored.json["subject"]["reference"] == f"Patient/{patient_id}"
    found = (await call(http, "GET", f"/fhir/Observation?patient={patient_id}")).json
    assert labels(found) == ["tx-obs"]


async def test_transaction_with_a_stale_if_match_writes_nothing(
        http: aiohttp.ClientSession) -> None:
    existing = await create(http, patient("txr-existing"))
    sent = bundle_of(
        "transaction",
        post_entry(patient("txr-new")),
        {"resource": {**existing, "gender": "male"},
         "request": {"method": "PUT", "url": f"Patient/{existing['id']}",
                     "ifMatch": 'W/"3"'}})
    answer = await call(http, "POST", "/fhir", body=sent)
    assert answer.status == 412, answer.body
    assert "Bundle.entry[1]" in answer.issue()["diagnostics"]
    assert await count(http, f"Patient?identifier={SYSTEM}|txr-new") == 0
    current = (await call(http, "GET", f"/fhir/Patient/{existing['id']}")).json
    assert current["meta"]["versionId"] == "1"


async def test_transaction_with_an_invalid_resource_writes_nothing(
        http: aiohttp.ClientSession) -> None:
    sent = bundle_of("transaction", post_entry(patient("txi-1")),
                     post_entry(patient("txi-2", birthDate=f"{CANARY}-not-a-date")))
    answer = await call(http, "POST", "/fhir", body=sent)
    assert answer.status == 400, answer.body  # R4 http.html: basic validation is 400
    issue = answer.issue()
    assert "Bundle.entry[1]" in issue["diagnostics"]
    assert "birthDate" in issue["diagnostics"]
    assert_no_canary(answer)
    assert await count(http, f"Patient?identifier={SYSTEM}|txi-1") == 0


async def test_batch_answers_each_entry_on_its_own(http: aiohttp.ClientSession) -> None:
    existing = await create(http, patient("batch-existing", gender="female"))
    doomed = await create(http, patient("batch-doomed"))
    sent = bundle_of(
        "batch",
        post_entry(patient("batch-new")),
        post_entry(patient("batch-bad", birthDate=f"{CANARY}")),
        {"resource": {**existing, "gender": "male"},
         "request": {"method": "PUT", "url": f"Patient/{existing['id']}", "ifMatch": 'W/"5"'}},
        {"request": {"method": "GET", "url": f"Patient/{existing['id']}"}},
        {"request": {"method": "GET", "url": f"Patient?identifier={SYSTEM}|batch-existing"}},
        {"request": {"method": "GET", "url": "Patient/no-such-patient"}},
        {"request": {"method": "DELETE", "url": f"Patient/{doomed['id']}"}},
    )
    answer = await call(http, "POST", "/fhir", body=sent)
    assert answer.status == 200, answer.body
    assert_no_canary(answer)
    result = answer.json
    assert result["type"] == "batch-response"
    entries = result["entry"]
    statuses = [e["response"]["status"].split()[0] for e in entries]
    assert statuses == ["201", "400", "412", "200", "200", "404", "204"]
    assert entries[0]["resource"]["identifier"][0]["value"] == "batch-new"
    for failed in (1, 2, 5):
        assert entries[failed]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert entries[3]["resource"]["meta"]["versionId"] == "1"  # the 412 wrote nothing
    assert labels(entries[4]["resource"]) == ["batch-existing"]
    assert await count(http, f"Patient?identifier={SYSTEM}|batch-new") == 1
    assert (await call(http, "GET", f"/fhir/Patient/{doomed['id']}")).status == 410


async def test_transaction_reference_to_a_matched_conditional_create(
        http: aiohttp.ClientSession) -> None:
    existing = await create(http, patient("txc-1"))
    urn = "urn:uuid:6f1c1d0e-8e43-4d0b-9a57-0c2f1f3b9d21"
    sent = bundle_of(
        "transaction",
        {"fullUrl": urn, "resource": patient("txc-1", gender="male"),
         "request": {"method": "POST", "url": "Patient",
                     "ifNoneExist": f"identifier={SYSTEM}|txc-1"}},
        post_entry(observation(urn, label="txc-obs", loinc="8867-4",
                               effectiveDateTime="2024-03-01")))
    answer = await call(http, "POST", "/fhir", body=sent)
    assert answer.status == 200, answer.body
    matched, made = answer.json["entry"]
    assert matched["response"]["status"] == "200 OK"
    assert matched["resource"]["id"] == existing["id"]
    assert "gender" not in matched["resource"]
    assert made["resource"]["subject"]["reference"] == f"Patient/{existing['id']}"
    assert await count(http, f"Patient?identifier={SYSTEM}|txc-1") == 1


async def test_transaction_with_two_identical_conditional_creates_makes_one(
        http: aiohttp.ClientSession) -> None:
    entry = {"resource": patient("txd-1"), "request": {
        "method": "POST", "url": "Patient", "ifNoneExist": f"identifier={SYSTEM}|txd-1"}}
    answer = await call(http, "POST", "/fhir", body=bundle_of("transaction", entry, entry))
    assert answer.status == 200, answer.body
    first, second = answer.json["entry"]
    assert first["resource"]["id"] == second["resource"]["id"]
    assert await count(http, f"Patient?identifier={SYSTEM}|txd-1") == 1


async def test_conflicts_name_the_bundle_entry_and_no_other_index(
        http: aiohttp.ClientSession) -> None:
    existing = await create(http, patient("idx-1"))
    stale = {"resource": existing, "request": {"method": "PUT", "url": f"Patient/{existing['id']}",
                                               "ifMatch": 'W/"4"'}}
    read = {"request": {"method": "GET", "url": f"Patient/{existing['id']}"}}
    answer = await call(http, "POST", "/fhir", body=bundle_of("transaction", read, stale))
    assert answer.status == 412
    diagnostics = answer.issue()["diagnostics"]
    assert diagnostics.startswith("Bundle.entry[1]")
    assert "entry 0" not in diagnostics and "entry[0]" not in diagnostics
    answer = await call(http, "POST", "/fhir", body=bundle_of("batch", read, stale))
    outcome = answer.json["entry"][1]["response"]["outcome"]
    assert "entry 0" not in outcome["issue"][0]["diagnostics"]
    # A single write is no Bundle: its refusal names no entry at all.
    single = await call(http, "PUT", f"/fhir/Patient/{existing['id']}", body=existing,
                        headers={"If-Match": 'W/"4"'})
    assert single.status == 412
    assert "entry" not in single.issue()["diagnostics"]


async def test_batch_get_entries_read_and_search(http: aiohttp.ClientSession) -> None:
    existing = await create(http, patient("bget-1", gender="female"))
    sent = bundle_of(
        "batch",
        {"request": {"method": "GET", "url": f"Patient/{existing['id']}"}},
        {"request": {"method": "GET", "url": "Patient?gender=female"}},
        {"request": {"method": "GET", "url": "Patient?birthdate=not-a-date"}},
    )
    answer = await call(http, "POST", "/fhir", body=sent)
    assert answer.status == 200, answer.body
    read, found, bad = answer.json["entry"]
    assert read["response"]["status"] == "200 OK"
    assert read["response"]["etag"] == 'W/"1"'
    assert read["resource"]["id"] == existing["id"]
    assert labels(found["resource"]) == ["bget-1"]
    assert bad["response"]["status"].startswith("400")


# -- errors -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A request the edge must refuse: the answer's status and issue code, and text that
    the diagnostics must name."""

    method: str
    path: str
    status: int
    code: str
    body: Any = None
    raw: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    names: str = ""


REFUSALS = [
    Refusal("GET", f"/fhir/Patient?birthdate=not-{CANARY}", 400, "invalid", names="birthdate"),
    Refusal("GET", f"/fhir/Patient?unknown-param={CANARY}", 400, "invalid",
            headers=(("Prefer", "handling=strict"),), names="unknown-param"),
    Refusal("GET", f"/fhir/Patient?family:sounds={CANARY}", 400, "invalid", names="family"),
    Refusal("GET", "/fhir/Patient?_count=-1", 400, "invalid", names="_count"),
    Refusal("GET", f"/fhir/Observation?patient=Basic/{CANARY}", 400, "invalid",
            names="patient"),
    Refusal("POST", "/fhir/Patient", 400, "invalid",
            raw=b'{"resourceType": "Patient", "name": [{"family": "' + CANARY.encode() + b'"'),
    Refusal("POST", "/fhir/Patient", 400, "invalid", raw=b'["' + CANARY.encode() + b'"]'),
    Refusal("POST", "/fhir/Patient", 400, "invalid",
            body={"resourceType": "Observation", "status": CANARY}, names="resourceType"),
    Refusal("PUT", "/fhir/Patient/one-id", 400, "invalid",
            body=patient(CANARY, id="another-id"), names="Patient.id"),
    Refusal("POST", "/fhir", 400, "invalid", body={"resourceType": "Bundle",
                                                    "type": CANARY}, names="Bundle.type"),
    Refusal("GET", f"/fhir/Patient/{CANARY}-unknown", 404, "not-found"),
    Refusal("GET", f"/fhir/Patient/{CANARY}-unknown/_history", 404, "not-found"),
    Refusal("GET", f"/fhir/{CANARY_WORD}", 404, "not-supported"),
    Refusal("GET", f"/fhir/{CANARY_WORD}/1", 404, "not-supported"),
    Refusal("POST", f"/fhir/{CANARY_WORD}", 404, "not-supported", body={}),
    Refusal("GET", "/fhir/Basic?code=1", 404, "not-supported", names="Basic"),
    Refusal("GET", f"/fhir/Patient/1/{CANARY}/x", 404, "not-found"),
    Refusal("PATCH", "/fhir/Patient/1", 405, "not-supported", body=[]),
    Refusal("PUT", "/fhir/Patient/1/_history/1", 405, "not-supported", body=patient("x")),
    Refusal("POST", "/fhir/Patient", 415, "not-supported",
            raw=f"<Patient><name value='{CANARY}'/></Patient>".encode(),
            headers=(("Content-Type", "application/fhir+xml"),)),
    Refusal("POST", "/fhir/Patient", 415, "not-supported", raw=CANARY.encode(),
            headers=(("Content-Type", "text/plain"),)),
    Refusal("GET", "/fhir/Patient?_format=xml", 415, "not-supported"),
    Refusal("GET", "/fhir/Patient?_format=application/fhir%2Bxml", 415, "not-supported"),
    Refusal("GET", "/fhir/Patient/1", 415, "not-supported",
            headers=(("Accept", "application/fhir+xml"),)),
    Refusal("GET", "/fhir/metadata?_format=xml", 415, "not-supported"),
    Refusal("POST", "/fhir/Patient", 400, "structure",
            body=patient("bad-date", birthDate=f"{CANARY}-not-a-date"), names="Patient.birthDate"),
    Refusal("POST", "/fhir/Observation", 400, "structure",
            body={"resourceType": "Observation", "status": "final",
                  "code": {"text": CANARY}, "valueQuantity": {"value": f"{CANARY}"}},
            names="Observation.valueQuantity"),
    Refusal("POST", "/fhir/Observation", 400, "structure",
            body={"resourceType": "Observation", "status": "final",
                  "note": [{"text": CANARY}]}, names="Observation.code"),
    Refusal("POST", "/fhir/Patient", 400, "structure",
            body=patient("extra", nickname=CANARY), names="Patient.nickname"),
    Refusal("PUT", "/fhir/Patient/p-1", 400, "structure",
            body=patient("feb-30", id="p-1", birthDate="1970-02-30",
                         name=[{"family": CANARY}]), names="Patient.birthDate"),
    Refusal("GET", f"/fhir/Patient?_sort={CANARY}", 400, "invalid", names="_sort"),
    Refusal("GET", f"/fhir/Patient?_elements={CANARY}", 400, "invalid", names="_elements"),
    Refusal("GET", f"/fhir/Patient?_include=Observation:{CANARY}", 400, "invalid",
            names="_include"),
    Refusal("GET", f"/fhir/Patient?_summary={CANARY}", 400, "invalid", names="_summary"),
    Refusal("GET", f"/fhir/Patient/_history?_count={CANARY}", 400, "invalid",
            names="_count"),
]


@pytest.mark.parametrize("refusal", REFUSALS,
                         ids=[f"{r.status}-{r.method}-{i}" for i, r in enumerate(REFUSALS)])
async def test_refusal_is_an_operation_outcome_without_the_input(
        http: aiohttp.ClientSession, refusal: Refusal) -> None:
    answer = await call(http, refusal.method, refusal.path, body=refusal.body, raw=refusal.raw,
                        headers=dict(refusal.headers))
    assert answer.status == refusal.status, answer.body
    assert answer.headers["content-type"].startswith(FHIR_JSON)
    issue = answer.issue()
    assert issue["severity"] == "error"
    assert issue["code"] == refusal.code
    assert refusal.names in issue["diagnostics"] + " ".join(issue.get("expression", []))
    assert_no_canary(answer)


async def test_invalid_resource_names_the_element_and_not_the_value(
        http: aiohttp.ClientSession) -> None:
    answer = await call(http, "POST", "/fhir/Patient",
                        body=patient("bad-date", birthDate="not-a-date"))
    assert answer.status == 400
    issue = answer.issue()
    assert issue["expression"] == ["Patient.birthDate"]
    assert "Patient.birthDate" in issue["diagnostics"]
    assert b"not-a-date" not in answer.body


@pytest.mark.parametrize(("resource", "element"), [
    (patient("binding-1", gender=CANARY), "Patient.gender"),
    ({"resourceType": "Patient", "telecom": [{"system": "phone", "value": "1"},
                                             {"system": CANARY, "value": "2"}]},
     "Patient.telecom.1.system"),
    # The R4B model's list is cut short ('amended +'): gateway/fhir/bindings.py has it all.
    ({"resourceType": "Observation", "status": CANARY, "code": {"text": "x"}},
     "Observation.status"),
])
async def test_a_code_outside_a_required_binding_is_400(
        http: aiohttp.ClientSession, resource: dict[str, Any], element: str) -> None:
    answer = await call(http, "POST", f"/fhir/{resource['resourceType']}", body=resource)
    assert answer.status == 400, answer.body
    assert answer.issue()["expression"] == [element]
    assert_no_canary(answer)


async def test_update_with_an_unknown_if_match_form_is_400(http: aiohttp.ClientSession) -> None:
    created = await create(http, patient("ifm-bad"))
    answer = await call(http, "PUT", f"/fhir/Patient/{created['id']}", body=created,
                        headers={"If-Match": f"{CANARY}"})
    assert answer.status == 400
    assert answer.issue()["code"] == "invalid"
    assert_no_canary(answer)


@pytest.mark.parametrize(("scopes", "method", "path", "body"), [
    (("system/Patient.rs",), "POST", "/fhir/Patient", patient("s-1")),
    (("system/Patient.rs",), "GET", "/fhir/Observation?code=8867-4", None),
    (("system/Patient.rs",), "GET", "/fhir/Observation/some-id", None),
    (("system/Patient.r",), "GET", "/fhir/Patient?gender=male", None),
    (("system/Patient.s",), "GET", "/fhir/Patient/some-id", None),
    (("system/Patient.cruds",), "POST", "/fhir",
     bundle_of("transaction", post_entry(observation("Patient/x", label="s-2", loinc="1-8",
                                                     effectiveDateTime="2024-01-01")))),
    (("system/*.rs",), "DELETE", "/fhir/Patient/some-id", None),
    (("system/Observation.rs",), "GET",
     "/fhir/Observation?code=8867-4&_include=Observation:patient", None),
])
async def test_scope_that_does_not_permit_is_403(tmp_path: Path, scopes: tuple[str, ...],
                                                 method: str, path: str, body: Any) -> None:
    admin = api_key_config("admin", "synthetic-admin-key", ["system/*.cruds"])
    running = await start_fhir_gateway(tmp_path / "var", scopes, extra_keys=[admin])
    try:
        async with fhir_session(running, key="synthetic-admin-key") as session:
            # Something to find, so an _include has a target to refuse.
            pat = await create(session, patient("s-pat"))
            await create(session, observation(f"Patient/{pat['id']}", label="s-obs",
                                              loinc="8867-4", effectiveDateTime="2024-01-01"))
        async with fhir_session(running) as session:
            answer = await call(session, method, path, body=body)
        assert answer.status == 403, answer.body
        assert answer.issue()["code"] == "forbidden"
    finally:
        await running.runner.cleanup()


async def test_a_wrong_api_key_is_401(gw: RunningGateway) -> None:
    async with fhir_session(gw, key=f"{CANARY}-wrong-key") as session:
        answer = await call(session, "GET", "/fhir/Patient")
    assert answer.status == 401
    assert answer.issue()["code"] == "login"
    assert_no_canary(answer)


@pytest.mark.parametrize(("overrides", "body", "reason"), [
    ({"fhir.max_body_bytes": 2048},
     patient("big", name=[{"family": CANARY * 40, "given": [CANARY * 40]}] * 3), "bytes"),
    ({"fhir.max_depth": 6},
     patient("deep", extension=[{"url": "urn:x", "extension": [{"url": "urn:y", "extension": [
         {"url": "urn:z", "extension": [{"url": "urn:w", "valueString": CANARY}]}]}]}]),
     "nesting"),
    ({"fhir.max_array_items": 10},
     patient("wide", name=[{"given": [f"{CANARY}{n}" for n in range(11)]}]), "array"),
])
async def test_body_over_a_limit_is_413(tmp_path: Path, overrides: dict[str, Any],
                                        body: dict[str, Any], reason: str) -> None:
    running = await start_fhir_gateway(tmp_path / "var", **overrides)
    try:
        async with fhir_session(running) as session:
            answer = await call(session, "POST", "/fhir/Patient", body=body)
            assert answer.status == 413, answer.body
            assert answer.issue()["code"] == "too-costly"
            assert reason in answer.issue()["diagnostics"]
            assert_no_canary(answer)
            # Just within the limits, the same edge accepts a resource.
            assert (await call(session, "POST", "/fhir/Patient", body=patient("ok"))
                    ).status == 201
    finally:
        await running.runner.cleanup()


async def test_bundle_over_max_bundle_entries_is_413(tmp_path: Path) -> None:
    limits: dict[str, Any] = {"fhir.max_bundle_entries": 2}
    running = await start_fhir_gateway(tmp_path / "var", **limits)
    try:
        async with fhir_session(running) as session:
            entries = [post_entry(patient(f"{CANARY}-{n}")) for n in range(3)]
            answer = await call(session, "POST", "/fhir",
                                body=bundle_of("transaction", *entries))
            assert answer.status == 413
            assert answer.issue()["expression"] == ["Bundle.entry"]
            assert_no_canary(answer)
            answer = await call(session, "POST", "/fhir",
                                body=bundle_of("transaction", *entries[:2]))
            assert answer.status == 200
    finally:
        await running.runner.cleanup()


async def test_body_over_the_limit_without_content_length_is_413(tmp_path: Path) -> None:
    limits: dict[str, Any] = {"fhir.max_body_bytes": 2048}
    running = await start_fhir_gateway(tmp_path / "var", **limits)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"resourceType":"Patient","name":[{"family":"'
        for _ in range(10):
            yield CANARY.encode() * 30
        yield b'"}]}'

    try:
        async with fhir_session(running) as session, session.post(
                "/fhir/Patient", data=chunks(), headers={"Content-Type": FHIR_JSON}) as response:
            body = await response.read()
        assert response.status == 413
        assert CANARY.encode() not in body
    finally:
        await running.runner.cleanup()


async def test_over_the_rate_limit_is_429_with_retry_after(tmp_path: Path) -> None:
    limits: dict[str, Any] = {"fhir.rate_limit_per_client": 1}
    running = await start_fhir_gateway(tmp_path / "var", **limits)
    try:
        async with fhir_session(running) as session:
            statuses = []
            for _ in range(4):
                answer = await call(session, "GET", "/fhir/Patient")
                statuses.append(answer.status)
            assert statuses[:2] == [200, 200]  # the burst: two seconds' worth
            assert statuses[-1] == 429
            assert answer.issue()["code"] == "throttled"
            assert int(answer.headers["retry-after"]) >= 1
            # Metadata is not rate-limited: it is open to everyone.
            assert (await call(session, "GET", "/fhir/metadata")).status == 200
            await asyncio.sleep(1.1)  # the bucket refilling is the behaviour under test
            assert (await call(session, "GET", "/fhir/Patient")).status == 200
    finally:
        await running.runner.cleanup()


# -- audit --------------------------------------------------------------------------------------


async def audit_rows(running: RunningGateway, action: Action) -> list[dict[str, Any]]:
    audit = running.app[AUDIT]
    rows = await audit.search(AuditQuery(client=API_KEY_NAME, action=action))
    return [parse_body(row.body) for row in rows]


async def test_reads_and_searches_are_audited_by_shape_without_values(
        gw: RunningGateway, http: aiohttp.ClientSession) -> None:
    created = await create(http, patient(CANARY, name=[{"family": CANARY}]))
    assert (await call(http, "GET", f"/fhir/Patient/{created['id']}")).status == 200
    found = await call(http, "GET", f"/fhir/Patient?identifier={SYSTEM}|{CANARY}"
                       f"&family={CANARY}&_count=5")
    assert labels(found.json) == [CANARY]

    [read] = await audit_rows(gw, Action.READ)
    assert read["client"] == API_KEY_NAME
    assert read["type"] == "Patient"
    assert read["outcome"] == "success"
    assert "phi" in read  # the resource id and patient, sealed
    [search] = await audit_rows(gw, Action.SEARCH)
    assert search["client"] == API_KEY_NAME
    assert search["type"] == "Patient"
    assert search["query"] == "identifier=*&family=*&_count=*"
    [created_row] = await audit_rows(gw, Action.CREATE)
    assert created_row["client"] == API_KEY_NAME
    rows = await gw.app[AUDIT].search(AuditQuery(client=API_KEY_NAME))
    assert all(CANARY.encode() not in row.body for row in rows)


async def test_refused_reads_are_audited_with_their_status(
        gw: RunningGateway, http: aiohttp.ClientSession) -> None:
    id_ = (await create(http, patient("audit-del")))["id"]
    await call(http, "DELETE", f"/fhir/Patient/{id_}")
    assert (await call(http, "GET", f"/fhir/Patient/{id_}")).status == 410
    assert (await call(http, "GET", "/fhir/Patient/never-was")).status == 404
    outcomes = [row["outcome"] for row in await audit_rows(gw, Action.READ)]
    assert outcomes == ["410", "404"]



# -- decimals keep their digits --------------------------------------------------------------


async def test_decimals_keep_their_digits_through_create_read_search_and_bundles(
        gw: RunningGateway, http: aiohttp.ClientSession) -> None:
    """FHIR decimals are exact: "1.50" stays "1.50" (a float would answer 1.5)."""
    raw = (b'{"resourceType":"Observation","status":"final","code":{"text":"x"},'
           b'"subject":{"reference":"Patient/dec-1"},'
           b'"valueQuantity":{"value":1.50,"unit":"mg","code":"mg",'
           b'"system":"http://unitsofmeasure.org"},'
           b'"referenceRange":[{"low":{"value":0.100},"high":{"value":2.0E1}}]}')
    created = await call(http, "POST", "/fhir/Observation", raw=raw)
    assert created.status == 201, created.body
    assert b'"value":1.50' in created.body and b'"value":0.100' in created.body
    id_ = created.json["id"]
    read = await call(http, "GET", f"/fhir/Observation/{id_}")
    assert b'"value":1.50' in read.body
    # The number is still a number to search: 1.5 finds it (and 1.50 is the same value).
    found = await call(http, "GET", "/fhir/Observation?value-quantity=1.5")
    assert [e["resource"]["id"] for e in found.json["entry"]] == [id_]
    # _elements re-serialises the resource: the digits survive that too.
    cut = await call(http, "GET", f"/fhir/Observation/{id_}?_elements=valueQuantity")
    assert b'"value":1.50' in cut.body
    # Sending the same content again is no change: no new version.
    resent = raw.replace(b'{"resourceType":"Observation",',
                         f'{{"resourceType":"Observation","id":"{id_}",'.encode())
    again = await call(http, "PUT", f"/fhir/Observation/{id_}", raw=resent)
    assert again.status == 200 and again.json["meta"]["versionId"] == "1"
