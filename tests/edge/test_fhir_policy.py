"""Who may see what through /fhir, over real HTTP against a running gateway: the SMART
Backend Services flow, the scope matrix, the patient compartment (no access to another
patient's data, not even its existence), minimum-necessary profiles, and per-entry checks
in batches and transactions. Assertions are minted with joserfc, never with our own JOSE
code. One gateway serves the whole module; every test uses resources of its own or the
seeded ones below, so the order the tests run in does not matter.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from conftest import RunningGateway, start_gateway
from gateway.audit.query import AuditQuery
from gateway.audit.sealed import parse_body
from gateway.edge.audit_http import AUDIT
from gateway.edge.auth_server import JWT_BEARER
from support import builders
from support.fhir import (
    Answer,
    api_key_config,
    is_outcome,
    tagged_subsetted,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

PATIENT_A = "Patient/pat-a"
IDP = "https://idp.example"  # an external authorization server whose tokens we accept
IDP_AUDIENCE = "https://gw.example/fhir"
PATIENT_B = "Patient/pat-b"

# -- the scope matrix: one API key per scope form; what each permits, written by hand ------

# (scope form, letters it grants on Patient, letters it grants on Observation)
SCOPE_FORMS: list[tuple[str, str, str]] = [
    ("system/Patient.rs", "rs", ""),
    ("system/Patient.r", "r", ""),
    ("system/Patient.s", "s", ""),
    ("system/Patient.c", "c", ""),
    ("system/Patient.u", "u", ""),
    ("system/Patient.d", "d", ""),
    ("system/Patient.cruds", "cruds", ""),
    ("system/*.cruds", "cruds", "cruds"),
    ("system/*.rs", "rs", "rs"),
    ("system/Observation.rs", "", "rs"),
    ("system/Patient.read", "rs", ""),  # SMART v1
    ("system/Patient.write", "cud", ""),  # SMART v1
    ("system/*.*", "cruds", "cruds"),  # SMART v1
    ("system/*.read", "rs", "rs"),  # SMART v1
    ("user/Patient.rs", "rs", ""),
    ("user/*.cruds", "cruds", "cruds"),
    ("user/Observation.cud", "", "cud"),
    ("user/*.write", "cud", "cud"),  # SMART v1
    ("system/Patient.rs system/Observation.c", "rs", "c"),
    # A patient/ scope with no patient bound to the credential permits nothing.
    ("patient/*.cruds", "", ""),
    ("launch openid", "", ""),  # no resource scope at all
]
# The SMART permission letter each REST interaction needs (SMART App Launch 2.x §Scopes).
NEEDS = {"read": "r", "vread": "r", "history": "r", "search": "s", "history-type": "s",
         "create": "c", "update": "u", "delete": "d"}
TYPES = ("Patient", "Observation")


def matrix_key(index: int) -> str:
    return f"matrix-key-{index:02d}"


def api_key(name: str, scopes: list[str], profile: str | None = None) -> dict[str, Any]:
    """The key `<name>-secret`, known by its hash, with these scopes."""
    return api_key_config(name, f"{name}-secret", scopes, profile)


def key_headers(name: str) -> dict[str, str]:
    return {"X-API-Key": f"{name}-secret"}


# -- seeded data: two patients and their resources, written with the admin key ------------

def home_phone(number: str) -> list[dict[str, str]]:
    return [{"system": "phone", "value": number, "use": "home"}]


# Every seeded person has all the elements a profile may hide (the builders' keyword defaults
# for this suite; a test overrides what it needs).
patient = partial(builders.patient, system="urn:oid:1.2.3.4.5", active=True,
                  given=["Synthetic"], gender="other", birthDate="1970-01-01",
                  telecom=home_phone("555-0100"),
                  address=[{"line": ["1 Synthetic Way"], "city": "Nowhere",
                            "postalCode": "00001"}])
observation = partial(builders.observation, code={"text": "synthetic test"})


SEED: list[dict[str, Any]] = [
    patient("MRN-A-1", id="pat-a", family="Alphasynth"),
    patient("MRN-B-1", id="pat-b", family="Betasynth", birthDate="1971-02-02",
            telecom=home_phone("555-0111")),
    observation(PATIENT_A, id="obs-a"),
    observation(PATIENT_B, id="obs-b"),
    builders.encounter(PATIENT_A, id="enc-a"),
    builders.encounter(PATIENT_B, id="enc-b"),
    {"resourceType": "Appointment", "id": "appt-a", "status": "booked",
     "participant": [{"actor": {"reference": PATIENT_A}, "status": "accepted"}]},
    {"resourceType": "Appointment", "id": "appt-b", "status": "booked",
     "participant": [{"actor": {"reference": PATIENT_B}, "status": "accepted"}]},
    # In both compartments: A may see it, and its reference to B, but never B itself.
    {"resourceType": "Appointment", "id": "appt-ab", "status": "booked",
     "participant": [{"actor": {"reference": PATIENT_A}, "status": "accepted"},
                     {"actor": {"reference": PATIENT_B}, "status": "accepted"}]},
    # A's report pointing (wrongly) at B's result: _include must not follow it to B.
    {"resourceType": "DiagnosticReport", "id": "dr-a", "status": "final",
     "code": {"text": "synthetic panel"}, "subject": {"reference": PATIENT_A},
     "result": [{"reference": "Observation/obs-b"}]},
    {"resourceType": "MedicationRequest", "id": "mr-a", "status": "active",
     "intent": "order", "medicationCodeableConcept": {"text": "synthetic drug"},
     "subject": {"reference": PATIENT_A}},
]


# -- the running gateway and an HTTP helper ------------------------------------------------


@dataclass
class World:
    gw: RunningGateway
    session: aiohttp.ClientSession
    keys: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def token_url(self) -> str:
        return f"{self.gw.http_url}/auth/token"

    async def call(self, method: str, path: str, headers: dict[str, str],
                   body: Any = None) -> Answer:
        sent = dict(headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/fhir+json"
        async with self.session.request(method, self.gw.http_url + path, headers=sent,
                                        data=data) as response:
            raw = await response.read()
            parsed = json.loads(raw) if raw else None
            return Answer(response.status, parsed, raw, response.headers)

    async def admin(self, method: str, path: str, body: Any = None) -> Answer:
        return await self.call(method, path, key_headers("admin"), body)

    async def token(self, client_id: str, scope: str) -> dict[str, Any]:
        """The token endpoint's answer to a joserfc-minted client assertion."""
        key, alg = self.keys[client_id]
        now = int(time.time())
        assertion = jwt.encode({"alg": alg}, {
            "iss": client_id, "sub": client_id, "aud": self.token_url, "iat": now,
            "exp": now + 240, "jti": uuid.uuid4().hex}, key, algorithms=[alg])
        async with self.session.post(self.token_url, data={
                "grant_type": "client_credentials", "client_assertion_type": JWT_BEARER,
                "client_assertion": assertion, "scope": scope}) as response:
            answer: dict[str, Any] = await response.json()
            answer["_status"] = response.status
            return answer

    async def bearer(self, client_id: str, scope: str) -> dict[str, str]:
        cached = self.tokens.get(f"{client_id} {scope}")
        if cached is None:
            answer = await self.token(client_id, scope)
            assert answer["_status"] == 200, answer
            cached = self.tokens[f"{client_id} {scope}"] = answer["access_token"]
        return {"Authorization": f"Bearer {cached}"}


