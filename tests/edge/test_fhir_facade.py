"""The FHIR facade over real HTTP: a running gateway, configured with a FHIR backend and
routes, sends Patient, Appointment and MedicationRequest to a fake EHR on 127.0.0.1 and
must apply the same policy to what comes back as to its own store: scopes before any
call, the patient compartment (no access to another patient's data, not even its
existence), task profiles and _elements, the vendor table, URLs on our base. The
backend's refusals pass through; a backend that cannot be asked answers 503 with
Retry-After at once, one that does not answer 504, garbage 502. Reads are cached a few
seconds, never across a write or past a caller's policy. All data is synthetic.

One gateway and one fake EHR serve the module. Each test starts with the facade the
gateway built from its config (cache emptied) and the fake's log and failure knobs
cleared; a test that needs other backend settings (retries, breaker, timeouts, a vendor
table, a misbehaving server) swaps in a facade of its own for its duration.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import ECKey
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import RunningGateway
from gateway.app.state import TELEMETRY
from gateway.audit.query import AuditQuery
from gateway.audit.record import Action
from gateway.audit.sealed import parse_body
from gateway.edge.audit_http import AUDIT
from gateway.edge.fhir_api import FHIR
from gateway.edge.fhir_proxy import Facade
from gateway.forward.backend import FhirResponse
from gateway.forward.cache import ReadCache
from gateway.forward.fhir_backend import FhirBackend, FhirBackendSpec
from gateway.forward.normalize import Normalizer
from gateway.forward.routes import Route, Router
from gateway.telemetry import configure
from support import builders
from support.fake_ehr import FakeEhr
from support.fhir import (
    API_KEY,
    Answer,
    api_key_config,
    is_outcome,
    start_fhir_gateway,
    tagged_subsetted,
)
from support.wait import ManualClock

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROUTED = ("Patient", "Appointment", "MedicationRequest")
ROUTER = Router(tuple(Route(("ehr",), resource=t) for t in ROUTED), {"ehr": "fhir"})
IDP = "https://idp.example"
IDP_AUDIENCE = "https://gw.example/fhir"
PATIENT_A, PATIENT_B = "Patient/pat-a", "Patient/pat-b"
VENDOR_MRN = "urn:oid:2.999.1.1.1"
CANONICAL_MRN = "urn:isthmus:sid:mrn"
VENDOR_PHONE = "https://vendor-a.example/fhir/StructureDefinition/mobile-phone"
VENDOR_TABLE = f"""resource,rule,path,from,to,note
Patient,identifier-system,identifier,{VENDOR_MRN},{CANONICAL_MRN},MRN
Patient,extension-to-telecom,telecom,{VENDOR_PHONE},phone,phone in an extension
Patient,telecom-use,telecom,cell,mobile,
MedicationRequest,coding-system,medicationCodeableConcept.coding,urn:oid:2.16.840.1.113883.6.88,http://www.nlm.nih.gov/research/umls/rxnorm,
"""
CANARY = "QZXFACADECANARY"


# Patients as vendor A writes them (its MRN system, phone in an extension, telecom use
# "cell"): what the normalizer has to turn into canonical FHIR.
patient = partial(builders.patient, system=VENDOR_MRN, active=True, given=["Synthetic"],
                  birthDate="1970-01-01", gender="other",
                  extension=[{"url": VENDOR_PHONE, "valueString": "+1 555 0100 123"}])


def vendor_email(id_: str) -> list[dict[str, str]]:
    return [{"system": "email", "value": f"{id_}@example.invalid", "use": "cell"}]


def medication(id_: str, subject: str) -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "id": id_, "status": "active",
            "intent": "order", "subject": {"reference": subject},
            "medicationCodeableConcept": {"coding": [{
                "system": "urn:oid:2.16.840.1.113883.6.88", "code": "197361"}]}}


def appointment(id_: str, *actors: str, identifier: str | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Appointment", "id": id_, "status": "booked",
        "start": "2030-01-02T09:00:00Z", "end": "2030-01-02T09:15:00Z",
        "participant": [{"actor": {"reference": a}, "status": "accepted"} for a in actors]}
    if identifier is not None:
        resource["identifier"] = [{"system": "urn:isthmus:test:appt", "value": identifier}]
    return resource


SEED = [patient("SYN-A-1", id="pat-a", family="Alphafacade", telecom=vendor_email("pat-a")),
        patient("SYN-B-1", id="pat-b", family="Betafacade", telecom=vendor_email("pat-b")),
        medication("mr-a", PATIENT_A), medication("mr-b", PATIENT_B),
        *(appointment(f"appt-{i}", PATIENT_A) for i in range(1, 6)),
        appointment("appt-b", PATIENT_B)]


# -- the rig: one gateway, one fake EHR; a backend client and facade per test -------------


@dataclass
class Rig:
    gw: RunningGateway
    ehr: FakeEhr
    spans: InMemorySpanExporter
    session: aiohttp.ClientSession
    vendor_table: Path
    idp_key: ECKey
    wired: Facade | None = None  # the facade the gateway built from its config
    backends: list[FhirBackend] = field(default_factory=list)
    cache: ReadCache | None = None

    def reset(self) -> None:
        """Back to the configured facade, its cache emptied."""
        assert self.wired is not None
        self.gw.app[FHIR].facade = self.wired
        cache = self.wired.cache_for("ehr")
        assert cache is not None
        cache.clear()
        cache.hits = cache.misses = 0
        self.cache = cache

    async def use(self, *, url: str | None = None, cache: bool = True, vendor: bool = False,
                  per_backend: bool = False, **spec: Any) -> FhirBackend:
        """Route the types to a backend client (and cache) of this test's own."""
        settings: dict[str, Any] = {"max_retries": 0, "backoff_base": 0.01,
                                    "breaker_failures": 50, "read_timeout": 5.0, **spec}
        backend = await FhirBackend.open(
            FhirBackendSpec(name="ehr", base_url=url or self.ehr.url, **settings),
            self.gw.app[TELEMETRY])
        self.backends.append(backend)
        self.cache = ReadCache(30.0, 100) if cache else None
        normalizers = {"ehr": Normalizer.load(self.vendor_table)} if vendor else {}
        caches = {"ehr": self.cache} if per_backend and self.cache else self.cache
        self.gw.app[FHIR].facade = Facade(ROUTER, {"ehr": backend}, caches, normalizers)
        return backend

    async def call(self, method: str, path: str, *, key: str | None = API_KEY,
                   headers: dict[str, str] | None = None, body: Any = None,
                   form: dict[str, str] | None = None) -> Answer:
        sent = {"Accept": "application/fhir+json", **(headers or {})}
        if key is not None:
            sent["X-API-Key"] = key
        data: Any = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/fhir+json"
        elif form is not None:
            data = form
        async with self.session.request(method, self.gw.http_url + path, headers=sent,
                                        data=data) as response:
            raw = await response.read()
            parsed = json.loads(raw) if raw else None
            return Answer(response.status, parsed, raw, response.headers)

    def confined(self, patient_id: str, scope: str = "patient/*.cruds") -> dict[str, str]:
        """A bearer token from the external issuer with a patient launch context."""
        now = int(time.time())
        token = jwt.encode({"alg": "ES256", "kid": "idp-1"}, {
            "iss": IDP, "aud": IDP_AUDIENCE, "client_id": "voice-agent", "exp": now + 300,
            "iat": now, "scope": scope, "patient": patient_id}, self.idp_key,
            algorithms=["ES256"])
        return {"Authorization": f"Bearer {token}"}

    def asked(self, method: str | None = None) -> list[Any]:
        return [r for r in self.ehr.requests if method is None or r.method == method]


