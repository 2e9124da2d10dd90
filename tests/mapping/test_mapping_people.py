"""People, organizations and coverage (issue 14): the operator of the event, the mother,
roles, the insured, the payer, program identifiers, telecoms and street lines, by the tables.

`tests/messages/mapping_adt_people.hl7` is one synthetic ADT^A01 (CANARY names,
example.invalid addresses) carrying every field asserted here; each Bundle is validated
against the R4 model by `translate`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.hl7.message import parse_message
from support.mapping import Json, one, ref, resources, translate, translator

MESSAGES = Path(__file__).parents[1] / "messages"
OID = "urn:oid:1.2.3.4.5"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
ROLE_CODE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"


def people() -> bytes:
    return (MESSAGES / "mapping_adt_people.hl7").read_bytes()


def replace_segment(data: bytes, segment: str) -> bytes:
    """The message with the (first) segment of that id replaced, or removed when empty."""
    sid = segment[:3].encode() if segment else b""
    lines = data.split(b"\r")
    return b"\r".join(segment.encode() if line.startswith(sid) else line for line in lines)


def without(data: bytes, segment_id: str) -> bytes:
    return b"\r".join(line for line in data.split(b"\r")
                      if not line.startswith(segment_id.encode()))


def by_ref(bundle: Json, reference: str) -> Json:
    return next(e["resource"] for e in bundle["entry"] if e["fullUrl"] == reference)


def type_code(identifier: Json) -> str:
    return str(identifier["type"]["coding"][0]["code"])


@pytest.fixture(scope="module")
def bundle() -> Json:
    return translate(people())


# -- Patient: street lines, telecoms, names, program identifiers ------------------------------

def test_street_address_lines_from_every_part(bundle: Json) -> None:
    [address] = one(bundle, "Patient")["address"]
    # SAD-1 street, XAD-2 other designation, SAD-2 street name, SAD-3 dwelling, XAD-19.
    assert address["line"] == ["12", "Apt 4", "Example Street", "4B", "c/o CANARYHOST"]
    assert (address["city"], address["postalCode"], address["use"]) == (
        "Springfield", "12345", "home")


def test_telecom_values_in_the_guides_order(bundle: Json) -> None:
    mobile, email, work, pid40 = one(bundle, "Patient")["telecom"]
    # XTN-12 (unformatted) before the formatted components of the same number.
    assert mobile == {"value": "5550100001", "use": "home", "system": "phone"}
    assert email == {"value": "jane.canary@example.invalid", "system": "email"}
    assert work == {"value": "555 0100003", "use": "work", "system": "phone"}
    # PID-40, an Internet address sent in XTN-1 without XTN-4: kept, not an empty e-mail.
    assert pid40 == {"value": "robin.canary@example.invalid", "system": "email"}


def test_called_by_name_is_a_nickname(bundle: Json) -> None:
    official, nickname = one(bundle, "Patient")["name"]
    assert official == {"family": "CANARYFAMILY", "given": ["Jane", "Quinn"], "use": "official"}
    assert nickname == {"given": ["Janie"], "use": "nickname"}


def test_patient_program_and_disability_identifiers(bundle: Json) -> None:
    identifiers = one(bundle, "Patient")["identifier"]
    found = {i["value"]: (type_code(i), i.get("system")) for i in identifiers}
    assert found == {
        "MRN-400001": ("MR", OID),
        "DIS-55": ("PN", OID),  # DB1-3, the disabled person is the patient (DB1-2 PT)
        "MCR-111A": ("MC", "http://hl7.org/fhir/sid/us-medicare"),  # IN2-6
        "MCD-222B": ("MA", None),  # IN2-8
        "MIL-333C": ("MI", None),  # IN2-10
        "PMN-444D": ("MB", OID),  # IN2-61
    }


def test_db1_of_another_person_is_not_the_patients() -> None:
    bundle = translate(replace_segment(people(), "DB1|1|GT|DIS-66^^^SYNTHHOSP^PN|Y"))
    values = [i["value"] for i in one(bundle, "Patient")["identifier"]]
    assert "DIS-66" not in values and "DIS-55" not in values
    unmapped = translator().translate(parse_message(
        replace_segment(people(), "DB1|1|GT|DIS-66^^^SYNTHHOSP^PN|Y"))).unmapped
    assert unmapped["DB1"] == 1


def test_account_from_pid_18(bundle: Json) -> None:
    account = one(bundle, "Account")
    assert account["status"] == "active"
    assert account["subject"] == [{"reference": ref(bundle, one(bundle, "Patient"))}]
    [identifier] = account["identifier"]
    assert (identifier["value"], identifier["system"], type_code(identifier)) == (
        "ACCT-400001", OID, "AN")


# -- the mother (PID-21) ----------------------------------------------------------------------

def test_mother_is_a_related_person(bundle: Json) -> None:
    mother = next(p for p in resources(bundle, "RelatedPerson")
                  if p["relationship"][0]["coding"][0]["code"] == "MTH")
    assert mother["relationship"] == [{"coding": [
        {"system": ROLE_CODE, "code": "MTH", "display": "mother"}]}]
    assert mother["patient"] == {"reference": ref(bundle, one(bundle, "Patient"))}
    [identifier] = mother["identifier"]
    assert (identifier["value"], identifier["system"], type_code(identifier)) == (
        "MOM-77", OID, "MR")
    assigner = by_ref(bundle, identifier["assigner"]["reference"])
    assert assigner["identifier"][0]["value"] == "SYNTHHOSP"


def test_no_mother_without_pid_21() -> None:
    data = people().replace(b"MOM-77^^^SYNTHHOSP&1.2.3.4.5&ISO^MR", b"")
    bundle = translate(data)
    codes = [p["relationship"][0]["coding"][0]["code"] for p in resources(bundle, "RelatedPerson")]
    assert "MTH" not in codes


# -- the event's operator (EVN) ---------------------------------------------------------------

def _event(bundle: Json) -> Json:
    return next(p for p in resources(bundle, "Provenance") if "agent" in p and
                p["agent"][0]["who"].get("reference"))


def test_event_provenance_names_the_operator_time_reason_and_place(bundle: Json) -> None:
    event = _event(bundle)
    assert event["target"] == [{"reference": ref(bundle, one(bundle, "MessageHeader"))}]
    assert event["recorded"] == "2026-03-14T09:29:00+01:00"
    assert event["occurredDateTime"] == "2026-03-14T09:25:00+01:00"
    assert event["reason"][0]["coding"][0]["code"] == "01"
    [agent] = event["agent"]
    assert agent["type"]["coding"][0]["code"] == "enterer"
    operator = by_ref(bundle, agent["who"]["reference"])
    assert operator["resourceType"] == "Practitioner"
    assert operator["identifier"][0]["value"] == "OP-7"
    assert operator["name"] == [{"family": "CANARYCLERK", "given": ["Olive"], "prefix": ["Ms"]}]
    place = by_ref(bundle, event["location"]["reference"])
    assert place["name"] == "EASTWING"
    assert place["identifier"] == [{"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.3.4.6"}]


def test_event_time_falls_back_to_the_message_time() -> None:
    data = people().replace(b"EVN|A01|20260314092900+0100|", b"EVN|A01|20260314|")
    assert _event(translate(data))["recorded"] == "2026-03-14T09:30:00+01:00"


def test_no_event_provenance_without_an_operator() -> None:
    data = replace_segment(people(), "EVN|A01|20260314092900+0100")
    bundle = translate(data)
    assert [p for p in resources(bundle, "Provenance") if "recorded" in p and
            p["agent"][0]["who"].get("reference")] == []
    assert "EVN" not in translator().translate(parse_message(data)).unmapped


# -- roles (ROL) ------------------------------------------------------------------------------

def test_primary_care_provider_role_is_the_general_practitioner(bundle: Json) -> None:
    patient = one(bundle, "Patient")
    [gp] = patient["generalPractitioner"]
    role = by_ref(bundle, gp["reference"])
    assert role["resourceType"] == "PractitionerRole"
    assert role["code"][0]["coding"][0]["code"] == "PP"
    assert role["specialty"][0]["coding"][0]["code"] == "FP"
    assert role["period"] == {"start": "2025-01-01", "end": "2027-12-31"}
    assert role["telecom"] == [{"value": "555 0100020", "use": "work", "system": "phone"}]
    assert by_ref(bundle, role["practitioner"]["reference"])["name"][0]["family"] == "CANARYPCP"
    assert by_ref(bundle, role["location"][0]["reference"])["name"] == "CLINIC1"
    clinic = by_ref(bundle, role["organization"]["reference"])
    assert clinic["name"] == "CANARY FAMILY CLINIC"
    assert clinic["identifier"][0]["value"] == "ORG-88"


def test_other_role_is_a_participant_of_the_visit(bundle: Json) -> None:
    encounter = one(bundle, "Encounter")
    roles = [by_ref(bundle, p["individual"]["reference"]) for p in encounter["participant"]]
    [attending] = [r for r in roles if r["resourceType"] == "PractitionerRole"]
    assert attending["code"][0]["coding"][0]["code"] == "AT"
    doctor = by_ref(bundle, attending["practitioner"]["reference"])
    assert doctor["identifier"][0]["value"] == "1234"


# -- NK1 organization -------------------------------------------------------------------------

def test_nk1_organization_is_a_contact_of_the_patient(bundle: Json) -> None:
    [contact] = one(bundle, "Patient")["contact"]
    home = by_ref(bundle, contact["organization"]["reference"])
    assert home["name"] == "CANARY CARE HOME"
    assert home["identifier"][0]["value"] == "ORG-99"
    assert home["contact"] == [{
        "name": {"family": "CANARYMANAGER", "given": ["Mia"]},
        "telecom": [{"value": "555 0100030", "use": "work", "system": "phone"}],
        "address": {"line": ["1 Care Lane"], "city": "Springfield", "state": "ST",
                    "postalCode": "12345"}}]


# -- coverage: the insured, the payer ---------------------------------------------------------

def _insured(bundle: Json) -> Json:
    coverage = one(bundle, "Coverage")
    return by_ref(bundle, coverage["subscriber"]["reference"])


def test_insured_spouse_is_the_subscriber(bundle: Json) -> None:
    insured = _insured(bundle)
    assert insured["resourceType"] == "RelatedPerson"
    assert insured["patient"] == {"reference": ref(bundle, one(bundle, "Patient"))}
    assert insured["name"] == [{"family": "CANARYSPOUSE", "given": ["John"]}]
    assert insured["relationship"][0]["coding"][0] == {
        "system": ROLE_CODE, "code": "SPS", "display": "spouse"}
    assert insured["birthDate"] == "1979-05-05"
    assert insured["gender"] == "male"
    assert insured["address"] == [{"line": ["12 Example Street"], "city": "Springfield",
                                   "state": "ST", "postalCode": "12345"}]
    found = {i["value"]: (type_code(i), i.get("system")) for i in insured["identifier"]}
    assert found == {"MEM-987654": ("MB", OID), "EMP-31": ("EI", OID),
                     "900-00-5678": ("SS", "http://hl7.org/fhir/sid/us-ssn")}
    assert insured["telecom"] == [
        {"value": "555 0100050", "use": "home", "system": "phone"},
        {"value": "555 0100051", "use": "work", "system": "phone"}]


def test_coverage_identifiers_from_in2(bundle: Json) -> None:
    coverage = one(bundle, "Coverage")
    assert [(i["value"], type_code(i)) for i in coverage["identifier"]] == [
        ("PMN-444D", "MB"), ("MCR-111A", "MC"), ("MCD-222B", "MA")]
    assert coverage["subscriberId"] == "MEM-987654"


def test_payer_organization_carries_in1_3_and_5_to_7(bundle: Json) -> None:
    payer = by_ref(bundle, one(bundle, "Coverage")["payor"][0]["reference"])
    assert payer["name"] == "CANARY INSURANCE CO"
    [identifier] = payer["identifier"]
    assert (identifier["value"], identifier["system"], type_code(identifier)) == (
        "INS-1", OID, "NIIP")
    assert payer["address"] == [{"line": ["9 Payer Road"], "city": "Springfield",
                                 "state": "ST", "postalCode": "12345"}]
    assert payer["contact"] == [{"name": {"family": "CANARYAGENT", "given": ["Ann"]}}]
    assert payer["telecom"] == [{"value": "555 0100040", "use": "work", "system": "phone"}]


def test_self_insured_patient_gets_no_insured_person() -> None:
    data = people().replace(b"SPO^Spouse^HL70063|19790505", b"SEL^Self^HL70063|19790505")
    bundle = translate(data)
    patient = one(bundle, "Patient")
    coverage = one(bundle, "Coverage")
    assert coverage["subscriber"] == {"reference": ref(bundle, patient)}
    assert [p for p in resources(bundle, "RelatedPerson") if "birthDate" in p] == []
    # IN2-2, the insured's SSN, is the patient's own when the patient is the insured.
    assert any(i["value"] == "900-00-5678" and
               i["system"] == "http://hl7.org/fhir/sid/us-ssn" for i in patient["identifier"])


def test_insured_birth_date_that_is_no_date_is_left_out_and_counted() -> None:
    # Shifted fields (the Guide's own samples): an address where IN1-18 belongs.
    data = people().replace(b"|19790505|", b"|1000 House Lane^Appt 123^Ann Arbor^MI^99999^USA|")
    bundle = translate(data)
    assert "birthDate" not in _insured(bundle)
    assert translator().translate(parse_message(data)).unmapped["IN1-18"] == 1


def test_in2_without_its_in1_writes_the_patient_only() -> None:
    # A Coverage needs the payer IN1 names: IN2 alone makes none, and no insured person.
    bundle = translate(without(people(), "IN1"))
    assert resources(bundle, "Coverage") == []
    assert [p for p in resources(bundle, "RelatedPerson") if "birthDate" in p] == []
    assert "MCR-111A" in [i["value"] for i in one(bundle, "Patient")["identifier"]]


# -- participations (PRT) ---------------------------------------------------------------------

def _with_prt(*prts: str) -> bytes:
    base = (MESSAGES / "reverse_oru_r01.hl7").read_bytes().rstrip(b"\r")
    return base + b"\r" + b"\r".join(p.encode() for p in prts) + b"\r"


def test_participation_is_a_practitioner_role() -> None:
    bundle = translate(_with_prt(
        "PRT|1|AD||RO^Responsible Observer^HL70912|777^CANARYREADER^Rita^^^Dr^^^SYNTHHOSP"
        "|RAD^Radiology^L||CANARY IMAGING^^^^^SYNTHHOSP^XX^^^ORG-55|XRAY1^^^SYNTHHOSP"
        "||20260101|20261231|||^WPN^PH^^^555^0100060"))
    [role] = resources(bundle, "PractitionerRole")
    assert role["code"][0]["coding"][0]["code"] == "RO"
    assert role["specialty"][0]["coding"][0]["code"] == "RAD"
    assert role["period"] == {"start": "2026-01-01", "end": "2026-12-31"}
    assert role["telecom"] == [{"value": "555 0100060", "use": "work", "system": "phone"}]
    reader = by_ref(bundle, role["practitioner"]["reference"])
    assert (reader["identifier"][0]["value"], reader["name"][0]["family"]) == (
        "777", "CANARYREADER")
    assert by_ref(bundle, role["organization"]["reference"])["name"] == "CANARY IMAGING"
    assert by_ref(bundle, role["location"][0]["reference"])["name"] == "XRAY1"


def test_device_only_participation_makes_no_role() -> None:
    data = _with_prt("PRT|1|AD||EQUIP^Equipment^HL70912||||||DEV-1")
    assert resources(translate(data), "PractitionerRole") == []
    assert translator().translate(parse_message(data)).unmapped["PRT"] == 1


# -- financial transactions (FT1) -------------------------------------------------------------

FT1 = ("FT1|1|TX-9001||20260402|20260403|CG|71045^Xray exam chest 1 view^C4|||2|100&USD"
       "||RAD-1^Radiology^L||||||R07.9^Chest pain^I10|777^CANARYREADER^Rita||||"
       "888^CANARYCLERK^Olive||||||||CANARY IMAGING^^^^^SYNTHHOSP^XX^^^ORG-55"
       "|CANARY CLINIC^^^^^SYNTHHOSP^XX^^^ORG-56")


def test_financial_transaction_is_a_charge_item() -> None:
    bundle = translate(_with_prt(FT1))
    charge = one(bundle, "ChargeItem")
    assert charge["identifier"] == [{"value": "TX-9001", "type": {"coding": [
        {"system": V2_0203, "code": "FILL"}]}}]
    assert charge["status"] == "billable"
    assert (charge["occurrenceDateTime"], charge["enteredDate"]) == ("2026-04-02", "2026-04-03")
    assert charge["code"]["coding"][0]["code"] == "71045"
    assert charge["quantity"] == {"value": 2}
    assert charge["priceOverride"] == {"value": 100, "currency": "USD"}
    assert charge["reason"][0]["coding"][0]["code"] == "R07.9"
    assert charge["subject"] == {"reference": ref(bundle, one(bundle, "Patient"))}
    cost_center = by_ref(bundle, charge["costCenter"]["reference"])
    assert (cost_center["identifier"][0]["value"], cost_center["name"]) == ("RAD-1", "Radiology")
    performer = by_ref(bundle, charge["performer"][0]["actor"]["reference"])
    assert performer["name"][0]["family"] == "CANARYREADER"
    assert by_ref(bundle, charge["enterer"]["reference"])["name"][0]["family"] == "CANARYCLERK"
    assert by_ref(bundle, charge["performingOrganization"]["reference"])["name"] == (
        "CANARY IMAGING")
    assert by_ref(bundle, charge["requestingOrganization"]["reference"])["name"] == (
        "CANARY CLINIC")


def test_transaction_without_a_code_makes_no_charge_item() -> None:
    data = _with_prt("FT1|1|TX-9002||20260402||PY")
    assert resources(translate(data), "ChargeItem") == []
    assert translator().translate(parse_message(data)).unmapped["FT1"] == 1


def test_policy_holder_employer_carries_its_id(bundle: Json) -> None:
    employer = by_ref(bundle, one(bundle, "Coverage")["policyHolder"]["reference"])
    assert employer["name"] == "CANARY EMPLOYER"
    [identifier] = employer["identifier"]
    assert (identifier["value"], identifier["system"], type_code(identifier)) == (
        "EMPL-7", OID, "EN")


def test_employer_id_alone_is_the_policy_holder() -> None:
    bundle = translate(people().replace(b"|CANARY EMPLOYER|", b"||"))
    employer = by_ref(bundle, one(bundle, "Coverage")["policyHolder"]["reference"])
    assert employer["identifier"][0]["value"] == "EMPL-7"
    assert "name" not in employer


# -- the episode of care (PV1-53/54) ----------------------------------------------------------

def test_service_episode_is_the_visits_episode_of_care(bundle: Json) -> None:
    episode = one(bundle, "EpisodeOfCare")
    encounter = one(bundle, "Encounter")
    assert encounter["episodeOfCare"] == [{"reference": ref(bundle, episode)}]
    assert episode["patient"] == {"reference": ref(bundle, one(bundle, "Patient"))}
    assert episode["status"] == "active"
    [identifier] = episode["identifier"]
    assert (identifier["value"], identifier["system"]) == ("EOC-9", OID)
    assert episode["extension"] == [{
        "url": "http://hl7.org/fhir/StructureDefinition/resource-instance-description",
        "valueString": "Knee rehabilitation"}]


def test_episode_of_a_discharged_visit_is_finished() -> None:
    lines = people().split(b"\r")
    pv1 = next(i for i, line in enumerate(lines) if line.startswith(b"PV1|"))
    fields = lines[pv1].split(b"|")
    fields[45] = b"20260320100000+0100"
    lines[pv1] = b"|".join(fields)
    assert one(translate(b"\r".join(lines)), "EpisodeOfCare")["status"] == "finished"


def test_no_episode_of_care_without_pv1_54() -> None:
    bundle = translate(people().replace(b"|EOC-9^^^SYNTHHOSP&1.2.3.4.5&ISO", b"|"))
    assert resources(bundle, "EpisodeOfCare") == []
    assert "episodeOfCare" not in one(bundle, "Encounter")