def write_keys(directory: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Client keys (joserfc) and the [[auth.clients]] entries naming their public halves."""
    directory.mkdir(parents=True, exist_ok=True)
    rsa = RSAKey.generate_key(2048, parameters={"kid": "rs-1"})
    ec_keys = {name: ECKey.generate_key("P-384") for name in (
        "es-client", "pa-client", "pw-client", "pnone-client", "sched-client")}
    jwks = directory / "rs-client.jwks"
    jwks.write_text(json.dumps({"keys": [rsa.as_dict(private=False)]}))
    clients: list[dict[str, Any]] = [
        {"client_id": "rs-client", "jwks_file": str(jwks), "scopes": ["system/*.cruds"]},
    ]
    for name, key in ec_keys.items():
        pem = directory / f"{name}.pem"
        pem.write_bytes(key.as_pem(private=False))
        clients.append({"client_id": name, "public_key_file": str(pem)})
    by_id = {c["client_id"]: c for c in clients}
    by_id["es-client"]["scopes"] = ["system/Patient.rs", "system/Observation.r"]
    by_id["pa-client"].update(scopes=["patient/*.rs"], patient=PATIENT_A)
    by_id["pw-client"].update(scopes=["patient/*.cruds"], patient="pat-a")
    by_id["pnone-client"]["scopes"] = ["patient/*.rs"]
    by_id["sched-client"].update(scopes=["system/*.rs"], profile="scheduling")
    keys: dict[str, Any] = {"rs-client": (rsa, "RS384")}
    keys.update({name: (key, "ES384") for name, key in ec_keys.items()})
    idp = ECKey.generate_key("P-256", parameters={"kid": "idp-1"})
    (directory / "idp.jwks").write_text(json.dumps({"keys": [idp.as_dict(private=False)]}))
    keys[IDP] = (idp, "ES256")
    return keys, clients


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    base = tmp_path_factory.mktemp("policy")
    keys, clients = write_keys(base / "clients")
    api_keys = [api_key("admin", ["system/*.cruds"]),
                api_key("sched", ["system/*.rs"], "scheduling"),
                api_key("refill", ["system/*.rs"], "refill"),
                api_key("obs-only", ["system/Observation.rs"]),
                api_key("pat-only", ["system/Patient.cruds"]),
                api_key("lab-only", ["system/Observation.cruds?category=laboratory"]),
                *(api_key(matrix_key(i), form.split())
                  for i, (form, _, _) in enumerate(SCOPE_FORMS))]
    profiles = {
        "scheduling": {"Patient": ["name", "birthDate", "telecom"], "Appointment": ["*"],
                       "Slot": ["*"], "Schedule": ["*"]},
        "refill": {"Patient": ["name", "birthDate"], "MedicationRequest": ["*"]},
    }
    issuers = [{"issuer": IDP, "jwks_file": str(base / "clients" / "idp.jwks"),
                "audience": IDP_AUDIENCE, "allowed_scopes": ["patient/*.rs"]}]
    gw = await start_gateway(base / "var", **{
        "auth.clients": clients, "auth.api_keys": api_keys, "auth.issuers": issuers,
        "profiles": profiles})
    session = aiohttp.ClientSession()
    world = World(gw, session, keys)
    try:
        for resource in SEED:
            answer = await world.admin("PUT", f"/fhir/{resource['resourceType']}/"
                                       f"{resource['id']}", resource)
            assert answer.status == 201, answer.body
        yield world
    finally:
        await session.close()
        await gw.runner.cleanup()


def ids(bundle: dict[str, Any], resource_type: str | None = None) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", [])
            if resource_type is None or e["resource"]["resourceType"] == resource_type}


def refs(bundle: dict[str, Any]) -> set[str]:
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in bundle.get("entry", [])}


async def audit_bodies(world: World, client: str) -> list[dict[str, Any]]:
    audit = world.gw.app[AUDIT]
    return [parse_body(row.body) for row in await audit.search(AuditQuery(client=client),
                                                               limit=1000)]


# -- the SMART Backend Services flow ---------------------------------------------------------


async def test_es384_client_gets_a_token_and_uses_it(world: World) -> None:
    answer = await world.token("es-client", "system/Patient.rs")
    assert answer["_status"] == 200, answer
    assert answer["token_type"] == "bearer" and answer["scope"] == "system/Patient.rs"
    bearer = {"Authorization": f"Bearer {answer['access_token']}"}
    read = await world.call("GET", "/fhir/Patient/pat-a", bearer)
    assert read.status == 200 and read.body["id"] == "pat-a"
    found = await world.call("GET", "/fhir/Patient?family=Alphasynth", bearer)
    assert found.status == 200 and ids(found.body) == {"pat-a"}


async def test_rs384_client_gets_a_token_and_writes_with_it(world: World) -> None:
    answer = await world.token("rs-client", "system/Observation.cu")
    assert answer["_status"] == 200, answer
    assert answer["scope"] == "system/Observation.cu"
    bearer = {"Authorization": f"Bearer {answer['access_token']}"}
    created = await world.call("POST", "/fhir/Observation", bearer,
                               observation("Patient/pat-m", id="ignored"))
    assert created.status == 201, created.body
    # Granted c and u only: reading back what it wrote is not among them.
    read = await world.call("GET", f"/fhir/Observation/{created.body['id']}", bearer)
    assert is_outcome(read, 403)


async def test_granted_scopes_are_the_intersection_of_asked_and_allowed(
        world: World) -> None:
    # es-client may have system/Patient.rs and system/Observation.r; it asks for all.
    answer = await world.token("es-client", "system/*.cruds openid")
    assert answer["_status"] == 200, answer
    assert answer["scope"].split() == ["system/Observation.r", "system/Patient.rs"]
    bearer = {"Authorization": f"Bearer {answer['access_token']}"}
    assert (await world.call("GET", "/fhir/Observation/obs-a", bearer)).status == 200
    assert is_outcome(await world.call("GET", "/fhir/Observation", bearer), 403)
    assert is_outcome(await world.call("POST", "/fhir/Patient", bearer,
                                       patient("MRN-X", id="x", family="Nobody")), 403)
    assert is_outcome(await world.call("GET", "/fhir/Encounter/enc-a", bearer), 403)


async def test_asking_only_for_scopes_not_allowed_gets_no_token(world: World) -> None:
    answer = await world.token("es-client", "system/Encounter.rs")
    assert answer["_status"] == 400 and answer["error"] == "invalid_scope"


@pytest.mark.parametrize(("client_id", "scope", "interaction", "path", "status"), [
    ("rs-client", "system/Patient.rs", "read", "/fhir/Patient/pat-b", 200),
    ("rs-client", "system/Patient.rs", "search", "/fhir/Observation", 403),
    ("rs-client", "system/Patient.read", "search", "/fhir/Patient?family=Betasynth", 200),
    ("rs-client", "system/Patient.r", "search", "/fhir/Patient", 403),
    ("rs-client", "system/*.s", "search", "/fhir/Encounter", 200),
    ("rs-client", "system/*.s", "read", "/fhir/Encounter/enc-a", 403),
    ("es-client", "system/Observation.r", "read", "/fhir/Observation/obs-b", 200),
    ("es-client", "system/Observation.r", "read", "/fhir/Patient/pat-a", 403),
])
async def test_smart_token_rows_of_the_scope_matrix(world: World, client_id: str, scope: str,
                                                    interaction: str, path: str,
                                                    status: int) -> None:
    answer = await world.call("GET", path, await world.bearer(client_id, scope))
    assert answer.status == status, (interaction, answer.body)


async def test_a_token_is_refused_after_the_client_signs_with_another_key(
        world: World) -> None:
    key, alg = world.keys["es-client"]
    world.keys["es-client"] = (ECKey.generate_key("P-384"), "ES384")
    try:
        answer = await world.token("es-client", "system/Patient.rs")
    finally:
        world.keys["es-client"] = (key, alg)
    assert answer["_status"] == 401 and answer["error"] == "invalid_client"


# -- the scope matrix over HTTP (API keys) ---------------------------------------------------


def _fresh(resource_type: str) -> dict[str, Any]:
    """A new resource for the matrix, unlike the seeded ones in every searched element."""
    if resource_type == "Observation":
        return observation("Patient/pat-m", id="x")
    return builders.patient(id="x", family="Matrixsynth", birthDate="1999-09-09")


async def _target(world: World, resource_type: str) -> str:
    """A fresh resource of the type, written by the admin key: id."""
    body = _fresh(resource_type)
    created = await world.admin("POST", f"/fhir/{resource_type}", body)
    assert created.status == 201, created.body
    return str(created.body["id"])


async def _attempt(world: World, headers: dict[str, str], interaction: str,
                   resource_type: str) -> tuple[Answer, str | None]:
    """Perform one interaction; the id of the resource it targeted (when it had one)."""
    fresh = _fresh(resource_type)
    seeded = "pat-a" if resource_type == "Patient" else "obs-a"
    if interaction == "read":
        return await world.call("GET", f"/fhir/{resource_type}/{seeded}", headers), None
    if interaction == "vread":
        return await world.call("GET", f"/fhir/{resource_type}/{seeded}/_history/1",
                                headers), None
    if interaction == "history":
        return await world.call("GET", f"/fhir/{resource_type}/{seeded}/_history",
                                headers), None
    if interaction == "history-type":
        return await world.call("GET", f"/fhir/{resource_type}/_history", headers), None
    if interaction == "search":
        return await world.call("GET", f"/fhir/{resource_type}?_count=2", headers), None
    if interaction == "create":
        fresh.pop("id")
        return await world.call("POST", f"/fhir/{resource_type}", headers, fresh), None
    target = await _target(world, resource_type)
    if interaction == "update":
        fresh["id"] = target
        return await world.call("PUT", f"/fhir/{resource_type}/{target}", headers,
                                fresh), target
    assert interaction == "delete"
    return await world.call("DELETE", f"/fhir/{resource_type}/{target}", headers), target


@pytest.mark.parametrize("resource_type", TYPES)
@pytest.mark.parametrize("interaction", list(NEEDS))
@pytest.mark.parametrize("row", range(len(SCOPE_FORMS)),
                         ids=[form for form, _, _ in SCOPE_FORMS])
async def test_scope_matrix(world: World, row: int, interaction: str,
                            resource_type: str) -> None:
    form, on_patient, on_observation = SCOPE_FORMS[row]
    letters = on_patient if resource_type == "Patient" else on_observation
    permitted = NEEDS[interaction] in letters
    answer, target = await _attempt(world, key_headers(matrix_key(row)), interaction,
                                    resource_type)
    if permitted:
        assert 200 <= answer.status < 300, (form, interaction, answer.body)
        return
    assert is_outcome(answer, 403), (form, interaction, answer.status, answer.body)
    assert answer.body["issue"][0]["code"] == "forbidden"
    if target is not None:  # a refused write changed nothing
        after = await world.admin("GET", f"/fhir/{resource_type}/{target}")
        assert after.status == 200 and after.body["meta"]["versionId"] == "1"


# -- the patient compartment: another patient's data does not exist -------------------------


async def pa(world: World) -> dict[str, str]:
    return await world.bearer("pa-client", "patient/*.rs")


async def pw(world: World) -> dict[str, str]:
    return await world.bearer("pw-client", "patient/*.cruds")


def in_a_compartment(resource: dict[str, Any]) -> bool:
    text = json.dumps(resource)
    return resource.get("id") == "pat-a" or f'"{PATIENT_A}"' in text


async def test_patient_scope_reads_its_own_patient_and_their_resources(world: World) -> None:
    headers = await pa(world)
    for path in ("Patient/pat-a", "Observation/obs-a", "Encounter/enc-a",
                 "Appointment/appt-a", "Appointment/appt-ab", "DiagnosticReport/dr-a"):
        answer = await world.call("GET", f"/fhir/{path}", headers)
        assert answer.status == 200, (path, answer.body)
        assert answer.body["id"] == path.partition("/")[2]


@pytest.mark.parametrize("path", [
    "Patient/{}", "Observation/{}", "Encounter/{}", "Appointment/{}",
    "Patient/{}/_history", "Observation/{}/_history", "Patient/{}/_history/1",
    "Observation/{}/_history/1",
])
async def test_another_patients_resource_answers_like_an_unknown_id(world: World,
                                                                    path: str) -> None:
    headers = await pa(world)
    other = {"Patient": "pat-b", "Observation": "obs-b", "Encounter": "enc-b",
             "Appointment": "appt-b"}[path.partition("/")[0]]
    theirs = await world.call("GET", "/fhir/" + path.format(other), headers)
    unknown = await world.call("GET", "/fhir/" + path.format("no-such-id-42"), headers)
    assert theirs.status == 404, theirs.body
    assert (theirs.status, theirs.raw) == (unknown.status, unknown.raw)
    # The resource is there: an unconfined caller reads it.
    assert (await world.admin("GET", "/fhir/" + path.format(other))).status == 200


@pytest.mark.parametrize(("query", "expected"), [
    ("Patient", {"pat-a"}),
    ("Patient?_id=pat-b", set()),
    ("Patient?_id=pat-a,pat-b", {"pat-a"}),
    ("Patient?family=Betasynth", set()),
    ("Patient?identifier=MRN-B-1", set()),
    ("Observation?subject=Patient/pat-b", set()),
    ("Observation?patient=pat-b", set()),
    ("Observation?_id=obs-b", set()),
    ("Encounter?patient=Patient/pat-b", set()),
    ("Encounter?_id=enc-a,enc-b", {"enc-a"}),
    ("Appointment?actor=Patient/pat-b", {"appt-ab"}),
    ("Appointment?_id=appt-b", set()),
])
async def test_patient_scope_searches_return_only_its_patients_data(
        world: World, query: str, expected: set[str]) -> None:
    answer = await world.call("GET", f"/fhir/{query}", await pa(world))
    assert answer.status == 200, answer.body
    assert ids(answer.body) == expected
    assert all(in_a_compartment(e["resource"]) for e in answer.body.get("entry", []))


async def test_patient_scope_unfiltered_searches_hold_no_other_patients_data(
        world: World) -> None:
    headers = await pa(world)
    for resource_type, own, theirs in (("Observation", "obs-a", "obs-b"),
                                       ("Encounter", "enc-a", "enc-b"),
                                       ("Appointment", "appt-a", "appt-b")):
        answer = await world.call("GET", f"/fhir/{resource_type}", headers)
        assert answer.status == 200
        found = ids(answer.body)
        assert own in found and theirs not in found, resource_type
        assert all(in_a_compartment(e["resource"]) for e in answer.body["entry"])
    count = await world.call("GET", "/fhir/Observation?_id=obs-a,obs-b&_summary=count",
                             headers)
    assert count.body["total"] == 1
    # POST _search is the same search.
    async with world.session.post(world.gw.http_url + "/fhir/Patient/_search",
                                  data={"_id": "pat-b"}, headers=headers) as response:
        assert response.status == 200
        assert "entry" not in await response.json()


@pytest.mark.parametrize(("query", "forbidden"), [
    ("Appointment?_include=Appointment:actor", PATIENT_B),
    ("Appointment?_id=appt-ab&_include=Appointment:patient", PATIENT_B),
    ("DiagnosticReport?_include=DiagnosticReport:result", "Observation/obs-b"),
    ("Patient?_revinclude=Observation:subject", "Observation/obs-b"),
    ("Patient?_revinclude=Appointment:actor", "Appointment/appt-b"),
    ("Patient?_id=pat-b&_revinclude=Observation:subject", "Observation/obs-b"),
    ("Observation?_include=Observation:subject", PATIENT_B),
])
async def test_include_and_revinclude_never_bring_in_another_patient(
        world: World, query: str, forbidden: str) -> None:
    answer = await world.call("GET", f"/fhir/{query}", await pa(world))
    assert answer.status == 200, answer.body
    assert forbidden not in refs(answer.body)
    assert all(in_a_compartment(e["resource"]) for e in answer.body.get("entry", []))
    # The same search without a patient scope does reach it, so the check is not vacuous.
    wide = await world.admin("GET", f"/fhir/{query}")
    if "_id=pat-b" not in query:
        assert forbidden in refs(wide.body)


async def test_include_brings_in_the_own_patient(world: World) -> None:
    answer = await world.call("GET", "/fhir/Appointment?_id=appt-ab&_include=Appointment:actor",
                              await pa(world))
    assert answer.status == 200
    assert refs(answer.body) == {"Appointment/appt-ab", PATIENT_A}


async def test_patient_scope_cannot_list_type_history(world: World) -> None:
    answer = await world.call("GET", "/fhir/Observation/_history", await pa(world))
    assert is_outcome(answer, 403)


async def test_batch_get_of_another_patients_resource_is_404_in_its_entry(
        world: World) -> None:
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/pat-b"}},
        {"request": {"method": "GET", "url": "Patient/pat-a"}},
        {"request": {"method": "GET", "url": "Observation/obs-b"}},
        {"request": {"method": "GET", "url": "Observation?subject=Patient/pat-b"}},
        {"request": {"method": "GET", "url": "Observation/no-such-id-42"}},
    ]}
    answer = await world.call("POST", "/fhir", await pa(world), bundle)
    assert answer.status == 200, answer.body
    entries = answer.body["entry"]
    statuses = [e["response"]["status"].split()[0] for e in entries]
    assert statuses == ["404", "200", "404", "200", "404"]
    assert entries[1]["resource"]["id"] == "pat-a"
    assert "entry" not in entries[3]["resource"]
    assert entries[2]["response"]["outcome"] == entries[4]["response"]["outcome"]
    assert b"Betasynth" not in answer.raw  # nothing of B's, only the query as asked


async def test_patient_scope_may_not_create_for_another_patient(world: World) -> None:
    headers = await pw(world)
    theirs = observation(PATIENT_B, id="x")
    theirs.pop("id")
    refused = await world.call("POST", "/fhir/Observation", headers, theirs)
    assert is_outcome(refused, 403)
    mine = observation(PATIENT_A, id="x")
    mine.pop("id")
    created = await world.call("POST", "/fhir/Observation", headers, mine)
    assert created.status == 201, created.body
    assert created.body["subject"]["reference"] == PATIENT_A


async def test_patient_scope_updating_or_deleting_another_patients_resource_is_404(
        world: World) -> None:
    headers = await pw(world)
    before = await world.admin("GET", "/fhir/Observation/obs-b")
    # Re-pointed at its own patient, so only the stored resource's owner can refuse it.
    hijack = observation(PATIENT_A, id="obs-b")
    updated = await world.call("PUT", "/fhir/Observation/obs-b", headers, hijack)
    deleted = await world.call("DELETE", "/fhir/Observation/obs-b", headers)
    unknown = await world.call("DELETE", "/fhir/Observation/no-such-id-42", headers)
    created_at_id = await world.call("PUT", "/fhir/Observation/no-such-id-43", headers,
                                     observation(PATIENT_A, id="no-such-id-43"))
    assert is_outcome(updated, 404), updated.body
    assert is_outcome(deleted, 404), deleted.body
    # For a confined token an unknown id answers exactly like another patient's: deleting
    # nothing and update-as-create would otherwise tell which ids exist.
    assert is_outcome(unknown, 404) and unknown.raw == deleted.raw
    assert is_outcome(created_at_id, 404) and created_at_id.raw == updated.raw
    after = await world.admin("GET", "/fhir/Observation/obs-b")
    assert after.raw == before.raw  # untouched: same version, same subject
    patient_b = await world.call("PUT", "/fhir/Patient/pat-b", headers,
                                 patient("MRN-B-1", id="pat-b", family="Hijacked",
                                         birthDate="1971-02-02"))
    assert patient_b.status in (403, 404)
    assert (await world.admin("GET", "/fhir/Patient/pat-b")).body["name"][0]["family"] \
        == "Betasynth"


async def test_patient_scope_transaction_writing_for_another_patient_is_refused_whole(
        world: World) -> None:
    marker = f"txn-{uuid.uuid4().hex[:8]}"
    mine = observation(PATIENT_A, id="x", identifier=[{"system": "urn:test", "value": marker}])
    theirs = observation(PATIENT_B, id="y", identifier=[{"system": "urn:test", "value": marker}])
    for resource in (mine, theirs):
        resource.pop("id")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Observation"}, "resource": mine},
        {"request": {"method": "POST", "url": "Observation"}, "resource": theirs}]}
    answer = await world.call("POST", "/fhir", await pw(world), bundle)
    assert is_outcome(answer, 403), answer.body
    written = await world.admin("GET", f"/fhir/Observation?identifier=urn:test|{marker}")
    assert "entry" not in written.body


async def _b_observation_with(marker: str, world: World) -> None:
    theirs = observation(PATIENT_B, id="x", identifier=[{"system": "urn:test", "value": marker}],
                         valueString="b-only-text")
    theirs.pop("id")
    assert (await world.admin("POST", "/fhir/Observation", theirs)).status == 201


async def test_patient_scope_conditional_create_does_not_match_another_patient(
        world: World) -> None:
    marker = f"cc-{uuid.uuid4().hex[:8]}"
    await _b_observation_with(marker, world)
    mine = observation(PATIENT_A, id="x", identifier=[{"system": "urn:test", "value": marker}])
    mine.pop("id")
    headers = {**await pw(world), "If-None-Exist": f"identifier=urn:test|{marker}"}
    answer = await world.call("POST", "/fhir/Observation", headers, mine)
    assert answer.status == 201, answer.body  # B's match is invisible: A's is created
    assert b"b-only-text" not in answer.raw and b"pat-b" not in answer.raw
    assert answer.body["subject"]["reference"] == PATIENT_A
    again = await world.call("POST", "/fhir/Observation", headers, mine)
    assert again.status == 200 and again.body["id"] == answer.body["id"]  # A's own matches
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "POST", "url": "Observation",
                     "ifNoneExist": f"identifier=urn:test|{marker}&subject=Patient/pat-b"},
         "resource": mine}]}
    batch = await world.call("POST", "/fhir", await pw(world), bundle)
    assert b"b-only-text" not in batch.raw


async def test_patient_scope_history_leaves_out_another_patients_versions(
        world: World) -> None:
    """A resource re-filed from B to A: A sees its own version, not B's (as vread says)."""
    resource_id = f"refiled-{uuid.uuid4().hex[:8]}"
    path = f"/fhir/Observation/{resource_id}"
    first = await world.admin("PUT", path, observation(PATIENT_B, id=resource_id,
                                                       valueString="b-era-text"))
    assert first.status == 201
    second = await world.admin("PUT", path, observation(PATIENT_A, id=resource_id,
                                                        valueString="a-era-text"))
    assert second.status == 200
    headers = await pa(world)
    history = await world.call("GET", f"{path}/_history", headers)
    assert history.status == 200, history.body
    assert [e["resource"]["meta"]["versionId"] for e in history.body["entry"]] == ["2"]
    assert b"b-era-text" not in history.raw and "total" not in history.body
    assert (await world.call("GET", f"{path}/_history/1", headers)).status == 404
    assert (await world.call("GET", f"{path}/_history/2", headers)).status == 200
    wide = await world.admin("GET", f"{path}/_history")
    assert wide.body["total"] == 2 and b"b-era-text" in wide.raw


@pytest.mark.parametrize("claim", ["pat-a", PATIENT_A])
async def test_external_token_patient_claim_confines_like_a_client_binding(
        world: World, claim: str) -> None:
    key, alg = world.keys[IDP]
    now = int(time.time())
    token = jwt.encode({"alg": alg, "kid": "idp-1"}, {
        "iss": IDP, "aud": IDP_AUDIENCE, "client_id": "voice-agent", "exp": now + 120,
        "iat": now, "scope": "patient/*.rs", "patient": claim}, key, algorithms=[alg])
    headers = {"Authorization": f"Bearer {token}"}
    assert (await world.call("GET", "/fhir/Patient/pat-a", headers)).status == 200
    assert is_outcome(await world.call("GET", "/fhir/Patient/pat-b", headers), 404)
    found = await world.call("GET", "/fhir/Observation?_id=obs-a,obs-b", headers)
    assert ids(found.body) == {"obs-a"}


async def test_patient_scope_without_a_bound_patient_is_refused(world: World) -> None:
    headers = await world.bearer("pnone-client", "patient/*.rs")
    for path in ("/fhir/Patient/pat-a", "/fhir/Patient", "/fhir/Observation/obs-a",
                 "/fhir/Observation?subject=Patient/pat-a"):
        assert is_outcome(await world.call("GET", path, headers), 403), path


# -- SMART v2 scope constraints (?param=value) ------------------------------------------------


def categorised(category: str) -> dict[str, Any]:
    return observation("Patient/pat-m", id="x", category=[{"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
        "code": category}]}])


