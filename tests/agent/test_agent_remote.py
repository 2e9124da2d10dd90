"""The agent API over the remote shape: the EHR is a FHIR backend (a fake one) reached
through the facade the routes name; booking is a plain POST Appointment with the slot,
a refill request a POST MedicationRequest; an EHR that fails or is slow answers
503 emr_unavailable within the deadline, never made-up data."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from conftest import RunningGateway, start_gateway
from gateway.agent import AGENT
from support.agent import (
    CALLER,
    CANARIES,
    OTHER_AGENT_KEY,
    SLOTS,
    AgentClient,
    agent_settings,
    location,
    practitioner,
    schedule,
    slot,
)
from support.fake_ehr import FAILURE_DIAGNOSTICS, FakeEhr

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROUTED = ("Patient", "Appointment", "Slot", "Schedule", "Practitioner", "Location",
          "MedicationRequest", "MedicationDispense")


def ehr_records() -> list[dict[str, Any]]:
    caller = {"resourceType": "Patient", "id": "ehr-pat-1",
              "identifier": [{"system": "urn:oid:1.2.840.114350", "value": "E700001",
                              "type": {"coding": [{"code": "MR"}]}}],
              "name": [{"family": "Agentcanary-Smith", "given": ["Zoë"]}],
              "birthDate": "1980-02-14",
              "telecom": [{"system": "phone", "value": "617-555-0142"}],
              "address": [{"postalCode": "02134"}]}
    other = {"resourceType": "Patient", "id": "ehr-pat-2",
             "name": [{"family": "Othercanary", "given": ["Pat"]}],
             "birthDate": "1980-02-14", "telecom": [{"system": "phone",
                                                     "value": "617-555-0199"}]}
    booked = {"resourceType": "Appointment", "id": "ehr-appt-1", "status": "booked",
              "start": "2027-01-15T14:00:00Z", "end": "2027-01-15T14:30:00Z",
              "appointmentType": {"text": "Annual physical"},
              "reasonCode": [{"text": "yearly check"}],
              "participant": [{"actor": {"reference": "Patient/ehr-pat-1"}},
                              {"actor": {"reference": "Practitioner/prac-lee",
                                         "display": "Dr Avery Lee"}},
                              {"actor": {"reference": "Location/loc-north"}}]}
    theirs = {"resourceType": "Appointment", "id": "ehr-appt-2", "status": "booked",
              "start": "2027-01-16T14:00:00Z",
              "participant": [{"actor": {"reference": "Patient/ehr-pat-2"}}]}

    def order(ident: str, name: str, repeats: int, status: str = "active",
              patient: str = "ehr-pat-1") -> dict[str, Any]:
        return {"resourceType": "MedicationRequest", "id": ident, "status": status,
                "intent": "order", "subject": {"reference": f"Patient/{patient}"},
                "medicationCodeableConcept": {"text": name},
                "requester": {"reference": "Practitioner/prac-lee"},
                "dosageInstruction": [{"text": "one tablet daily"}],
                "dispenseRequest": {"numberOfRepeatsAllowed": repeats}}

    def dispense(ident: str, order_id: str, when: str) -> dict[str, Any]:
        return {"resourceType": "MedicationDispense", "id": ident, "status": "completed",
                "subject": {"reference": "Patient/ehr-pat-1"},
                "authorizingPrescription": [{"reference": f"MedicationRequest/{order_id}"}],
                "whenHandedOver": when}

    return [caller, other, practitioner(), location(), schedule(), *SLOTS, booked, theirs,
            order("ehr-med-1", "Lisinopril 10 mg", 3),
            order("ehr-med-2", "Metformin 500 mg", 1),
            order("ehr-med-3", "Simvastatin 20 mg", 5, status="stopped"),
            order("ehr-med-4", "Their drug", 5, patient="ehr-pat-2"),
            dispense("ehr-disp-1", "ehr-med-1", "2026-10-01T10:00:00Z"),
            dispense("ehr-disp-2", "ehr-med-1", "2026-11-01T10:00:00Z"),
            dispense("ehr-disp-3", "ehr-med-2", "2026-11-02T10:00:00Z")]


@dataclass
class Remote:
    gw: RunningGateway
    ehr: FakeEhr
    http: aiohttp.ClientSession

    def agent(self, key: str | None = None) -> AgentClient:
        client = AgentClient(self.http, self.gw.http_url)
        if key is not None:
            client.key = key
        return client


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def remote(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Remote]:
    ehr = FakeEhr()
    await ehr.start()
    for resource in ehr_records():
        ehr.seed(resource)
    gw = await start_gateway(
        tmp_path_factory.mktemp("agent-remote") / "var",
        **agent_settings(**{
            "agent.deadline": 0.5,
            "backends": [{"name": "ehr", "kind": "fhir", "base_url": ehr.url,
                          "max_retries": 0, "backoff_base": 0.01, "cache_ttl": 30.0,
                          "breaker_failures": 1000}],
            "routes": [{"match": {"resource": t}, "to": ["ehr"]} for t in ROUTED]}))
    http = aiohttp.ClientSession()
    try:
        yield Remote(gw, ehr, http)
    finally:
        await http.close()
        await gw.runner.cleanup()
        await ehr.stop()


@pytest_asyncio.fixture(loop_scope="module", autouse=True)
async def healthy(remote: Remote) -> AsyncIterator[None]:
    remote.ehr.fail_all(None)
    remote.ehr.delay = 0.0
    yield
    remote.ehr.fail_all(None)
    remote.ehr.delay = 0.0


async def test_the_caller_is_verified_against_the_ehrs_patients(remote: Remote) -> None:
    agent = remote.agent()
    reply = await agent.verify("appointment_lookup", "r-call-verify")
    assert reply.status == 201, reply.body
    assert reply.body["patient"] == {"first_name": "Zoë", "last_name_initial": "A"}
    assert remote.ehr.requests_to("GET", "Patient")


async def test_wrong_factor_and_unknown_patient_answer_alike(remote: Remote) -> None:
    agent = remote.agent()
    wrong = await agent.verify("scheduling", "r-call-same-1", **{**CALLER, "phone": None,
                                                                 "zip": "99999"})
    unknown = await agent.verify("scheduling", "r-call-same-2",
                                 **{**CALLER, "last_name": "Nobody"})
    assert wrong.status == unknown.status == 401 and wrong.raw == unknown.raw


async def test_appointments_come_flat_from_the_ehr_and_from_the_session_cache(
        remote: Remote) -> None:
    agent = remote.agent()
    await agent.verify("appointment_lookup", "r-call-lookup")
    reply = await agent.call("GET", "/appointments?from=2027-01-01")
    assert reply.status == 200
    assert reply.body == [{"id": "ehr-appt-1", "start": "2027-01-15T14:00:00Z",
                           "end": "2027-01-15T14:30:00Z", "status": "booked",
                           "type": "Annual physical", "provider_name": "Dr Avery Lee",
                           "location": "North Clinic", "reason": "yearly check"}]
    # Prefetched at verification: the EHR going down now changes nothing for this call.
    remote.ehr.fail_all(503)
    again = await agent.call("GET", "/appointments?from=2027-01-01")
    assert again.status == 200 and again.body == reply.body


async def test_booking_posts_an_appointment_with_the_slot(remote: Remote) -> None:
    agent = remote.agent()
    await agent.verify("scheduling", "r-call-book")
    slots = await agent.call("GET", "/slots?from=2027-02-01&to=2027-02-04")
    assert [s["id"] for s in slots.body] == ["slot-a", "slot-b", "slot-c"]
    booked = await agent.call("POST", "/appointments", {"slot_id": "slot-a",
                                                        "reason": "check-up"},
                              idempotency_key="r-book-a")
    assert booked.status == 201, booked.body
    assert booked.body["start"] == SLOTS[0]["start"]
    [sent] = [r for r in remote.ehr.requests_to("POST", "Appointment")]
    created = remote.ehr.resource("Appointment", booked.body["id"])
    assert created is not None and sent is not None
    assert created["slot"] == [{"reference": "Slot/slot-a"}]
    assert {"actor": {"reference": "Patient/ehr-pat-1"}, "status": "accepted"} in \
        created["participant"]
    retried = await agent.call("POST", "/appointments", {"slot_id": "slot-a",
                                                         "reason": "check-up"},
                               idempotency_key="r-book-a")
    assert retried.raw == booked.raw
    assert len(remote.ehr.requests_to("POST", "Appointment")) == 1


async def test_a_race_for_one_slot_has_one_winner(remote: Remote) -> None:
    first, second = remote.agent(), remote.agent(OTHER_AGENT_KEY)
    await first.verify("scheduling", "r-call-race-1")
    await second.verify("scheduling", "r-call-race-2")
    answers = await asyncio.gather(
        first.call("POST", "/appointments", {"slot_id": "slot-b"}),
        second.call("POST", "/appointments", {"slot_id": "slot-b"}))
    assert sorted(a.status for a in answers) == [201, 409]
    on_slot = [a for a in remote.ehr.resources("Appointment")
               if a.get("slot") == [{"reference": "Slot/slot-b"}]]
    assert len(on_slot) == 1


async def test_cancel_updates_the_ehrs_appointment_and_another_patients_is_404(
        remote: Remote) -> None:
    agent = remote.agent()
    await agent.verify("scheduling", "r-call-cancel")
    booked = await agent.call("POST", "/appointments", {"slot_id": "slot-c"})
    cancelled = await agent.call("POST", f"/appointments/{booked.body['id']}/cancel",
                                 {"reason": "travel"})
    assert cancelled.status == 200 and cancelled.body["status"] == "cancelled"
    assert remote.ehr.resource("Appointment", booked.body["id"])["status"] == "cancelled"
    theirs = await agent.call("POST", "/appointments/ehr-appt-2/cancel", {})
    assert theirs.status == 404
    assert remote.ehr.resource("Appointment", "ehr-appt-2")["status"] == "booked"


async def test_medications_count_dispenses_against_allowed_repeats(remote: Remote) -> None:
    agent = remote.agent()
    await agent.verify("refill", "r-call-meds")
    reply = await agent.call("GET", "/medications")
    by_id = {m["id"]: m for m in reply.body}
    assert set(by_id) == {"ehr-med-1", "ehr-med-2"}
    assert by_id["ehr-med-1"]["refills_remaining"] == 1
    assert by_id["ehr-med-1"]["last_filled"] == "2026-11-01T10:00:00Z"
    assert by_id["ehr-med-1"]["prescriber_name"] == "Dr Avery Lee"
    assert by_id["ehr-med-1"]["dose"] == "one tablet daily"
    assert by_id["ehr-med-2"]["refills_remaining"] == 0


async def test_refills_are_posted_or_refused(remote: Remote) -> None:
    agent = remote.agent()
    await agent.verify("refill", "r-call-refill")
    requested = await agent.call("POST", "/refill-requests",
                                 {"medication_id": "ehr-med-1", "note": "travelling"})
    assert requested.status == 201 and requested.body["status"] == "requested"
    draft = remote.ehr.resource("MedicationRequest", requested.body["id"])
    assert draft is not None
    assert (draft["status"], draft["intent"]) == ("draft", "order")
    assert draft["priorPrescription"] == {"reference": "MedicationRequest/ehr-med-1"}
    none_left = await agent.call("POST", "/refill-requests", {"medication_id": "ehr-med-2"})
    assert none_left.status == 422 and none_left.body["error"] == "no_refills_remaining"
    stopped = await agent.call("POST", "/refill-requests", {"medication_id": "ehr-med-3"})
    assert stopped.status == 422 and stopped.body["error"] == "not_active"
    theirs = await agent.call("POST", "/refill-requests", {"medication_id": "ehr-med-4"})
    assert theirs.status == 404


async def test_an_ehr_that_fails_answers_emr_unavailable_without_its_words(
        remote: Remote, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    agent = remote.agent()
    await agent.verify("scheduling", "r-call-down")
    remote.ehr.fail_all(503)
    for method, path, body in (("GET", "/slots?from=2027-02-01", None),
                               ("POST", "/appointments", {"slot_id": "slot-c"})):
        reply = await agent.call(method, path, body)
        assert reply.status == 503, reply.body
        assert reply.body["error"] == "emr_unavailable" and reply.body["retry_after"] >= 1
        assert FAILURE_DIAGNOSTICS.encode() not in reply.raw
    # A caller not asked about yet (nothing cached): the EHR must be asked, and is down.
    verify = await remote.agent().verify("scheduling", "r-call-down-2",
                                         **{**CALLER, "date_of_birth": "1990-03-03"})
    assert verify.status == 503 and verify.body["error"] == "emr_unavailable"
    for canary in (*CANARIES, "CANARY-DIAG"):
        assert canary not in caplog.text


async def test_a_slow_ehr_is_cut_off_at_the_deadline(remote: Remote) -> None:
    agent = remote.agent()
    await agent.verify("scheduling", "r-call-slow")
    service = remote.gw.app[AGENT].service
    assert service.limits.deadline == 0.5
    remote.ehr.delay = 5.0  # ten times the deadline: only the deadline can answer first
    reply = await agent.call("GET", "/slots?from=2027-02-05")
    assert reply.status == 503 and reply.body["error"] == "emr_unavailable"


async def test_the_vendor_table_normalises_what_verification_and_flattening_read(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    ehr = FakeEhr()
    await ehr.start()
    # Epic-shaped: the mobile phone only as a vendor extension, a local visit type code.
    ehr.seed({"resourceType": "Patient", "id": "epic-pat-1", "birthDate": "1975-05-05",
              "name": [{"family": "Vendorcanary", "given": ["Sam"]}],
              "extension": [{"url": "https://vendor-a.example/fhir/StructureDefinition/"
                                    "mobile-phone", "valueString": "+1 617 555 0177"}]})
    ehr.seed({"resourceType": "Appointment", "id": "epic-appt-1", "status": "booked",
              "start": "2027-06-01T10:00:00Z", "end": "2027-06-01T10:20:00Z",
              "appointmentType": {"coding": [{"system": "urn:oid:2.999.1.2.10",
                                              "code": "FU"}]},
              "participant": [{"actor": {"reference": "Patient/epic-pat-1"}}]})
    # A site's copy of the epic table (the shipped one holds the sandbox's real values):
    # the site's own extension and local visit type code, as a site would write them.
    site = tmp_path_factory.mktemp("agent-epic-site")
    (site / "vendors").mkdir()
    (site / "vendors" / "epic.csv").write_text(
        "resource,rule,path,from,to,source,note\n"
        "Patient,extension-to-telecom,telecom,https://vendor-a.example/fhir/"
        "StructureDefinition/mobile-phone,phone,site,a mobile number as an extension\n"
        "Appointment,code,appointmentType.coding,urn:oid:2.999.1.2.10|FU,"
        "http://terminology.hl7.org/CodeSystem/v2-0276|FOLLOWUP|A follow up visit from a "
        "previous appointment,site,local visit type code\n")
    gw = await start_gateway(
        tmp_path_factory.mktemp("agent-epic") / "var",
        **agent_settings(**{
            "mapping.site_dir": site,
            "backends": [{"name": "ehr", "kind": "fhir", "base_url": ehr.url,
                          "max_retries": 0, "vendor": "epic"}],
            "routes": [{"match": {"resource": t}, "to": ["ehr"]} for t in ROUTED]}))
    try:
        async with aiohttp.ClientSession() as http:
            agent = AgentClient(http, gw.http_url)
            reply = await agent.verify("appointment_lookup", "epic-call",
                                       last_name="vendorcanary", date_of_birth="1975-05-05",
                                       phone="617-555-0177")
            assert reply.status == 201, reply.body
            listed = await agent.call("GET", "/appointments?from=2027-01-01")
            assert [a["type"] for a in listed.body] == [
                "A follow up visit from a previous appointment"]
    finally:
        await gw.runner.cleanup()
        await ehr.stop()


async def test_reschedule_moves_the_ehrs_appointment_to_a_free_slot(remote: Remote) -> None:
    remote.ehr.seed(slot("slot-r1", "2027-07-01T09:00:00Z", "2027-07-01T09:30:00Z"))
    remote.ehr.seed(slot("slot-r2", "2027-07-02T09:00:00Z", "2027-07-02T09:30:00Z"))
    agent = remote.agent()
    await agent.verify("scheduling", "r-call-move")
    booked = await agent.call("POST", "/appointments", {"slot_id": "slot-r1"})
    moved = await agent.call("POST", f"/appointments/{booked.body['id']}/reschedule",
                             {"slot_id": "slot-r2"})
    assert moved.status == 200, moved.body
    assert moved.body["start"] == "2027-07-02T09:00:00Z"
    stored = remote.ehr.resource("Appointment", booked.body["id"])
    assert stored["slot"] == [{"reference": "Slot/slot-r2"}]
    remote.ehr.seed(slot("slot-r3", "2027-07-03T09:00:00Z", "2027-07-03T09:30:00Z"))
    other = remote.agent(OTHER_AGENT_KEY)
    await other.verify("scheduling", "r-call-move-other")
    assert (await other.call("POST", "/appointments", {"slot_id": "slot-r3"})).status == 201
    taken = await agent.call("POST", f"/appointments/{booked.body['id']}/reschedule",
                             {"slot_id": "slot-r3"})
    assert taken.status == 409 and taken.body["error"] == "slot_unavailable"