def key(name: str) -> str:
    return f"{name}-facade-secret"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    base = tmp_path_factory.mktemp("facade")
    idp_key = ECKey.generate_key("P-256", parameters={"kid": "idp-1"})
    jwks = base / "idp.jwks"
    jwks.write_text(json.dumps({"keys": [idp_key.as_dict(private=False)]}))
    vendor_table = base / "vendor.csv"
    vendor_table.write_text(VENDOR_TABLE, encoding="utf-8")
    spans = InMemorySpanExporter()
    extra = [api_key_config("pat-only", key("pat-only"), ["system/Patient.rs"]),
             api_key_config("refill", key("refill"), ["system/*.rs"], "refill"),
             api_key_config("active-only", key("active-only"),
                            ["system/MedicationRequest.rs?status=active"])]
    ehr = FakeEhr()
    await ehr.start()
    for resource in SEED:
        ehr.seed(resource)
    gw = await start_fhir_gateway(
        base / "var", extra_keys=extra, telemetry=configure("none", span_exporter=spans),
        backends=[{"name": "ehr", "kind": "fhir", "base_url": ehr.url, "max_retries": 0,
                   "backoff_base": 0.01, "cache_ttl": 30.0}],
        routes=[{"match": {"resource": t}, "to": ["ehr"]} for t in ROUTED],
        **{"auth.issuers": [{"issuer": IDP, "jwks_file": str(jwks), "audience": IDP_AUDIENCE,
                             "allowed_scopes": ["patient/*.cruds"]}],
           "profiles": {"refill": {"Patient": ["name", "birthDate"],
                                   "MedicationRequest": ["*"]}}})
    session = aiohttp.ClientSession()
    try:
        yield Rig(gw, ehr, spans, session, vendor_table, idp_key, gw.app[FHIR].facade)
    finally:
        await session.close()
        await gw.runner.cleanup()
        await ehr.stop()


@pytest_asyncio.fixture(loop_scope="module", autouse=True)
async def fresh(rig: Rig) -> AsyncIterator[None]:
    await rig.ehr.start()
    rig.ehr.requests.clear()
    rig.ehr.fail_all(None)
    rig.ehr.delay = 0.0
    rig.reset()
    yield
    rig.reset()
    for backend in rig.backends:
        await backend.close()
    rig.backends.clear()


def ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


# -- proxying -------------------------------------------------------------------------------


async def test_a_read_is_proxied_with_the_backends_etag(rig: Rig) -> None:
    answer = await rig.call("GET", "/fhir/Appointment/appt-1")
    assert answer.status == 200, answer.body
    assert answer.body["id"] == "appt-1" and answer.body["status"] == "booked"
    assert answer.headers["ETag"] == 'W/"1"'
    assert [(r.method, r.path) for r in rig.asked()] == [("GET", "Appointment/appt-1")]
    again = await rig.call("GET", "/fhir/Appointment/appt-1",
                           headers={"If-None-Match": 'W/"1"'})
    assert again.status == 304


async def test_a_read_of_an_unknown_id_is_404_as_locally(rig: Rig) -> None:
    answer = await rig.call("GET", "/fhir/Appointment/no-such-appt")
    assert is_outcome(answer, 404)
    assert answer.body["issue"][0]["diagnostics"] == "no Appointment with this id is known"