async def test_a_constrained_scope_neither_sees_nor_writes_what_it_excludes(
        world: World) -> None:
    vital, lab = categorised("vital-signs"), categorised("laboratory")
    for resource in (vital, lab):
        resource.pop("id")
        created = await world.admin("POST", "/fhir/Observation", resource)
        resource["id"] = created.body["id"]
    headers = key_headers("lab-only")
    found = await world.call("GET", "/fhir/Observation?subject=Patient/pat-m&_count=1000",
                             headers)
    assert lab["id"] in ids(found.body) and vital["id"] not in ids(found.body)
    assert (await world.call("GET", f"/fhir/Observation/{lab['id']}", headers)).status == 200
    assert is_outcome(await world.call("GET", f"/fhir/Observation/{vital['id']}", headers),
                      404)
    # Writes: never outside the constraint (the vital-signs one stays as it was).
    before = await world.admin("GET", f"/fhir/Observation/{vital['id']}")
    fresh = categorised("vital-signs")
    fresh.pop("id")
    assert is_outcome(await world.call("POST", "/fhir/Observation", headers, fresh), 403)
    changed = {**vital, "status": "amended"}
    assert is_outcome(await world.call("PUT", f"/fhir/Observation/{vital['id']}", headers,
                                       changed), 403)
    # Deleting one it cannot see answers like reading it: 404.
    assert is_outcome(await world.call("DELETE", f"/fhir/Observation/{vital['id']}",
                                       headers), 404)
    after = await world.admin("GET", f"/fhir/Observation/{vital['id']}")
    assert after.raw == before.raw
    # Inside the constraint the scope's c, u and d are honoured...
    own = categorised("laboratory")
    own.pop("id")
    created = await world.call("POST", "/fhir/Observation", headers, own)
    assert created.status == 201, created.body
    own_id = created.body["id"]
    updated = await world.call("PUT", f"/fhir/Observation/{own_id}", headers,
                               {**created.body, "status": "amended"})
    assert updated.status == 200, updated.body
    # ...but a lab result cannot be re-filed as vital signs through it,
    moved = {**categorised("vital-signs"), "id": own_id}
    assert is_outcome(await world.call("PUT", f"/fhir/Observation/{own_id}", headers,
                                       moved), 403)
    # a conditional delete only finds what the scope shows,
    swept = await world.call("DELETE", "/fhir/Observation?category=vital-signs", headers)
    assert swept.status in (200, 204)
    assert (await world.admin("GET", f"/fhir/Observation/{vital['id']}")).raw == before.raw
    # and its own resource it may delete.
    assert (await world.call("DELETE", f"/fhir/Observation/{own_id}", headers)).status in (
        200, 204)


