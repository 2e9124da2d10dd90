"""What orders, financial and document messages carry besides their orders (issue 14):
a pharmacy order in ORM^O01 (ORC + RXO) is a MedicationRequest; an OBX whose value is a
document or image (ED, RP) in ORM/OML/OMG/BAR/MDM is also a DiagnosticReport with it as
presentedForm; every OBX of an MDM is an Observation too; ADT^A41 names the two accounts
and a Linkage; a visit points at the patient's account (PID-18)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.mapping.engine import Translator
from gateway.mapping.errors import TableErrors
from gateway.mapping.tables import SHIPPED
from support.mapping import Json, one, ref, resources, translate, v2

SYS = "urn:oid:2.16.840.1.113883.3.9901"
AUTH = "SYNTHCLINIC&2.16.840.1.113883.3.9901&ISO"
PDF = "JVBERi0xLjQKJcfsj6IK"  # the first bytes of a PDF, in Base64


def msh(message_type: str, control_id: str = "CTRL-ORDDOC-1") -> str:
    return (f"MSH|^~\\&|SYNTHEHR|SYNTHCLINIC|ISTHMUS|GATEWAY|20261203101500+0000||"
            f"{message_type}|{control_id}|P|2.5.1")


PID = (f"PID|1||MRN-910001^^^{AUTH}^MR||Formwell^Dana^J||19810623|F|||"
       f"4 Test Lane^^Springfield^ST^12345|||||||ACCT-910001^^^{AUTH}^AN")
PV1 = f"PV1|1|O|CLINIC3^12^^SYNTHCLINIC||||7001^Orderly^Sam^^^Dr|||||||||||VN-910001^^^{AUTH}^VN"
ED_OBX = (f"OBX|1|ED|18748-4^Diagnostic imaging study^LN|1|^AP^PDF^Base64^{PDF}||||||F|||"
          "20261203093000+0000||7002^Reader^Kim^^^Dr|||||"
          "SLIDE-77^SYNTHCLINIC^2.16.840.1.113883.3.9901^ISO")
RP_OBX = ("OBX|2|RP|55113-5^Key images^LN|1|https://images.example.org/study/4471^^IM^JPEG"
          "||||||P|||20261203094500+0000")
NM_OBX = "OBX|3|NM|29463-7^Body weight^LN||68|kg^kilogram^UCUM|||||F"


def report_for(bundle: Json, code: str) -> Json:
    return next(r for r in resources(bundle, "DiagnosticReport")
                if r["code"]["coding"][0]["code"] == code)


def observation_for(bundle: Json, code: str) -> Json:
    return next(r for r in resources(bundle, "Observation")
                if r["code"]["coding"][0]["code"] == code)


# -- ORM^O01 pharmacy order ----------------------------------------------------------------

RXO_ORDER = [
    PID, PV1,
    "ORC|NW|RX-5501^SYNTHEHR|||||||20261203100000+0000|||7001^Orderly^Sam^^^Dr",
    "RXO|197361^Amlodipine 5 MG Oral Tablet^RXNORM|5||mg^milligram^UCUM|||||||30"
    "|TAB^Tablet^HL70292|2",
    "RXR|PO^Oral^HL70162",
]


def test_an_orm_pharmacy_order_is_a_medication_request_named_by_its_orc() -> None:
    bundle = translate(v2(msh("ORM^O01^ORM_O01"), *RXO_ORDER))
    order = one(bundle, "MedicationRequest")
    assert order["identifier"][0]["value"] == "RX-5501"
    assert order["identifier"][0]["type"]["coding"][0]["code"] == "PLAC"
    assert order["status"] == "active"  # ORC-1 NW
    assert order["intent"] == "original-order"
    assert order["authoredOn"] == "2026-12-03T10:00:00+00:00"
    assert order["medicationCodeableConcept"]["coding"][0]["code"] == "197361"
    dose = order["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]
    assert (dose["value"], dose["code"]) == (5, "mg")
    assert order["dispenseRequest"]["quantity"]["value"] == 30
    assert order["dispenseRequest"]["numberOfRepeatsAllowed"] == 2
    # one Dosage per RXR (segments/RXR-MedicationRequest.csv), after the RXO's own
    assert order["dosageInstruction"][1]["route"]["coding"][0]["code"] == "PO"
    prescriber = next(r for r in resources(bundle, "Practitioner")
                      if r["identifier"][0]["value"] == "7001")
    assert order["requester"] == {"reference": ref(bundle, prescriber)}
    assert order["subject"] == {"reference": ref(bundle, one(bundle, "Patient"))}
    assert order["encounter"] == {"reference": ref(bundle, one(bundle, "Encounter"))}
    # The ORC still makes the Guide's ServiceRequest.
    assert one(bundle, "ServiceRequest")["identifier"][0]["value"] == "RX-5501"


def test_an_orm_order_without_rxo_makes_no_medication_request() -> None:
    bundle = translate(v2(msh("ORM^O01^ORM_O01"), PID, PV1,
                          "ORC|NW|ORD-5502^SYNTHEHR",
                          "OBR|1|ORD-5502^SYNTHEHR||24725-4^CT Head^LN"))
    assert resources(bundle, "MedicationRequest") == []


# -- ED / RP OBX as a report ---------------------------------------------------------------

ORDER = ["ORC|NW|ORD-6601^SYNTHEHR|||||||20261203090000+0000",
         "OBR|1|ORD-6601^SYNTHEHR||18748-4^Diagnostic imaging study^LN"]


@pytest.mark.parametrize(("message_type", "segments", "based_on"), [
    ("ORM^O01^ORM_O01", [PID, PV1, *ORDER, ED_OBX, RP_OBX, NM_OBX], True),
    ("OML^O21^OML_O21", [PID, PV1, *ORDER, ED_OBX, RP_OBX, NM_OBX], True),
    ("OMG^O19^OMG_O19", [PID, PV1, *ORDER, ED_OBX, RP_OBX, NM_OBX], True),
    ("BAR^P12^BAR_P12", ["EVN|P12|20261203101500+0000", PID, PV1, ED_OBX, RP_OBX, NM_OBX],
     False),
])
def test_a_document_or_image_obx_is_also_a_report(message_type: str, segments: list[str],
                                                   based_on: bool) -> None:
    bundle = translate(v2(msh(message_type), *segments))
    patient, encounter = one(bundle, "Patient"), one(bundle, "Encounter")
    pdf = report_for(bundle, "18748-4")
    assert pdf["presentedForm"] == [{"contentType": "application/pdf", "data": PDF}]
    assert pdf["status"] == "final"  # OBX-11 F
    assert pdf["effectiveDateTime"] == "2026-12-03T09:30:00+00:00"
    assert pdf["identifier"][0]["value"] == "SLIDE-77"
    assert pdf["identifier"][0]["system"] == SYS
    assert pdf["identifier"][0]["type"]["coding"][0]["code"] == "FILL"
    reader = next(r for r in resources(bundle, "Practitioner")
                  if r["identifier"][0]["value"] == "7002")
    assert pdf["performer"] == [{"reference": ref(bundle, reader)}]
    assert pdf["subject"] == {"reference": ref(bundle, patient)}
    assert pdf["encounter"] == {"reference": ref(bundle, encounter)}
    assert pdf["result"] == [{"reference": ref(bundle, observation_for(bundle, "18748-4"))}]
    pointer = report_for(bundle, "55113-5")
    assert pointer["presentedForm"] == [{"url": "https://images.example.org/study/4471"}]
    assert pointer["status"] == "preliminary"  # OBX-11 P
    assert pointer["effectiveDateTime"] == "2026-12-03T09:45:00+00:00"
    if based_on:
        assert pdf["basedOn"] == [{"reference": ref(bundle, one(bundle, "ServiceRequest"))}]
    else:
        assert "basedOn" not in pdf
    # A number is a result, not a document: no report for it.
    assert len(resources(bundle, "DiagnosticReport")) == 2
    assert observation_for(bundle, "29463-7")["valueQuantity"]["value"] == 68


def test_a_report_from_an_obx_keeps_its_id_when_resent_under_a_new_control_id() -> None:
    segments = [PID, PV1, *ORDER, RP_OBX]
    first = translate(v2(msh("ORM^O01^ORM_O01", "CTRL-ORDDOC-1"), *segments))
    again = translate(v2(msh("ORM^O01^ORM_O01", "CTRL-ORDDOC-2"), *segments))
    assert one(first, "DiagnosticReport")["id"] == one(again, "DiagnosticReport")["id"]


# -- MDM: every OBX an Observation too -----------------------------------------------------

MDM = [
    "EVN|T02|20261203101500+0000", PID, PV1,
    "TXA|1|CN^Consultation note|TX|20261203100000+0000||20261203100500+0000|||||"
    "DOC-7701^SYNTHEHR||||||AU",
    "OBX|1|TX|11488-4^Consultation note^LN|1|Patient seen for follow-up.||||||F",
    "NTE|1||dictated, then corrected by the author",
    "OBX|2|CWE|8251-1^Service comment^LN|1|G0001^Good response^L||||||F",
    "OBX|3|ED|11488-4^Consultation note^LN|2|^AP^PDF^Base64^" + PDF + "||||||F",
]


def test_every_obx_of_an_mdm_is_also_an_observation() -> None:
    bundle = translate(v2(msh("MDM^T02^MDM_T02"), *MDM))
    document = one(bundle, "DocumentReference")
    assert len(document["content"]) == 2  # the text line and the PDF, as before
    patient = one(bundle, "Patient")
    text, coded, pdf = resources(bundle, "Observation")
    assert text["valueString"] == "Patient seen for follow-up."
    assert text["note"] == [{"text": "dictated, then corrected by the author"}]
    assert coded["valueCodeableConcept"]["coding"][0]["code"] == "G0001"
    assert {o["status"] for o in (text, coded, pdf)} == {"final"}
    assert all(o["subject"] == {"reference": ref(bundle, patient)} for o in (text, coded, pdf))
    report = one(bundle, "DiagnosticReport")
    assert report["presentedForm"] == [{"contentType": "application/pdf", "data": PDF}]
    assert report["result"] == [{"reference": ref(bundle, pdf)}]


# -- ADT^A41 and the visit's account -------------------------------------------------------

def test_a41_names_both_accounts_and_a_linkage() -> None:
    bundle = translate(v2(msh("ADT^A41^ADT_A39"), "EVN|A41|20261203101500+0000", PID,
                          f"MRG|||ACCT-900001^^^{AUTH}^AN"))
    survivor, prior = resources(bundle, "Account")
    assert survivor["identifier"][0]["value"] == "ACCT-910001"
    assert survivor["status"] == "active"
    assert prior["identifier"][0]["value"] == "ACCT-900001"
    assert prior["identifier"][0]["system"] == SYS
    assert prior["status"] == "unknown"  # the Guide's MRG[Account]; the store decides
    assert prior["subject"] == [{"reference": ref(bundle, one(bundle, "Patient"))}]
    linkage = one(bundle, "Linkage")
    assert linkage["active"] is True
    assert linkage["item"] == [
        {"resource": {"reference": ref(bundle, survivor)}, "type": "source"},
        {"resource": {"reference": ref(bundle, prior)}, "type": "historical"}]


def test_a41_without_a_prior_account_makes_no_linkage() -> None:
    bundle = translate(v2(msh("ADT^A41^ADT_A39"), "EVN|A41|20261203101500+0000", PID,
                          f"MRG|MRN-900009^^^{AUTH}^MR"))
    assert resources(bundle, "Linkage") == []
    assert len(resources(bundle, "Account")) == 1


def test_a_visit_points_at_the_patients_account() -> None:
    bundle = translate(v2(msh("ADT^A01^ADT_A01"), "EVN|A01|20261203101500+0000", PID, PV1))
    assert one(bundle, "Encounter")["account"] == [
        {"reference": ref(bundle, one(bundle, "Account"))}]


# -- merges.csv: which types a merge can keep ----------------------------------------------

@pytest.mark.parametrize(("resource", "accepted"), [
    ("Patient", True), ("Account", True), ("Encounter", False), ("Observation", False)])
def test_merges_csv_takes_a_type_only_if_a_merged_away_record_can_say_so(
        tmp_path: Path, resource: str, accepted: bool) -> None:
    tables = tmp_path / "tables"
    shutil.copytree(SHIPPED, tables)
    merges = tables / "merges.csv"
    merges.write_text(merges.read_text().replace("ADT^A41,Account,", f"ADT^A41,{resource},"))
    if accepted:
        Translator.load(tables)
        return
    with pytest.raises(TableErrors) as caught:
        Translator.load(tables)
    line = next(n for n, row in enumerate(merges.read_text().splitlines(), 1)
                if row.startswith("ADT^A41,"))
    assert f"{merges}:{line}: a {resource} cannot be merged" in str(caught.value)
