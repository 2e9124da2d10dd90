"""The facade against real EHR shapes (issue 20): a running gateway in front of two fake
EHRs, one Epic-like and one Cerner-like, serving recorded sandbox-shaped payloads
(tests/forward/vendor_payloads, sources named in its README) with the shipped vendor
tables. Reads come out normalised and valid; multi-page searches page to the end through
opaque cursors; vendor parameters, declared operations and alias hosts work; invalid
vendor content is passed, repaired or rejected as configured; refusals are audited and
the vendor's error codes kept.

Epic-like backend `epic`: Patient, Appointment, Observation. Cerner-like backend
`cerner`: Slot, Encounter; its links name `localhost` (an alias of 127.0.0.1) and it
pages with `-pageContext`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
import pytest_asyncio

from conftest import RunningGateway
from gateway.audit.query import AuditQuery
from gateway.audit.sealed import parse_body
from gateway.edge.audit_http import AUDIT
from gateway.edge.fhir_api import FHIR
from gateway.edge.fhir_proxy import Facade
from gateway.forward.normalize import Normalizer
from gateway.mapping.tables import SHIPPED
from gateway.policy.cursors import PageCursors
from support.fake_ehr import FakeEhr
from support.fhir import (
    API_KEY,
    API_KEY_NAME,
    Answer,
    api_key_config,
    is_outcome,
    start_fhir_gateway,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

PAYLOADS = Path(__file__).parent.parent / "forward" / "vendor_payloads"
EPIC_PATIENT = "erXuFYUfucBZaryVksYEcMg3"
EPIC_MRN = "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14"
EPIC_ERRORS = "urn:oid:1.2.840.114350.1.13.0.1.7.2.657369"
CERNER_PATIENT = "4342009"
LOCATION_A = "Location/39997807"
READER = "reader-vendor-secret"  # system/*.rs: no create, no Appointment.$book
OTHER = "other-vendor-secret"
CANARY = "QZXVENDORCANARY"


def payload(name: str) -> Any:
    return json.loads((PAYLOADS / name).read_text(encoding="utf-8"))


@dataclass
class Shapes:
    gw: RunningGateway
    epic: FakeEhr
    cerner: FakeEhr
    session: aiohttp.ClientSession

    @property
    def facade(self) -> Facade:
        facade = self.gw.app[FHIR].facade
        assert isinstance(facade, Facade)
        return facade

    async def call(self, method: str, path: str, *, key: str = API_KEY,
                   headers: dict[str, str] | None = None, body: Any = None) -> Answer:
        sent = {"Accept": "application/fhir+json", "X-API-Key": key, **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/fhir+json"
        url = path if path.startswith("http") else self.gw.http_url + path
        async with self.session.request(method, url, headers=sent, data=data) as response:
            raw = await response.read()
            return Answer(response.status, json.loads(raw) if raw else None, raw,
                          response.headers)

    async def page_to_the_end(self, first: str, key: str = API_KEY
                              ) -> tuple[list[str], list[str]]:
        """Follow `next` links from `first`: the ids seen and the links followed."""
        seen: list[str] = []
        followed: list[str] = []
        url: str | None = first
        while url is not None:
            assert len(followed) < 20, "paging does not end"
            answer = await self.call("GET", url, key=key)
            assert answer.status == 200, answer.body
            seen += [e["resource"]["id"] for e in answer.body.get("entry", [])
                     if e["search"]["mode"] == "match"]
            followed.append(url)
            url = {k["relation"]: k["url"] for k in answer.body.get("link", [])}.get("next")
        return seen, followed

    async def metrics(self) -> str:
        async with self.session.get(self.gw.http_url + "/metrics") as response:
            return await response.text()

    async def records(self) -> list[dict[str, Any]]:
        rows = await self.gw.app[AUDIT].search(AuditQuery(), limit=10_000)
        return [parse_body(row.body) for row in rows]


def _epic_operations(epic: FakeEhr) -> None:
    def find(method: str, query: Any, body: Any, id_: str | None) -> tuple[int, Any]:
        return 200, payload("epic/find.json")

    def book(method: str, query: Any, body: Any, id_: str | None) -> tuple[int, Any]:
        booked = dict(payload("epic/find.json")["entry"][0]["resource"], status="booked")
        return 200, booked

    epic.operations[("Appointment", "$find")] = find
    epic.operations[("Appointment", "$book")] = book


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shapes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Shapes]:
    base = tmp_path_factory.mktemp("shapes")
    epic, cerner = FakeEhr(base_path="/api/FHIR/R4"), FakeEhr(base_path="/r4/0b8a0111")
    await epic.start()
    await cerner.start()
    epic.seed(payload("epic/patient.json"))
    for observation in payload("epic/observations.json"):
        epic.seed(observation)
    epic.not_found = payload("epic/not-found.json")
    _epic_operations(epic)
    cerner.seed(payload("cerner/patient.json"))
    cerner.seed(payload("cerner/encounter.json"))
    for slot in payload("cerner/slots.json"):
        cerner.seed(slot)
    cerner.page_style = "opaque"
    cerner.link_origin = f"http://localhost:{cerner.port}"
    cerner.search_matchers["-location"] = lambda resource, value: any(
        e.get("valueReference", {}).get("reference") == value
        for e in resource.get("extension", []))
    routes = [{"match": {"resource": t}, "to": ["epic"]}
              for t in ("Patient", "Appointment", "Observation")]
    routes += [{"match": {"resource": t}, "to": ["cerner"]} for t in ("Slot", "Encounter")]
    gw = await start_fhir_gateway(
        base / "var",
        extra_keys=[api_key_config("reader", READER, ["system/*.rs"]),
                    api_key_config("other", OTHER, ["system/*.rs"])],
        backends=[{"name": "epic", "kind": "fhir", "base_url": epic.url, "vendor": "epic",
                   "max_retries": 0, "cache_ttl": 0},
                  {"name": "cerner", "kind": "fhir", "base_url": cerner.url,
                   "vendor": "cerner", "max_retries": 0, "cache_ttl": 0,
                   "aliases": [f"localhost:{cerner.port}"]}],
        routes=routes)
    session = aiohttp.ClientSession()
    try:
        yield Shapes(gw, epic, cerner, session)
    finally:
        await session.close()
        await gw.runner.cleanup()
        await epic.stop()
        await cerner.stop()


@pytest_asyncio.fixture(loop_scope="module", autouse=True)
async def fresh(shapes: Shapes) -> AsyncIterator[None]:
    for ehr in (shapes.epic, shapes.cerner):
        ehr.requests.clear()
        ehr.extra_links.clear()
    yield


def backend(shapes: Shapes, name: str) -> Any:
    return shapes.facade.backends[name]


# -- reads: normalised by the shipped tables, valid R4, nothing of the vendor leaked -------


async def test_an_epic_read_comes_out_with_canonical_identifiers(shapes: Shapes) -> None:
    answer = await shapes.call("GET", f"/fhir/Patient/{EPIC_PATIENT}")
    assert answer.status == 200, answer.body
    systems = {i["system"]: i["value"] for i in answer.body["identifier"]}
    assert systems == {"urn:isthmus:sid:mrn": "203713",
                       "urn:isthmus:sid:enterprise-id": "E4007",
                       "urn:isthmus:sid:epic-internal-id": "E4007"}
    urls = [e["url"] for e in answer.body["extension"]]
    assert urls == ["http://open.epic.com/FHIR/StructureDefinition/extension/legal-sex"]
    assert shapes.epic.url not in answer.raw.decode()


async def test_a_search_with_the_canonical_system_is_sent_with_the_vendors(
        shapes: Shapes) -> None:
    answer = await shapes.call("GET", "/fhir/Patient?identifier=urn:isthmus:sid:mrn|203713")
    assert answer.status == 200, answer.body
    assert [e["resource"]["id"] for e in answer.body["entry"]] == [EPIC_PATIENT]
    [sent] = shapes.epic.requests
    assert ("identifier", f"{EPIC_MRN}|203713") in sent.query


async def test_elements_keeps_what_r4_requires(shapes: Shapes) -> None:
    answer = await shapes.call("GET", "/fhir/Encounter/97953477?_elements=subject")
    assert answer.status == 200, answer.body
    assert {"class", "status", "subject"} <= set(answer.body)
    assert "type" not in answer.body and "period" not in answer.body


# -- paging to the end through opaque cursors ----------------------------------------------


async def test_cerner_slots_page_to_the_end_through_cursors(shapes: Shapes) -> None:
    seen, followed = await shapes.page_to_the_end("/fhir/Slot?_count=2")
    assert sorted(seen) == sorted(s["id"] for s in shapes.cerner.resources("Slot"))
    assert len(seen) == len(set(seen)) == 7 and len(followed) == 4
    for url in followed[1:]:
        assert url.startswith(shapes.gw.http_url + "/fhir/Slot?_cursor=")
        assert "pageContext" not in url and "localhost" not in url
    # The backend was asked for its own continuation, as it sent it.
    contexts = [dict(r.query).get("-pageContext") for r in shapes.cerner.requests]
    assert contexts[0] is None and all(contexts[1:])


async def test_epic_observations_page_to_the_end(shapes: Shapes) -> None:
    seen, followed = await shapes.page_to_the_end(
        f"/fhir/Observation?patient=Patient/{EPIC_PATIENT}&_count=1")
    assert sorted(seen) == ["eyg-obs-comment", "eyg-obs-hr"] and len(followed) == 2
    assert all(shapes.epic.url not in url for url in followed)


async def test_a_cursor_opens_only_for_its_client_and_only_unchanged(shapes: Shapes) -> None:
    first = await shapes.call("GET", "/fhir/Slot?_count=2")
    following = {k["relation"]: k["url"] for k in first.body["link"]}["next"]
    other = await shapes.call("GET", following, key=OTHER)
    assert is_outcome(other, 400)
    query = dict(parse_qsl(urlsplit(following).query))
    cursor = query["_cursor"]
    tampered = cursor[:-3] + ("AAA" if not cursor.endswith("AAA") else "BBB")
    changed = await shapes.call("GET", f"/fhir/Slot?_cursor={tampered}")
    assert is_outcome(changed, 400)
    widened = await shapes.call("GET", f"{following}&status=busy")
    assert is_outcome(widened, 400)
    assert all(dict(r.query).get("-pageContext") is None for r in shapes.cerner.requests)


async def test_an_expired_cursor_is_refused(shapes: Shapes) -> None:
    now = [1_000_000.0]
    saved = shapes.facade.cursors
    shapes.facade.cursors = PageCursors(lifetime=60, clock=lambda: now[0])
    try:
        first = await shapes.call("GET", "/fhir/Slot?_count=2")
        following = {k["relation"]: k["url"] for k in first.body["link"]}["next"]
        now[0] += 61
        expired = await shapes.call("GET", following)
    finally:
        shapes.facade.cursors = saved
    assert is_outcome(expired, 400)
    assert "expired" in expired.body["issue"][0]["diagnostics"]


# -- vendor parameters ----------------------------------------------------------------------


async def test_a_declared_vendor_parameter_is_forwarded(shapes: Shapes) -> None:
    answer = await shapes.call("GET", f"/fhir/Slot?-location={LOCATION_A}")
    assert answer.status == 200, answer.body
    assert len(answer.body["entry"]) == 4
    assert ("-location", LOCATION_A) in shapes.cerner.requests[0].query


async def test_an_undeclared_parameter_is_refused_or_dropped_as_before(
        shapes: Shapes) -> None:
    refused = await shapes.call("GET", f"/fhir/Slot?-colour={CANARY}",
                                headers={"Prefer": "handling=strict"})
    assert is_outcome(refused, 400) and shapes.cerner.requests == []
    assert CANARY not in refused.raw.decode()
    lenient = await shapes.call("GET", "/fhir/Slot?-colour=blue&_count=1")  # the default
    assert lenient.status == 200
    assert [n for n, _ in shapes.cerner.requests[0].query] == ["_count"]


# -- hosts: the backend's aliases kept, others dropped and counted ---------------------------


async def test_links_on_an_alias_are_kept_and_others_dropped_and_counted(
        shapes: Shapes, caplog: pytest.LogCaptureFixture) -> None:
    shapes.cerner.extra_links.append(
        {"relation": "related", "url": f"https://fhir-elsewhere.example/r4/Slot?x={CANARY}"})
    answer = await shapes.call("GET", "/fhir/Slot?_count=2")
    assert "dropped" in caplog.text and CANARY not in caplog.text
    relations = [link["relation"] for link in answer.body["link"]]
    assert relations == ["self", "next"]  # on localhost (an alias): kept, as cursors
    assert "elsewhere" not in answer.raw.decode()
    text = await shapes.metrics()
    assert re.search(r'isthmus_facade_links_dropped_total\{forward_backend="cerner"\} '
                     r'[1-9]', text), text


# -- operations -----------------------------------------------------------------------------


async def test_find_is_forwarded_by_get_and_post(shapes: Shapes) -> None:
    by_get = await shapes.call("GET", f"/fhir/Appointment/$find?patient={EPIC_PATIENT}")
    assert by_get.status == 200, by_get.body
    assert [e["resource"]["status"] for e in by_get.body["entry"]] == ["proposed"] * 2
    parameters = {"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueReference": {"reference": f"Patient/{EPIC_PATIENT}"}}]}
    by_post = await shapes.call("POST", "/fhir/Appointment/$find", body=parameters)
    assert by_post.status == 200, by_post.body
    assert len(by_post.body["entry"]) == 2
    methods = [(r.method, r.path) for r in shapes.epic.requests]
    assert methods == [("GET", "Appointment/$find"), ("POST", "Appointment/$find")]


async def test_operations_go_under_scopes_and_only_when_declared(shapes: Shapes) -> None:
    parameters = {"resourceType": "Parameters", "parameter": [
        {"name": "appointment", "valueReference": {"reference": "Appointment/x"}}]}
    refused = await shapes.call("POST", "/fhir/Appointment/$book", key=READER,
                                body=parameters)
    assert is_outcome(refused, 403)
    booked = await shapes.call("POST", "/fhir/Appointment/$book", body=parameters)
    assert booked.status == 200 and booked.body["status"] == "booked"
    by_get = await shapes.call("GET", "/fhir/Appointment/$book")
    assert is_outcome(by_get, 405)
    unknown = await shapes.call("GET", "/fhir/Appointment/$everything")
    assert is_outcome(unknown, 404)
    assert [r.path for r in shapes.epic.requests] == ["Appointment/$book"]


async def test_everything_is_forwarded_when_a_table_declares_it(
        shapes: Shapes, tmp_path: Path) -> None:
    table = tmp_path / "epic.csv"
    shipped = (SHIPPED / "vendors" / "epic.csv").read_text(encoding="utf-8")
    table.write_text(shipped + "Patient,operation,instance,$everything,read,"
                               "https://hl7.org/fhir/R4/patient-operation-everything.html,\n")
    pages = [{"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": payload("epic/patient.json"), "search": {"mode": "match"}}],
        "link": [{"relation": "next",
                  "url": f"{shapes.epic.url}/Patient/{EPIC_PATIENT}/$everything?page=2"}]},
        {"resourceType": "Bundle", "type": "searchset", "entry": [
            {"resource": o, "search": {"mode": "match"}}
            for o in payload("epic/observations.json")[:1]]}]
    shapes.epic.operations[("Patient", "$everything")] = (
        lambda method, query, body, id_: (200, pages[1] if dict(query).get("page")
                                          else pages[0]))
    saved = shapes.facade.normalizers["epic"]
    shapes.facade.normalizers["epic"] = Normalizer.load(table)
    try:
        seen, followed = await shapes.page_to_the_end(
            f"/fhir/Patient/{EPIC_PATIENT}/$everything")
    finally:
        shapes.facade.normalizers["epic"] = saved
    assert seen == [EPIC_PATIENT, "eyg-obs-hr"] and len(followed) == 2
    assert "_cursor=" in followed[1]


# -- validation modes -----------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "status"), [("pass", 200), ("repair", 200),
                                              ("reject", 502)])
async def test_invalid_vendor_content_is_passed_repaired_or_rejected(
        shapes: Shapes, mode: str, status: int, caplog: pytest.LogCaptureFixture) -> None:
    epic = backend(shapes, "epic")
    saved = epic.spec
    epic.spec = dataclasses.replace(saved, validation=mode)
    try:
        answer = await shapes.call("GET", "/fhir/Observation/eyg-obs-comment")
    finally:
        epic.spec = saved
    assert answer.status == status, answer.body
    assert EPIC_PATIENT not in caplog.text and "Vitals comment" not in caplog.text
    if mode == "pass":
        assert answer.body["valueString"] == ""
    elif mode == "repair":
        assert "valueString" not in answer.body and answer.body["status"] == "final"
    else:
        assert is_outcome(answer, 502)
        assert answer.body["issue"][0]["expression"] == ["Observation.valueString"]
    text = await shapes.metrics()
    outcome = {"pass": "passed", "repair": "repaired", "reject": "rejected"}[mode]
    assert re.search(r'isthmus_facade_invalid_answers_total\{forward_backend="epic",'
                     rf'outcome="{outcome}"\}} [1-9]', text), text


# -- refusals: audited, with the vendor's codes ----------------------------------------------


async def test_a_vendor_404_keeps_its_error_code_and_only_its_code(shapes: Shapes) -> None:
    answer = await shapes.call("GET", "/fhir/Patient/no-such-patient")
    assert is_outcome(answer, 404)
    issue = answer.body["issue"][0]
    assert issue["details"] == {"coding": [{"system": EPIC_ERRORS, "code": "4102"}]}
    assert "Invalid FHIR ID" not in answer.raw.decode()  # the vendor's text stays out


async def test_refusals_by_the_vendor_and_by_policy_are_audited(shapes: Shapes) -> None:
    before = len(await shapes.records())
    shapes.epic.fail_next(1, 500)
    failed = await shapes.call("GET", f"/fhir/Patient/{EPIC_PATIENT}")
    assert is_outcome(failed, 500)
    denied = await shapes.call("POST", "/fhir/Appointment/$book", key=READER,
                               body={"resourceType": "Parameters"})
    assert is_outcome(denied, 403)
    records = (await shapes.records())[before:]
    outcomes = [(r["action"], r["outcome"], r["client"], r["type"]) for r in records]
    assert outcomes == [("read", "500", API_KEY_NAME, "Patient"),
                        ("create", "403", "reader", "Appointment")], outcomes


# -- the tables' hits -----------------------------------------------------------------------


async def test_every_vendor_row_has_a_hit_counter_in_metrics(shapes: Shapes) -> None:
    await shapes.call("GET", f"/fhir/Patient/{EPIC_PATIENT}")
    text = await shapes.metrics()
    series = dict(re.findall(r'isthmus_vendor_rule_hits_total\{vendor_table="epic",'
                             r'vendor_row="(\d+)"\} (\d+)', text))
    rows = {str(rule.line) for rule in shapes.facade.normalizers["epic"].rules}
    assert set(series) == rows
    assert int(series["6"]) >= 1  # the sandbox MRN row
    assert EPIC_PATIENT not in text and "203713" not in text