# -- minimum necessary: task profiles ---------------------------------------------------------


async def test_scheduling_profile_sees_only_name_birth_date_and_telecom(world: World) -> None:
    before = await world.admin("GET", "/fhir/Patient/pat-a")
    answer = await world.call("GET", "/fhir/Patient/pat-a", key_headers("sched"))
    assert answer.status == 200
    assert set(answer.body) == {"resourceType", "id", "meta", "name", "birthDate", "telecom"}
    assert answer.body["name"] == before.body["name"]
    assert answer.body["telecom"] == before.body["telecom"]
    assert tagged_subsetted(answer.body)
    # The store keeps the whole resource: an unrestricted read is unchanged and untagged.
    after = await world.admin("GET", "/fhir/Patient/pat-a")
    assert after.raw == before.raw
    assert {"identifier", "address", "gender"} <= set(after.body)
    assert not tagged_subsetted(after.body)


async def test_scheduling_profile_through_a_smart_token(world: World) -> None:
    headers = await world.bearer("sched-client", "system/Patient.rs")
    answer = await world.call("GET", "/fhir/Patient/pat-a", headers)
    assert answer.status == 200
    assert "identifier" not in answer.body and tagged_subsetted(answer.body)
    assert is_outcome(await world.call("GET", "/fhir/Patient?identifier=MRN-A-1", headers),
                      403)


