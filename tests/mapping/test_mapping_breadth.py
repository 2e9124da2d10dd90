"""The message types added for the reference corpus (issue 14), by the tables: ADT A09 A10
A14 A15 A16 A25 A26 A27 A29 A41 A45 A47 A60, SIU S16, MDM T01 T05 T06 T09 T10, RDE O25,
OMG O19, OUL R22 R23 R24, BAR P01 P02 P12, DFT P03 P11, REF I12 I14.

One synthetic message per v2 structure (`tests/messages/mapping_<structure>.hl7`, invented
names and numbers); the events sharing a structure are the same message with another MSH-9.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.hl7.message import parse_message
from support.mapping import Json, one, ref, resources, translate, translator

MESSAGES = Path(__file__).parents[1] / "messages"
SCT = "http://snomed.info/sct"


def message(structure: str, event: str | None = None) -> bytes:
    """The structure's message, with `event` (`ADT^A10`) in MSH-9 instead of its own."""
    data = (MESSAGES / f"mapping_{structure}.hl7").read_bytes()
    if event is None:
        return data
    msh, rest = data.split(b"\r", 1)
    fields = msh.split(b"|")
    fields[8] = event.encode()
    return b"|".join(fields) + b"\r" + rest.replace(
        b"EVN|" + fields[8].split(b"^")[-1], b"EVN|" + event.split("^")[1].encode())


def at(resource: Json, path: str) -> Any:
    """A dotted path into a resource: a number picks a list element, else a list gives its first."""
    value: Any = resource
    for step in path.split("."):
        if step.isdigit():
            value = value[int(step)]
            continue
        if isinstance(value, list):
            value = value[0]
        value = value[step]
    return value


def by_ref(bundle: Json, reference: str) -> Json:
    return next(e["resource"] for e in bundle["entry"] if e["fullUrl"] == reference)


# -- every new type translates, with the resources its structure carries -------------------

TYPES = [
    ("adt_a09", "ADT^A09", {"Patient", "Encounter", "Observation"}),
    ("adt_a09", "ADT^A10", {"Patient", "Encounter", "Observation"}),
    ("adt_a09", "ADT^A15", {"Patient", "Encounter", "Observation"}),
    ("adt_a09", "ADT^A25", {"Patient", "Encounter", "Observation"}),
    ("adt_a09", "ADT^A26", {"Patient", "Encounter", "Observation"}),
    ("adt_a09", "ADT^A27", {"Patient", "Encounter", "Observation"}),
    ("adt_a09", "ADT^A29", {"Patient", "Encounter", "Observation"}),
    ("adt_a16", "ADT^A14", {"Patient", "Encounter", "AllergyIntolerance", "Condition",
                            "Procedure"}),
    ("adt_a16", "ADT^A16", {"Patient", "Encounter", "AllergyIntolerance", "Condition",
                            "Procedure"}),
    ("adt_a41", "ADT^A41", {"Patient", "Encounter"}),
    ("adt_a45", "ADT^A45", {"Patient", "Encounter"}),
    ("adt_a47", "ADT^A47", {"Patient"}),
    ("adt_a60", "ADT^A60", {"Patient", "Encounter", "AllergyIntolerance"}),
    ("siu_s16", "SIU^S16", {"Appointment", "Patient", "Practitioner"}),
    ("mdm_t01", "MDM^T01", {"Patient", "Encounter", "ServiceRequest", "DocumentReference"}),
    ("mdm_t01", "MDM^T05", {"Patient", "Encounter", "ServiceRequest", "DocumentReference"}),
    ("mdm_t01", "MDM^T09", {"Patient", "Encounter", "ServiceRequest", "DocumentReference"}),
    ("mdm_t06", "MDM^T06", {"Patient", "Encounter", "ServiceRequest", "DocumentReference"}),
    ("mdm_t06", "MDM^T10", {"Patient", "Encounter", "ServiceRequest", "DocumentReference"}),
    ("rde_o25", "RDE^O25", {"Patient", "Encounter", "Coverage", "MedicationRequest"}),
    ("omg_o19", "OMG^O19", {"Patient", "Encounter", "Coverage", "ServiceRequest",
                            "Condition", "Observation"}),
    ("oul_r22", "OUL^R22", {"Patient", "Encounter", "Specimen", "DiagnosticReport",
                            "ServiceRequest", "Observation"}),
    ("oul_r22", "OUL^R23", {"Patient", "Encounter", "Specimen", "DiagnosticReport",
                            "ServiceRequest", "Observation"}),
    ("oul_r24", "OUL^R24", {"Patient", "Encounter", "Specimen", "DiagnosticReport",
                            "ServiceRequest", "Observation"}),
    ("bar_p01", "BAR^P01", {"Patient", "Encounter", "Observation", "AllergyIntolerance",
                            "Condition", "Procedure", "RelatedPerson", "Coverage"}),
    ("bar_p01", "BAR^P12", {"Patient", "Encounter", "Condition", "Procedure"}),
    ("bar_p02", "BAR^P02", {"Patient", "Encounter"}),
    ("dft_p03", "DFT^P03", {"Patient", "Encounter", "ServiceRequest", "DiagnosticReport",
                            "Observation", "Procedure", "Condition", "Coverage",
                            "RelatedPerson"}),
    ("dft_p03", "DFT^P11", {"Patient", "Encounter", "ServiceRequest", "DiagnosticReport",
                            "Observation", "Procedure", "Condition", "Coverage",
                            "RelatedPerson"}),
    ("ref_i12", "REF^I12", {"Patient", "RelatedPerson", "Coverage", "Condition",
                            "AllergyIntolerance", "Procedure", "ServiceRequest",
                            "DiagnosticReport", "Observation", "Encounter"}),
    ("ref_i12", "REF^I14", {"Patient", "ServiceRequest", "DiagnosticReport"}),
]


