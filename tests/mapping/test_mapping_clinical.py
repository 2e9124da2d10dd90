"""Orders, results and clinical segments added for the reference corpus (issue 14), field by
field: RF1 (referral), ACC (accident), PDA (death and autopsy), PV2-25 (visit priority),
OBR[Specimen], SPM parents and identifiers, FT1 with a drug, TQ1 of an encoded pharmacy
order, AIS[ServiceRequest] and the ORC order of a VXU.

The messages are `tests/messages/mapping_<structure>_clinical.hl7` (invented people, places
and numbers). Every Bundle is validated with the R4 models by `translate()`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from gateway.hl7.message import parse_message
from gateway.mapping.errors import TranslationError
from support.mapping import Json, one, ref, resources, translate, translator

MESSAGES = Path(__file__).parents[1] / "messages"
V2_0136 = "http://terminology.hl7.org/CodeSystem/v2-0136"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
UCUM = "http://unitsofmeasure.org"
LOCAL_OBSERVATION = "urn:isthmus:code-system:observation-code"


def message(structure: str) -> bytes:
    return (MESSAGES / f"mapping_{structure}_clinical.hl7").read_bytes()


@cache
def _bundle(structure: str) -> Json:
    return translate(message(structure))


def bundle(structure: str) -> Json:
    return _bundle(structure)


def unmapped(data: bytes) -> dict[str, int]:
    return dict(translator().translate(parse_message(data)).unmapped)


def by_ref(data: Json, reference: dict[str, str]) -> Json:
    return next(e["resource"] for e in data["entry"] if e["fullUrl"] == reference["reference"])


def replace_segment(data: bytes, prefix: str, line: str) -> bytes:
    segments = data.split(b"\r")
    return b"\r".join(line.encode() if s.startswith(prefix.encode()) else s for s in segments)


def coded(resource: Json, code: str) -> bool:
    return any(c.get("code") == code for c in resource["code"].get("coding", []))


# -- ADT: visit priority, OBX status, RF1, ACC, PDA ----------------------------------------

def test_visit_priority_goes_through_the_encounter_priority_map_for_every_coding() -> None:
    encounter = one(bundle("adt_a01"), "Encounter")
    act_priority = "http://terminology.hl7.org/CodeSystem/v3-ActPriority"
    assert encounter["priority"]["coding"] == [
        {"system": act_priority, "code": "UR", "display": "urgent"},
        {"code": "2", "display": "Urgent",
         "system": "http://terminology.hl7.org/CodeSystem/v2-0217"},
        {"system": act_priority, "code": "EL", "display": "elective"},
        {"code": "3", "display": "Elective",
         "system": "http://terminology.hl7.org/CodeSystem/v2-0217"}]


def test_partial_result_status_has_no_fhir_code_and_is_unknown() -> None:
    heart_rate = next(o for o in resources(bundle("adt_a01"), "Observation")
                      if coded(o, "8867-4"))
    assert heart_rate["status"] == "unknown"  # OBX-11 S: the Guide gives no status
    assert unmapped(message("adt_a01")).get("OBX-11") == 1


def test_several_numbers_in_one_obx_are_components_coded_as_the_observation() -> None:
    pressure = next(o for o in resources(bundle("adt_a01"), "Observation")
                    if coded(o, "8480-6"))
    code = {"code": "8480-6", "display": "Systolic blood pressure", "system": "http://loinc.org"}
    units = {"code": "mm[Hg]", "system": UCUM, "unit": "millimeter of mercury"}
    assert pressure["component"] == [
        {"code": {"coding": [code]}, "valueQuantity": {"value": 128, **units}},
        {"code": {"coding": [code]}, "valueQuantity": {"value": 131, **units}}]
    assert "valueQuantity" not in pressure  # one number only: see the heart rate
    heart_rate = next(o for o in resources(bundle("adt_a01"), "Observation")
                      if coded(o, "8867-4"))
    assert heart_rate["valueQuantity"]["value"] == 112 and "component" not in heart_rate
    assert "OBX-5" not in unmapped(message("adt_a01"))


def referral(data: Json) -> Json:
    return next(r for r in resources(data, "ServiceRequest")
                if r["category"][0]["coding"][0]["code"] == "3457005")


def test_rf1_is_the_referral_service_request() -> None:
    data = bundle("adt_a01")
    request = referral(data)
    assert request["status"] == "on-hold"  # RF1-1 P: pending
    assert request["intent"] == "order"
    assert request["priority"] == "asap"  # RF1-2 A
    assert request["category"][1]["coding"][0]["code"] == "MED"  # RF1-3
    assert request["locationCode"][0]["coding"][0]["code"] == "I"  # RF1-5
    assert [(i["value"], i["system"]) for i in request["identifier"]] == [
        ("REF-6001", "urn:isthmus:naming-system:SYNTHCLINIC"),  # RF1-6
        ("XREF-6002", "urn:isthmus:naming-system:SYNTHREG")]  # RF1-11
    assert request["occurrencePeriod"] == {"start": "2026-04-03", "end": "2026-05-03"}
    assert request["authoredOn"] == "2026-04-03T09:30:00+01:00"  # RF1-9
    reason, reason_text = request["reasonCode"]
    assert reason["coding"][0] == {"code": "S06.0", "display": "Concussion",
                                   "system": "http://hl7.org/fhir/sid/icd-10"}
    assert reason_text == {"text": "Suspected head injury after collision"}  # RF1-14
    centre, neurologist = (by_ref(data, p) for p in request["performer"])
    assert centre["resourceType"] == "Organization"  # RF1-19
    assert centre["name"] == "SYNTH NEURO CENTRE"
    assert neurologist["name"] == [{"family": "CANARYNEURO", "given": ["Devon"],
                                    "prefix": ["Dr"]}]  # RF1-20
    assert request["note"] == [{"text": "Please see within 24 hours"}]  # RF1-24
    assert request["subject"] == {"reference": ref(data, one(data, "Patient"))}
    assert request["encounter"] == {"reference": ref(data, one(data, "Encounter"))}


def test_acc_is_an_injury_incident_observation() -> None:
    data = bundle("adt_a01")
    accident = next(o for o in resources(data, "Observation") if coded(o, "11374-6"))
    assert accident["code"]["coding"][1] == {"system": LOCAL_OBSERVATION,
                                             "code": "injury-incident"}
    assert accident["status"] == "final"
    assert accident["effectiveDateTime"] == "2026-04-03T07:15:00+01:00"  # ACC-1
    assert accident["valueString"] == "Car collision at low speed"  # ACC-8
    assert accident["identifier"] == [{"value": "ACC-6003",
                                       "system": "urn:isthmus:naming-system:SYNTHHOSP"}]
    indicators = {c["code"]["coding"][0]["code"]: c["valueCodeableConcept"]["coding"][0]
                  for c in accident["component"]}
    assert indicators == {"AJRI": {"code": "N", "system": V2_0136},  # ACC-5
                          "ADI": {"code": "N", "system": V2_0136},  # ACC-6
                          "PNI": {"code": "Y", "system": V2_0136}}  # ACC-10
    assert by_ref(data, accident["performer"][0])["name"][0]["family"] == "CANARYCLERK"


def test_pda_cause_of_death_indicators_and_procedures() -> None:
    data = bundle("adt_a01")
    cause = next(c for c in resources(data, "Condition") if coded(c, "I61.9"))  # PDA-1
    assert cause["subject"] == {"reference": ref(data, one(data, "Patient"))}
    indicators = {o["code"]["coding"][0]["code"]: o["valueCodeableConcept"]["coding"][0]
                  for o in resources(data, "Observation")
                  if o["code"]["coding"][0].get("system") == LOCAL_OBSERVATION}
    assert indicators == {"death-certificate": {"code": "Y", "system": V2_0136},  # PDA-3
                          "autopsy": {"code": "Y", "system": V2_0136},  # PDA-6
                          "coroner": {"code": "N", "system": V2_0136}}  # PDA-9
    certification, autopsy = resources(data, "Procedure")
    assert certification["code"]["coding"][0]["code"] == "death-certification"
    assert certification["status"] == "completed"
    assert certification["performedDateTime"] == "2026-04-05T14:15:00+01:00"  # PDA-4
    certifier = by_ref(data, certification["performer"][0]["actor"])  # PDA-5
    assert certifier["name"][0]["family"] == "CANARYCERT"
    assert autopsy["code"]["coding"][0]["code"] == "autopsy-performed"
    assert autopsy["performedPeriod"] == {"start": "2026-04-06T09:00:00+01:00",
                                          "end": "2026-04-06T11:30:00+01:00"}  # PDA-7
    assert by_ref(data, autopsy["performer"][0]["actor"])["name"][0]["family"] == \
        "CANARYPATH"  # PDA-8


def test_pda_without_autopsy_makes_no_autopsy_resources() -> None:
    data = replace_segment(message("adt_a01"), "PDA|",
                           "PDA|I61.9^Nontraumatic intracerebral hemorrhage^I10||Y")
    bundled = translate(data)
    assert [p["code"]["coding"][0]["code"] for p in resources(bundled, "Procedure")] == []
    assert [o["code"]["coding"][0]["code"] for o in resources(bundled, "Observation")
            if o["code"]["coding"][0].get("system") == LOCAL_OBSERVATION] == [
        "death-certificate"]


@pytest.mark.parametrize(("prefix", "line", "location"), [
    ("RF1|", "RF1|A|||||REF-1|||2026-04-03", "RF1"),
    ("ACC|", "ACC|yesterday", "ACC"),
    ("PDA|", "PDA||||20261345", "PDA"),
])
def test_a_bad_date_fails_the_message_naming_the_segment(prefix: str, line: str,
                                                         location: str) -> None:
    data = replace_segment(message("adt_a01"), prefix, line)
    with pytest.raises(TranslationError) as caught:
        translator().translate(parse_message(data))
    assert caught.value.location.startswith(location)
    assert "CANARYCLINIC" not in caught.value.safe_text


def test_an_unknown_referral_status_is_unknown_and_counted() -> None:
    data = replace_segment(message("adt_a01"), "RF1|", "RF1|X^Held^L|||||REF-1")
    request = referral(translate(data))
    assert request["status"] == "unknown"
    assert "priority" not in request
    assert unmapped(data).get("RF1-1.1") == 1


# -- ORU: the OBR's specimen, SPM parents and identifiers, FT1 with a drug -----------------

def test_obr_describes_its_specimen() -> None:
    data = bundle("oru_r01")
    from_obr = resources(data, "Specimen")[0]
    assert [(i["value"], i["type"]["coding"][0]["code"]) for i in from_obr["identifier"]] == [
        ("PL-7001", "PLAC"), ("FL-7002", "FILL")]
    collection = from_obr["collection"]
    assert collection["collectedPeriod"] == {"start": "2026-04-03T08:30:00+01:00",
                                             "end": "2026-04-03T08:35:00+01:00"}  # OBR-7/8
    assert collection["quantity"] == {"value": 10, "code": "mL", "system": UCUM,
                                      "unit": "milliliter"}  # OBR-9
    assert by_ref(data, collection["collector"])["name"][0]["family"] == "CANARYDRAW"
    assert from_obr["receivedTime"] == "2026-04-03T09:00:00+01:00"  # OBR-14
    assert from_obr["type"]["coding"][0] == {  # OBR-15.1
        "code": "BLD", "display": "Whole blood",
        "system": "http://terminology.hl7.org/CodeSystem/v2-0487"}
    assert from_obr["note"] == [{"text": "Drawn from left arm"}]  # OBR-15.3
    assert collection["bodySite"]["coding"][0]["code"] == "LACF"  # OBR-15.4
    report = one(data, "DiagnosticReport")
    assert report["specimen"][0] == {"reference": ref(data, from_obr)}


def test_spm_parents_accession_and_other_identifiers() -> None:
    data = bundle("oru_r01")
    _, first, second = resources(data, "Specimen")
    # SPM-3 names the first SPM's specimen: the reference goes to it, no stub is added.
    assert second["parent"] == [{"reference": ref(data, first)}]
    assert len({e["fullUrl"] for e in data["entry"]}) == len(data["entry"])
    assert second["accessionIdentifier"]["value"] == "ACC-7006"  # SPM-30
    assert second["accessionIdentifier"]["type"]["coding"][0]["code"] == "ACSN"
    other, shipment = second["identifier"][1:]
    assert (other["value"], other["type"]["coding"][0]["code"]) == ("OSI-7007", "PI")
    assert shipment == {"value": "SHIP-7008",
                        "system": "urn:isthmus:naming-system:SYNTHCOURIER",
                        "type": {"coding": [{"system": V2_0203, "code": "SHIP"}]}}


def test_a_parent_specimen_not_in_the_message_is_referred_to_by_its_identifiers() -> None:
    data = replace_segment(message("oru_r01"), "SPM|1|", "NTE|1||no first specimen")
    bundled = translate(data)
    child = next(s for s in resources(bundled, "Specimen")
                 if s["identifier"][0]["value"] == "SP-7004")
    parent = by_ref(bundled, child["parent"][0])
    assert [(i["value"], i["type"]["coding"][0]["code"]) for i in parent["identifier"]] == [
        ("SP-7003", "PGN"), ("SF-7005", "FGN")]
    entry = next(e for e in bundled["entry"] if e["resource"] is parent)
    assert entry["request"]["method"] == "POST"  # created only if absent


def test_txa_with_results_is_a_document_reference_of_its_own() -> None:
    data = bundle("oru_r01")
    document = one(data, "DocumentReference")
    assert document["masterIdentifier"] == {"value": "DOC-7013",
                                            "system": "urn:isthmus:naming-system:SYNTHLAB"}
    assert document["type"]["coding"][0]["code"] == "CN"  # TXA-2
    assert (document["status"], document["docStatus"]) == ("current", "final")  # TXA-19/17
    assert document["context"]["period"] == {"start": "2026-04-03T11:00:00+01:00"}  # TXA-4
    # The OBX around it stay results; the content is what TXA-3 and TXA-6 say.
    assert document["content"] == [{"attachment": {
        "contentType": "text/plain", "creation": "2026-04-03T11:30:00+01:00"}}]
    assert by_ref(data, document["author"][0])["name"][0]["family"] == "CANARYMICRO"
    assert document["subject"] == {"reference": ref(data, one(data, "Patient"))}


def test_a_txa_saying_nothing_of_its_content_says_the_content_is_unknown() -> None:
    data = replace_segment(message("oru_r01"), "TXA|", "TXA|1|CN||||||||||DOC-7014")
    document = one(translate(data), "DocumentReference")
    assert document["content"] == [{"attachment": {"extension": [{
        "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
        "valueCode": "unknown"}]}}]


def test_ft1_naming_a_drug_is_a_medication_dispense() -> None:
    data = bundle("oru_r01")
    dispense = one(data, "MedicationDispense")
    assert dispense["status"] == "unknown"
    assert dispense["medicationCodeableConcept"]["coding"][0] == {
        "code": "0409-4888-02", "display": "Sodium chloride 0.9% flush",
        "system": "http://hl7.org/fhir/sid/ndc"}  # FT1-29
    assert dispense["quantity"] == {"value": 10, "code": "mL", "system": UCUM,
                                    "unit": "milliliter"}  # FT1-43
    assert dispense["authorizingPrescription"] == [{"identifier": {"value": "RX-7010"}}]
    assert dispense["subject"] == {"reference": ref(data, one(data, "Patient"))}
    assert dispense["context"] == {"reference": ref(data, one(data, "Encounter"))}
    # The third FT1 charges a fee, neither a drug nor a procedure: it is a charge only
    # (every FT1 with a transaction code is a ChargeItem, test_mapping_people).
    assert "FT1" not in unmapped(message("oru_r01"))
    assert any(c["code"]["coding"][0]["code"] == "LABFEE"
               for c in resources(data, "ChargeItem"))


def test_ft1_naming_a_procedure_is_a_procedure() -> None:
    data = bundle("oru_r01")
    procedure = one(data, "Procedure")
    assert procedure["status"] == "unknown"
    assert procedure["code"]["coding"][0] == {  # FT1-25
        "code": "36415", "display": "Collection of venous blood by venipuncture",
        "system": "http://www.ama-assn.org/go/cpt"}
    assert procedure["performedDateTime"] == "2026-04-03T08:30:00+01:00"  # FT1-4
    assert procedure["reasonCode"][0]["coding"][0]["code"] == "R50.9"  # FT1-19
    assert by_ref(data, procedure["performer"][0]["actor"])["name"][0]["family"] == \
        "CANARYDRAW"  # FT1-20
    assert procedure["subject"] == {"reference": ref(data, one(data, "Patient"))}
    assert procedure["encounter"] == {"reference": ref(data, one(data, "Encounter"))}


# -- RDE: the TQ1 of the encoded order -----------------------------------------------------

def test_tq1_after_rxe_times_the_encoded_order() -> None:
    request = one(bundle("rde_o11"), "MedicationRequest")
    assert request["intent"] == "filler-order"
    assert request["priority"] == "stat"  # TQ1-9
    timed = next(d for d in request["dosageInstruction"] if "timing" in d)
    assert timed["timing"]["repeat"] == {
        "boundsPeriod": {"start": "2026-04-03T14:00:00+01:00",
                         "end": "2026-04-03T18:00:00+01:00"},  # TQ1-7/8
        "countMax": 1}  # TQ1-14
    assert timed["doseAndRate"][0]["doseQuantity"]["value"] == 500  # TQ1-2
    assert timed["additionalInstruction"] == [{"text": "If systolic below 90"}]  # TQ1-10
    assert timed["text"] == "Run over 4 hours"  # TQ1-11
    assert "TQ1" not in unmapped(message("rde_o11"))


# -- SIU: the services booked --------------------------------------------------------------

def test_each_ais_service_is_a_service_request_the_appointment_is_based_on() -> None:
    data = bundle("siu_s12")
    appointment = one(data, "Appointment")
    scan, ecg = resources(data, "ServiceRequest")
    assert appointment["basedOn"] == [{"reference": ref(data, scan)},
                                      {"reference": ref(data, ecg)}]
    assert scan["code"]["coding"][0] == {"code": "70450", "display": "CT head without contrast",
                                         "system": "http://www.ama-assn.org/go/cpt"}
    assert scan["occurrencePeriod"] == {"start": "2026-04-10T09:30:00+01:00"}  # AIS-4
    assert (scan["status"], scan["intent"]) == ("active", "filler-order")  # AIS-10 Booked
    assert [d["coding"][0]["code"] for d in scan["orderDetail"]] == [
        "LT", "CONTRAST-NONE"]  # AIS-11, AIS-12
    assert scan["note"] == [{"text": "Patient to remove metal items"}]  # NTE after AIS
    assert scan["subject"] == {"reference": ref(data, one(data, "Patient"))}
    assert ecg["status"] == "revoked"  # AIS-10 Cancelled
    assert "note" not in ecg


def test_tq1_timing_wins_over_the_withdrawn_sch_11() -> None:
    appointment = one(bundle("siu_s12"), "Appointment")
    assert appointment["start"] == "2026-04-10T09:30:00+01:00"
    assert appointment["end"] == "2026-04-10T10:30:00+01:00"
    without_tq1 = replace_segment(message("siu_s12"), "TQ1|", "NTE|1||no timing")
    assert one(translate(without_tq1), "Appointment")["start"] == "2026-04-10T09:00:00+01:00"


def test_an_unknown_filler_status_leaves_the_service_active_and_is_counted() -> None:
    data = replace_segment(message("siu_s12"), "AIS|2|",
                           "AIS|2||93000^Electrocardiogram^C4|||||||Paused")
    ecg = resources(translate(data), "ServiceRequest")[1]
    assert ecg["status"] == "active"
    assert unmapped(data).get("AIS-10.1") == 1


# -- VXU: the order behind the immunization ------------------------------------------------

def test_vxu_orc_is_also_a_service_request() -> None:
    data = translate((MESSAGES / "codec_v2.8_vxu_v04.hl7").read_bytes())
    order = one(data, "ServiceRequest")
    assert (order["status"], order["intent"]) == ("unknown", "order")
    assert order["identifier"][0]["value"] == "IMM28001"
    assert order["identifier"][0]["type"]["coding"][0]["code"] == "FILL"
    assert order["subject"] == {"reference": ref(data, one(data, "Patient"))}


# -- orders whose ORC is missing or comes after the OBR ------------------------------------

def test_an_oru_without_orc_makes_the_order_from_each_obr() -> None:
    data = replace_segment(message("oru_r01"), "ORC|", "NTE|1||no common order segment")
    bundled = translate(data)
    order = one(bundled, "ServiceRequest")
    assert [(i["value"], i["type"]["coding"][0]["code"]) for i in order["identifier"]] == [
        ("PL-7001", "PLAC"), ("FL-7002", "FILL")]  # OBR-2, OBR-3
    assert order["code"]["coding"][0]["code"] == "600-7"  # OBR-4
    assert (order["status"], order["intent"]) == ("unknown", "order")
    assert order["subject"] == {"reference": ref(bundled, one(bundled, "Patient"))}
    assert one(bundled, "DiagnosticReport")["basedOn"] == [{"reference": ref(bundled, order)}]


def test_an_oul_order_takes_its_obr_fields_from_the_obr_above_its_orc() -> None:
    segments = [
        "MSH|^~\\&|SYNTHLAB|SYNTHHOSP|ISTHMUS|GATEWAY|20260403150000+0100||OUL^R22^OUL_R22|"
        "CTRL-CLIN-0005|P|2.5.1",
        "PID|1||MRN-600001^^^SYNTHHOSP&1.2.3.4.5&ISO^MR||CANARYCLINIC^Quinn^Ash||19610722|M",
        "SPM|1|SP-7301&SYNTHLAB||BLD^Whole blood^HL70487",
        "OBR|1|PO-7302^SYNTHWARD|FO-7303^SYNTHLAB|2345-7^Glucose^LN|||20260403140000+0100"
        "|||||||||8808^CANARYORDER^Kai",
        "ORC|SC||||CM",
        "OBR|2|PO-7304^SYNTHWARD|FO-7305^SYNTHLAB|2951-2^Sodium^LN",
        "ORC|SC|PO-7399^SYNTHWARD|||CM",
    ]
    data = translate("\r".join(segments))
    glucose, sodium = resources(data, "ServiceRequest")
    assert [i["value"] for i in glucose["identifier"]] == ["PO-7302", "FO-7303"]
    assert glucose["code"]["coding"][0]["code"] == "2345-7"
    assert glucose["status"] == "completed"  # ORC-5
    assert by_ref(data, glucose["requester"])["name"][0]["family"] == "CANARYORDER"
    # The second ORC carries its own placer number; the filler number still comes from
    # its own OBR, never from the first group's.
    assert [i["value"] for i in sodium["identifier"]] == ["PO-7399", "FO-7305"]
    assert sodium["code"]["coding"][0]["code"] == "2951-2"
    first, second = resources(data, "DiagnosticReport")
    assert first["basedOn"] == [{"reference": ref(data, glucose)}]
    assert second["basedOn"] == [{"reference": ref(data, sodium)}]


def test_a_reference_pointer_result_is_an_attachment_url() -> None:
    data = bundle("oru_r01")
    imaging = next(o for o in resources(data, "Observation") if coded(o, "18748-4"))
    assert imaging["extension"] == [{
        "url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-Observation.value",
        "valueAttachment": {"url": "https://images.example.org/study/7014"}}]
    assert "OBX-5" not in unmapped(message("oru_r01"))