@pytest.mark.parametrize(("query", "status"), [
    ("Patient?identifier=MRN-A-1", 403),
    ("Patient?address-postalcode=00001", 403),
    ("Patient?address=Synthetic", 403),
    ("Patient?gender=other", 403),
    ("Patient?family=Alphasynth&identifier=MRN-A-1", 403),
    ("Patient?identifier:missing=false", 403),
    ("Patient?_sort=address-postalcode", 403),  # the order would tell what is hidden
    ("Patient?family=Alphasynth&_sort=birthdate", 200),
    ("Patient?name=Alphasynth", 200),
    ("Patient?family=Alphasynth", 200),
    ("Patient?birthdate=1970-01-01", 200),
    ("Patient?phone=555-0100", 200),
    ("Patient?_id=pat-a", 200),
])
async def test_scheduling_profile_searches_only_on_what_it_may_see(world: World, query: str,
                                                                   status: int) -> None:
    answer = await world.call("GET", f"/fhir/{query}", key_headers("sched"))
    assert answer.status == status, answer.body
    if status == 403:
        assert is_outcome(answer, 403)
        return
    assert ids(answer.body) == {"pat-a"}
    for entry in answer.body["entry"]:
        assert "identifier" not in entry["resource"] and "address" not in entry["resource"]
        assert tagged_subsetted(entry["resource"])


