"""v2 → FHIR for scheduling (SIU), immunization (VXU), pharmacy (RDE, OMP, RDS) and
documents (MDM): every mapped field of a realistic message, per event.

The messages are synthetic (invented names and numbers) and follow the v2.5.1 structures.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from conftest import REFERENCE
from gateway.hl7.message import parse_message
from gateway.mapping.errors import TranslationError
from support.mapping import Json, one, ref, resources, translate, translator, v2

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0443 = "http://terminology.hl7.org/CodeSystem/v2-0443"
SCH_SENDER = "urn:oid:2.16.840.1.113883.19.4.1"
SCH_PLACER = "urn:oid:2.16.840.1.113883.19.4.2"


def _by_ref(bundle: Json, reference: str) -> Json:
    return next(e["resource"] for e in bundle["entry"] if e["fullUrl"] == reference)


def _type_code(identifier: Json) -> str:
    return str(identifier["type"]["coding"][0]["code"])


# -- SIU: Appointment ---------------------------------------------------------------------

def siu(event: str, sch25: str = "Booked^Booked^HL70278", sch6: str = "",
        sch11: str = "^^^20250317093000-0500^20250317100000-0500",
        tq1: str | None = None, ais: str | None = None) -> bytes:
    segments = [
        f"MSH|^~\\&|SCHEDAPP|NORTHCLINIC|GATEWAY|ISTHMUS|20250310081500-0500||SIU^{event}^SIU_S12"
        f"|SCH{event}0001|P|2.5.1",
        f"SCH|PL-77|FL-9001^SCHEDAPP^2.16.840.1.113883.19.4.1^ISO||||{sch6}"
        "|FOLLOWUP^Follow up visit^HL70276|Normal^Routine schedule request type^HL70277|30"
        f"|min^minutes^UCUM|{sch11}||||||||||||||{sch25}"
        "|ORD-55^ORDERAPP^2.16.840.1.113883.19.4.2^ISO|FORD-56^SCHEDAPP^"
        "2.16.840.1.113883.19.4.1^ISO",
    ]
    if tq1 is not None:
        segments.append(tq1)
    segments += [
        "PID|1||MRN-4471^^^NORTHCLINIC&2.16.840.1.113883.19.5&ISO^MR||Quillfeather^Marisol^J"
        "||19790214|F",
        "RGS|1|A",
        ais if ais is not None else
        "AIS|1|A|99213^Office visit, established patient^C4|20250317093000-0500|||30|min",
        "AIG|1|A|ULTRA-2^Ultrasound suite 2^L|EQ^Equipment^HL70182|||||||||"
        "Booked^Booked^HL70278",
        "AIL|1|A|CARDIO^204^B^NORTHCLINIC|CLINIC^Clinic^HL70305||20250317093000-0500||||||"
        "Pending^Pending^HL70278",
        "AIP|1|A|1098765432^Okonkwo-Lindqvist^Tobias^R^^Dr^^^&2.16.840.1.113883.4.6&ISO^^^^NPI"
        "|ATND^Attending^HL70443||20250317093000-0500||||||Booked^Booked^HL70278",
    ]
    return v2(*segments)


@pytest.mark.parametrize(("event", "sch25", "status"), [
    ("S12", "Booked^Booked^HL70278", "booked"),
    ("S13", "Booked^Booked^HL70278", "booked"),
    ("S14", "Waitlist^Waitlist^HL70278", "waitlist"),
    ("S14", "", "booked"),
    ("S14", "Blocked^Blocked^HL70278", "booked"),
    ("S12", "Complete^Complete^HL70278", "fulfilled"),
    ("S15", "Booked^Booked^HL70278", "cancelled"),
    ("S15", "Cancelled^Cancelled^HL70278", "cancelled"),
    ("S17", "Booked^Booked^HL70278", "entered-in-error"),
    ("S17", "Deleted^Deleted^HL70278", "entered-in-error"),
    ("S26", "Booked^Booked^HL70278", "noshow"),
    ("S26", "Noshow^No show^HL70278", "noshow"),
])
def test_appointment_status_comes_from_the_event_then_sch_25(event: str, sch25: str,
                                                             status: str) -> None:
    appointment = one(translate(siu(event, sch25)), "Appointment")
    assert appointment["status"] == status


def test_appointment_fields_and_participants() -> None:
    bundle = translate(siu("S12"))
    appointment = one(bundle, "Appointment")
    patient = one(bundle, "Patient")

    filler, placer = appointment["identifier"]
    assert (filler["value"], filler["system"], _type_code(filler)) == (
        "FL-9001", SCH_SENDER, "FILL")
    assert (placer["value"], _type_code(placer)) == ("PL-77", "PLAC")
    assert "system" not in placer
    # The filler id with its system is the business key: a resend updates the appointment.
    request = next(e["request"] for e in bundle["entry"] if e["resource"] is appointment)
    assert request == {"method": "PUT",
                       "url": f"Appointment?identifier={SCH_SENDER}|FL-9001"}

    assert appointment["start"] == "2025-03-17T09:30:00-05:00"
    assert appointment["end"] == "2025-03-17T10:00:00-05:00"
    assert appointment["minutesDuration"] == 30
    reason = appointment["reasonCode"][0]["coding"]
    assert reason[0] == {"system": "http://snomed.info/sct", "code": "185389009"}
    assert reason[1]["code"] == "FOLLOWUP"
    assert reason[1]["system"] == "http://terminology.hl7.org/CodeSystem/v2-0276"
    assert appointment["appointmentType"]["coding"][0] == {
        "code": "Normal", "display": "Routine schedule request type",
        "system": "http://terminology.hl7.org/CodeSystem/v2-0277"}
    assert appointment["serviceType"][0]["coding"][0] == {
        "code": "99213", "display": "Office visit, established patient",
        "system": "http://www.ama-assn.org/go/cpt"}
    # The orders by number (SCH-26/27), then the ServiceRequest the AIS service makes.
    based_on = [b["identifier"] for b in appointment["basedOn"] if "identifier" in b]
    service = one(bundle, "ServiceRequest")
    assert appointment["basedOn"][-1] == {"reference": ref(bundle, service)}
    assert [(i["value"], i["system"], _type_code(i)) for i in based_on] == [
        ("ORD-55", SCH_PLACER, "PLAC"), ("FORD-56", SCH_SENDER, "FILL")]
    assert "cancelationReason" not in appointment

    patient_part, equipment, room, doctor = appointment["participant"]
    assert patient_part == {"actor": {"reference": ref(bundle, patient)}, "status": "accepted"}

    assert equipment["status"] == "accepted"
    assert equipment["type"][0]["coding"][0]["code"] == "EQ"
    suite = _by_ref(bundle, equipment["actor"]["reference"])
    assert suite["resourceType"] == "Location"
    assert suite["identifier"] == [{"value": "ULTRA-2", "system": "L"}]
    assert suite["name"] == "Ultrasound suite 2"

    assert room["status"] == "tentative"  # AIL-12 Pending
    assert room["period"] == {"start": "2025-03-17T09:30:00-05:00"}
    assert room["type"][0]["coding"][0]["code"] == "CLINIC"
    location = _by_ref(bundle, room["actor"]["reference"])
    assert location["resourceType"] == "Location"
    # AIL-3 CARDIO^204^B^NORTHCLINIC: bed B of room 204 of CARDIO, at NORTHCLINIC
    chain = [location["name"]]
    while "partOf" in location:
        location = _by_ref(bundle, location["partOf"]["reference"])
        chain.append(location["name"])
    assert chain == ["B", "204", "CARDIO", "NORTHCLINIC"]

    assert doctor["status"] == "accepted"
    assert doctor["period"] == {"start": "2025-03-17T09:30:00-05:00"}
    assert doctor["type"][0]["coding"][0]["code"] == "ATND"
    practitioner = _by_ref(bundle, doctor["actor"]["reference"])
    assert practitioner["resourceType"] == "Practitioner"
    assert practitioner["identifier"][0]["value"] == "1098765432"
    assert practitioner["name"][0]["family"] == "Okonkwo-Lindqvist"
    assert practitioner["name"][0]["given"] == ["Tobias", "R"]


def test_cancel_keeps_the_event_reason() -> None:
    appointment = one(translate(siu("S15", sch6="PATREQ^Patient request^HL70276")),
                      "Appointment")
    assert appointment["status"] == "cancelled"
    assert appointment["cancelationReason"]["coding"][0]["code"] == "PATREQ"


def test_times_come_from_tq1_then_ais_when_sch_11_is_empty() -> None:
    tq1 = "TQ1|1||||||20250401140000+0200|20250401144500+0200||||||45^min&minutes&UCUM"
    appointment = one(translate(siu("S12", sch11="", tq1=tq1)), "Appointment")
    assert appointment["start"] == "2025-04-01T14:00:00+02:00"
    assert appointment["end"] == "2025-04-01T14:45:00+02:00"
    assert appointment["minutesDuration"] == 30  # SCH-9 comes first

    ais = "AIS|1|A|99213^Office visit^C4|202504021015||||20|min"
    appointment = one(translate(siu("S12", sch11="", ais=ais)), "Appointment")
    assert appointment["start"] == "2025-04-02T10:15:00-05:00"  # MSH-7's offset


def test_appointment_start_that_is_not_a_date_names_the_field() -> None:
    with pytest.raises(TranslationError) as caught:
        translate(siu("S12", sch11="^^^20251345093000"))
    assert caught.value.location.startswith("SCH-11.4")


# -- VXU: Immunization --------------------------------------------------------------------

VXU = (
    "MSH|^~\\&|CLINICEHR|LAKESIDE PEDS|STATEIIS|STATE|20250512103000-0400||VXU^V04^VXU_V04"
    "|VXU0042|P|2.5.1|||ER|AL",
    "PID|1||PT-20931^^^LAKESIDE&2.16.840.1.113883.19.7&ISO^MR||Brightwater^Oliver^Kai"
    "||20230301|M",
    "ORC|RE|PLC-881^CLINICEHR|IMM-5521^LAKESIDE^2.16.840.1.113883.19.7.9^ISO||||||"
    "20250512101500-0400|||1457293810^Vasquez-Hale^Priya^^^^^^&2.16.840.1.113883.4.6&ISO"
    "^^^^NPI",
    "RXA|0|1|20250512100500-0400||20^DTaP^CVX|0.5|mL^milliliter^UCUM||00^New record^NIP001"
    "|88213^Tennant^Rosalind^^^^^^&2.16.840.1.113883.19.7.3&ISO|||||U4429AB|20260131"
    "|SKB^GlaxoSmithKline^MVX|||CP|A|20250512101000-0400",
    "RXR|IM^Intramuscular^HL70162|LT^Left Thigh^HL70163",
    "OBX|1|CE|64994-7^Vaccine funding program eligibility category^LN|1|V02^VFC eligible"
    " - Medicaid^HL70064||||||F|||20250512",
)


def test_immunization_fields() -> None:
    bundle = translate(v2(*VXU))
    immunization = one(bundle, "Immunization")
    patient = one(bundle, "Patient")

    filler, placer = immunization["identifier"]
    assert (filler["value"], filler["system"], _type_code(filler)) == (
        "IMM-5521", "urn:oid:2.16.840.1.113883.19.7.9", "FILL")
    assert (placer["value"], _type_code(placer)) == ("PLC-881", "PLAC")
    assert immunization["patient"] == {"reference": ref(bundle, patient)}
    assert immunization["status"] == "completed"
    assert "isSubpotent" not in immunization
    assert immunization["occurrenceDateTime"] == "2025-05-12T10:05:00-04:00"
    assert immunization["recorded"] == "2025-05-12T10:15:00-04:00"  # ORC-9 before RXA-22
    assert immunization["vaccineCode"]["coding"] == [
        {"code": "20", "display": "DTaP", "system": "http://hl7.org/fhir/sid/cvx"}]
    assert immunization["doseQuantity"] == {
        "value": 0.5, "code": "mL", "system": "http://unitsofmeasure.org",
        "unit": "milliliter"}
    assert immunization["primarySource"] is True
    assert immunization["lotNumber"] == "U4429AB"
    assert immunization["expirationDate"] == "2026-01-31"

    manufacturer = _by_ref(bundle, immunization["manufacturer"]["reference"])
    assert manufacturer["resourceType"] == "Organization"
    assert manufacturer["identifier"] == [{"value": "SKB",
                                           "system": "http://hl7.org/fhir/sid/mvx"}]
    assert manufacturer["name"] == "GlaxoSmithKline"

    functions = {p["function"]["coding"][0]["code"]: p for p in immunization["performer"]}
    assert {p["function"]["coding"][0]["system"] for p in functions.values()} == {V2_0443}
    ordering = _by_ref(bundle, functions["OP"]["actor"]["reference"])
    assert ordering["name"][0]["family"] == "Vasquez-Hale"
    administering = _by_ref(bundle, functions["AP"]["actor"]["reference"])
    assert administering["name"][0]["family"] == "Tennant"
    npi = administering["identifier"][0]
    assert _by_ref(bundle, npi.pop("assigner")["reference"])["identifier"] == [{
        "value": "urn:oid:2.16.840.1.113883.19.7.3", "system": "urn:ietf:rfc:3986",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0301",
                             "code": "ISO"}]}}]
    assert npi == {"value": "88213", "system": "urn:oid:2.16.840.1.113883.19.7.3"}

    route = immunization["route"]["coding"]
    assert route[0] == {"system": "http://terminology.hl7.org/CodeSystem/v3-RouteOfAdministration",
                        "code": "IM", "display": "Injection, intramuscular"}
    assert route[1]["code"] == "IM"
    assert immunization["site"]["coding"][0] == {
        "code": "LT", "display": "Left Thigh",
        "system": "http://terminology.hl7.org/CodeSystem/v2-0163"}

    observation = one(bundle, "Observation")
    assert observation["partOf"] == [{"reference": ref(bundle, immunization)}]
    assert observation["subject"] == {"reference": ref(bundle, patient)}


@pytest.mark.parametrize(("rxa20", "rxa21", "status", "subpotent"), [
    ("CP", "A", "completed", None),
    ("PA", "A", "completed", True),
    ("RE", "A", "not-done", None),
    ("NA", "U", "not-done", None),
    ("", "A", "completed", None),
    ("CP", "D", "entered-in-error", None),
])
def test_immunization_status(rxa20: str, rxa21: str, status: str,
                             subpotent: bool | None) -> None:
    rxa = VXU[3].replace("|CP|A|", f"|{rxa20}|{rxa21}|")
    immunization = one(translate(v2(*VXU[:3], rxa, *VXU[4:])), "Immunization")
    assert immunization["status"] == status
    assert immunization.get("isSubpotent") is subpotent


def test_historical_record_with_unknown_amount() -> None:
    rxa = ("RXA|0|1|20190415||08^Hep B, adolescent or pediatric^CVX|999|||01^Historical"
           " information - source unspecified^NIP001||||||||||CP|A")
    bundle = translate(v2(*VXU[:3], rxa))
    immunization = one(bundle, "Immunization")
    assert immunization["occurrenceDateTime"] == "2019-04-15"
    assert immunization["primarySource"] is False
    assert "doseQuantity" not in immunization
    translation = translator().translate(parse_message(v2(*VXU[:3], rxa)))
    assert "RXA-6" not in translation.unmapped  # 999 is deliberately left out


def test_bad_administration_date_names_rxa_3() -> None:
    rxa = VXU[3].replace("|20250512100500-0400|", "|20250230|")
    with pytest.raises(TranslationError) as caught:
        translate(v2(*VXU[:3], rxa))
    assert caught.value.location == "RXA-3"
    assert "RXA-3" in caught.value.safe_text and "20250230" not in caught.value.safe_text


# -- RDE, OMP: MedicationRequest ----------------------------------------------------------

RDE = (
    "MSH|^~\\&|CPOE|RIVERBEND|PHARM|RIVERBEND|20250602143000+0100||RDE^O11^RDE_O11|RDE7781"
    "|P|2.5.1",
    "PID|1||RB-66120^^^RIVERBEND&2.16.840.1.113883.19.8&ISO^MR||Ashgrove^Delphine||19620909|F",
    "PV1|1|I|WARD7^712^A^RIVERBEND||||||||||||||||V-88014^^^RIVERBEND&2.16.840.1.113883.19.8"
    "&ISO^VN",
    "ORC|NW|RX-40012^CPOE^2.16.840.1.113883.19.8.1^ISO|PH-7719^PHARM^2.16.840.1.113883.19.8.2"
    "^ISO|GRP-12^CPOE^2.16.840.1.113883.19.8.1^ISO|SC||||20250602142500+0100"
    "|1550||1962551234^Marchetti^Lorenzo^^^^^^&2.16.840.1.113883.4.6&ISO^^^^NPI",
    "RXO|197361^Amlodipine 5 MG Oral Tablet^RXNORM|5||mg",
    "RXE|^BID^^20250602150000+0100^20250702150000+0100|197361^Amlodipine 5 MG Oral Tablet"
    "^RXNORM|5||mg^milligram^UCUM||WF^With food^L|||30|{tbl}^tablet^UCUM|2|||RXN-99031",
    "TQ1|1||BID",
    "RXR|PO^Oral^HL70162",
)


def test_medication_request_fields() -> None:
    bundle = translate(v2(*RDE))
    request = one(bundle, "MedicationRequest")
    placer, filler, rx_number = request["identifier"]
    assert (placer["value"], placer["system"], _type_code(placer)) == (
        "RX-40012", "urn:oid:2.16.840.1.113883.19.8.1", "PLAC")
    assert (filler["value"], filler["system"], _type_code(filler)) == (
        "PH-7719", "urn:oid:2.16.840.1.113883.19.8.2", "FILL")
    assert (rx_number["value"], _type_code(rx_number)) == ("RXN-99031", "FILL")
    assert request["groupIdentifier"] == {"value": "GRP-12",
                                          "system": "urn:oid:2.16.840.1.113883.19.8.1"}
    assert request["status"] == "active"  # ORC-5 SC before ORC-1
    assert request["intent"] == "filler-order"  # the pharmacy's encoding (RXE)
    assert request["authoredOn"] == "2025-06-02T14:25:00+01:00"
    assert request["subject"] == {"reference": ref(bundle, one(bundle, "Patient"))}
    assert request["encounter"] == {"reference": ref(bundle, one(bundle, "Encounter"))}
    requester = _by_ref(bundle, request["requester"]["reference"])
    assert requester["name"][0]["family"] == "Marchetti"
    recorder = _by_ref(bundle, request["recorder"]["reference"])
    assert recorder["identifier"][0]["value"] == "1550"

    assert request["medicationCodeableConcept"]["coding"] == [{
        "code": "197361", "display": "Amlodipine 5 MG Oral Tablet",
        "system": "http://www.nlm.nih.gov/research/umls/rxnorm"}]
    dosage, route_dosage = request["dosageInstruction"]
    assert dosage["timing"] == {"code": {"text": "BID"}, "repeat": {"boundsPeriod": {
        "start": "2025-06-02T15:00:00+01:00", "end": "2025-07-02T15:00:00+01:00"}}}
    assert dosage["doseAndRate"] == [{"doseQuantity": {
        "value": 5, "unit": "milligram", "code": "mg",
        "system": "http://unitsofmeasure.org"}}]
    assert dosage["additionalInstruction"][0]["coding"][0]["code"] == "WF"
    # RXR is its own segment: its route lands in a Dosage of its own (see the report).
    assert route_dosage["route"]["coding"][0]["code"] == "PO"
    assert request["dispenseRequest"] == {
        "quantity": {"value": 30, "unit": "tablet", "code": "{tbl}",
                     "system": "http://unitsofmeasure.org"},
        "numberOfRepeatsAllowed": 2}
    translation = translator().translate(parse_message(v2(*RDE)))
    assert translation.unmapped.get("RXO") == 1  # RXE is the pharmacy's order in RDE


def test_dose_range_and_bare_units() -> None:
    rxe = "RXE||311989^Morphine 2 MG/ML Injection^RXNORM|2|4|mg|||||1|mL"
    request = one(translate(v2(*RDE[:4], rxe)), "MedicationRequest")
    assert request["dosageInstruction"][0]["doseAndRate"] == [{"doseRange": {
        "low": {"value": 2, "unit": "mg"}, "high": {"value": 4}}}]
    assert request["dispenseRequest"]["quantity"] == {"value": 1, "unit": "mL"}


@pytest.mark.parametrize(("orc1", "orc5", "status"), [
    ("NW", "", "active"),
    ("OC", "", "cancelled"),
    ("OD", "", "stopped"),
    ("OH", "", "on-hold"),
    ("CA", "", "active"),
    ("XO", "CM", "completed"),
    ("NW", "ER", "entered-in-error"),
    ("ZZ", "", "unknown"),
])
def test_medication_request_status(orc1: str, orc5: str, status: str) -> None:
    orc = f"ORC|{orc1}|RX-40012^CPOE^2.16.840.1.113883.19.8.1^ISO|||{orc5}"
    request = one(translate(v2(*RDE[:3], orc, RDE[5])), "MedicationRequest")
    assert request["status"] == status


def test_omp_order_maps_rxo() -> None:
    message = v2(
        RDE[0].replace("RDE^O11^RDE_O11", "OMP^O09^OMP_O09"), RDE[1], RDE[3],
        "RXO|197361^Amlodipine 5 MG Oral Tablet^RXNORM|5|10|mg^milligram^UCUM|||||G||60"
        "|TAB^tablet^L|3|1962551234^Marchetti^Lorenzo",
        "RXR|PO^Oral^HL70162")
    request = one(translate(message), "MedicationRequest")
    assert request["intent"] == "original-order"
    assert request["medicationCodeableConcept"]["coding"][0]["code"] == "197361"
    assert request["dosageInstruction"][0]["doseAndRate"] == [{"doseRange": {
        "low": {"value": 5, "unit": "milligram", "code": "mg",
                "system": "http://unitsofmeasure.org"},
        "high": {"value": 10}}}]
    assert request["substitution"]["allowedCodeableConcept"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0161", "code": "G",
        "display": "Allow generic substitutions"}
    assert request["dispenseRequest"] == {
        "quantity": {"value": 60, "unit": "tablet", "code": "TAB", "system": "L"},
        "numberOfRepeatsAllowed": 3}
    assert request["dosageInstruction"][1]["route"]["coding"][0]["code"] == "PO"


# -- RDS: MedicationDispense --------------------------------------------------------------

RDS = (
    "MSH|^~\\&|PHARM|RIVERBEND|EHR|RIVERBEND|20250603091500+0100||RDS^O13^RDS_O13|RDS3310"
    "|P|2.5.1",
    RDE[1], RDE[2],
    "ORC|RE|RX-40012^CPOE^2.16.840.1.113883.19.8.1^ISO|PH-7719^PHARM^2.16.840.1.113883.19.8.2"
    "^ISO",
    RDE[5],
    "RXD|1|197361^Amlodipine 5 MG Oral Tablet^RXNORM|20250603090000+0100|30|{tbl}^tablet^UCUM"
    "||RXN-99031||Counselled on dizziness~Blister pack|77120^Nakagawa-Reyes^Hana|G",
    "RXR|PO^Oral^HL70162",
)


def test_medication_dispense_fields() -> None:
    bundle = translate(v2(*RDS))
    dispense = one(bundle, "MedicationDispense")
    assert dispense["status"] == "completed"
    assert dispense["subject"] == {"reference": ref(bundle, one(bundle, "Patient"))}
    assert dispense["context"] == {"reference": ref(bundle, one(bundle, "Encounter"))}
    # The prescription is the MedicationRequest the ORC and its RXE make.
    request = one(bundle, "MedicationRequest")
    assert dispense["authorizingPrescription"] == [{"reference": ref(bundle, request)}]
    identifier = request["identifier"][0]
    assert (identifier["value"], identifier["system"], _type_code(identifier)) == (
        "RX-40012", "urn:oid:2.16.840.1.113883.19.8.1", "PLAC")
    assert request["intent"] == "filler-order"
    assert request["medicationCodeableConcept"]["coding"][0]["code"] == "197361"
    assert request["subject"] == dispense["subject"]
    assert dispense["medicationCodeableConcept"]["coding"][0]["code"] == "197361"
    assert dispense["whenHandedOver"] == "2025-06-03T09:00:00+01:00"
    assert dispense["quantity"] == {"value": 30, "unit": "tablet", "code": "{tbl}",
                                    "system": "http://unitsofmeasure.org"}
    assert dispense["note"] == [{"text": "Counselled on dizziness"},
                                {"text": "Blister pack"}]
    dispenser = _by_ref(bundle, dispense["performer"][0]["actor"]["reference"])
    assert dispenser["name"][0]["family"] == "Nakagawa-Reyes"
    assert dispense["substitution"]["wasSubstituted"] is True
    assert dispense["substitution"]["type"]["coding"][0]["code"] == "G"
    assert dispense["dosageInstruction"][0]["route"]["coding"][0]["code"] == "PO"
    assert len(resources(bundle, "MedicationRequest")) == 1  # the prescription


def test_dispense_without_substitution() -> None:
    rxd = RDS[5].replace("|77120^Nakagawa-Reyes^Hana|G", "|77120^Nakagawa-Reyes^Hana|N")
    dispense = one(translate(v2(*RDS[:5], rxd)), "MedicationDispense")
    assert dispense["substitution"] == {"wasSubstituted": False}


# -- MDM: DocumentReference ---------------------------------------------------------------

PDF = base64.b64encode(b"%PDF-1.4 synthetic discharge summary").decode()
MDM = (
    "MSH|^~\\&|TRANSCRIBE|HARBORVIEW|EHR|HARBORVIEW|20250704181500-0700||MDM^T02^MDM_T02"
    "|MDM55120|P|2.5.1",
    "EVN|T02|20250704181500-0700",
    "PID|1||HV-30077^^^HARBORVIEW&2.16.840.1.113883.19.9&ISO^MR||Fairweather^Cosimo||19880521|M",
    "PV1|1|O|CLINIC3^^^HARBORVIEW||||||||||||||||V-12004^^^HARBORVIEW&2.16.840.1.113883.19.9"
    "&ISO^VN",
    "TXA|1|DS^Discharge summary^L|TX|20250704160000-0700|2288^Abernathy-Cole^Miriam|"
    "20250704173000-0700|||2288^Abernathy-Cole^Miriam|3390^Sorensen^Idris||"
    "DOC-81003^TRANSCRIBE^2.16.840.1.113883.19.9.4^ISO|DOC-80990^TRANSCRIBE^"
    "2.16.840.1.113883.19.9.4^ISO|||DS_81003.RTF|AU|R|AV||||||Discharge summary, cardiology",
    "OBX|1|TX|18842-5^Discharge summary^LN||Patient discharged in stable condition."
    "~Follow up in two weeks.||||||F",
    "OBX|2|FT|18842-5^Discharge summary^LN||Medications:\\.br\\amlodipine 5 mg daily||||||F",
    f"OBX|3|ED|18842-5^Discharge summary^LN||TRANSCRIBE^AP^PDF^Base64^{PDF}||||||F",
    "OBX|4|ED|18842-5^Discharge summary^LN||TRANSCRIBE^TEXT^^A^Plain note, sent as ASCII"
    "||||||F",
)
DOC_SYSTEM = "urn:oid:2.16.840.1.113883.19.9.4"


def _text(content: Json) -> str:
    return base64.b64decode(content["attachment"]["data"]).decode()


def test_document_reference_fields_and_content() -> None:
    bundle = translate(v2(*MDM))
    document = one(bundle, "DocumentReference")
    patient = one(bundle, "Patient")
    assert document["masterIdentifier"] == {"value": "DOC-81003", "system": DOC_SYSTEM}
    assert document["identifier"] == [{"value": "DOC-81003", "system": DOC_SYSTEM},
                                      {"value": "DS_81003.RTF"}]
    request = next(e["request"] for e in bundle["entry"] if e["resource"] is document)
    assert request == {"method": "PUT",
                       "url": f"DocumentReference?identifier={DOC_SYSTEM}|DOC-81003"}
    assert document["status"] == "current"
    assert document["docStatus"] == "final"
    assert document["type"]["coding"][0] == {"code": "DS", "display": "Discharge summary",
                                             "system": "L"}
    assert document["securityLabel"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0272", "code": "R",
        "display": "Restricted"}
    assert document["date"] == "2025-07-04T17:30:00-07:00"  # TXA-6 before TXA-4
    assert document["context"]["period"] == {"start": "2025-07-04T16:00:00-07:00"}
    assert document["context"]["encounter"] == [
        {"reference": ref(bundle, one(bundle, "Encounter"))}]
    assert document["subject"] == {"reference": ref(bundle, patient)}
    assert document["description"] == "Discharge summary, cardiology"
    assert document["relatesTo"] == [{"code": "appends", "target": {"identifier": {
        "value": "DOC-80990", "system": DOC_SYSTEM}}}]
    authors = [_by_ref(bundle, a["reference"]) for a in document["author"]]
    assert [a["name"][0]["family"] for a in authors] == ["Abernathy-Cole"]
    authenticator = _by_ref(bundle, document["authenticator"]["reference"])
    assert authenticator["name"][0]["family"] == "Sorensen"

    line1, line2, formatted, pdf, ascii_text = document["content"]
    assert line1["attachment"]["contentType"] == "text/plain"
    assert _text(line1) == "Patient discharged in stable condition."
    assert _text(line2) == "Follow up in two weeks."
    assert _text(formatted) == "Medications:\namlodipine 5 mg daily"
    assert pdf["attachment"] == {"contentType": "application/pdf", "data": PDF,
                                 "creation": "2025-07-04T17:30:00-07:00"}  # TXA-6
    assert all(c["attachment"]["creation"] == "2025-07-04T17:30:00-07:00"
               for c in document["content"])
    assert ascii_text["attachment"]["contentType"] == "text/plain"
    assert _text(ascii_text) == "Plain note, sent as ASCII"


def test_document_cancel_t11_marks_the_same_document_entered_in_error() -> None:
    original = translate(v2(*MDM))
    cancel = translate(v2(MDM[0].replace("MDM^T02^MDM_T02", "MDM^T11^MDM_T01"), MDM[1],
                          MDM[2], MDM[4].replace("|AU|R|AV|", "|AU|R|AV|")))
    document = one(cancel, "DocumentReference")
    assert document["status"] == "entered-in-error"
    assert document["docStatus"] == "entered-in-error"
    # No OBX: TXA-3 says what the content was, as FHIR needs a content.
    assert document["content"] == [{"attachment": {
        "contentType": "text/plain", "creation": "2025-07-04T17:30:00-07:00"}}]
    assert ref(cancel, document) == ref(original, one(original, "DocumentReference"))


@pytest.mark.parametrize(("txa17", "txa19", "status", "doc_status"), [
    ("AU", "AV", "current", "final"),
    ("DI", "", "current", "preliminary"),
    ("LA", "OB", "superseded", "final"),
    ("IP", "UN", "current", "preliminary"),
    ("AU", "CA", "entered-in-error", "final"),
])
def test_document_status(txa17: str, txa19: str, status: str, doc_status: str) -> None:
    txa = MDM[4].replace("|AU|R|AV|", f"|{txa17}|R|{txa19}|")
    document = one(translate(v2(*MDM[:4], txa, MDM[5])), "DocumentReference")
    assert (document["status"], document["docStatus"]) == (status, doc_status)


def test_bad_base64_names_the_obx_value() -> None:
    obx = "OBX|1|ED|18842-5^Discharge summary^LN||TRANSCRIBE^AP^PDF^Base64^not*base64||||||F"
    with pytest.raises(TranslationError) as caught:
        translate(v2(*MDM[:5], obx))
    assert "OBX" in caught.value.location and caught.value.location.endswith("-5.5")


def test_authentication_person_when_no_authenticator_is_assigned() -> None:
    txa = MDM[4].replace("|3390^Sorensen^Idris|", "||")
    txa = txa.replace("|AU|R|AV||||||", "|AU|R|AV|||4410^Ruiz-Tanaka^Elena^^^^^^^^^^^"
                                         "20250704180000-0700|||")
    bundle = translate(v2(*MDM[:4], txa, MDM[5]))
    document = one(bundle, "DocumentReference")
    authenticator = _by_ref(bundle, document["authenticator"]["reference"])
    assert authenticator["identifier"][0]["value"] == "4410"
    assert authenticator["name"][0] == {"family": "Ruiz-Tanaka", "given": ["Elena"]}


_MINE = re.compile(rb"MSH\|[^\r\n]*\|(SIU|VXU|RDE|RDS|OMP|MDM)\^")


@pytest.mark.parametrize("path", sorted(
    p for p in REFERENCE.rglob("*.hl7") if _MINE.search(p.read_bytes())),
    ids=lambda p: p.name)  # type: ignore[no-any-return]
def test_reference_messages_translate_or_are_refused_clearly(path: Path) -> None:
    raw = path.read_bytes()
    try:
        bundle = translate(raw)
    except TranslationError as exc:
        assert exc.location  # refused, naming where
        return
    assert resources(bundle, "Provenance")


@pytest.mark.parametrize(("field", "type_code"), [
    (12, None),  # placer contact person: the Guide's type is still a placeholder
    (16, None),  # filler contact person
    (20, "enterer"),  # entered by person
])
def test_sch_contact_people_take_part_in_the_appointment(field: int,
                                                          type_code: str | None) -> None:
    raw = siu("S12").decode().split("\r")
    sch = raw[1].split("|")
    sch[field] = "7781^Marsh^Ines^^^^^^NORTHCLINIC&2.16.840.1.113883.19.5&ISO"
    raw[1] = "|".join(sch)
    bundle = translate("\r".join(raw).encode())
    appointment = one(bundle, "Appointment")
    people = [(p, _by_ref(bundle, p["actor"]["reference"]))
              for p in appointment["participant"]]
    [taking_part] = [p for p, actor in people if actor["resourceType"] == "Practitioner"
                     and actor["name"][0]["family"] == "Marsh"]
    assert taking_part["status"] == "accepted"
    assert [c["code"] for t in taking_part.get("type", []) for c in t["coding"]] == (
        [type_code] if type_code else [])
    person = _by_ref(bundle, taking_part["actor"]["reference"])
    authority = _by_ref(bundle, person["identifier"][0]["assigner"]["reference"])
    assert [i["value"] for i in authority["identifier"]] == [
        "NORTHCLINIC", "urn:oid:2.16.840.1.113883.19.5"]