@pytest.mark.parametrize(("structure", "event", "expected"), TYPES,
                         ids=[event for _, event, _ in TYPES])
def test_each_new_type_translates_to_the_resources_of_its_structure(
        structure: str, event: str, expected: set[str]) -> None:
    assert translator().supports(event)
    bundle = translate(message(structure, event))
    types = {e["resource"]["resourceType"] for e in bundle["entry"]}
    assert expected <= types, expected - types


# -- PR1 -> Procedure (the Guide's PR1[Procedure]) -----------------------------------------

@pytest.fixture(scope="module")
def a16() -> Json:
    return translate(message("adt_a16"))


def surgery(bundle: Json) -> Json:
    return next(p for p in resources(bundle, "Procedure") if "identifier" in p)


@pytest.mark.parametrize(("path", "value"), [
    ("identifier.value", "PROC-9001"),
    ("identifier.system", "urn:oid:1.2.3.4.5"),
    ("status", "unknown"),
    ("code.coding.code", "0DTJ4ZZ"),
    ("code.coding.display", "Resection of appendix, endoscopic"),
    ("performedDateTime", "2026-04-02T10:30:00+01:00"),
    ("category.coding.code", "S"),
    ("category.coding.system", "http://terminology.hl7.org/CodeSystem/v2-0230"),
    ("reasonCode.coding.code", "K35.80"),
    ("performer.0.function.coding.code", "88189002"),
    ("performer.0.function.coding.system", SCT),
    ("performer.1.function.coding.code", "304292004"),
])
def test_pr1_procedure_fields(a16: Json, path: str, value: str) -> None:
    assert at(surgery(a16), path) == value


@pytest.mark.parametrize(("index", "family"), [
    (0, "CANARYANES"),   # PR1-8 anesthesiologist
    (1, "CANARYSURG"),   # PR1-11 surgeon
    (2, "CANARYPROC"),   # PR1-12 procedure practitioner
])
def test_pr1_performers_are_practitioners(a16: Json, index: int, family: str) -> None:
    performer = surgery(a16)["performer"][index]
    assert by_ref(a16, performer["actor"]["reference"])["name"][0]["family"] == family