async def test_scheduling_profile_refuses_types_it_does_not_list(world: World) -> None:
    headers = key_headers("sched")
    for path in ("/fhir/MedicationRequest/mr-a", "/fhir/MedicationRequest",
                 "/fhir/Observation/obs-a", "/fhir/Patient?_revinclude=Observation:subject"):
        assert is_outcome(await world.call("GET", path, headers), 403), path
    appointments = await world.call("GET", "/fhir/Appointment/appt-a", headers)
    assert appointments.status == 200 and not tagged_subsetted(appointments.body)


async def test_scheduling_profile_cuts_included_patients_too(world: World) -> None:
    answer = await world.call(
        "GET", "/fhir/Appointment?_id=appt-a&_include=Appointment:patient",
        key_headers("sched"))
    assert answer.status == 200, answer.body
    [included] = [e["resource"] for e in answer.body["entry"]
                  if e["resource"]["resourceType"] == "Patient"]
    assert "identifier" not in included and tagged_subsetted(included)


async def test_refill_profile_reads_medication_requests_and_less_of_the_patient(
        world: World) -> None:
    headers = key_headers("refill")
    order = await world.call("GET", "/fhir/MedicationRequest/mr-a", headers)
    assert order.status == 200 and not tagged_subsetted(order.body)
    assert order.body["medicationCodeableConcept"] == {"text": "synthetic drug"}
    person = await world.call("GET", "/fhir/Patient/pat-a", headers)
    assert set(person.body) == {"resourceType", "id", "meta", "name", "birthDate"}
    assert is_outcome(await world.call("GET", "/fhir/Appointment/appt-a", headers), 403)
    assert is_outcome(await world.call("GET", "/fhir/Patient?phone=555-0100", headers), 403)