async def test_vread_is_proxied(rig: Rig) -> None:
    answer = await rig.call("GET", "/fhir/Appointment/appt-2/_history/1")
    assert answer.status == 200 and answer.body["id"] == "appt-2"
    assert rig.asked()[-1].path == "Appointment/appt-2/_history/1"


async def test_a_search_is_proxied_with_urls_on_our_base_and_pages_through_it(
        rig: Rig) -> None:
    first = await rig.call("GET", "/fhir/Appointment?_count=2")
    assert first.status == 200, first.body
    bundle = first.body
    assert bundle["type"] == "searchset" and len(bundle["entry"]) == 2
    ours = rig.gw.http_url + "/fhir"
    for entry in bundle["entry"]:
        assert entry["fullUrl"] == f"{ours}/Appointment/{entry['resource']['id']}"
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    assert all(url.startswith(ours + "/Appointment?") for url in links.values())
    assert rig.ehr.url not in first.raw.decode()
    seen = ids(bundle)
    following = links.get("next")
    while following:
        page = await rig.call("GET", following.removeprefix(rig.gw.http_url))
        assert page.status == 200, page.body
        seen += ids(page.body)
        following = {k["relation"]: k["url"] for k in page.body["link"]}.get("next")
    assert sorted(seen) == sorted(r["id"] for r in rig.ehr.resources("Appointment"))


async def test_post_search_stays_a_post_to_the_backend(rig: Rig) -> None:
    answer = await rig.call("POST", "/fhir/MedicationRequest/_search",
                            form={"patient": PATIENT_A})
    assert answer.status == 200, answer.body
    assert ids(answer.body) == ["mr-a"]
    [sent] = rig.asked()
    assert (sent.method, sent.path, sent.query) == ("POST", "MedicationRequest/_search", ())


async def test_create_update_and_delete_are_proxied(rig: Rig) -> None:
    created = await rig.call("POST", "/fhir/Appointment",
                             body=appointment("ignored", PATIENT_A, identifier="crud-1"))
    assert created.status == 201, created.body
    new_id = created.body["id"]
    assert created.headers["Location"] == (f"{rig.gw.http_url}/fhir/Appointment/{new_id}"
                                           "/_history/1")
    assert rig.ehr.resource("Appointment", new_id) is not None
    changed = {**created.body, "status": "arrived"}
    updated = await rig.call("PUT", f"/fhir/Appointment/{new_id}", body=changed,
                             headers={"If-Match": 'W/"1"'})
    assert updated.status == 200, updated.body
    assert rig.ehr.resource("Appointment", new_id)["status"] == "arrived"  # type: ignore[index]
    put = rig.asked("PUT")[-1]
    assert put.headers["If-Match"] == 'W/"1"'
    deleted = await rig.call("DELETE", f"/fhir/Appointment/{new_id}")
    assert deleted.status == 204
    assert rig.ehr.resource("Appointment", new_id) is None
    gone = await rig.call("GET", f"/fhir/Appointment/{new_id}")
    assert is_outcome(gone, 410)


async def test_a_create_gets_if_none_exist_from_its_identifier_and_is_retried(
        rig: Rig) -> None:
    await rig.use(max_retries=2)
    rig.ehr.fail_next(1, 503)
    body = appointment("ignored", PATIENT_A, identifier="retry-1")
    created = await rig.call("POST", "/fhir/Appointment", body=body)
    assert created.status == 201, created.body
    posts = rig.asked("POST")
    assert len(posts) == 2  # the 503, then the retry: safe, the condition finds a repeat
    condition = posts[0].headers["If-None-Exist"]
    assert condition == "identifier=urn:isthmus:test:appt|retry-1"
    # Sent again, the same identifier finds the first: no duplicate.
    again = await rig.call("POST", "/fhir/Appointment", body=body)
    assert again.status == 200 and again.body["id"] == created.body["id"]


async def test_a_create_without_an_identifier_is_sent_once(rig: Rig) -> None:
    await rig.use(max_retries=2)
    rig.ehr.fail_next(1, 503)
    answer = await rig.call("POST", "/fhir/Appointment", body=appointment("x", PATIENT_A))
    assert is_outcome(answer, 503)
    [post] = rig.asked("POST")
    assert "If-None-Exist" not in post.headers


async def test_the_callers_if_none_exist_goes_on_as_given(rig: Rig) -> None:
    body = appointment("ignored", PATIENT_A, identifier="given-1")
    answer = await rig.call("POST", "/fhir/Appointment", body=body,
                            headers={"If-None-Exist": "identifier=urn:isthmus:test:appt|zz"})
    assert answer.status == 201
    assert rig.asked("POST")[0].headers["If-None-Exist"] == (
        "identifier=urn:isthmus:test:appt|zz")


async def test_conditional_update_and_delete_are_proxied(rig: Rig) -> None:
    body = appointment("ignored", PATIENT_A, identifier="cond-1")
    del body["id"]
    made = await rig.call("PUT", "/fhir/Appointment?identifier=urn:isthmus:test:appt|cond-1",
                          body=body)
    assert made.status == 201, made.body
    assert rig.asked("PUT")[-1].query == (("identifier", "urn:isthmus:test:appt|cond-1"),)
    # The fake has no conditional delete: its 405 passes through, the request went as sent.
    removed = await rig.call("DELETE",
                             "/fhir/Appointment?identifier=urn:isthmus:test:appt|cond-1")
    assert is_outcome(removed, 405)
    sent = rig.asked("DELETE")[-1]
    assert (sent.path, sent.query) == ("Appointment", (
        ("identifier", "urn:isthmus:test:appt|cond-1"),))
    refused = await rig.call("DELETE", f"/fhir/Appointment?colour={CANARY}")
    assert is_outcome(refused, 400) and len(rig.asked("DELETE")) == 1