def test_pr1_procedure_points_at_patient_encounter_and_location(a16: Json) -> None:
    procedure = surgery(a16)
    assert procedure["subject"] == {"reference": ref(a16, one(a16, "Patient"))}
    assert procedure["encounter"] == {"reference": ref(a16, one(a16, "Encounter"))}
    assert by_ref(a16, procedure["location"]["reference"])["resourceType"] == "Location"
    assert "performedPeriod" not in procedure  # PR1-7 minutes: no date arithmetic


def test_a_second_pr1_is_its_own_procedure_with_a_date(a16: Json) -> None:
    second = next(p for p in resources(a16, "Procedure") if "identifier" not in p)
    assert at(second, "code.coding.code") == "44970"
    assert second["performedDateTime"] == "2026-04-02"
    assert second["status"] == "unknown" and "performer" not in second


# -- event semantics ----------------------------------------------------------------------

@pytest.mark.parametrize(("structure", "event", "status"), [
    ("adt_a09", "ADT^A09", "in-progress"),
    ("adt_a09", "ADT^A10", "in-progress"),
    ("adt_a16", "ADT^A14", "planned"),
    ("adt_a09", "ADT^A15", "in-progress"),
    ("adt_a16", "ADT^A16", "in-progress"),
    ("adt_a09", "ADT^A25", "in-progress"),
    ("adt_a09", "ADT^A26", "in-progress"),
    ("adt_a09", "ADT^A27", "cancelled"),
    ("adt_a09", "ADT^A29", "unknown"),
    ("adt_a41", "ADT^A41", "unknown"),
    ("adt_a45", "ADT^A45", "unknown"),
    ("adt_a60", "ADT^A60", "unknown"),
    ("bar_p01", "BAR^P01", "unknown"),
    ("dft_p03", "DFT^P03", "unknown"),
    ("ref_i12", "REF^I12", "unknown"),
])
def test_encounter_status_comes_from_the_event(structure: str, event: str,
                                               status: str) -> None:
    encounters = resources(translate(message(structure, event)), "Encounter")
    assert {e["status"] for e in encounters} == {status}


def test_s16_discontinues_the_appointment_with_its_reason() -> None:
    appointment = one(translate(message("siu_s16")), "Appointment")
    assert appointment["status"] == "cancelled"  # whatever SCH-25 (Booked) still reads
    assert at(appointment, "cancelationReason.coding.code") == "STOP"
    assert at(appointment, "identifier.value") == "FL-902"


@pytest.mark.parametrize(("structure", "event", "path", "value"), [
    ("mdm_t01", "MDM^T01", "relatesTo.code", "appends"),
    ("mdm_t01", "MDM^T05", "relatesTo.code", "appends"),
    ("mdm_t01", "MDM^T09", "relatesTo.code", "replaces"),
    ("mdm_t06", "MDM^T06", "relatesTo.code", "appends"),
    ("mdm_t06", "MDM^T10", "relatesTo.code", "replaces"),
    ("mdm_t01", "MDM^T01", "relatesTo.target.identifier.value", "DOC-6900"),
    ("mdm_t01", "MDM^T01", "masterIdentifier.value", "DOC-7001"),
    ("mdm_t01", "MDM^T01", "status", "current"),
    ("mdm_t01", "MDM^T01", "docStatus", "final"),
    ("mdm_t01", "MDM^T01", "type.coding.code", "CN"),
    ("mdm_t01", "MDM^T01", "content.attachment.contentType", "text/plain"),
    ("mdm_t06", "MDM^T06", "content.attachment.contentType", "text/plain"),
    ("mdm_t01", "MDM^T09", "description", "Consultation, gastroenterology"),
])
def test_mdm_document_fields_per_event(structure: str, event: str, path: str,
                                       value: str) -> None:
    document = one(translate(message(structure, event)), "DocumentReference")
    assert at(document, path) == value


def test_mdm_t06_carries_its_obx_text_as_content() -> None:
    document = one(translate(message("mdm_t06")), "DocumentReference")
    assert len(document["content"]) == 2


# -- ADT structures of their own ----------------------------------------------------------