async def test_audit_records_carry_the_profile_as_purpose(world: World) -> None:
    await world.call("GET", "/fhir/Patient/pat-a", key_headers("sched"))
    await world.call("GET", "/fhir/MedicationRequest/mr-a", key_headers("refill"))
    await world.call("GET", "/fhir/Patient/pat-a", key_headers("admin"))
    for client, profile in (("sched", "scheduling"), ("refill", "refill"), ("admin", "")):
        bodies = [b for b in await audit_bodies(world, client) if b["action"] == "read"]
        assert bodies, client
        assert {(b.get("profile", ""), b.get("purpose", "")) for b in bodies} == \
            {(profile, profile)}, client


# -- what _include and bundles may reach ---------------------------------------------------------


@pytest.mark.parametrize(("key", "query"), [
    ("obs-only", "Observation?_include=Observation:subject"),
    ("obs-only", "Observation?_include=Observation:patient:Patient"),
    ("pat-only", "Patient?_revinclude=Observation:subject"),
    # Refused even when nothing matches: the answer must not depend on the data.
    ("obs-only", "Observation?_id=no-such-obs&_include=Observation:patient"),
    ("pat-only", "Patient?_id=no-such-patient&_revinclude=Observation:subject"),
])
async def test_include_of_a_type_the_scopes_do_not_permit_is_403(world: World, key: str,
                                                                 query: str) -> None:
    answer = await world.call("GET", f"/fhir/{query}", key_headers(key))
    assert is_outcome(answer, 403), answer.body
    # The same search without the include is allowed.
    plain = await world.call("GET", f"/fhir/{query.partition('?')[0]}", key_headers(key))
    assert plain.status == 200