async def test_history_of_a_proxied_type_is_not_supported(rig: Rig) -> None:
    assert is_outcome(await rig.call("GET", "/fhir/Appointment/appt-1/_history"), 501)
    assert is_outcome(await rig.call("GET", "/fhir/Appointment/_history"), 501)
    assert rig.asked() == []


async def test_an_invalid_body_is_refused_before_the_backend(rig: Rig) -> None:
    bad = {**appointment("x", PATIENT_A), "status": f"nonsense{CANARY}"}
    answer = await rig.call("POST", "/fhir/Appointment", body=bad)
    assert is_outcome(answer, 400)
    assert CANARY not in answer.raw.decode()
    assert rig.asked() == []


# -- policy before the call -----------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/fhir/Appointment/appt-1", None),
    ("GET", "/fhir/Appointment?patient=Patient/pat-a", None),
    ("POST", "/fhir/Appointment", appointment("x", PATIENT_A)),
    ("PUT", "/fhir/Appointment/appt-1", appointment("appt-1", PATIENT_A)),
    ("DELETE", "/fhir/Appointment/appt-1", None),
    ("POST", "/fhir/Patient", patient("SYN-X", id="x", family="Nobody",
                                      telecom=vendor_email("x"))),
])
async def test_scopes_are_refused_before_any_backend_call(
        rig: Rig, method: str, path: str, body: Any) -> None:
    answer = await rig.call(method, path, key=key("pat-only"), body=body)
    assert is_outcome(answer, 403)
    assert rig.asked() == []


async def test_an_unknown_search_parameter_is_refused_without_its_value(rig: Rig) -> None:
    answer = await rig.call("GET", f"/fhir/Appointment?colour={CANARY}",
                            headers={"Prefer": "handling=strict"})
    assert is_outcome(answer, 400)
    assert CANARY not in answer.raw.decode()
    assert rig.asked() == []


async def test_lenient_handling_drops_an_unknown_parameter_before_the_backend(
        rig: Rig) -> None:
    for prefer in ({"Prefer": "handling=lenient"}, {}):  # lenient is the default
        answer = await rig.call("GET", f"/fhir/Appointment?colour={CANARY}&_count=1",
                                headers=prefer)
        assert answer.status == 200
        assert [name for name, _ in rig.asked()[-1].query] == ["_count"]


# -- the patient compartment -------------------------------------------------------------------


async def test_a_confined_caller_cannot_read_another_patients_resource(rig: Rig) -> None:
    headers = rig.confined("pat-a")
    own = await rig.call("GET", "/fhir/MedicationRequest/mr-a", key=None, headers=headers)
    assert own.status == 200, own.body
    other = await rig.call("GET", "/fhir/MedicationRequest/mr-b", key=None, headers=headers)
    unknown = await rig.call("GET", "/fhir/MedicationRequest/mr-zz", key=None,
                             headers=headers)
    assert is_outcome(other, 404) and is_outcome(unknown, 404)
    assert other.raw == unknown.raw  # another patient's answers exactly like no such id
    assert is_outcome(await rig.call("GET", "/fhir/Patient/pat-b", key=None,
                                     headers=headers), 404)
    assert (await rig.call("GET", "/fhir/Patient/pat-a", key=None,
                           headers=headers)).status == 200


async def test_a_confined_search_asks_for_the_compartment_and_returns_only_its_own(
        rig: Rig) -> None:
    headers = rig.confined("pat-a")
    answer = await rig.call("GET", "/fhir/MedicationRequest?status=active", key=None,
                            headers=headers)
    assert answer.status == 200, answer.body
    assert ids(answer.body) == ["mr-a"]
    assert ("patient", PATIENT_A) in rig.asked()[0].query
    patients = await rig.call("GET", "/fhir/Patient", key=None, headers=headers)
    assert ids(patients.body) == ["pat-a"]
    assert ("_id", "pat-a") in rig.asked()[-1].query


async def test_a_confined_caller_cannot_write_into_another_compartment(rig: Rig) -> None:
    headers = rig.confined("pat-a")
    other = await rig.call("POST", "/fhir/Appointment", key=None, headers=headers,
                           body=appointment("x", PATIENT_B))
    assert is_outcome(other, 403)
    assert rig.asked() == []
    # Replacing or deleting B's appointment: fetched, found outside, answered like unknown.
    replace = await rig.call("PUT", "/fhir/Appointment/appt-b", key=None, headers=headers,
                             body=appointment("appt-b", PATIENT_A))
    delete = await rig.call("DELETE", "/fhir/Appointment/appt-b", key=None, headers=headers)
    assert is_outcome(replace, 404) and is_outcome(delete, 404)
    assert [r.method for r in rig.asked()] == ["GET", "GET"]
    assert rig.ehr.resource("Appointment", "appt-b") is not None