def test_a60_adverse_reaction_with_its_comment() -> None:
    bundle = translate(message("adt_a60"))
    allergy = one(bundle, "AllergyIntolerance")
    assert at(allergy, "code.coding.code") == "227493005"
    assert allergy["category"] == ["food"]
    assert allergy["note"] == [{"text": "Reaction seen after a cashew snack"}]
    assert allergy["patient"] == {"reference": ref(bundle, one(bundle, "Patient"))}


def test_a45_moves_the_visit_to_the_pid_patient() -> None:
    bundle = translate(message("adt_a45"))
    patient, encounter = one(bundle, "Patient"), one(bundle, "Encounter")
    assert at(patient, "identifier.value") == "MRN-500001"
    assert encounter["subject"] == {"reference": ref(bundle, patient)}
    assert at(encounter, "identifier.value") == "VN-500001"
    unmapped = translator().translate(parse_message(message("adt_a45"))).unmapped
    assert unmapped.get("MRG") == 1


def test_a41_account_merge_leaves_one_patient() -> None:
    bundle = translate(message("adt_a41"))
    assert at(one(bundle, "Patient"), "identifier.value") == "MRN-500001"


def test_a47_the_old_identifier_is_replaced_by_the_pid_one() -> None:
    bundle = translate(message("adt_a47"))
    survivor, old = resources(bundle, "Patient")
    assert at(old, "identifier.value") == "MRN-500077"
    assert old["link"] == [{"other": {"reference": ref(bundle, survivor)},
                            "type": "replaced-by"}]
    assert survivor["link"][0]["type"] == "replaces"


# -- orders and results -------------------------------------------------------------------

def test_oul_report_links_specimen_order_and_result() -> None:
    bundle = translate(message("oul_r22"))
    report = one(bundle, "DiagnosticReport")
    specimen, order = one(bundle, "Specimen"), one(bundle, "ServiceRequest")
    glucose = next(o for o in resources(bundle, "Observation")
                   if at(o, "code.coding.code") == "2345-7")
    volume = next(o for o in resources(bundle, "Observation")
                  if at(o, "code.coding.code") == "1000-1")
    assert report["specimen"] == [{"reference": ref(bundle, specimen)}]
    assert report["basedOn"] == [{"reference": ref(bundle, order)}]
    assert report["result"] == [{"reference": ref(bundle, glucose)}]
    assert volume["specimen"] == {"reference": ref(bundle, specimen)}  # before any OBR
    assert glucose["note"] == [{"text": "Fasting sample"}]


@pytest.mark.parametrize(("path", "value"), [
    ("accessionIdentifier.value", None),
    ("type.coding.code", "119297000"),
    ("collection.collectedDateTime", "2026-04-02T07:00:00+01:00"),
    ("receivedTime", "2026-04-02T07:30:00+01:00"),
])
def test_oul_specimen_fields(path: str, value: str | None) -> None:
    specimen = one(translate(message("oul_r22")), "Specimen")
    if value is None:
        assert path.split(".")[0] not in specimen
    else:
        assert at(specimen, path) == value


def test_oul_r24_order_first_then_its_specimen() -> None:
    bundle = translate(message("oul_r24"))
    report = one(bundle, "DiagnosticReport")
    assert at(report, "code.coding.code") == "718-7"
    assert report["result"] == [{"reference": ref(bundle, one(bundle, "Observation"))}]
    assert at(one(bundle, "ServiceRequest"), "identifier.value") == "PO-9101"


def test_bar_p02_each_visit_belongs_to_its_own_patient() -> None:
    bundle = translate(message("bar_p02"))
    first, second = resources(bundle, "Patient")
    visits = {at(e, "identifier.value"): e["subject"]["reference"]
              for e in resources(bundle, "Encounter")}
    assert visits == {"VN-500001": ref(bundle, first), "VN-500002": ref(bundle, second)}


