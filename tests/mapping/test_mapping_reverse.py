"""FHIR R4 -> HL7 v2 from the same tables: round trips, message headers, bad input."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import message as fixture
from gateway.hl7.message import Message, parse_message
from gateway.mapping.errors import TableErrors, TranslationError, UnsupportedResource
from gateway.mapping.tables import SHIPPED
from gateway.mapping.to_v2 import Reverser
from support.mapping import one, ref, resources, translate

NOW = datetime(2024, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=-5)))
Json = dict[str, Any]


@cache
def reverser() -> Reverser:
    return Reverser.load()


def to_v2(document: Json, **options: Any) -> list[Message]:
    texts = reverser().to_v2(document, control_id="CTL1", now=NOW, **options)
    return [parse_message(text.encode()) for text in texts]


def content(resource: Json) -> Json:
    """A resource without what the Bundle assigns (id, references to other entries)."""
    return {k: v for k, v in resource.items()
            if k not in ("id", "subject", "encounter", "basedOn", "result", "requester",
                         "performer", "specimen")}


# -- v2 -> FHIR -> v2 keeps every mapped field --------------------------------------------

@pytest.mark.parametrize("field", [3, 5, 7, 8, 11, 13, 14, 16, 19, 29])
def test_patient_round_trip_keeps_pid_field(field: int) -> None:
    original = parse_message(fixture("reverse_adt_a08.hl7"))
    [back] = to_v2(translate(fixture("reverse_adt_a08.hl7")))
    assert back.get_raw(f"PID-{field}") == original.get_raw(f"PID-{field}")


@pytest.mark.parametrize("path", ["PID-5.1", "PID-5(2).2", "PID-3(2).4.2", "PID-11(2).7",
                                  "PID-13(2).4", "PID-7"])
def test_patient_round_trip_unescaped_values(path: str) -> None:
    original = parse_message(fixture("reverse_adt_a08.hl7"))
    [back] = to_v2(translate(fixture("reverse_adt_a08.hl7")))
    assert back.get(path) == original.get(path) != ""


@pytest.mark.parametrize(("segment", "fields"), [
    ("PID", [3, 5, 7, 8]),
    ("ORC", [2, 3]),
    ("OBR", [2, 3, 4, 7, 22]),
])
def test_results_round_trip_keeps_mapped_fields(segment: str, fields: list[int]) -> None:
    original = parse_message(fixture("reverse_oru_r01.hl7"))
    [back] = to_v2(translate(fixture("reverse_oru_r01.hl7")))
    for number in fields:
        assert back.get_raw(f"{segment}-{number}") == original.get_raw(f"{segment}-{number}")


@pytest.mark.parametrize("occurrence", [1, 2, 3])
def test_each_result_becomes_its_obx_in_order(occurrence: int) -> None:
    original = parse_message(fixture("reverse_oru_r01.hl7"))
    [back] = to_v2(translate(fixture("reverse_oru_r01.hl7")))
    for number in (1, 2, 3, 5, 6, 7, 8, 14):
        path = f"OBX[{occurrence}]-{number}"
        assert back.get_raw(path) == original.get_raw(path), path


def test_order_round_trip_keeps_mapped_fields() -> None:
    original = parse_message(fixture("reverse_orm_o01.hl7"))
    [back] = to_v2(translate(fixture("reverse_orm_o01.hl7")))
    assert back.header.message_type == "ORM^O01"
    for path in ("PID-3", "PID-5", "ORC-1", "ORC-2", "ORC-9", "ORC-12", "OBR-4", "OBR-31"):
        assert back.get_raw(path) == original.get_raw(path), path


# -- FHIR -> v2 -> FHIR keeps the mapped elements ------------------------------------------

@pytest.mark.parametrize(("name", "kinds"), [
    ("reverse_adt_a08.hl7", ["Patient"]),
    ("reverse_oru_r01.hl7", ["Patient", "DiagnosticReport", "Observation", "ServiceRequest"]),
    ("reverse_orm_o01.hl7", ["Patient", "ServiceRequest", "Practitioner"]),
])
def test_fhir_round_trip_keeps_the_resources(name: str, kinds: list[str]) -> None:
    bundle = translate(fixture(name))
    [text] = reverser().to_v2(bundle, control_id="C", now=NOW)
    again = translate(text)
    for kind in kinds:
        assert [content(r) for r in resources(again, kind)] == \
            [content(r) for r in resources(bundle, kind)], kind


def test_a_bare_patient_resource_becomes_an_a31() -> None:
    patient = {"resourceType": "Patient", "gender": "female", "birthDate": "1970-05",
               "deceasedBoolean": False,
               "name": [{"family": "Ng", "given": ["Ann"], "use": "official"}]}
    [message] = to_v2(patient)
    assert message.get("PID-5.1") == "Ng" and message.get("PID-5.7") == "L"
    assert message.get("PID-7") == "197005"  # the precision sent is kept
    assert message.get("PID-8") == "F"
    assert message.get("PID-30") == "N"
    assert content(one(translate(message.encode()), "Patient")) == patient


# -- the header and the choice of message -------------------------------------------------

def test_msh_is_built_by_the_gateway() -> None:
    [message] = to_v2(translate(fixture("reverse_adt_a08.hl7")))
    assert message.get("MSH-3") == "ISTHMUS" and message.get("MSH-4") == "GATEWAY"
    assert message.get("MSH-7") == "20240304050607-0500"
    assert message.get_raw("MSH-9") == "ADT^A31^ADT_A05"
    assert message.get("MSH-10") == "CTL1"
    assert message.get("MSH-11") == "P" and message.get("MSH-12") == "2.5.1"
    assert message.get("EVN-1") == "A31"
    assert [s.id for s in message.segments()] == ["MSH", "EVN", "PID", "PV1"]


@pytest.mark.parametrize(("event", "expected"), [
    (None, "ADT^A31^ADT_A05"), ("A28", "ADT^A28^ADT_A05"), ("ADT^A28", "ADT^A28^ADT_A05"),
])
def test_a28_can_be_chosen(event: str | None, expected: str) -> None:
    [message] = to_v2(translate(fixture("reverse_adt_a08.hl7")), event=event)
    assert message.get_raw("MSH-9") == expected


def test_oml_can_be_chosen_for_an_order() -> None:
    [message] = to_v2(translate(fixture("reverse_orm_o01.hl7")), event="O21")
    assert message.get_raw("MSH-9") == "OML^O21^OML_O21"


def test_control_ids_are_fresh_and_unique_without_one() -> None:
    bundle = translate(fixture("reverse_adt_a08.hl7"))
    ids = {parse_message(reverser().to_v2(bundle)[0].encode()).get("MSH-10")
           for _ in range(20)}
    assert len(ids) == 20


def test_now_defaults_to_local_time_with_its_offset() -> None:
    [text] = reverser().to_v2({"resourceType": "Patient", "gender": "male"})
    stamp = parse_message(text.encode()).get("MSH-7")
    assert len(stamp) == 19 and stamp[14] in "+-"
    assert abs(datetime.strptime(stamp, "%Y%m%d%H%M%S%z") - datetime.now(UTC)) < \
        timedelta(minutes=1)


def test_a_bundle_gives_one_message_per_report_not_per_resource() -> None:
    bundle = translate(fixture("reverse_oru_r01.hl7"))
    messages = to_v2(bundle)
    assert [m.header.message_type for m in messages] == ["ORU^R01"]
    assert [s.id for s in messages[0].segments()] == ["MSH", "PID", "ORC", "OBR", "OBX",
                                                       "OBX", "OBX"]


def test_two_patients_give_two_messages_with_distinct_control_ids() -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "gender": "male"}},
        {"resource": {"resourceType": "Patient", "gender": "female"}}]}
    messages = to_v2(bundle)
    assert [m.get("MSH-10") for m in messages] == ["CTL1", "CTL1-2"]
    assert [m.get("PID-8") for m in messages] == ["M", "F"]


# -- bad input ------------------------------------------------------------------------------

def test_unknown_resource_type_is_named() -> None:
    with pytest.raises(UnsupportedResource, match="resource type Flag"):
        reverser().to_v2({"resourceType": "Flag"})


@pytest.mark.parametrize("document", [[], "Patient", {"gender": "male"}, None, 3])
def test_input_that_is_not_a_resource_is_refused(document: Any) -> None:
    with pytest.raises(TranslationError, match="not a FHIR resource"):
        reverser().to_v2(document)


def test_a_bundle_with_nothing_mappable_says_what_it_holds() -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Flag"}}, {"resource": {"resourceType": "Basic"}}]}
    with pytest.raises(UnsupportedResource, match="holds nothing .* Basic, Flag"):
        reverser().to_v2(bundle)


def test_an_event_the_type_cannot_become_is_refused() -> None:
    with pytest.raises(UnsupportedResource, match="cannot become S12"):
        reverser().to_v2({"resourceType": "Patient"}, event="S12")


def test_a_bad_fhir_date_names_the_element() -> None:
    with pytest.raises(TranslationError, match="birthDate"):
        reverser().to_v2({"resourceType": "Patient", "birthDate": "12/03/1985"})


def test_a_bad_outbound_table_is_reported_with_file_and_line(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "outbound").mkdir(parents=True)
    shutil.copy(SHIPPED / "outbound.csv", site / "outbound.csv")
    with (site / "outbound.csv").open("a") as f:
        f.write("Pateint,,ADT^A31,ADT_A05,,\nPatient,,ADT^A28,NOPE,,\n")
    (site / "outbound" / "ADT_A05.csv").write_text(
        "segment,source,map,set_id,fixed,note\nPID,this,PID-Patient,99,,\nMSH,,,,,\n")
    with pytest.raises(TableErrors) as caught:
        Reverser.load(SHIPPED, site)
    text = str(caught.value)
    assert "outbound.csv:" in text and "'Pateint' is not a FHIR R4 resource type" in text
    assert "unknown layout 'NOPE'" in text
    assert "ADT_A05.csv:2: set_id '99'" in text
    assert "ADT_A05.csv:3: MSH is built by the gateway" in text


def test_rows_that_cannot_be_read_backwards_are_listed() -> None:
    skipped = reverser().skipped_rows
    assert any("PV1-Encounter.csv" in s and "MSH-9.2" in s for s in skipped)


# -- property tests: text with delimiters and non-ASCII survives exactly ------------------

TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"),
                           whitelist_characters="|^~\\&"),
    min_size=1, max_size=12).filter(lambda s: s != '""' and s.strip() == s and s != "")
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(family=TEXT, given_names=st.lists(TEXT, min_size=1, max_size=2), city=TEXT,
       line=TEXT, postal=TEXT, value=TEXT)
def test_names_addresses_and_identifiers_round_trip_exactly(
        family: str, given_names: list[str], city: str, line: str, postal: str,
        value: str) -> None:
    patient = {
        "resourceType": "Patient",
        "identifier": [{"value": value, "system": "urn:oid:1.2.3"}],
        "name": [{"family": family, "given": given_names}],
        "address": [{"line": [line], "city": city, "postalCode": postal}],
    }
    [text] = reverser().to_v2(patient, control_id="P", now=NOW)
    message = parse_message(text.encode())
    assert len(list(message.segments("PID"))) == 1
    assert message.get("PID-5.1") == family
    again = translate(text)
    back = content(one(again, "Patient"))
    identifier = back["identifier"][0]
    # The assigning authority comes back as an Organization the identifier refers to.
    assigner = identifier.pop("assigner")["reference"]
    assert any(ref(again, o) == assigner for o in resources(again, "Organization"))
    assert back == patient


CODE = TEXT.filter(lambda s: not any(c.isspace() for c in s))


@SETTINGS
@given(comment=TEXT, code=CODE)
def test_result_text_round_trips_exactly(comment: str, code: str) -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:r", "resource": {
            "resourceType": "DiagnosticReport", "status": "final",
            "code": {"coding": [{"code": code}]}, "result": [{"reference": "urn:uuid:o"}]}},
        {"fullUrl": "urn:uuid:o", "resource": {
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"code": code}]}, "valueString": comment}},
    ]}
    [text] = reverser().to_v2(bundle, control_id="P", now=NOW)
    assert parse_message(text.encode()).get("OBX-5") == comment
    back = one(translate(text), "Observation")
    assert back["valueString"] == comment
    assert back["code"]["coding"][0]["code"] == code


# -- appointments and medication orders ---------------------------------------------------

APPOINTMENT = {"resourceType": "Bundle", "type": "collection", "entry": [
    {"fullUrl": "urn:uuid:a", "resource": {
        "resourceType": "Appointment", "status": "booked",
        "identifier": [{"value": "A1", "type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "FILL"}]}}],
        "start": "2024-05-01T09:00:00-05:00", "end": "2024-05-01T09:30:00-05:00",
        "minutesDuration": 30,
        "participant": [{"actor": {"reference": "urn:uuid:p"}, "status": "accepted"}]}},
    {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient",
                                           "name": [{"family": "Ng"}]}},
]}


@pytest.mark.parametrize(("status", "event", "expected"), [
    ("booked", None, "SIU^S12^SIU_S12"), ("pending", None, "SIU^S12^SIU_S12"),
    ("cancelled", None, "SIU^S15^SIU_S12"), ("booked", "S14", "SIU^S14^SIU_S12"),
])
def test_appointment_message_follows_its_status(status: str, event: str | None,
                                                expected: str) -> None:
    bundle = {**APPOINTMENT, "entry": [
        {**APPOINTMENT["entry"][0],
         "resource": {**APPOINTMENT["entry"][0]["resource"], "status": status}},
        APPOINTMENT["entry"][1]]}
    [message] = to_v2(bundle, event=event)
    assert message.get_raw("MSH-9") == expected
    assert [s.id for s in message.segments()] == ["MSH", "SCH", "PID", "RGS", "AIS"]
    assert message.get("SCH-2") == "A1" and message.get("PID-5") == "Ng"


def test_an_appointment_with_no_default_message_asks_for_an_event() -> None:
    with pytest.raises(UnsupportedResource, match="SIU\\^S14"):
        reverser().to_v2({"resourceType": "Appointment", "status": "noshow"})


def test_appointment_round_trip_keeps_the_mapped_elements() -> None:
    [text] = reverser().to_v2(APPOINTMENT, control_id="C", now=NOW)
    again = translate(text)
    appointment = one(again, "Appointment")
    original = APPOINTMENT["entry"][0]["resource"]
    for key in ("status", "identifier", "start", "end", "minutesDuration"):
        assert appointment[key] == original[key], key
    assert one(again, "Patient")["name"] == [{"family": "Ng"}]


@pytest.mark.parametrize(("event", "expected", "segment"), [
    (None, "RDE^O11^RDE_O11", "RXE"), ("O09", "OMP^O09^OMP_O09", "RXO")])
def test_medication_request_becomes_rde_or_omp(event: str | None, expected: str,
                                               segment: str) -> None:
    request = {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
               "medicationCodeableConcept": {"coding": [{
                   "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                   "code": "197361", "display": "Amlodipine 5 MG"}]}}
    [message] = to_v2(request, event=event)
    assert message.get_raw("MSH-9") == expected
    assert [s.id for s in message.segments()] == ["MSH", "ORC", segment]
    assert message.get("ORC-1") == "NW"
    assert "197361^Amlodipine 5 MG^RXNORM" in message.to_text()