@dataclass
class Liar:
    """A backend that ignores every parameter and answers what it was told to."""

    body: bytes
    status: int = 200
    content_type: str = "application/fhir+json"
    runner: web.AppRunner | None = None
    url: str = ""

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.Response:
            return web.Response(body=self.body, status=self.status,
                                content_type=self.content_type)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/fhir/r4"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def test_search_entries_are_checked_even_when_the_backend_ignores_the_compartment(
        rig: Rig) -> None:
    liar = Liar(json.dumps({"resourceType": "Bundle", "type": "searchset", "total": 3,
                            "entry": [{"resource": medication("mr-a", PATIENT_A)},
                                      {"resource": medication("mr-b", PATIENT_B)},
                                      {"resource": patient("X", id="pat-b",
                                                           family="Betafacade",
                                                           telecom=vendor_email("pat-b")),
                                       "search": {"mode": "include"}}]}).encode())
    await liar.start()
    try:
        await rig.use(url=liar.url)
        answer = await rig.call("GET", "/fhir/MedicationRequest", key=None,
                                headers=rig.confined("pat-a"))
        assert answer.status == 200, answer.body
        assert ids(answer.body) == ["mr-a"]
        assert "total" not in answer.body  # a total counting what was held back would tell
        everything = await rig.call("GET", "/fhir/MedicationRequest")
        assert ids(everything.body) == ["mr-a", "mr-b", "pat-b"]
        assert everything.body["total"] == 3
    finally:
        await liar.stop()


async def test_a_constrained_scope_is_sent_on_and_checked_on_every_entry(rig: Rig) -> None:
    stopped = medication("mr-stopped", PATIENT_A) | {"status": "stopped"}
    liar = Liar(json.dumps({"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": medication("mr-a", PATIENT_A)}, {"resource": stopped}]}).encode())
    await liar.start()
    try:
        await rig.use(url=liar.url)
        answer = await rig.call("GET", "/fhir/MedicationRequest", key=key("active-only"))
        assert ids(answer.body) == ["mr-a"]
    finally:
        await liar.stop()
    rig.reset()
    await rig.call("GET", "/fhir/MedicationRequest", key=key("active-only"))
    assert ("status", "active") in rig.asked()[-1].query


# -- minimum necessary and vendor normalisation ------------------------------------------------


async def test_the_task_profile_cuts_proxied_reads_and_searches(rig: Rig) -> None:
    read = await rig.call("GET", "/fhir/Patient/pat-a", key=key("refill"))
    assert read.status == 200, read.body
    assert set(read.body) <= {"resourceType", "id", "meta", "name", "birthDate"}
    assert tagged_subsetted(read.body)
    found = await rig.call("GET", "/fhir/Patient?_id=pat-a,pat-b", key=key("refill"))
    for entry in found.body["entry"]:
        assert "telecom" not in entry["resource"] and "identifier" not in entry["resource"]
    refused = await rig.call("GET", "/fhir/Appointment/appt-1", key=key("refill"))
    assert is_outcome(refused, 403)


async def test_elements_cuts_proxied_answers_but_not_what_the_backend_is_asked(
        rig: Rig) -> None:
    # Appointment.participant is 1..* in R4: kept with what was asked for.
    read = await rig.call("GET", "/fhir/Appointment/appt-1?_elements=status")
    assert set(read.body) == {"resourceType", "id", "meta", "status", "participant"}
    assert tagged_subsetted(read.body)
    found = await rig.call("GET", "/fhir/Appointment?_elements=start&_count=2")
    assert all(set(e["resource"]) == {"resourceType", "id", "meta", "start", "status",
                                      "participant"}
               for e in found.body["entry"])
    assert all(name != "_elements" for name, _ in rig.asked()[-1].query)


async def test_the_vendor_table_absorbs_the_backends_quirks(rig: Rig) -> None:
    await rig.use(vendor=True)
    read = await rig.call("GET", "/fhir/Patient/pat-a")
    assert read.body["identifier"] == [{"system": CANONICAL_MRN, "value": "SYN-A-1"}]
    assert {"system": "phone", "value": "+1 555 0100 123"} in read.body["telecom"]
    assert {"system": "email", "value": "pat-a@example.invalid", "use": "mobile"} in (
        read.body["telecom"])
    assert "extension" not in read.body
    found = await rig.call("GET", "/fhir/MedicationRequest?patient=Patient/pat-b")
    coding = found.body["entry"][0]["resource"]["medicationCodeableConcept"]["coding"]
    assert coding[0]["system"] == "http://www.nlm.nih.gov/research/umls/rxnorm"


async def test_without_a_vendor_table_answers_pass_as_the_backend_sent_them(
        rig: Rig) -> None:
    read = await rig.call("GET", "/fhir/Patient/pat-a")  # the configured backend has none
    assert read.body["identifier"][0]["system"] == VENDOR_MRN


# -- the backend's refusals and its absence ------------------------------------------------


async def test_a_backend_422_passes_through_with_its_operation_outcome(rig: Rig) -> None:
    rig.ehr.fail_next(1, 422)
    answer = await rig.call("POST", "/fhir/Appointment",
                            body=appointment("x", PATIENT_A, identifier="refused-1"))
    assert is_outcome(answer, 422)
    assert answer.body["issue"][0]["code"] == "processing"
    assert "fake EHR refused" in answer.body["issue"][0]["diagnostics"]  # as it sent it


async def test_a_backend_429_passes_through_with_its_retry_after(rig: Rig) -> None:
    rig.ehr.fail_next(1, 429, retry_after=120)
    answer = await rig.call("GET", "/fhir/Appointment/appt-3")
    assert is_outcome(answer, 429)
    assert answer.headers["Retry-After"] == "120"