def _two_writes(marker: str) -> list[dict[str, Any]]:
    person = patient(marker, family="Bundlesynth", birthDate="1988-08-08",
                     telecom=home_phone("555-0188"))
    result = observation("Patient/pat-m", identifier=[{"system": "urn:test", "value": marker}])
    return [{"request": {"method": "POST", "url": "Patient"}, "resource": person},
            {"request": {"method": "POST", "url": "Observation"}, "resource": result}]


async def test_transaction_with_one_entry_outside_the_scopes_is_refused_whole(
        world: World) -> None:
    marker = f"MRN-T-{uuid.uuid4().hex[:8]}"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": _two_writes(marker)}
    answer = await world.call("POST", "/fhir", key_headers("pat-only"), bundle)
    assert is_outcome(answer, 403), answer.body
    assert "Bundle.entry[1]" in answer.body["issue"][0]["diagnostics"]
    written = await world.admin("GET", f"/fhir/Patient?identifier={marker}")
    assert "entry" not in written.body  # nothing of it was written


async def test_batch_answers_the_entry_outside_the_scopes_403_and_the_others_2xx(
        world: World) -> None:
    marker = f"MRN-B-{uuid.uuid4().hex[:8]}"
    entries = [*_two_writes(marker),
               {"request": {"method": "GET", "url": "Observation/obs-a"}},
               {"request": {"method": "GET", "url": "Patient/pat-a"}}]
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": entries}
    answer = await world.call("POST", "/fhir", key_headers("pat-only"), bundle)
    assert answer.status == 200, answer.body
    statuses = [e["response"]["status"].split()[0] for e in answer.body["entry"]]
    assert statuses == ["201", "403", "403", "200"]
    written = await world.admin("GET", f"/fhir/Patient?identifier={marker}")
    assert len(written.body["entry"]) == 1
    observations = await world.admin("GET", f"/fhir/Observation?identifier=urn:test|{marker}")
    assert "entry" not in observations.body


async def test_conditional_create_without_a_read_scope_shows_no_existing_resource(
        world: World) -> None:
    marker = f"wo-{uuid.uuid4().hex[:8]}"
    await _b_observation_with(marker, world)
    write_only = key_headers(matrix_key(
        next(i for i, row in enumerate(SCOPE_FORMS) if row[0] == "user/Observation.cud")))
    mine = observation("Patient/pat-m", id="x",
                       identifier=[{"system": "urn:test", "value": marker}])
    mine.pop("id")
    answer = await world.call("POST", "/fhir/Observation", {
        **write_only, "If-None-Exist": f"identifier=urn:test|{marker}"}, mine)
    assert answer.status == 200  # matched: nothing created...
    assert b"b-only-text" not in answer.raw  # ...and nothing read
    assert "ETag" in answer.headers
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "POST", "url": "Observation",
                     "ifNoneExist": f"identifier=urn:test|{marker}"}, "resource": mine}]}
    batch = await world.call("POST", "/fhir", write_only, bundle)
    assert batch.status == 200
    [entry] = batch.body["entry"]
    assert entry["response"]["status"].startswith("200") and "resource" not in entry
    assert b"b-only-text" not in batch.raw


@pytest.mark.parametrize("url", ["Observation/obs-a", "Observation?subject=Patient/pat-a"])
async def test_transaction_with_a_read_outside_the_scopes_is_refused_whole(
        world: World, url: str) -> None:
    marker = f"MRN-R-{uuid.uuid4().hex[:8]}"
    [write, _] = _two_writes(marker)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        write, {"request": {"method": "GET", "url": url}}]}
    answer = await world.call("POST", "/fhir", key_headers("pat-only"), bundle)
    assert is_outcome(answer, 403), answer.body
    assert "Bundle.entry[1]" in answer.body["issue"][0]["diagnostics"]
    written = await world.admin("GET", f"/fhir/Patient?identifier={marker}")
    assert "entry" not in written.body
    # A read it may make goes through with the write.
    bundle["entry"][1] = {"request": {"method": "GET", "url": "Patient/pat-a"}}
    answer = await world.call("POST", "/fhir", key_headers("pat-only"), bundle)
    assert answer.status == 200, answer.body
    assert [e["response"]["status"][:3] for e in answer.body["entry"]] == ["201", "200"]
