"""Issue 13, item 12: bad input on the FHIR edge gets a 400 OperationOutcome naming the
parameter or element, never a 5xx, a text/plain page from the HTTP parser, or a 201.

Search parameters are capped (repeats of one name, parameters in all, values in all)
below what the store's SQL can hold; a request line or header the HTTP parser refuses is
answered as FHIR; and values the R4 base spec forbids (control characters in strings, a
code outside a required binding, a reference or a uri with a space) are refused with the
element's path.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import RunningGateway
from support.fhir import FHIR_JSON, fhir_session, start_fhir_gateway

CANARY = "Zqxwvu"  # a synthetic value that must never come back in an error


@pytest.fixture
async def fhir(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    running = await start_fhir_gateway(tmp_path / "var")
    yield running
    await running.runner.cleanup()


async def _get(running: RunningGateway, path: str) -> tuple[int, str, dict[str, Any]]:
    async with fhir_session(running) as session, session.get(path) as answer:
        return answer.status, answer.content_type, await answer.json(content_type=None)


async def _post(running: RunningGateway, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with fhir_session(running) as session, session.post(
            f"/fhir/{body['resourceType']}", data=json.dumps(body),
            headers={"Content-Type": FHIR_JSON}) as answer:
        return answer.status, await answer.json(content_type=None)


def _issue(outcome: dict[str, Any]) -> dict[str, Any]:
    assert outcome["resourceType"] == "OperationOutcome", outcome
    issue: dict[str, Any] = outcome["issue"][0]
    return issue


# -- search parameters ----------------------------------------------------------------------


@pytest.mark.parametrize(("query", "parameter"), [
    ("&".join(["name=x"] * 1000), "name"),  # the issue's 503
    ("&".join(["family=x"] * 21), "family"),
    ("&".join(f"{n}=x" for n in ["name", "family", "given", "phone", "email"] * 20
              + ["gender=male"]), None),  # the whole search, not one parameter
    ("&".join([f"name={','.join(['x'] * 100)}"] * 11), None),
])
async def test_too_many_search_parameters_answer_400_naming_the_rule(
        fhir: RunningGateway, query: str, parameter: str | None) -> None:
    status, content_type, outcome = await _get(fhir, f"/fhir/Patient?{query}")
    assert status == 400, outcome
    assert content_type == FHIR_JSON
    assert _issue(outcome).get("expression") == ([parameter] if parameter else None), outcome


@pytest.mark.parametrize("query", [
    "&".join(["name=x"] * 20),
    "&".join(f"{n}=x" for n in ["name", "family", "given", "phone", "email"] * 20),
    "&".join([f"name={','.join(['x'] * 100)}"] * 10),
])
async def test_a_search_at_the_caps_is_answered(fhir: RunningGateway, query: str) -> None:
    status, _, bundle = await _get(fhir, f"/fhir/Patient?{query}")
    assert status == 200, bundle
    assert bundle["resourceType"] == "Bundle"


# -- what the HTTP parser refuses --------------------------------------------------------------


async def _raw(running: RunningGateway, request: bytes) -> tuple[int, str, bytes]:
    """Send bytes as they are; the status, Content-Type and body of the answer."""
    port = int(running.http_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # the parser's answer closes
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers.get("Content-Type", ""), body


@pytest.mark.parametrize("request_bytes", [
    # A request line over aiohttp's 8190 bytes.
    f"GET /fhir/Patient?name={CANARY * 1600} HTTP/1.1\r\nHost: gw\r\n\r\n".encode(),
    # A 20 KB header.
    f"GET /fhir/Patient HTTP/1.1\r\nHost: gw\r\nX-Note: {CANARY * 3400}\r\n\r\n".encode(),
    # Not HTTP at all.
    b"GET /fhir/Patient HTTP/1.1\r\nHost: gw\r\nBad Header\x01: x\r\n\r\n",
], ids=["request-line", "header", "malformed"])
async def test_what_the_http_parser_refuses_is_an_operation_outcome(
        fhir: RunningGateway, request_bytes: bytes, caplog: pytest.LogCaptureFixture) -> None:
    status, content_type, body = await _raw(fhir, request_bytes)
    assert status == 400
    assert content_type == FHIR_JSON
    issue = _issue(json.loads(body))
    assert issue["severity"] == "error" and issue["diagnostics"]
    assert CANARY.encode() not in body
    assert CANARY not in caplog.text  # aiohttp logged the line it refused, with a traceback


# -- values the R4 base spec forbids ---------------------------------------------------------------

OBSERVATION: dict[str, Any] = {"resourceType": "Observation", "status": "final",
                               "code": {"text": "glucose"}}


@pytest.mark.parametrize(("body", "expression"), [
    ({**OBSERVATION, "code": {"text": f"{CANARY}\u0000"}}, "Observation.code.text"),
    ({**OBSERVATION, "note": [{"text": f"{CANARY}\u0007"}]}, "Observation.note.0.text"),
    ({"resourceType": "Patient", "name": [{"given": [f"{CANARY}\u001f"]}]},
     "Patient.name.0.given.0"),
    ({"resourceType": "Patient", "_birthDate": {"extension": [{
        "url": "http://example.org/x", "valueString": f"{CANARY}\u0000"}]}},
     "Patient._birthDate.extension.0.valueString"),
    ({**OBSERVATION, "status": "bogus"}, "Observation.status"),
    ({"resourceType": "Encounter", "status": "bogus", "class": {"code": "AMB"}},
     "Encounter.status"),
    ({"resourceType": "Patient", "gender": "bogus"}, "Patient.gender"),
    ({**OBSERVATION, "valueQuantity": {"value": 1, "comparator": "~"}},
     "Observation.valueQuantity.comparator"),
    ({**OBSERVATION, "subject": {"reference": f"Patient/{CANARY} 1"}},
     "Observation.subject.reference"),
    ({**OBSERVATION, "subject": {"reference": f"{CANARY}"}},
     "Observation.subject.reference"),
    ({**OBSERVATION, "subject": {"reference": f"Patient/{CANARY}\u0000"}},
     "Observation.subject.reference"),
    ({**OBSERVATION, "extension": [{"url": f"not {CANARY}", "valueString": "x"}]},
     "Observation.extension.0.url"),
    ({**OBSERVATION, "extension": [{"url": f"{CANARY}", "valueString": "x"}]},
     "Observation.extension.0.url"),
    ({**OBSERVATION, "code": {"text": "x", "extension": [{"url": CANARY, "valueCode": "x"}]}},
     "Observation.code.extension.0.url"),
    ({**OBSERVATION, "modifierExtension": [{"url": "http://x.org/a b", "valueCode": "x"}]},
     "Observation.modifierExtension.0.url"),
    ({**OBSERVATION, "code": {"coding": [{"system": f"http://loinc.org/{CANARY} x",
                                          "code": "1"}]}},
     "Observation.code.coding.0.system"),
], ids=["nul", "bell-in-list", "unit-separator", "nul-in-primitive-extension",
        "observation-status", "encounter-status", "patient-gender", "comparator",
        "reference-space", "reference-not-type-id", "reference-nul", "extension-url-space",
        "extension-url-relative", "element-extension-url-relative", "modifier-extension-url",
        "coding-system-space"])
async def test_a_value_the_base_spec_forbids_is_400_naming_the_element(
        fhir: RunningGateway, body: dict[str, Any], expression: str) -> None:
    status, outcome = await _post(fhir, body)
    assert status == 400, outcome
    issue = _issue(outcome)
    assert issue["expression"] == [expression], outcome
    assert CANARY not in json.dumps(outcome)


async def test_a_bad_value_in_a_transaction_entry_names_the_entry(
        fhir: RunningGateway) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": OBSERVATION, "request": {"method": "POST", "url": "Observation"}},
        {"resource": {**OBSERVATION, "status": "bogus"},
         "request": {"method": "POST", "url": "Observation"}}]}
    async with fhir_session(fhir) as session, session.post(
            "/fhir", data=json.dumps(bundle), headers={"Content-Type": FHIR_JSON}) as answer:
        outcome = await answer.json(content_type=None)
        assert answer.status == 400, outcome
    assert _issue(outcome)["expression"][0].endswith("Observation.status"), outcome


@pytest.mark.parametrize("body", [
    {**OBSERVATION, "status": "corrected"},  # beyond the model's cut-short list
    {**OBSERVATION, "status": "entered-in-error"},
    {**OBSERVATION, "code": {"text": "two\tlines\r\nof text"}},
    {**OBSERVATION, "subject": {"reference": "Patient/p-1.2"}},
    {**OBSERVATION, "subject": {"reference": "urn:uuid:0f3c2d4e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"}},
    {**OBSERVATION, "subject": {"reference": "https://ehr.example/fhir/Patient/9"}},
    {**OBSERVATION, "extension": [{"url": "http://example.org/fhir/StructureDefinition/a",
                                   "extension": [{"url": "part", "valueString": "x"}]}]},
    {"resourceType": "Encounter", "status": "unknown", "class": {"code": "AMB"}},
    {"resourceType": "DiagnosticReport", "status": "appended", "code": {"text": "x"}},
], ids=["corrected", "entered-in-error", "tab-and-newlines", "reference", "urn-uuid",
        "absolute-reference", "complex-extension", "encounter-unknown", "report-appended"])
async def test_valid_values_are_still_created(fhir: RunningGateway,
                                              body: dict[str, Any]) -> None:
    status, outcome = await _post(fhir, body)
    assert status == 201, outcome