async def test_an_open_breaker_answers_503_with_retry_after_at_once(rig: Rig) -> None:
    await rig.use(cache=False, breaker_failures=2, breaker_reset=30.0)
    rig.ehr.fail_all(500)
    for _ in range(2):
        assert is_outcome(await rig.call("GET", "/fhir/Appointment/appt-1"), 500)
    rig.ehr.fail_all(None)
    asked = len(rig.asked())
    started = time.perf_counter()
    answer = await rig.call("GET", "/fhir/Appointment/appt-1")
    elapsed = time.perf_counter() - started
    assert is_outcome(answer, 503)
    assert answer.body["issue"][0]["code"] == "transient"
    assert 1 <= int(answer.headers["Retry-After"]) <= 30
    assert elapsed < 1.0
    assert len(rig.asked()) == asked  # no network while the breaker is open
    # writes too: nothing reaches the backend
    write = await rig.call("POST", "/fhir/Appointment", body=appointment("x", PATIENT_A))
    assert is_outcome(write, 503) and "Retry-After" in write.headers


async def test_a_backend_that_is_down_answers_503_quickly_and_recovers(rig: Rig) -> None:
    await rig.use(cache=False)
    await rig.ehr.stop()
    started = time.perf_counter()
    answer = await rig.call("GET", "/fhir/Appointment/appt-1")
    assert is_outcome(answer, 503)
    assert int(answer.headers["Retry-After"]) >= 1
    assert time.perf_counter() - started < 1.0
    await rig.ehr.start()
    assert (await rig.call("GET", "/fhir/Appointment/appt-1")).status == 200


async def test_no_answer_in_time_is_504(rig: Rig) -> None:
    await rig.use(cache=False, read_timeout=0.3)
    rig.ehr.delay = 1.0
    answer = await rig.call("GET", "/fhir/Appointment/appt-1")
    assert is_outcome(answer, 504)
    assert answer.body["issue"][0]["code"] == "timeout"


@pytest.mark.parametrize(("body", "content_type"), [
    (b"<html>maintenance</html>", "text/html"),
    (b'{"resourceType": "Appointment", "id": "appt-1"}', "application/fhir+json"),
    (b"[1, 2, 3]", "application/json"),
])
async def test_an_answer_that_is_not_what_was_asked_is_502(
        rig: Rig, body: bytes, content_type: str) -> None:
    liar = Liar(body, content_type=content_type)
    await liar.start()
    try:
        await rig.use(url=liar.url)
        answer = await rig.call("GET", "/fhir/Appointment?_count=1")
        assert is_outcome(answer, 502)
        if b"maintenance" in body:
            read = await rig.call("GET", "/fhir/Appointment/appt-1")
            assert is_outcome(read, 502)
    finally:
        await liar.stop()


async def test_a_backend_error_without_an_operation_outcome_gets_ours(rig: Rig) -> None:
    liar = Liar(b"<html>no</html>", status=409, content_type="text/html")
    await liar.start()
    try:
        await rig.use(url=liar.url)
        answer = await rig.call("DELETE", "/fhir/Appointment/appt-1")
        assert is_outcome(answer, 409)
        assert answer.body["issue"][0]["diagnostics"] == (
            "backend ehr refused the request (HTTP 409)")
    finally:
        await liar.stop()


async def test_a_backend_refusing_the_gateways_credentials_is_502_not_401(rig: Rig) -> None:
    liar = Liar(json.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "login", "diagnostics": "token expired"}]}).encode(),
        status=401)
    await liar.start()
    try:
        await rig.use(url=liar.url)
        answer = await rig.call("GET", "/fhir/Appointment/appt-1")
        assert is_outcome(answer, 502)
        assert "credentials" in answer.body["issue"][0]["diagnostics"]
        assert "WWW-Authenticate" not in answer.headers
    finally:
        await liar.stop()


# -- the read-through cache ---------------------------------------------------------------------


async def test_a_second_identical_read_is_served_from_the_cache(rig: Rig) -> None:
    for _ in range(2):
        assert (await rig.call("GET", "/fhir/Appointment/appt-4")).status == 200
        found = await rig.call("GET", "/fhir/MedicationRequest?patient=Patient/pat-a")
        assert ids(found.body) == ["mr-a"]
    assert [r.path for r in rig.asked()] == ["Appointment/appt-4", "MedicationRequest"]
    assert rig.cache is not None and rig.cache.hits == 2


async def test_a_write_of_the_type_drops_its_cached_answers(rig: Rig) -> None:
    await rig.use(per_backend=True)  # a cache per backend works alike
    await rig.call("GET", "/fhir/Appointment/appt-5")
    await rig.call("GET", "/fhir/MedicationRequest/mr-a")
    current = await rig.call("GET", "/fhir/Appointment/appt-5")
    updated = await rig.call("PUT", "/fhir/Appointment/appt-5",
                             body={**current.body, "status": "arrived"})
    assert updated.status == 200, updated.body
    read = await rig.call("GET", "/fhir/Appointment/appt-5")
    assert read.body["status"] == "arrived"
    await rig.call("GET", "/fhir/MedicationRequest/mr-a")  # another type: still cached
    assert [(r.method, r.path) for r in rig.asked()] == [
        ("GET", "Appointment/appt-5"), ("GET", "MedicationRequest/mr-a"),
        ("PUT", "Appointment/appt-5"), ("GET", "Appointment/appt-5")]


