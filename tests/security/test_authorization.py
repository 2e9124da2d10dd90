"""Authorization holes of issue 13, items 1-3, over real HTTP against a running gateway:
a patient-confined client writes only resources about its own patient (the compartment's
subject/patient parameters, never a performer, asserter or author), both the resource it
writes and the one it replaces; a constrained scope (`?category=laboratory`) holds on
every read path, every version; an update-only scope (`u` without `c`) never creates.
All data is synthetic; SMART assertions are minted with joserfc, never our own JOSE code.
One gateway serves the module; every test writes resources of its own.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from joserfc import jwt
from joserfc.jwk import ECKey

from conftest import RunningGateway, start_gateway
from gateway.edge.auth_server import JWT_BEARER
from support.fake_ehr import FakeEhr
from support.fhir import api_key_config

pytestmark = pytest.mark.asyncio(loop_scope="module")

PATIENT_A, PATIENT_B = "Patient/sec-a", "Patient/sec-b"
CONFINED = "confined-client"  # patient/*.cruds, bound to Patient A
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
# API keys: name -> scopes (the key is "<name>-secret").
KEYS = {
    "admin": ["system/*.cruds"],
    "lab-only": ["system/Observation.rs?category=laboratory"],
    "lab-reports": ["system/Observation.rs?category=laboratory", "system/DiagnosticReport.rs"],
    "update-only": ["system/Observation.u"],
    "update-create": ["system/Observation.cu"],
}


@dataclass
class Answer:
    status: int
    body: Any
    raw: bytes


@dataclass
class World:
    gw: RunningGateway
    session: aiohttp.ClientSession
    key: ECKey
    tokens: dict[str, str] = field(default_factory=dict)

    async def call(self, method: str, path: str, headers: dict[str, str],
                   body: Any = None) -> Answer:
        sent = {"Accept": "application/fhir+json", **headers}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/fhir+json"
        async with self.session.request(method, self.gw.http_url + path, headers=sent,
                                        data=data) as response:
            raw = await response.read()
            return Answer(response.status, json.loads(raw) if raw else None, raw)

    async def as_key(self, name: str, method: str, path: str, body: Any = None) -> Answer:
        return await self.call(method, path, {"X-API-Key": f"{name}-secret"}, body)

    async def admin(self, method: str, path: str, body: Any = None) -> Answer:
        return await self.as_key("admin", method, path, body)

    async def confined(self, method: str, path: str, body: Any = None,
                       headers: dict[str, str] | None = None) -> Answer:
        return await self.call(method, path, {**await self._bearer(), **(headers or {})},
                               body)

    async def _bearer(self) -> dict[str, str]:
        if CONFINED not in self.tokens:
            token_url = f"{self.gw.http_url}/auth/token"
            now = int(time.time())
            assertion = jwt.encode({"alg": "ES384"}, {
                "iss": CONFINED, "sub": CONFINED, "aud": token_url, "iat": now,
                "exp": now + 240, "jti": uuid.uuid4().hex}, self.key, algorithms=["ES384"])
            async with self.session.post(token_url, data={
                    "grant_type": "client_credentials", "client_assertion_type": JWT_BEARER,
                    "client_assertion": assertion, "scope": "patient/*.cruds"}) as response:
                answer = await response.json()
                assert response.status == 200, answer
            self.tokens[CONFINED] = answer["access_token"]
        return {"Authorization": f"Bearer {self.tokens[CONFINED]}"}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    base = tmp_path_factory.mktemp("authz")
    key = ECKey.generate_key("P-384")
    pem = base / "confined.pem"
    pem.write_bytes(key.as_pem(private=False))
    clients = [{"client_id": CONFINED, "public_key_file": str(pem),
                "scopes": ["patient/*.cruds"], "patient": PATIENT_A}]
    keys = [api_key_config(name, f"{name}-secret", scopes) for name, scopes in KEYS.items()]
    gw = await start_gateway(Path(base / "var"), **{"auth.clients": clients,
                                                    "auth.api_keys": keys})
    session = aiohttp.ClientSession()
    world = World(gw, session, key)
    try:
        for id_, family in (("sec-a", "Alphasec"), ("sec-b", "Betasec")):
            answer = await world.admin("PUT", f"/fhir/Patient/{id_}", {
                "resourceType": "Patient", "id": id_, "name": [{"family": family}]})
            assert answer.status == 201, answer.body
        yield world
    finally:
        await session.close()
        await gw.runner.cleanup()


def fresh_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def observation(subject: str | None, *, id_: str | None = None, performer: str | None = None,
                category: str | None = None, marker: str | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Observation", "status": "final",
                                "code": {"text": "synthetic test"}}
    if id_ is not None:
        resource["id"] = id_
    if subject is not None:
        resource["subject"] = {"reference": subject}
    if performer is not None:
        resource["performer"] = [{"reference": performer}]
    if category is not None:
        resource["category"] = [{"coding": [{"system": CATEGORY, "code": category}]}]
    if marker is not None:
        resource["identifier"] = [{"system": "urn:sec:test", "value": marker}]
    return resource


def is_outcome(answer: Answer, *statuses: int) -> bool:
    return (answer.status in statuses and isinstance(answer.body, dict)
            and answer.body.get("resourceType") == "OperationOutcome")


async def seeded(world: World, resource: dict[str, Any]) -> str:
    """A resource written by the admin key at an id of its own: that id."""
    id_ = resource.setdefault("id", fresh_id(resource["resourceType"].lower()))
    answer = await world.admin("PUT", f"/fhir/{resource['resourceType']}/{id_}", resource)
    assert answer.status == 201, answer.body
    return str(id_)


# -- item 1: a confined client writes only about its own patient ----------------------------


@pytest.mark.parametrize("resource", [
    observation(PATIENT_B, performer=PATIENT_A),
    {"resourceType": "Condition", "subject": {"reference": PATIENT_B},
     "asserter": {"reference": PATIENT_A}, "code": {"text": "synthetic finding"}},
    {"resourceType": "AllergyIntolerance", "patient": {"reference": PATIENT_B},
     "recorder": {"reference": PATIENT_A}, "asserter": {"reference": PATIENT_A}},
    {"resourceType": "DocumentReference", "status": "current",
     "subject": {"reference": PATIENT_B}, "author": [{"reference": PATIENT_A}],
     "content": [{"attachment": {"contentType": "text/plain"}}]},
    {"resourceType": "Appointment", "status": "booked", "participant": [
        {"actor": {"reference": PATIENT_A}, "status": "accepted"},
        {"actor": {"reference": PATIENT_B}, "status": "accepted"}]},
    # A subject that names no one by URL could be anyone: not provably A.
    {**observation(None, performer=PATIENT_A),
     "subject": {"identifier": {"system": "urn:sec:mrn", "value": "B-1"}}},
    {**observation(None, performer=PATIENT_A), "subject": {"reference": "Group/g-1"}},
], ids=["observation-subject-b-performer-a", "condition-subject-b-asserter-a",
        "allergy-patient-b-recorder-a", "document-subject-b-author-a",
        "appointment-actors-a-and-b", "subject-by-identifier-only", "subject-a-group"])
async def test_confined_client_cannot_create_about_another_patient(
        world: World, resource: dict[str, Any]) -> None:
    type_ = resource["resourceType"]
    marker = fresh_id("m")
    sent = {**resource, "identifier": [{"system": "urn:sec:test", "value": marker}]}
    answer = await world.confined("POST", f"/fhir/{type_}", sent)
    assert is_outcome(answer, 403), (answer.status, answer.body)
    written = await world.admin("GET", f"/fhir/{type_}?identifier=urn:sec:test|{marker}")
    assert "entry" not in written.body


async def test_confined_client_writes_about_its_own_patient_whoever_performed(
        world: World) -> None:
    answer = await world.confined("POST", "/fhir/Observation",
                                  observation(PATIENT_A, performer=PATIENT_B))
    assert answer.status == 201, answer.body
    condition = {"resourceType": "Condition", "subject": {"reference": PATIENT_A},
                 "asserter": {"reference": PATIENT_B}, "code": {"text": "synthetic"}}
    assert (await world.confined("POST", "/fhir/Condition", condition)).status == 201


async def test_confined_client_cannot_repoint_its_own_resource_to_another_patient(
        world: World) -> None:
    own = await seeded(world, observation(PATIENT_A, marker=fresh_id("own")))
    before = await world.admin("GET", f"/fhir/Observation/{own}")
    moved = observation(PATIENT_B, id_=own, performer=PATIENT_A)
    put = await world.confined("PUT", f"/fhir/Observation/{own}", moved)
    assert is_outcome(put, 403), (put.status, put.body)
    marker = before.body["identifier"][0]["value"]
    conditional = await world.confined(
        "PUT", f"/fhir/Observation?identifier=urn:sec:test|{marker}",
        observation(PATIENT_B, performer=PATIENT_A, marker=marker))
    assert is_outcome(conditional, 403), (conditional.status, conditional.body)
    transaction = await world.confined("POST", "/fhir", {
        "resourceType": "Bundle", "type": "transaction", "entry": [
            {"request": {"method": "PUT", "url": f"Observation/{own}"}, "resource": moved}]})
    assert is_outcome(transaction, 403), (transaction.status, transaction.body)
    batch = await world.confined("POST", "/fhir", {
        "resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "PUT", "url": f"Observation/{own}"}, "resource": moved}]})
    assert batch.status == 200
    assert batch.body["entry"][0]["response"]["status"].startswith("403")
    after = await world.admin("GET", f"/fhir/Observation/{own}")
    assert after.raw == before.raw  # untouched: same version, same subject


async def test_confined_client_cannot_change_what_is_about_another_patient(
        world: World) -> None:
    """B's Observation that A performed: in A's compartment (A may read it), but about B:
    A may neither re-point, nor update, nor delete it, by id or by condition."""
    marker = fresh_id("theirs")
    theirs = await seeded(world, observation(PATIENT_B, performer=PATIENT_A, marker=marker))
    before = await world.admin("GET", f"/fhir/Observation/{theirs}")
    assert (await world.confined("GET", f"/fhir/Observation/{theirs}")).status == 200
    hijack = observation(PATIENT_A, id_=theirs, performer=PATIENT_A, marker=marker)
    answers = [
        await world.confined("PUT", f"/fhir/Observation/{theirs}", hijack),
        await world.confined("PUT", f"/fhir/Observation?identifier=urn:sec:test|{marker}",
                             {k: v for k, v in hijack.items() if k != "id"}),
        await world.confined("DELETE", f"/fhir/Observation/{theirs}"),
        await world.confined("DELETE", f"/fhir/Observation?identifier=urn:sec:test|{marker}"),
    ]
    for answer in answers:
        assert is_outcome(answer, 403, 404), (answer.status, answer.body)
    after = await world.admin("GET", f"/fhir/Observation/{theirs}")
    assert after.raw == before.raw


# -- item 2: a constrained scope holds on every read path, for every version ----------------


async def test_constrained_scope_hides_excluded_versions_from_history_and_vread(
        world: World) -> None:
    vital = await seeded(world, observation(PATIENT_A, category="vital-signs"))
    # Filed as laboratory, then re-filed as vital signs: only version 1 is the scope's.
    moved = await seeded(world, observation(PATIENT_A, category="laboratory"))
    second = observation(PATIENT_A, id_=moved, category="vital-signs")
    assert (await world.admin("PUT", f"/fhir/Observation/{moved}", second)).status == 200

    def lab(name: str, method: str = "GET") -> Any:
        return world.as_key("lab-only", method, f"/fhir/Observation{name}")

    for path in (f"/{vital}", f"/{vital}/_history", f"/{vital}/_history/1",
                 f"/{moved}", f"/{moved}/_history/2"):
        answer = await lab(path)
        assert is_outcome(answer, 404), (path, answer.status, answer.body)
    assert (await lab(f"/{moved}/_history/1")).status == 200
    history = await lab(f"/{moved}/_history")
    assert history.status == 200, history.body
    assert [e["resource"]["meta"]["versionId"] for e in history.body["entry"]] == ["1"]
    assert b"vital-signs" not in history.raw and "total" not in history.body
    listed = await lab("/_history?_count=1000")
    assert listed.status == 200, listed.body
    assert b"vital-signs" not in listed.raw
    shown = {(e["resource"]["id"], e["resource"]["meta"]["versionId"])
             for e in listed.body.get("entry", []) if "resource" in e}
    assert (moved, "1") in shown and (moved, "2") not in shown
    assert not any(id_ == vital for id_, _ in shown)
    # No deletion marker of a resource the scope never showed either.
    gone = await seeded(world, observation(PATIENT_A, category="vital-signs"))
    assert (await world.admin("DELETE", f"/fhir/Observation/{gone}")).status in (200, 204)
    listed = await lab("/_history?_count=1000")
    assert gone.encode() not in listed.raw
    # The unconstrained caller does see them all, so the checks above are not vacuous.
    wide = await world.admin("GET", f"/fhir/Observation/{moved}/_history")
    assert wide.body["total"] == 2


async def test_constrained_scope_holds_on_search_include_and_batch_reads(
        world: World) -> None:
    vital = await seeded(world, observation(PATIENT_A, category="vital-signs"))
    lab = await seeded(world, observation(PATIENT_A, category="laboratory"))
    report = await seeded(world, {
        "resourceType": "DiagnosticReport", "status": "final", "code": {"text": "panel"},
        "subject": {"reference": PATIENT_A},
        "result": [{"reference": f"Observation/{vital}"}, {"reference": f"Observation/{lab}"}]})
    found = await world.as_key("lab-only", "GET", f"/fhir/Observation?_id={vital},{lab}")
    assert {e["resource"]["id"] for e in found.body.get("entry", [])} == {lab}
    included = await world.as_key(
        "lab-reports", "GET",
        f"/fhir/DiagnosticReport?_id={report}&_include=DiagnosticReport:result")
    assert included.status == 200, included.body
    assert {e["resource"]["id"] for e in included.body["entry"]} == {report, lab}
    batch = await world.as_key("lab-only", "POST", "/fhir", {
        "resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": f"Observation/{vital}"}},
            {"request": {"method": "GET", "url": f"Observation/{lab}"}},
            {"request": {"method": "GET", "url": f"Observation?_id={vital}"}}]})
    assert batch.status == 200, batch.body
    entries = batch.body["entry"]
    assert [e["response"]["status"].split()[0] for e in entries] == ["404", "200", "200"]
    assert "entry" not in entries[2]["resource"]


# -- item 3: an update-only scope never creates ----------------------------------------------


async def test_update_only_scope_cannot_create_by_update(world: World) -> None:
    new_id = fresh_id("upd")
    marker = fresh_id("nomatch")
    put = await world.as_key("update-only", "PUT", f"/fhir/Observation/{new_id}",
                             observation(PATIENT_A, id_=new_id))
    conditional = await world.as_key(
        "update-only", "PUT", f"/fhir/Observation?identifier=urn:sec:test|{marker}",
        observation(PATIENT_A, marker=marker))
    transaction = await world.as_key("update-only", "POST", "/fhir", {
        "resourceType": "Bundle", "type": "transaction", "entry": [
            {"request": {"method": "PUT", "url": f"Observation/{new_id}"},
             "resource": observation(PATIENT_A, id_=new_id)}]})
    for answer in (put, conditional, transaction):
        assert is_outcome(answer, 403), (answer.status, answer.body)
        assert answer.body["issue"][0]["code"] == "forbidden"
    assert (await world.admin("GET", f"/fhir/Observation/{new_id}")).status == 404
    written = await world.admin("GET", f"/fhir/Observation?identifier=urn:sec:test|{marker}")
    assert "entry" not in written.body
    # A deleted resource is re-created by a PUT: that is a create too.
    gone = await seeded(world, observation(PATIENT_A))
    assert (await world.admin("DELETE", f"/fhir/Observation/{gone}")).status in (200, 204)
    again = await world.as_key("update-only", "PUT", f"/fhir/Observation/{gone}",
                               observation(PATIENT_A, id_=gone))
    assert is_outcome(again, 403), (again.status, again.body)


async def test_update_only_scope_still_updates_and_cu_creates_by_update(
        world: World) -> None:
    existing = await seeded(world, observation(PATIENT_A))
    updated = await world.as_key("update-only", "PUT", f"/fhir/Observation/{existing}",
                                 {**observation(PATIENT_A, id_=existing), "status": "amended"})
    assert updated.status == 200, updated.body
    new_id = fresh_id("cu")
    created = await world.as_key("update-create", "PUT", f"/fhir/Observation/{new_id}",
                                 observation(PATIENT_A, id_=new_id))
    assert created.status == 201, created.body


# -- the facade: the same rules for types a remote FHIR backend serves ----------------------


@dataclass
class Proxied:
    world: World
    ehr: FakeEhr

    def writes(self) -> list[Any]:
        return [r for r in self.ehr.requests if r.method in ("POST", "PUT", "DELETE")]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def proxied(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Proxied]:
    base = tmp_path_factory.mktemp("authz-facade")
    key = ECKey.generate_key("P-384")
    pem = base / "confined.pem"
    pem.write_bytes(key.as_pem(private=False))
    clients = [{"client_id": CONFINED, "public_key_file": str(pem),
                "scopes": ["patient/*.cruds"], "patient": PATIENT_A}]
    keys = [api_key_config(name, f"{name}-secret", scopes) for name, scopes in KEYS.items()]
    ehr = FakeEhr()
    await ehr.start()
    gw = await start_gateway(Path(base / "var"), **{
        "auth.clients": clients, "auth.api_keys": keys,
        "backends": [{"name": "ehr", "kind": "fhir", "base_url": ehr.url, "max_retries": 0,
                      "backoff_base": 0.01, "cache_ttl": 30.0}],
        "routes": [{"match": {"resource": t}, "to": ["ehr"]}
                   for t in ("Observation", "Condition")]})
    session = aiohttp.ClientSession()
    try:
        yield Proxied(World(gw, session, key), ehr)
    finally:
        await session.close()
        await gw.runner.cleanup()
        await ehr.stop()


async def test_facade_confined_writes_only_about_its_own_patient(proxied: Proxied) -> None:
    world, ehr = proxied.world, proxied.ehr
    own = ehr.seed(observation(PATIENT_A, id_=fresh_id("own")))
    theirs = ehr.seed(observation(PATIENT_B, id_=fresh_id("theirs"), performer=PATIENT_A))
    ehr.requests.clear()
    answers = [
        await world.confined("POST", "/fhir/Observation",
                             observation(PATIENT_B, performer=PATIENT_A)),
        await world.confined("POST", "/fhir/Condition", {
            "resourceType": "Condition", "subject": {"reference": PATIENT_B},
            "asserter": {"reference": PATIENT_A}, "code": {"text": "synthetic"}}),
        await world.confined("PUT", f"/fhir/Observation/{own['id']}",
                             observation(PATIENT_B, id_=own["id"], performer=PATIENT_A)),
        await world.confined("PUT", f"/fhir/Observation/{theirs['id']}",
                             observation(PATIENT_A, id_=theirs["id"])),
        await world.confined("DELETE", f"/fhir/Observation/{theirs['id']}"),
    ]
    for answer in answers:
        assert is_outcome(answer, 403, 404), (answer.status, answer.body)
    assert proxied.writes() == []  # nothing reached the backend


async def test_facade_update_only_scope_cannot_create_by_update(proxied: Proxied) -> None:
    world, ehr = proxied.world, proxied.ehr
    ehr.requests.clear()
    new_id = fresh_id("upd")
    marker = fresh_id("nomatch")
    put = await world.as_key("update-only", "PUT", f"/fhir/Observation/{new_id}",
                             observation(PATIENT_A, id_=new_id))
    conditional = await world.as_key(
        "update-only", "PUT", f"/fhir/Observation?identifier=urn:sec:test|{marker}",
        observation(PATIENT_A, marker=marker))
    for answer in (put, conditional):
        assert is_outcome(answer, 403), (answer.status, answer.body)
    assert proxied.writes() == []
    existing = ehr.seed(observation(PATIENT_A, id_=fresh_id("existing")))
    updated = await world.as_key("update-only", "PUT", f"/fhir/Observation/{existing['id']}",
                                 {**existing, "status": "amended"})
    assert updated.status == 200, updated.body


async def test_facade_constrained_scope_hides_excluded_versions(proxied: Proxied) -> None:
    world, ehr = proxied.world, proxied.ehr
    moved = ehr.seed(observation(PATIENT_A, id_=fresh_id("moved"), category="laboratory"))
    ehr.seed(observation(PATIENT_A, id_=moved["id"], category="vital-signs"))
    path = f"/fhir/Observation/{moved['id']}"
    assert is_outcome(await world.as_key("lab-only", "GET", path), 404)
    assert is_outcome(await world.as_key("lab-only", "GET", f"{path}/_history/2"), 404)
    assert (await world.as_key("lab-only", "GET", f"{path}/_history/1")).status == 200
