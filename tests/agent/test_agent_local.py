"""The agent API over the local shape: a clinic fed over MLLP with real HL7 bytes (ADT,
RDE, RDS, SIU) plus slots written over FHIR, bookings told to a scheduling system (a
fake MLLP peer) as SIU, refill requests as OMP^O09 with ORC-1 RF."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import MllpPeer, RunningGateway, segments, start_gateway
from gateway.agent import AGENT
from gateway.audit.query import AuditQuery
from gateway.audit.sealed import parse_body, reveal
from gateway.edge.audit_http import AUDIT
from gateway.telemetry import configure
from support.agent import (
    AGENT_KEY,
    CALLER,
    CANARIES,
    CLINIC,
    MESSAGES,
    NOT_AGENT_KEY,
    OTHER_AGENT_KEY,
    SLOTS,
    WRITER_KEY,
    AgentClient,
    agent_settings,
    location,
    practitioner,
    schedule,
)
from support.fake_mllp import FakeMllp
from support.wait import ManualClock, eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Clinic:
    gw: RunningGateway
    scheduler: FakeMllp
    http: aiohttp.ClientSession
    spans: InMemorySpanExporter
    patient_id: str
    other_id: str

    def agent(self, key: str = AGENT_KEY) -> AgentClient:
        return AgentClient(self.http, self.gw.http_url, key)

    async def fhir(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(method, self.gw.http_url + "/fhir/" + path, json=body,
                                     headers={"X-API-Key": WRITER_KEY,
                                              "Accept": "application/fhir+json"}) as response:
            assert response.status < 300, await response.text()
            return await response.json(content_type=None)

    def received(self, message_type: str) -> list[dict[str, list[list[str]]]]:
        found = [segments(r.raw) for r in self.scheduler.received]
        return [s for s in found if s["MSH"][0][9].startswith(message_type)]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def clinic(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Clinic]:
    scheduler = await FakeMllp().start()
    spans = InMemorySpanExporter()
    gw = await start_gateway(
        tmp_path_factory.mktemp("agent-local") / "var",
        telemetry=configure("none", span_exporter=spans),
        **agent_settings(**{
            "backends": [{"name": "scheduler", "kind": "mllp", "host": "127.0.0.1",
                          "port": scheduler.port, "max_attempts": 3}],
            # What the gateway itself says goes to the scheduling and pharmacy system;
            # what the clinic sends stays in the local store.
            "routes": [{"match": {"message": "SIU^*", "sender": "ISTHMUS"},
                        "to": ["scheduler"]},
                       {"match": {"message": "OMP^*", "sender": "ISTHMUS"},
                        "to": ["scheduler"]}]}))
    http = aiohttp.ClientSession()
    try:
        peer = await MllpPeer.open(gw.mllp_port)
        for name in CLINIC:
            ack = segments(await peer.request((MESSAGES / name).read_bytes()))
            assert ack["MSA"][0][1] == "AA", (name, ack)
        await peer.close()
        clinic = Clinic(gw, scheduler, http, spans, "", "")
        for resource in (practitioner(), location(), schedule(), *SLOTS):
            await clinic.fhir("PUT", f"{resource['resourceType']}/{resource['id']}", resource)

        async def applied() -> bool:
            found = await clinic.fhir("GET", "MedicationDispense")
            appointments = await clinic.fhir("GET", "Appointment")
            patients = await clinic.fhir("GET", "Patient?birthdate=1980-02-14")
            registered = [e for e in patients.get("entry", []) if e["resource"].get("telecom")]
            return (len(found.get("entry", [])) == 2 and len(registered) == 2
                    and len(appointments.get("entry", [])) == 1)

        await eventually(applied, timeout=20)
        patients = await clinic.fhir("GET", "Patient?birthdate=1980-02-14")
        by_family = {e["resource"]["name"][0]["family"]: e["resource"]["id"]
                     for e in patients["entry"]}
        clinic.patient_id = by_family["Agentcanary-Smith"]
        clinic.other_id = by_family["Othercanary"]
        yield clinic
    finally:
        await http.close()
        await gw.runner.cleanup()
        await scheduler.stop()


# -- verification -----------------------------------------------------------------------


async def test_a_caller_matching_every_factor_gets_a_session_and_only_a_first_name(
        clinic: Clinic) -> None:
    agent = clinic.agent()
    reply = await agent.verify("appointment_lookup", "call-verify-1")
    assert reply.status == 201, reply.body
    assert reply.body["patient"] == {"first_name": "Zoë", "last_name_initial": "A"}
    assert reply.body["expires_in"] == 900
    assert set(reply.body) == {"session_token", "session_id", "expires_in", "patient"}


@pytest.mark.parametrize("factor", [
    {"phone": "+1 617 555 0142"}, {"mrn": "mrn-700001"}, {"ssn_last4": "6789"},
    {"zip": "02134"}])
async def test_each_second_factor_verifies(clinic: Clinic, factor: dict[str, str]) -> None:
    said = {"last_name": "Agentcanary-Smith", "date_of_birth": "1980-02-14", **factor}
    reply = await clinic.agent().verify("refill", f"call-factor-{next(iter(factor))}", **said)
    assert reply.status == 201, reply.body


async def test_a_wrong_factor_and_an_unknown_patient_get_the_same_answer(
        clinic: Clinic) -> None:
    agent = clinic.agent()
    wrong_phone = await agent.verify("scheduling", "call-same-1",
                                     **{**CALLER, "phone": "617 555 0000"})
    unknown = await agent.verify("scheduling", "call-same-2",
                                 **{**CALLER, "last_name": "Nobody", "date_of_birth": "1990-01-01"})
    shared_dob_other_name = await agent.verify("scheduling", "call-same-3",
                                               **{**CALLER, "last_name": "Othercanary"})
    assert wrong_phone.status == unknown.status == shared_dob_other_name.status == 401
    assert wrong_phone.raw == unknown.raw == shared_dob_other_name.raw
    assert wrong_phone.body == {"error": "not_verified",
                                "message": "the caller could not be verified",
                                "attempts_left": 2}


async def test_a_failed_verification_retried_under_its_key_is_not_a_second_attempt(
        clinic: Clinic) -> None:
    agent = clinic.agent()
    body = {"purpose": "refill", "call_id": "call-idem-verify", **CALLER,
            "phone": "617 555 0005"}
    first = await agent.call("POST", "/sessions", body, idempotency_key="verify-1")
    again = await agent.call("POST", "/sessions", body, idempotency_key="verify-1")
    assert first.status == 401 and again.raw == first.raw
    third = await agent.call("POST", "/sessions", body, idempotency_key="verify-2")
    assert third.body["attempts_left"] == 1  # the retry under verify-1 counted nothing


async def test_attempts_per_call_id_lock_the_call_even_with_the_right_factors(
        clinic: Clinic) -> None:
    agent = clinic.agent()
    wrong = {**CALLER, "zip": None, "phone": "617 555 0001"}
    answers = [await agent.verify("scheduling", "call-lock-1", **wrong) for _ in range(3)]
    assert [a.status for a in answers] == [401, 401, 423]
    assert [a.body.get("attempts_left") for a in answers[:2]] == [2, 1]
    locked = await agent.verify("scheduling", "call-lock-1")
    assert locked.status == 423
    assert locked.body["error"] == "locked" and 0 < locked.body["retry_after"] <= 900
    assert locked.headers["Retry-After"] == str(locked.body["retry_after"])
    # Another call is not locked by this one.
    assert (await agent.verify("scheduling", "call-lock-2")).status == 201


async def test_attempts_per_caller_phone_lock_across_call_ids(clinic: Clinic) -> None:
    agent = clinic.agent()
    wrong = {**CALLER, "phone": "617 555 0002", "caller_phone": "+1 (212) 555-0199"}
    for n in range(3):
        await agent.verify("scheduling", f"call-ani-{n}", **wrong)
    right = {**CALLER, "caller_phone": "212-555-0199"}
    locked = await agent.verify("scheduling", "call-ani-new", **right)
    assert locked.status == 423 and locked.body["error"] == "locked"


async def test_lockout_ends_when_the_window_has_passed(clinic: Clinic) -> None:
    attempts = clinic.gw.app[AGENT].service.attempts
    clock = ManualClock()
    real, attempts.clock = attempts.clock, clock
    try:
        agent = clinic.agent()
        wrong = {**CALLER, "phone": "617 555 0003"}
        for _ in range(3):
            await agent.verify("scheduling", "call-window", **wrong)
        assert (await agent.verify("scheduling", "call-window")).status == 423
        clock.now += 901
        assert (await agent.verify("scheduling", "call-window")).status == 201
    finally:
        attempts.clock = real


# -- sessions ---------------------------------------------------------------------------


async def test_a_session_expires_and_its_token_is_refused(clinic: Clinic) -> None:
    sessions = clinic.gw.app[AGENT].service.sessions
    clock = ManualClock()
    real, sessions.clock = sessions.clock, clock
    try:
        agent = clinic.agent()
        assert (await agent.verify("appointment_lookup", "call-expiry")).status == 201
        assert (await agent.call("GET", "/appointments")).status == 200
        clock.now += 15 * 60
        expired = await agent.call("GET", "/appointments")
        assert expired.status == 401 and expired.body["error"] == "invalid_session"
    finally:
        sessions.clock = real


async def test_ending_a_session_purges_it(clinic: Clinic) -> None:
    agent = clinic.agent()
    await agent.verify("appointment_lookup", "call-end")
    service = clinic.gw.app[AGENT].service
    held = service.sessions.get(agent.token or "", "voicebot")
    assert held is not None
    await agent.call("GET", "/appointments")
    assert held.cache
    ended = await agent.call("DELETE", f"/sessions/{agent.session_id}")
    assert ended.status == 200
    assert held.cache == {} and held.tasks == {}
    assert (await agent.call("GET", "/appointments")).body["error"] == "invalid_session"


async def test_a_session_belongs_to_the_client_it_was_issued_to(clinic: Clinic) -> None:
    agent = clinic.agent()
    await agent.verify("appointment_lookup", "call-owner")
    stolen = await agent.call("GET", "/appointments", key=OTHER_AGENT_KEY)
    assert stolen.status == 401 and stolen.body["error"] == "invalid_session"


# -- appointments and slots -------------------------------------------------------------


async def test_lookup_answers_upcoming_appointments_as_flat_objects(clinic: Clinic) -> None:
    agent = clinic.agent()
    await agent.verify("appointment_lookup", "call-lookup")
    reply = await agent.call("GET", "/appointments?from=2027-01-01")
    assert reply.status == 200
    [appointment] = [a for a in reply.body if a["start"].startswith("2027-01-15")]
    assert appointment == {
        "id": appointment["id"], "start": "2027-01-15T14:00:00+00:00",
        "end": "2027-01-15T14:30:00+00:00", "status": "booked", "type": "Follow-up visit",
        "provider_name": "Dr Morgan Prescriber", "location": "ROOM5",
        "reason": "Follow-up visit"}


async def test_a_purpose_limits_what_the_session_may_ask(clinic: Clinic) -> None:
    agent = clinic.agent()
    await agent.verify("appointment_lookup", "call-purpose")
    for method, path in (("GET", "/medications"), ("GET", "/slots")):
        refused = await agent.call(method, path)
        assert refused.status == 403 and refused.body["error"] == "not_permitted_for_purpose"
    booked = await agent.call("POST", "/appointments", {"slot_id": "slot-c"})
    assert booked.status == 403


async def test_slots_are_the_free_ones_with_provider_and_location(clinic: Clinic) -> None:
    agent = clinic.agent()
    await agent.verify("scheduling", "call-slots")
    reply = await agent.call("GET", "/slots?from=2027-02-01&to=2027-02-04&provider=lee")
    assert reply.status == 200
    ids = [s["id"] for s in reply.body]
    assert "slot-busy" not in ids and "slot-c" in ids
    first = next(s for s in reply.body if s["id"] == "slot-c")
    assert first == {"id": "slot-c", "start": "2027-02-02T09:00:00+00:00",
                     "end": "2027-02-02T09:30:00+00:00", "provider_name": "Dr Avery Lee",
                     "location": "North Clinic", "type": "Follow-up visit"}
    assert (await agent.call("GET", "/slots?from=2027-02-01&provider=nobody")).body == []


async def test_booking_marks_the_slot_busy_and_tells_the_scheduler_siu_s12(
        clinic: Clinic) -> None:
    agent = clinic.agent()
    await agent.verify("scheduling", "call-book")
    booked = await agent.call("POST", "/appointments", {"slot_id": "slot-a",
                                                        "reason": "blood pressure check"},
                              idempotency_key="book-a-1")
    assert booked.status == 201, booked.body
    assert booked.body["start"] == "2027-02-01T09:00:00+00:00"
    assert booked.body["status"] == "booked"
    assert booked.body["provider_name"] == "Dr Avery Lee"
    assert booked.body["reason"] == "blood pressure check"
    slot = await clinic.fhir("GET", "Slot/slot-a")
    assert slot["status"] == "busy"
    stored = await clinic.fhir("GET", f"Appointment/{booked.body['id']}")
    assert stored["slot"] == [{"reference": "Slot/slot-a"}]
    await eventually(lambda: bool(clinic.received("SIU^S12")))
    siu = clinic.received("SIU^S12")[-1]
    assert siu["MSH"][0][3] == "ISTHMUS"
    assert siu["PID"][0][3].startswith("MRN-700001^^^SYNTHCLINIC")
    assert siu["SCH"][0][11].split("^")[3:5] == ["20270201090000+0000",
                                                 "20270201093000+0000"]
    assert siu["SCH"][0][25] == "Booked"
    assert siu["SCH"][0][1].endswith("^ISTHMUS")  # the gateway placed it (SCH-1)
    # The list answers the booking from now on.
    listed = await agent.call("GET", "/appointments?from=2027-02-01&to=2027-02-02")
    assert [a["id"] for a in listed.body] == [booked.body["id"]]


async def test_cancel_frees_the_slot_and_reschedule_moves_it_with_s15_and_s13(
        clinic: Clinic) -> None:
    agent = clinic.agent()
    await agent.verify("scheduling", "call-move")
    booked = await agent.call("POST", "/appointments", {"slot_id": "slot-d"})
    assert booked.status == 404  # no such slot: nothing is invented
    await clinic.fhir("PUT", "Slot/slot-d", {**SLOTS[0], "id": "slot-d",
                                             "start": "2027-03-01T09:00:00+00:00",
                                             "end": "2027-03-01T09:30:00+00:00"})
    await clinic.fhir("PUT", "Slot/slot-e", {**SLOTS[0], "id": "slot-e",
                                             "start": "2027-03-02T09:00:00+00:00",
                                             "end": "2027-03-02T09:30:00+00:00"})
    booked = await agent.call("POST", "/appointments", {"slot_id": "slot-d"})
    ident = booked.body["id"]
    moved = await agent.call("POST", f"/appointments/{ident}/reschedule",
                             {"slot_id": "slot-e"})
    assert moved.status == 200, moved.body
    assert moved.body["start"] == "2027-03-02T09:00:00+00:00"
    assert (await clinic.fhir("GET", "Slot/slot-d"))["status"] == "free"
    assert (await clinic.fhir("GET", "Slot/slot-e"))["status"] == "busy"
    cancelled = await agent.call("POST", f"/appointments/{ident}/cancel",
                                 {"reason": "feeling better"})
    assert cancelled.status == 200 and cancelled.body["status"] == "cancelled"
    assert (await clinic.fhir("GET", "Slot/slot-e"))["status"] == "free"
    await eventually(lambda: bool(clinic.received("SIU^S13"))
                     and bool(clinic.received("SIU^S15")))
    assert clinic.received("SIU^S13")[-1]["SCH"][0][11].split("^")[3] == \
        "20270302090000+0000"
    assert clinic.received("SIU^S15")[-1]["SCH"][0][25] == "Cancelled"


async def test_two_agents_racing_for_one_slot_one_wins_one_gets_409(clinic: Clinic) -> None:
    first, second = clinic.agent(), clinic.agent(OTHER_AGENT_KEY)
    await first.verify("scheduling", "call-race-1")
    await second.verify("scheduling", "call-race-2")
    answers = await asyncio.gather(
        first.call("POST", "/appointments", {"slot_id": "slot-b"}),
        second.call("POST", "/appointments", {"slot_id": "slot-b"}))
    assert sorted(a.status for a in answers) == [201, 409]
    lost = next(a for a in answers if a.status == 409)
    assert lost.body == {"error": "slot_unavailable",
                         "message": "the slot is no longer free; offer another one"}
    on_slot = await clinic.fhir("GET", "Appointment?slot=Slot/slot-b")
    assert len(on_slot.get("entry", [])) == 1


async def test_a_retried_post_returns_the_first_answer_and_books_once(clinic: Clinic) -> None:
    agent = clinic.agent()
    await agent.verify("scheduling", "call-retry")
    await clinic.fhir("PUT", "Slot/slot-f", {**SLOTS[0], "id": "slot-f",
                                             "start": "2027-04-01T09:00:00+00:00",
                                             "end": "2027-04-01T09:30:00+00:00"})
    body = {"slot_id": "slot-f", "reason": "retry"}
    answers = await asyncio.gather(*(agent.call("POST", "/appointments", body,
                                                idempotency_key="retry-f-1")
                                     for _ in range(3)))
    assert {a.status for a in answers} == {201}
    assert len({a.raw for a in answers}) == 1
    on_slot = await clinic.fhir("GET", "Appointment?slot=Slot/slot-f")
    assert len(on_slot.get("entry", [])) == 1
    again = await agent.call("POST", "/appointments", body, idempotency_key="retry-f-1")
    assert again.raw == answers[0].raw
    reused = await agent.call("POST", "/appointments", {"slot_id": "slot-c"},
                              idempotency_key="retry-f-1")
    assert reused.status == 422 and reused.body["error"] == "idempotency_key_reused"
    # A refusal is replayed too: the slot stays taken for a second key.
    taken = await agent.call("POST", "/appointments", body, idempotency_key="retry-f-2")
    assert taken.status == 409
    assert (await agent.call("POST", "/appointments", body,
                             idempotency_key="retry-f-2")).raw == taken.raw


async def test_another_patients_appointment_is_404_as_if_absent(clinic: Clinic) -> None:
    theirs = await clinic.fhir("POST", "Appointment", {
        "resourceType": "Appointment", "status": "booked",
        "start": "2027-05-01T09:00:00+00:00", "end": "2027-05-01T09:30:00+00:00",
        "participant": [{"actor": {"reference": f"Patient/{clinic.other_id}"},
                         "status": "accepted"}]})
    agent = clinic.agent()
    await agent.verify("scheduling", "call-cross")
    for path in (f"/appointments/{theirs['id']}/cancel",
                 "/appointments/no-such-appointment/cancel"):
        refused = await agent.call("POST", path, {"reason": "x"})
        assert refused.status == 404
        assert refused.body == {"error": "not_found",
                                "message": "no such appointment for this caller"}
    listed = await agent.call("GET", "/appointments?from=2027-01-01")
    assert theirs["id"] not in [a["id"] for a in listed.body]
    assert (await clinic.fhir("GET", f"Appointment/{theirs['id']}"))["status"] == "booked"


# -- medications and refills ------------------------------------------------------------


async def test_medications_are_the_active_ones_with_refills_remaining(clinic: Clinic) -> None:
    agent = clinic.agent()
    await agent.verify("refill", "call-meds")
    reply = await agent.call("GET", "/medications?status=active")
    assert reply.status == 200
    by_name = {m["name"]: m for m in reply.body}
    assert set(by_name) == {"Amlodipine 5 MG Oral Tablet", "Ibuprofen 200 MG Oral Tablet"}
    amlodipine = by_name["Amlodipine 5 MG Oral Tablet"]
    assert amlodipine["refills_remaining"] == 1  # 2 repeats allowed, 1 dispense recorded
    assert amlodipine["dose"] == "5 milligram" and amlodipine["frequency"] == "QD"
    assert amlodipine["last_filled"] == "2026-11-10T12:00:00+00:00"
    assert amlodipine["prescriber_name"] == "Dr Morgan Prescriber"
    assert by_name["Ibuprofen 200 MG Oral Tablet"]["refills_remaining"] == 0


async def medication_ids(agent: AgentClient) -> dict[str, str]:
    reply = await agent.call("GET", "/medications")
    return {m["name"].split()[0]: m["id"] for m in reply.body}


async def test_a_refill_request_becomes_a_draft_order_and_an_omp_o09_rf(clinic: Clinic) -> None:
    agent = clinic.agent()
    await agent.verify("refill", "call-refill")
    ident = (await medication_ids(agent))["Amlodipine"]
    reply = await agent.call("POST", "/refill-requests", {"medication_id": ident,
                                                          "note": "running low"},
                             idempotency_key="refill-1")
    assert reply.status == 201, reply.body
    assert reply.body["status"] == "requested"
    draft = await clinic.fhir("GET", f"MedicationRequest/{reply.body['id']}")
    assert (draft["status"], draft["intent"]) == ("draft", "order")
    assert draft["priorPrescription"] == {"reference": f"MedicationRequest/{ident}"}
    assert draft["subject"] == {"reference": f"Patient/{clinic.patient_id}"}
    await eventually(lambda: bool(clinic.received("OMP^O09")))
    omp = clinic.received("OMP^O09")[-1]
    assert omp["ORC"][0][1] == "RF"
    assert omp["ORC"][0][2].startswith("RX-7001^SYNTHEHR")
    assert omp["RXO"][0][1].startswith("197361^Amlodipine")
    assert omp["PID"][0][3].startswith("MRN-700001")


async def test_a_refill_without_refills_left_or_of_a_stopped_order_is_422(
        clinic: Clinic) -> None:
    agent = clinic.agent()
    await agent.verify("refill", "call-refill-no")
    ids = await medication_ids(agent)
    none_left = await agent.call("POST", "/refill-requests", {"medication_id": ids["Ibuprofen"]})
    assert none_left.status == 422 and none_left.body["error"] == "no_refills_remaining"
    stopped = await clinic.fhir("GET", "MedicationRequest?status=stopped")
    [order] = [e["resource"] for e in stopped["entry"]]
    refused = await agent.call("POST", "/refill-requests", {"medication_id": order["id"]})
    assert refused.status == 422 and refused.body["error"] == "not_active"


async def test_another_patients_medication_is_404(clinic: Clinic) -> None:
    order = await clinic.fhir("POST", "MedicationRequest", {
        "resourceType": "MedicationRequest", "status": "active", "intent": "order",
        "subject": {"reference": f"Patient/{clinic.other_id}"},
        "medicationCodeableConcept": {"text": "Other drug"},
        "dispenseRequest": {"numberOfRepeatsAllowed": 5}})
    agent = clinic.agent()
    await agent.verify("refill", "call-cross-med")
    refused = await agent.call("POST", "/refill-requests", {"medication_id": order["id"]})
    assert refused.status == 404 and refused.body["error"] == "not_found"
    assert order["id"] not in (await medication_ids(agent)).values()


# -- the edge: who may call, bad input, audit, PHI --------------------------------------


@pytest.mark.parametrize(("body", "says"), [
    ({"purpose": "gossip", "call_id": "c", "last_name": "x", "date_of_birth": "2000-01-01",
      "phone": "1"}, "purpose must be one of"),
    ({"purpose": "refill", "call_id": "c", "last_name": "x", "date_of_birth": "2000-01-01"},
     "give exactly one of"),
    ({"purpose": "refill", "call_id": "c", "last_name": "x", "date_of_birth": "2000-01-01",
      "phone": "1", "zip": "2"}, "give exactly one of"),
    ({"purpose": "refill", "last_name": "x", "date_of_birth": "2000-01-01", "zip": "2"},
     "call_id is required"),
    ({"purpose": "refill", "call_id": "c", "last_name": "x", "date_of_birth": "2000-01-01",
      "zip": "2", "caller_phone": "not a phone"}, "caller_phone must be"),
    (["not", "an", "object"], "the body must be a JSON object"),
])
async def test_a_malformed_session_request_is_400_naming_the_field(
        clinic: Clinic, body: Any, says: str) -> None:
    reply = await clinic.agent().call("POST", "/sessions", body)
    assert reply.status == 400 and reply.body["error"] == "invalid_request"
    assert reply.body["message"].startswith(says)


async def test_bad_json_unknown_credentials_and_clients_without_the_agent_scope(
        clinic: Clinic) -> None:
    async with clinic.http.post(clinic.gw.http_url + "/agent/v1/sessions", data=b"{nope",
                                headers={"X-API-Key": AGENT_KEY}) as response:
        assert response.status == 400
        assert (await response.json())["message"] == "the body is not JSON"
    async with clinic.http.get(clinic.gw.http_url + "/agent/v1/appointments") as response:
        assert response.status == 401
        assert (await response.json())["error"] == "unauthorized"
    reader = await clinic.agent(NOT_AGENT_KEY).verify("refill", "call-reader")
    assert reader.status == 403 and reader.body["error"] == "forbidden"
    agent = clinic.agent()
    no_session = await agent.call("GET", "/appointments")
    assert no_session.status == 401
    forged = await agent.call("GET", "/appointments", token="forged-token")
    assert forged.status == 401 and forged.body["error"] == "invalid_session"
    await agent.verify("scheduling", "call-bad-params")
    bad_date = await agent.call("GET", "/slots?from=tomorrow")
    assert bad_date.status == 400 and bad_date.body["message"].startswith("from must be")
    bad_id = await agent.call("POST", "/appointments", {"slot_id": "../../etc"})
    assert bad_id.status == 400 and bad_id.body["message"] == "slot_id is not a valid id"


async def test_rate_limits_apply_per_agent_client(clinic: Clinic) -> None:
    api = clinic.gw.app[AGENT]
    real = api.rate
    api.rate, api._buckets = (0.001, 2.0), {}
    try:
        agent, other = clinic.agent(), clinic.agent(OTHER_AGENT_KEY)
        statuses = [(await agent.call("GET", "/appointments")).status for _ in range(3)]
        assert statuses[:2] == [401, 401] and statuses[2] == 429
        limited = agent.sent[-1]
        assert limited.body["error"] == "rate_limited" and limited.body["retry_after"] >= 1
        assert (await other.call("GET", "/appointments")).status == 401  # not limited
    finally:
        api.rate, api._buckets = real, {}


async def test_the_openapi_document_names_every_call(clinic: Clinic) -> None:
    async with clinic.http.get(clinic.gw.http_url + "/agent/v1/openapi.json") as response:
        document = await response.json()
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {
        "/sessions", "/sessions/{id}", "/appointments", "/appointments/{id}/cancel",
        "/appointments/{id}/reschedule", "/slots", "/medications", "/refill-requests"}


async def audit_records(clinic: Clinic) -> list[dict[str, Any]]:
    audit = clinic.gw.app[AUDIT]
    out = []
    after = 0
    while True:
        rows = await audit.search(AuditQuery(), after=after, limit=1000)
        if not rows:
            return out
        for row in rows:
            body = parse_body(row.body)
            body["revealed"] = reveal(body, audit.keys.ring)
            out.append(body)
        after = rows[-1].seq


async def test_every_call_is_audited_with_client_call_purpose_patient_and_outcome(
        clinic: Clinic) -> None:
    agent = clinic.agent()
    await agent.verify("refill", "call-audited", **{**CALLER, "phone": "617 555 0004"})
    await agent.verify("refill", "call-audited")
    await agent.call("GET", "/medications")
    records = [r for r in await audit_records(clinic)
               if r.get("control_id") == "call-audited"]
    details = [(r["detail"], r["outcome"]) for r in records]
    assert details == [("agent.verify second-factor=phone not_verified", "401"),
                       ("agent.verify second-factor=phone", "success"),
                       ("agent.medications", "success")]
    for record in records:
        assert record["client"] == "voicebot"
        assert record["purpose"] == "refill"
    assert records[0]["revealed"] is None  # no patient named for a failed attempt
    assert records[1]["revealed"].patient == f"Patient/{clinic.patient_id}"
    assert records[2]["revealed"].patient == f"Patient/{clinic.patient_id}"


async def test_no_phi_in_logs_spans_errors_or_audit_of_attempts(
        clinic: Clinic, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clinic.spans.clear()
    agent = clinic.agent()
    errors = [await agent.verify("scheduling", "call-canary",
                                 **{**CALLER, "phone": "617 555 0142 9"}),
              await agent.verify("refill", "call-canary-2",
                                 **{**CALLER, "last_name": "Agentcanary-Smith",
                                    "date_of_birth": "1980-02-14", "phone": None,
                                    "mrn": "MRN-700009"})]
    await agent.verify("refill", "call-canary-3")
    errors.append(await agent.call("POST", "/refill-requests",
                                   {"medication_id": (await medication_ids(agent))["Ibuprofen"]}))
    errors.append(await agent.call("POST", "/appointments", {"slot_id": "slot-busy"}))
    spans = [str(s.attributes) + s.name for s in clinic.spans.get_finished_spans()]
    assert any("agent.request" in s for s in spans)
    records = [str({k: v for k, v in r.items() if k != "revealed"})
               for r in await audit_records(clinic)]
    texts = [e.raw.decode() for e in errors] + [caplog.text] + spans + records
    for canary in CANARIES:
        leaked = [t[:120] for t in texts if canary.casefold() in t.casefold()]
        assert not leaked, (canary, leaked)