async def test_a_cached_answer_never_reaches_past_another_callers_policy(rig: Rig) -> None:
    assert (await rig.call("GET", "/fhir/MedicationRequest/mr-b")).status == 200
    answer = await rig.call("GET", "/fhir/MedicationRequest/mr-b", key=None,
                            headers=rig.confined("pat-a"))
    assert is_outcome(answer, 404)
    cut = await rig.call("GET", "/fhir/Patient/pat-b")
    assert "telecom" in cut.body
    profiled = await rig.call("GET", "/fhir/Patient/pat-b", key=key("refill"))
    assert "telecom" not in profiled.body
    assert len(rig.asked()) == 2  # both second reads were cache hits


async def test_failures_are_not_cached(rig: Rig) -> None:
    rig.ehr.fail_next(1, 500)
    assert is_outcome(await rig.call("GET", "/fhir/Appointment/appt-2"), 500)
    assert (await rig.call("GET", "/fhir/Appointment/appt-2")).status == 200


# -- Bundles, audit, traces -------------------------------------------------------------------


async def test_a_bundle_entry_for_a_proxied_type_is_refused(rig: Rig) -> None:
    transaction = await rig.call("POST", "/fhir", body={
        "resourceType": "Bundle", "type": "transaction", "entry": [
            {"request": {"method": "POST", "url": "Practitioner"},
             "resource": {"resourceType": "Practitioner", "active": True}},
            {"request": {"method": "POST", "url": "Appointment"},
             "resource": appointment("x", PATIENT_A)}]})
    assert is_outcome(transaction, 400)
    assert transaction.body["issue"][0]["diagnostics"] == (
        "Bundle.entry[1]: Appointment is served by backend ehr; send it on its own, not in "
        "a Bundle")
    batch = await rig.call("POST", "/fhir", body={
        "resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": "Appointment/appt-1"}},
            {"request": {"method": "GET", "url": "Practitioner?_count=1"}}]})
    assert batch.status == 200
    first, second = batch.body["entry"]
    assert first["response"]["status"].startswith("400")
    assert "served by backend ehr" in first["response"]["outcome"]["issue"][0]["diagnostics"]
    assert second["response"]["status"] == "200 OK"
    assert rig.asked() == []


async def test_proxied_accesses_are_audited(rig: Rig) -> None:
    headers = rig.confined("pat-a")
    await rig.call("GET", "/fhir/MedicationRequest/mr-a", key=None, headers=headers)
    await rig.call("GET", "/fhir/MedicationRequest?status=active", key=None, headers=headers)
    await rig.call("GET", "/fhir/MedicationRequest/mr-b", key=None, headers=headers)
    audit = rig.gw.app[AUDIT]
    rows = await audit.search(AuditQuery(client="voice-agent"), limit=1000)
    bodies = [parse_body(row.body) for row in rows]
    actions = [(b["action"], b["outcome"], b["type"]) for b in bodies[-3:]]
    assert actions == [(Action.READ.value, "success", "MedicationRequest"),
                       (Action.SEARCH.value, "success", "MedicationRequest"),
                       (Action.READ.value, "404", "MedicationRequest")]


async def test_the_backend_call_is_a_child_of_the_request_span(rig: Rig) -> None:
    rig.spans.clear()
    await rig.call("GET", "/fhir/Appointment/appt-1")
    spans = {s.name: s for s in rig.spans.get_finished_spans()}
    request, attempt = spans["fhir.request"], spans["forward.attempt"]
    assert attempt.parent is not None
    assert attempt.parent.span_id == request.context.span_id
    sent = rig.asked()[0].traceparent
    assert sent is not None and sent.split("-")[1] == format(request.context.trace_id, "032x")
    assert request.attributes is not None
    assert request.attributes["forward.cache"] == "miss"


async def test_a_canary_in_a_search_never_reaches_logs_or_spans(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rig.spans.clear()
    paths = [f"/fhir/Appointment?identifier=urn:isthmus:test:appt|{CANARY}",
             f"/fhir/Patient?family={CANARY}",
             f"/fhir/Appointment?date={CANARY}",
             f"/fhir/Appointment/{CANARY}"]
    statuses = [(await rig.call("GET", path)).status for path in paths]
    assert statuses == [200, 200, 400, 404]
    form = await rig.call("POST", "/fhir/MedicationRequest/_search",
                          form={"patient": f"Patient/{CANARY}"})
    assert form.status == 200
    assert any(CANARY in value for r in rig.asked() for _, value in r.query)  # it was sent
    # The test harness's runner keeps aiohttp's access log (the served app turns it off).
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name != "aiohttp.access")
    assert CANARY.lower() not in logged.lower()
    spans = rig.spans.get_finished_spans()
    assert spans
    for span in spans:
        text = json.dumps({"name": span.name, "attributes": dict(span.attributes or {}),
                           "events": [dict(e.attributes or {}) for e in span.events]})
        assert CANARY.lower() not in text.lower()


async def test_the_callers_traceparent_goes_on_unchanged_when_spans_are_not_recorded(
        rig: Rig, tmp_path: Path) -> None:
    gw = await start_fhir_gateway(
        tmp_path / "var", backends=[{"name": "ehr", "kind": "fhir", "base_url": rig.ehr.url}],
        routes=[{"match": {"resource": "Appointment"}, "to": ["ehr"]}])
    try:
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        async with rig.session.get(f"{gw.http_url}/fhir/Appointment/appt-1", headers={
                "X-API-Key": API_KEY, "traceparent": traceparent}) as response:
            assert response.status == 200
        assert rig.asked()[-1].traceparent == traceparent
    finally:
        await gw.runner.cleanup()