@pytest.mark.parametrize(("resource_type", "path", "value"), [
    ("Observation", "code.coding.code", "29463-7"),
    ("AllergyIntolerance", "code.coding.code", "7980"),
    ("Condition", "code.coding.code", "K35.80"),
    ("Procedure", "identifier.value", "PROC-9101"),
    ("Coverage", "beneficiary.reference", None),
])
def test_bar_p01_account_segments(resource_type: str, path: str, value: str | None) -> None:
    bundle = translate(message("bar_p01"))
    found = one(bundle, resource_type)
    if value is None:
        assert at(found, path) == ref(bundle, one(bundle, "Patient"))
    else:
        assert at(found, path) == value


def test_dft_order_report_observation_and_procedure() -> None:
    bundle = translate(message("dft_p03"))
    order, observation = one(bundle, "ServiceRequest"), one(bundle, "Observation")
    report = one(bundle, "DiagnosticReport")
    assert at(order, "code.coding.code") == "80053"
    assert order["intent"] == "order"
    assert report["basedOn"] == [{"reference": ref(bundle, order)}]
    assert report["result"] == [{"reference": ref(bundle, observation)}]
    assert at(observation, "interpretation.coding.code") == "H"
    assert at(one(bundle, "Procedure"), "code.coding.code") == "80053"
    charge = one(bundle, "ChargeItem")  # FT1: the financial transaction
    assert (charge["status"], at(charge, "code.coding.code")) == ("billable", "80053")
    assert charge["occurrenceDateTime"] == "2026-04-02"
    assert charge["quantity"] == {"value": 1}
    assert charge["subject"] == {"reference": ref(bundle, one(bundle, "Patient"))}


def test_ref_order_without_orc_is_a_valid_order_with_its_report() -> None:
    bundle = translate(message("ref_i12"))
    # The RF1 referral is a ServiceRequest of its own (test_mapping_clinical); the OBR's has a code.
    order = next(r for r in resources(bundle, "ServiceRequest") if "code" in r)
    report = one(bundle, "DiagnosticReport")
    assert (order["status"], order["intent"]) == ("unknown", "order")
    assert order["subject"] == {"reference": ref(bundle, one(bundle, "Patient"))}
    assert report["basedOn"] == [{"reference": ref(bundle, order)}]
    assert report["result"] == [{"reference": ref(bundle, one(bundle, "Observation"))}]
    unmapped = translator().translate(parse_message(message("ref_i12"))).unmapped
    assert "PRD" in unmapped and "RF1" not in unmapped


# -- GT1 -> RelatedPerson (the guarantor) -------------------------------------------------

def guarantor(bundle: Json) -> Json:
    return next(p for p in resources(bundle, "RelatedPerson")
                if any(c["code"] == "GUAR" for r in p["relationship"] for c in r["coding"]))


@pytest.mark.parametrize(("path", "value"), [
    ("identifier.0.value", "G-77001"),
    ("identifier.1.value", "900-00-7700"),
    ("identifier.1.system", "http://hl7.org/fhir/sid/us-ssn"),
    ("identifier.2.value", "EMP-7702"),
    ("name.family", "CANARYGUAR"),
    ("name.given", ["Pat"]),
    ("address.city", "Springfield"),
    ("telecom.0.value", "+1 555 0100031"),
    ("telecom.1.use", "work"),
    ("birthDate", "1970-08-09"),
    ("gender", "male"),
    ("relationship.0.coding.code", "SPS"),
    ("relationship.1.coding.code", "GUAR"),
    ("period.start", "2026-01-01"),
])
def test_gt1_guarantor_fields(path: str, value: object) -> None:
    assert at(guarantor(translate(message("bar_p01"))), path) == value


@pytest.mark.parametrize("structure", ["bar_p01", "dft_p03", "adt_a16", "ref_i12"])
def test_gt1_guarantor_is_related_to_the_patient(structure: str) -> None:
    bundle = translate(message(structure))
    assert guarantor(bundle)["patient"] == {"reference": ref(bundle, one(bundle, "Patient"))}


def test_nk1_next_of_kin_stays_its_own_related_person() -> None:
    bundle = translate(message("bar_p01"))
    kin = next(p for p in resources(bundle, "RelatedPerson") if p is not guarantor(bundle))
    assert at(kin, "name.family") == "CANARYKIN"
