"""Results and orders: ORU^R01, ORM^O01 and OML^O21 to FHIR R4, field by field.

The messages are files under tests/messages/results/ (invented people and places). Every Bundle
is validated with the R4B models by `translate()`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest

from gateway.hl7.message import parse_message
from gateway.mapping.errors import TranslationError
from support.mapping import Json, one, ref, resources, translate, translator

MESSAGES = Path(__file__).parents[1] / "messages" / "results"
UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
LAB_OID = "urn:oid:2.16.840.1.113883.3.9999.1"
WARD_OID = "urn:oid:2.16.840.1.113883.3.9999.2"


def message(name: str) -> bytes:
    return (MESSAGES / name).read_bytes()


@cache
def _bundle(name: str) -> Json:
    return translate(message(name))


def bundle(name: str) -> Json:
    return _bundle(name)


def oru() -> Json:
    return bundle("oru_r01_lab_results.hl7")


def unmapped(data: bytes) -> dict[str, int]:
    return dict(translator().translate(parse_message(data)).unmapped)


def observation(data: Json, code: str, nth: int = 0) -> Json:
    found = [o for o in resources(data, "Observation")
             if o["code"].get("coding", [{}])[0].get("code") == code]
    return found[nth]


def target(data: Json, reference: dict[str, str]) -> Json:
    """The resource a Reference in the Bundle points at."""
    return next(e["resource"] for e in data["entry"] if e["fullUrl"] == reference["reference"])


def identifier(value: str, system: str, type_code: str) -> Json:
    return {"value": value, "system": system,
            "type": {"coding": [{"system": V2_0203, "code": type_code}]}}


def replace_segment(data: bytes, old: str, new: str) -> bytes:
    """The fixture with one segment line replaced (bad-input variants)."""
    lines = data.decode().split("\r")
    index = next(i for i, line in enumerate(lines) if line.startswith(old))
    lines[index] = new
    return "\r".join(lines).encode()


# -- ORU^R01: observations by value type ----------------------------------------------------

@pytest.mark.parametrize(("loinc", "element", "expected"), [
    ("2345-7", "valueQuantity", {"value": 105, "unit": "milligram per deciliter",
                                 "code": "mg/dL", "system": UCUM}),
    ("8251-1", "valueString", "Sample received late"),
    ("11526-1", "valueString", "No abnormal cells seen."),
    ("18750-0", "valueString", "First line\nSecond line"),
    ("600-7", "valueCodeableConcept", {
        "coding": [{"code": "112283007", "display": "Escherichia coli",
                    "system": "http://snomed.info/sct"}],
        "text": "Escherichia coli"}),
    ("883-9", "valueCodeableConcept", {
        "coding": [{"code": "112144000", "display": "Blood group A",
                    "system": "http://snomed.info/sct"}],
        "text": "Blood group A"}),
    ("2160-0", "valueQuantity", {"comparator": "<", "value": 0.5, "unit": "mg/dL",
                                 "code": "mg/dL", "system": UCUM}),
    ("5130-0", "valueRatio", {"numerator": {"value": 1}, "denominator": {"value": 128}}),
    ("2093-3", "valueRange", {
        "low": {"value": 180, "unit": "mg/dL", "code": "mg/dL", "system": UCUM},
        "high": {"value": 200, "unit": "mg/dL", "code": "mg/dL", "system": UCUM}}),
    ("5778-6", "valueString", "2+"),
    ("11778-8", "valueDateTime", "2024-09-01"),
    ("21112-8", "valueDateTime", "2024-03-12T08:15:00+01:00"),
])
def test_obx_value_follows_the_value_type(loinc: str, element: str, expected: Any) -> None:
    obs = observation(oru(), loinc)
    assert obs[element] == expected
    values = [k for k in obs if k.startswith("value")]
    assert values == [element], "exactly one value[x]"


def test_ed_value_is_an_attachment_in_the_r5_value_extension() -> None:
    obs = observation(oru(), "18748-4")
    assert obs["extension"] == [{
        "url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-Observation.value",
        "valueAttachment": {"contentType": "application/pdf", "data": "JVBERi0xLjQK"}}]
    assert not [k for k in obs if k.startswith("value")]


def test_numeric_result_carries_range_interpretation_status_times_and_performers() -> None:
    data = oru()
    obs = observation(data, "2345-7")
    assert obs["code"] == {"coding": [{"code": "2345-7", "display": "Glucose",
                                       "system": LOINC}], "text": "Glucose"}
    assert obs["referenceRange"] == [{"text": "70-99"}]
    assert obs["interpretation"] == [{
        "coding": [{"system": INTERPRETATION, "code": "H", "display": "High"},
                   {"code": "H", "display": "High",
                    "system": "http://terminology.hl7.org/CodeSystem/v2-0078"}],
        "text": "High"}]
    assert obs["status"] == "final"
    assert obs["effectiveDateTime"] == "2024-03-12T08:20:00+01:00"  # OBX-14 before OBR-7
    assert obs["issued"] == "2024-03-12T10:05:00+01:00"  # OBR-22 of its OBR
    assert obs["extension"] == [{
        "url": "http://hl7.org/fhir/StructureDefinition/observation-analysis-date-time",
        "valueDateTime": "2024-03-12T09:30:00+01:00"}]
    assert obs["identifier"] == [identifier("OBS-1", LAB_OID, "FILL")]
    performers = [target(data, p) for p in obs["performer"]]
    assert [p["resourceType"] for p in performers] == [
        "Practitioner", "Organization", "Practitioner"]
    assert performers[0]["identifier"] == [{"value": "T4410"}]
    assert performers[0]["name"] == [{"family": "Lindqvist", "given": ["Aron"]}]
    assert performers[1]["name"] == "Northgate Central Lab"
    assert performers[1]["identifier"][0]["value"] == "LAB01"
    assert performers[2]["name"] == [{"family": "Brandt", "given": ["Otto"]}]
    assert obs["subject"]["reference"] == ref(data, one(data, "Patient"))
    assert obs["encounter"]["reference"] == ref(data, one(data, "Encounter"))


def test_status_interpretation_and_effective_time_of_other_results() -> None:
    data = oru()
    assert observation(data, "11526-1")["status"] == "preliminary"
    assert observation(data, "18750-0")["status"] == "corrected"
    creatinine = observation(data, "2160-0")
    assert creatinine["interpretation"][0]["coding"][0] == {
        "system": INTERPRETATION, "code": "L", "display": "Low"}
    assert creatinine["referenceRange"] == [{"text": "0.6-1.2"}]
    # Without OBX-14 the observation time is OBR-7 of the OBR above.
    assert creatinine["effectiveDateTime"] == "2024-03-12T08:15:00+01:00"
    culture = observation(data, "600-7")
    assert culture["interpretation"][0]["coding"][0]["code"] == "A"


def test_nte_after_obx_is_a_note_of_that_observation() -> None:
    data = oru()
    obs = observation(data, "2345-7")
    assert len(obs["note"]) == 1
    note = obs["note"][0]
    assert note["text"] == "Patient not fasting"
    assert note["time"] == "2024-03-12T09:40:00+01:00"
    author = target(data, note["authorReference"])
    assert author["name"] == [{"family": "Oskarsson", "given": ["Lina"]}]
    assert "note" not in observation(data, "8251-1")


def test_nte_after_obr_is_counted_as_unmapped_and_nothing_else_is() -> None:
    assert unmapped(message("oru_r01_lab_results.hl7")) == {"NTE": 1}


# -- ORU^R01: report, order, specimen ------------------------------------------------------

def test_obr_makes_a_diagnostic_report_with_every_result_of_its_group() -> None:
    data = oru()
    first, second = resources(data, "DiagnosticReport")
    assert first["identifier"] == [identifier("PL-5531", WARD_OID, "PLAC"),
                                   identifier("FL-9902", LAB_OID, "FILL")]
    assert first["code"]["coding"][0] == {
        "code": "24323-8", "display": "Comprehensive metabolic panel", "system": LOINC}
    assert first["status"] == "final"
    assert first["effectivePeriod"] == {"start": "2024-03-12T08:15:00+01:00",
                                        "end": "2024-03-12T08:30:00+01:00"}
    assert first["issued"] == "2024-03-12T10:05:00+01:00"
    assert first["category"] == [{"coding": [{
        "code": "CH", "system": "http://terminology.hl7.org/CodeSystem/v2-0074"}]}]
    interpreter = target(data, first["resultsInterpreter"][0])
    assert interpreter["identifier"] == [{"value": "P7781"}]
    assert interpreter["name"] == [{"family": "Oskarsson", "given": ["Lina"]}]
    assert first["subject"]["reference"] == ref(data, one(data, "Patient"))
    assert first["encounter"]["reference"] == ref(data, one(data, "Encounter"))
    observations = resources(data, "Observation")
    assert [r["reference"] for r in first["result"]] == [
        ref(data, o) for o in observations[:13]]
    assert [r["reference"] for r in second["result"]] == [ref(data, observations[13])]
    assert second["status"] == "preliminary"
    assert second["effectiveDateTime"] == "2024-03-12T09:15:00+01:00"


def test_observations_of_a_later_order_read_their_own_obr() -> None:
    sodium = observation(oru(), "2951-2")
    assert sodium["effectiveDateTime"] == "2024-03-12T09:15:00+01:00"
    assert sodium["issued"] == "2024-03-12T10:10:00+01:00"
    assert sodium["valueQuantity"] == {"value": 139, "unit": "mmol/L", "code": "mmol/L",
                                       "system": UCUM}
    assert sodium["interpretation"][0]["coding"][0]["code"] == "N"


def test_each_report_is_based_on_the_order_of_its_orc() -> None:
    data = oru()
    orders = resources(data, "ServiceRequest")
    reports = resources(data, "DiagnosticReport")
    assert [r["basedOn"] for r in reports] == [
        [{"reference": ref(data, orders[0])}], [{"reference": ref(data, orders[1])}]]
    first = orders[0]
    assert first["identifier"] == [identifier("PL-5531", WARD_OID, "PLAC"),
                                   identifier("FL-9902", LAB_OID, "FILL")]
    assert first["status"] == "completed"  # ORC-5 CM
    assert first["intent"] == "order"
    assert first["code"]["coding"][0]["code"] == "24323-8"
    assert target(data, first["requester"])["name"] == [
        {"family": "Varnhold", "given": ["Tessa"], "prefix": ["Dr"]}]
    assert "authoredOn" not in first  # ORC-9 is the authoring time only for NW
    assert orders[1]["status"] == "active"  # ORC-5 IP


def test_spm_makes_the_specimen_of_the_report() -> None:
    data = oru()
    # Each OBR describes a specimen too (OBR-Specimen); the SPM's is the one typed PGN.
    specimen = next(s for s in resources(data, "Specimen")
                    if s["identifier"][0]["type"]["coding"][0]["code"] == "PGN")
    assert specimen["identifier"] == [identifier("SP-100", LAB_OID, "PGN"),
                                      identifier("SF-200", LAB_OID, "FGN")]
    assert specimen["type"] == {"coding": [{
        "code": "SER", "display": "Serum",
        "system": "http://terminology.hl7.org/CodeSystem/v2-0487"}], "text": "Serum"}
    assert specimen["collection"]["method"]["coding"][0]["code"] == "VENIP"
    assert specimen["collection"]["bodySite"]["coding"][0]["code"] == "LACF"
    assert specimen["collection"]["quantity"] == {"value": 5, "unit": "milliliter",
                                                  "code": "mL", "system": UCUM}
    assert specimen["collection"]["collectedPeriod"] == {
        "start": "2024-03-12T08:15:00+01:00", "end": "2024-03-12T08:16:00+01:00"}
    assert specimen["receivedTime"] == "2024-03-12T08:30:00+01:00"
    assert specimen["status"] == "available"
    assert specimen["note"] == [{"text": "Slightly haemolysed"}]
    assert specimen["subject"]["reference"] == ref(data, one(data, "Patient"))
    first_report = resources(data, "DiagnosticReport")[0]
    from_obr = resources(data, "Specimen")[0]
    assert first_report["specimen"] == [{"reference": ref(data, from_obr)},
                                        {"reference": ref(data, specimen)}]


def test_obr_describes_the_specimen_collected_for_its_order() -> None:
    data = oru()
    first, _, second = resources(data, "Specimen")
    assert first["identifier"] == [identifier("PL-5531", WARD_OID, "PLAC"),
                                   identifier("FL-9902", LAB_OID, "FILL")]
    assert first["collection"]["collectedPeriod"] == {
        "start": "2024-03-12T08:15:00+01:00", "end": "2024-03-12T08:30:00+01:00"}
    assert second["collection"]["collectedDateTime"] == "2024-03-12T09:15:00+01:00"
    assert second["subject"]["reference"] == ref(data, one(data, "Patient"))
    assert resources(data, "DiagnosticReport")[1]["specimen"] == [
        {"reference": ref(data, second)}]


def test_business_identifiers_make_conditional_updates() -> None:
    requests = {e["resource"]["resourceType"]: e["request"] for e in oru()["entry"]
                if "PGN" in str(e["resource"].get("identifier")) or
                e["resource"]["resourceType"] != "Specimen"}
    assert requests["DiagnosticReport"] == {
        "method": "PUT", "url": f"DiagnosticReport?identifier={WARD_OID}|PL-5532"}
    assert requests["Specimen"] == {"method": "PUT",
                                    "url": f"Specimen?identifier={LAB_OID}|SP-100"}


# -- ORU^R01: bad and unusual input --------------------------------------------------------

def test_nm_value_that_is_not_a_number_fails_naming_obx5() -> None:
    data = replace_segment(message("oru_r01_lab_results.hl7"), "OBX|1|NM|2345-7",
                           "OBX|1|NM|2345-7^Glucose^LN||one hundred|mg/dL^^UCUM|||||F")
    with pytest.raises(TranslationError) as caught:
        translator().translate(parse_message(data))
    assert caught.value.location.startswith("OBX")
    assert "OBX-5" in str(caught.value)
    assert "not a valid number" in caught.value.safe_text
    assert "one hundred" not in caught.value.safe_text


@pytest.mark.parametrize("line", [
    "OBX|2|XX|8251-1^Service comment^LN||whatever||||||F",
    "OBX|2|ED|8251-1^Service comment^LN||LabSys^TEXT^PLAIN^A^plain text||||||F",
])
def test_a_value_no_row_can_map_is_left_out_and_counted(line: str) -> None:
    data = replace_segment(message("oru_r01_lab_results.hl7"), "OBX|2|ST", line)
    obs = observation(translate(data), "8251-1")
    assert not [k for k in obs if k.startswith("value")]
    assert "extension" not in obs
    assert obs["status"] == "final"
    assert unmapped(data) == {"NTE": 1, "OBX-5": 1}


def test_units_without_a_numeric_value_are_counted() -> None:
    data = replace_segment(message("oru_r01_lab_results.hl7"), "OBX|2|ST",
                           "OBX|2|ST|8251-1^Service comment^LN||late|mg/dL||||F")
    assert observation(translate(data), "8251-1")["valueString"] == "late"
    assert unmapped(data) == {"NTE": 1, "OBX-6": 1}


def test_sn_not_equal_and_unstructured_sn_are_kept_as_text() -> None:
    data = replace_segment(message("oru_r01_lab_results.hl7"), "OBX|8|SN",
                           "OBX|8|SN|5130-0^Antibody titer^LN||<>^5||||||F")
    assert observation(translate(data), "5130-0")["valueString"] == "<>5"
    data = replace_segment(message("oru_r01_lab_results.hl7"), "OBX|8|SN",
                           "OBX|8|SN|5130-0^Antibody titer^LN||<0.10||||||F")
    assert observation(translate(data), "5130-0")["valueString"] == "<0.10"


@pytest.mark.parametrize(("status", "counted"), [("", {}), ("Q", {"OBX-11": 1})])
def test_missing_status_and_code_say_unknown(status: str, counted: dict[str, int]) -> None:
    data = replace_segment(message("oru_r01_lab_results.hl7"), "OBX|2|ST",
                           f"OBX|2|ST|||late||||||{status}")
    obs = resources(translate(data), "Observation")[1]
    assert obs["valueString"] == "late"
    assert obs["status"] == "unknown"
    assert obs["code"] == {"extension": [{
        "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
        "valueCode": "unknown"}]}
    assert unmapped(data) == {"NTE": 1, **counted}


def test_obx_without_obr_needs_no_report() -> None:
    text = message("oru_r01_lab_results.hl7").decode().split("\r")
    data = "\r".join([text[0], text[1], text[6], ""]).encode()  # MSH, PID, the glucose OBX
    bundle_ = translate(data)
    obs = one(bundle_, "Observation")
    assert obs["valueQuantity"]["value"] == 105
    assert obs["effectiveDateTime"] == "2024-03-12T08:20:00+01:00"
    assert "issued" not in obs
    assert resources(bundle_, "DiagnosticReport") == []


# -- ORM^O01 ------------------------------------------------------------------------------

def test_orm_makes_a_service_request_from_orc_and_obr() -> None:
    data = bundle("orm_o01_lab_order.hl7")
    order = one(data, "ServiceRequest")
    assert order["identifier"] == [identifier("PL-7001", WARD_OID, "PLAC")]
    assert order["requisition"] == identifier("GRP-55", WARD_OID, "PGN")
    assert order["status"] == "active"  # ORC-1 NW, no ORC-5
    assert order["intent"] == "order"
    assert order["code"] == {"coding": [{
        "code": "58410-2", "display": "CBC panel - Blood by Automated count",
        "system": LOINC}], "text": "CBC panel - Blood by Automated count"}
    assert order["authoredOn"] == "2024-03-12T11:00:00+01:00"
    assert order["occurrencePeriod"] == {"start": "2024-03-15T09:00:00+01:00",
                                         "end": "2024-03-15T10:00:00+01:00"}
    assert order["priority"] == "stat"
    requester = target(data, order["requester"])
    assert requester["identifier"] == [{"value": "D1234"}]
    assert requester["name"] == [{"family": "Varnhold", "given": ["Tessa"],
                                  "prefix": ["Dr"]}]
    assert len(resources(data, "Practitioner")) == 1  # the PV1 attending is the same doctor
    assert order["reasonCode"][0]["coding"][0] == {
        "code": "R50.9", "display": "Fever, unspecified",
        "system": "http://hl7.org/fhir/sid/icd-10"}
    assert order["note"] == [{"text": "Patient on anticoagulants"}]
    assert order["subject"]["reference"] == ref(data, one(data, "Patient"))
    assert order["encounter"]["reference"] == ref(data, one(data, "Encounter"))
    weight = one(data, "Observation")
    assert order["supportingInfo"] == [{"reference": ref(data, weight)}]
    assert weight["valueQuantity"] == {"value": 72, "unit": "kilogram", "code": "kg",
                                       "system": UCUM}
    assert order["reasonReference"] == [{"reference": ref(data, one(data, "Condition"))}]
    entry = next(e for e in data["entry"] if e["resource"] is order)
    assert entry["request"] == {"method": "PUT",
                                "url": f"ServiceRequest?identifier={WARD_OID}|PL-7001"}
    assert unmapped(message("orm_o01_lab_order.hl7")) == {}


def test_unknown_order_control_gives_unknown_status_and_is_counted() -> None:
    data = replace_segment(message("orm_o01_lab_order.hl7"), "ORC|",
                           "ORC|ZZ|PL-7001^WardApp^2.16.840.1.113883.3.9999.2^ISO")
    assert one(translate(data), "ServiceRequest")["status"] == "unknown"
    assert unmapped(data) == {"ORC-1": 1}


# -- OML^O21 ------------------------------------------------------------------------------

def test_oml_makes_a_service_request_with_its_specimen() -> None:
    data = bundle("oml_o21_lab_order.hl7")
    order = one(data, "ServiceRequest")
    assert order["identifier"] == [identifier("PL-8001", WARD_OID, "PLAC"),
                                   identifier("FL-8001", LAB_OID, "FILL")]
    assert order["status"] == "on-hold"  # ORC-5 HD wins over ORC-1 NW
    assert order["intent"] == "order"
    assert order["code"]["coding"][0] == {"code": "24331-1", "display": "Lipid panel",
                                          "system": LOINC}
    assert order["authoredOn"] == "2024-03-12T12:00:00+01:00"
    assert order["occurrencePeriod"] == {"start": "2024-03-13T08:00:00+01:00",
                                         "end": "2024-03-13T09:00:00+01:00"}  # TQ1
    assert order["priority"] == "asap"
    # ORC-12 names the requester; OBR-16 (another doctor) is not used.
    assert target(data, order["requester"])["name"] == [
        {"family": "Ekdahl", "given": ["Mira"]}]
    assert len(resources(data, "Practitioner")) == 1
    assert order["note"] == [{"text": "Fasting since midnight"}]
    from_obr, specimen = resources(data, "Specimen")
    assert order["specimen"] == [{"reference": ref(data, from_obr)},
                                 {"reference": ref(data, specimen)}]
    assert from_obr["identifier"] == [identifier("PL-8001", WARD_OID, "PLAC"),
                                      identifier("FL-8001", LAB_OID, "FILL")]
    assert specimen["identifier"] == [identifier("SP-300", LAB_OID, "PGN")]
    assert specimen["type"]["coding"][0]["code"] == "BLDV"
    assert specimen["collection"] == {"collectedDateTime": "2024-03-13T08:10:00+01:00"}
    assert specimen["subject"]["reference"] == ref(data, one(data, "Patient"))
    assert unmapped(message("oml_o21_lab_order.hl7")) == {}