# -- the cache on its own -----------------------------------------------------------------------


def ok(text: str) -> FhirResponse:
    return FhirResponse(200, body=text.encode())


async def test_cache_entries_expire_after_the_ttl() -> None:
    clock = ManualClock()
    cache = ReadCache(5.0, 10, clock)
    cache.put("ehr", "GET", "Patient/1", [], ok("one"), ["Patient"])
    clock.now += 4.9
    assert cache.get("ehr", "GET", "Patient/1") == ok("one")
    clock.now += 0.2
    assert cache.get("ehr", "GET", "Patient/1") is None
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 0)


async def test_cache_keys_are_per_backend_and_ignore_query_order() -> None:
    cache = ReadCache(5.0, 10)
    cache.put("ehr", "GET", "Appointment", [("patient", "Patient/1"), ("_count", "5")],
              ok("a"), ["Appointment"])
    assert cache.get("ehr", "GET", "Appointment",
                     [("_count", "5"), ("patient", "Patient/1")]) == ok("a")
    assert cache.get("other", "GET", "Appointment",
                     [("_count", "5"), ("patient", "Patient/1")]) is None
    assert cache.get("ehr", "GET", "Appointment", [("patient", "Patient/1")]) is None
    assert cache.get("ehr", "POST", "Appointment",
                     [("_count", "5"), ("patient", "Patient/1")]) is None


async def test_cache_is_bounded_least_recently_used_first() -> None:
    cache = ReadCache(60.0, 2)
    cache.put("ehr", "GET", "Patient/1", [], ok("1"), ["Patient"])
    cache.put("ehr", "GET", "Patient/2", [], ok("2"), ["Patient"])
    assert cache.get("ehr", "GET", "Patient/1") is not None  # 1 is now the most recent
    cache.put("ehr", "GET", "Patient/3", [], ok("3"), ["Patient"])
    assert cache.get("ehr", "GET", "Patient/2") is None
    assert cache.get("ehr", "GET", "Patient/1") is not None
    assert len(cache) == 2


async def test_cache_keeps_only_200_answers() -> None:
    cache = ReadCache(60.0, 10)
    assert not cache.put("ehr", "GET", "Patient/1", [], FhirResponse(404), ["Patient"])
    assert not cache.put("ehr", "GET", "Patient/1", [], FhirResponse(503), ["Patient"])
    assert cache.get("ehr", "GET", "Patient/1") is None


async def test_invalidating_a_type_drops_searches_that_included_it() -> None:
    cache = ReadCache(60.0, 10)
    cache.put("ehr", "GET", "Appointment", [("_include", "Appointment:patient")], ok("s"),
              ["Appointment", "Patient"])
    cache.put("ehr", "GET", "MedicationRequest/1", [], ok("m"), ["MedicationRequest"])
    cache.put("other", "GET", "Appointment", [], ok("o"), ["Appointment"])
    assert cache.invalidate("ehr", "Patient") == 1
    assert cache.get("ehr", "GET", "Appointment", [("_include", "Appointment:patient")]) is None
    assert cache.get("ehr", "GET", "MedicationRequest/1") is not None
    assert cache.get("other", "GET", "Appointment") is not None


async def test_a_read_that_raced_a_write_is_not_kept() -> None:
    cache = ReadCache(60.0, 10)
    ticket = cache.ticket("ehr", ["Appointment"])
    cache.invalidate("ehr", "Appointment")  # a write landed while the read was in flight
    assert not cache.put("ehr", "GET", "Appointment/1", [], ok("old"), ["Appointment"],
                         ticket)
    assert cache.get("ehr", "GET", "Appointment/1") is None


async def test_concurrent_identical_reads_all_answer(rig: Rig) -> None:
    answers = await asyncio.gather(*(rig.call("GET", "/fhir/Appointment/appt-1")
                                     for _ in range(10)))
    assert all(a.status == 200 and a.body["id"] == "appt-1" for a in answers)


async def test_a_search_keeps_its_matches_as_reads(rig: Rig) -> None:
    """The read after a search (a caller identified, then their record) is a cache hit;
    still filtered for its caller, and not kept from partial (_summary) answers."""
    found = await rig.call("GET", "/fhir/MedicationRequest?patient=Patient/pat-a")
    assert ids(found.body) == ["mr-a"]
    read = await rig.call("GET", "/fhir/MedicationRequest/mr-a")
    assert read.status == 200 and read.body["id"] == "mr-a"
    assert "ETag" in read.headers
    assert is_outcome(await rig.call("GET", "/fhir/MedicationRequest/mr-a", key=None,
                                     headers=rig.confined("pat-b")), 404)
    assert [r.path for r in rig.asked()] == ["MedicationRequest"]
    # A subsetted representation in a search answer is not a read's answer.
    rig.ehr.seed({**appointment("appt-cut", PATIENT_A), "meta": {"tag": [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
         "code": "SUBSETTED"}]}})
    found = await rig.call("GET", "/fhir/Appointment?_id=appt-cut")
    assert ids(found.body) == ["appt-cut"]
    assert (await rig.call("GET", "/fhir/Appointment/appt-cut")).status == 200
    assert [r.path for r in rig.asked()][1:] == ["Appointment", "Appointment/appt-cut"]
