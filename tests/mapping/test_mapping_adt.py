"""ADT (A01 A02 A03 A04 A05 A06 A07 A08 A11 A12 A13 A28 A31 A40) to FHIR R4, by the tables.

Every message here is synthetic (CANARY names, example.invalid addresses); each Bundle is
validated against the R4 model by `translate`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.hl7.message import parse_message
from gateway.mapping.errors import TranslationError
from support.mapping import Json, one, ref, resources, translate, translator

MESSAGES = Path(__file__).parents[1] / "messages"
OID = "urn:oid:1.2.3.4.5"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0301 = "http://terminology.hl7.org/CodeSystem/v2-0301"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
LOCATION_TYPE = "http://terminology.hl7.org/CodeSystem/location-physical-type"
EXT = "http://hl7.org/fhir/StructureDefinition/"


def message(name: str) -> bytes:
    return (MESSAGES / f"mapping_adt_{name}.hl7").read_bytes()


def with_event(data: bytes, event: str) -> bytes:
    """The visit message with another trigger event in MSH-9 (and EVN-1)."""
    return data.replace(b"ADT^A01^ADT_A01", f"ADT^{event}".encode()).replace(
        b"EVN|A01|", f"EVN|{event}|".encode())


def replace_segment(data: bytes, segment: str) -> bytes:
    lines = data.split(b"\r")
    sid = segment[:3].encode()
    return b"\r".join(segment.encode() if line.startswith(sid) else line for line in lines)


def unmapped(data: bytes) -> dict[str, int]:
    return dict(translator().translate(parse_message(data)).unmapped)


def by_url(resource: Json, url: str) -> Json:
    return next(e for e in resource["extension"] if e["url"] == url)


def authority(bundle: Json, identifier: Json) -> Json:
    """The Organization an identifier's assigner refers to."""
    return resource_by_ref(bundle, identifier["assigner"]["reference"])


def plain(identifier: Json) -> Json:
    """The identifier without its assigner's reference (checked with `authority`)."""
    assigner = {k: v for k, v in identifier["assigner"].items() if k != "reference"}
    return {**identifier, "assigner": assigner} if assigner else {
        k: v for k, v in identifier.items() if k != "assigner"}


def hierarchy(bundle: Json, location: Json) -> list[tuple[str, str]]:
    """(name, physical type) of a Location and each one it is part of, up to the top."""
    chain = [(location["name"], location["physicalType"]["coding"][0]["code"])]
    while "partOf" in location:
        location = resource_by_ref(bundle, location["partOf"]["reference"])
        chain.append((location["name"], location["physicalType"]["coding"][0]["code"]))
    return chain


def resource_by_ref(bundle: Json, reference: str) -> Json:
    return next(e["resource"] for e in bundle["entry"] if e["fullUrl"] == reference)


@pytest.fixture(scope="module")
def a01() -> Json:
    return translate(message("a01"))


# -- ADT^A01, every mapped field ---------------------------------------------------------

def test_a01_patient_identifiers_with_systems(a01: Json) -> None:
    patient = one(a01, "Patient")
    mrn, ssn, ssn19, licence = patient["identifier"]
    assert authority(a01, mrn) == {"resourceType": "Organization", "identifier": [
        {"value": "SYNTHHOSP", "system": "urn:isthmus:naming-system:SYNTHHOSP"},
        {"value": f"{OID}", "system": "urn:ietf:rfc:3986",
         "type": {"coding": [{"system": V2_0301, "code": "ISO"}]}}]}
    assert plain(mrn) == {"value": "MRN-300001", "system": OID,
                          "assigner": {"display": "SYNTHHOSP"},
                          "type": {"coding": [{"code": "MR", "system": V2_0203}]}}
    assert ssn["value"] == "900-00-1234"
    assert ssn["system"] == "http://hl7.org/fhir/sid/us-ssn"  # SSA via NamingSystem
    assert authority(a01, ssn)["identifier"] == [
        {"value": "SSA", "system": "http://hl7.org/fhir/sid/us-ssn"}]
    assert ssn19 == {"value": "900-00-1234", "system": "http://hl7.org/fhir/sid/us-ssn",
                     "type": {"coding": [{"system": V2_0203, "code": "SS"}]}}
    assert licence == {"value": "D1234567", "assigner": {"display": "ST"},
                       "period": {"end": "2030-12-31"},
                       "type": {"coding": [{"system": V2_0203, "code": "DL"}]}}
    assert entry_request(a01, patient) == {
        "method": "PUT", "url": f"Patient?identifier={OID}|MRN-300001"}


def entry_request(bundle: Json, resource: Json) -> Json:
    return next(e["request"] for e in bundle["entry"] if e["resource"] is resource)


def test_a01_patient_names_birth_and_gender(a01: Json) -> None:
    patient = one(a01, "Patient")
    assert patient["name"] == [
        {"family": "CANARYFAMILY", "given": ["Jane", "Quinn"], "prefix": ["Dr"],
         "use": "official"},
        {"family": "CANARYNICK", "given": ["Janie"], "use": "nickname"},
    ]
    assert patient["birthDate"] == "1980-01-02"
    assert patient["_birthDate"] == {"extension": [{
        "url": EXT + "patient-birthTime", "valueDateTime": "1980-01-02T08:30:00+01:00"}]}
    assert patient["gender"] == "female"
    assert patient["multipleBirthInteger"] == 2
    assert "multipleBirthBoolean" not in patient
    assert patient["deceasedBoolean"] is False


def test_a01_patient_address_with_county_and_period(a01: Json) -> None:
    assert one(a01, "Patient")["address"] == [{
        "line": ["12 Example Street", "Apt 4"], "city": "Springfield", "state": "ST",
        "postalCode": "12345", "country": "USA", "use": "home", "district": "SPCO",
        "period": {"start": "2020-01-01", "end": "2030-12-31"}}]


def test_a01_patient_telecom_phone_email_and_unformatted(a01: Json) -> None:
    home, email, mobile, work = one(a01, "Patient")["telecom"]
    assert home == {"value": "+1 555 0100001", "use": "home", "system": "phone"}
    assert email == {"value": "jane.canary@example.invalid", "system": "email"}
    assert mobile == {"value": "5550100002", "use": "mobile", "system": "phone"}
    assert work == {"value": "555 0100003", "use": "work", "system": "phone",
                    "extension": [{"url": EXT + "contactpoint-extension", "valueString": "12"}]}


def test_a01_patient_coded_fields_and_extensions(a01: Json) -> None:
    patient = one(a01, "Patient")
    assert patient["maritalStatus"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M",
        "display": "Married"}
    assert patient["communication"] == [{"language": {
        "coding": [{"code": "en", "display": "English", "system": "urn:ietf:bcp:47"}],
        "text": "English"}}]
    assert by_url(patient, EXT + "patient-mothersMaidenName")["valueString"] == "CANARYMAIDEN"
    religion = by_url(patient, EXT + "patient-religion")["valueCodeableConcept"]
    assert religion["coding"][0] == {"code": "CHR", "display": "Christian",
                                     "system": "http://terminology.hl7.org/CodeSystem/v2-0006"}
    assert by_url(patient, EXT + "patient-birthPlace")["valueAddress"] == {"text": "Springfield"}
    citizenship = by_url(patient, EXT + "patient-citizenship")["extension"]
    assert citizenship[0]["url"] == "code"
    assert citizenship[0]["valueCodeableConcept"]["coding"][0]["code"] == "USA"


def test_a01_pd1_general_practitioners(a01: Json) -> None:
    patient = one(a01, "Patient")
    clinic = resource_by_ref(a01, patient["generalPractitioner"][0]["reference"])
    doctor = resource_by_ref(a01, patient["generalPractitioner"][1]["reference"])
    assert authority(a01, clinic["identifier"][0])["identifier"][0]["value"] == "SYNTHHOSP"
    assert {**clinic, "identifier": [plain(i) for i in clinic["identifier"]]} == {
        "resourceType": "Organization", "name": "SYNTHCLINIC", "identifier": [{
        "value": "ORG-77", "system": OID, "type": {"coding": [{"code": "XX",
                                                              "system": V2_0203}]}}]}
    assert doctor["name"] == [{"family": "CANARYPCP", "given": ["Paula"], "prefix": ["Dr"]}]
    org_entry = next(e for e in a01["entry"] if e["resource"] is clinic)
    assert org_entry["request"] == {"method": "POST", "url": "Organization",
                                    "ifNoneExist": f"identifier={OID}|ORG-77"}


def test_a01_nk1_related_person(a01: Json) -> None:
    person = one(a01, "RelatedPerson")
    assert person["patient"] == {"reference": ref(a01, one(a01, "Patient"))}
    assert person["name"] == [{"family": "CANARYSPOUSE", "given": ["John"], "prefix": ["Mr"]}]
    spouse, role = person["relationship"]
    assert spouse["coding"][0] == {"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                                   "code": "SPS", "display": "spouse"}
    assert spouse["coding"][1]["code"] == "SPO"
    assert role["coding"] == [{"code": "N", "display": "Next-of-Kin",
                               "system": "http://terminology.hl7.org/CodeSystem/v2-0131"}]
    assert person["address"][0]["city"] == "Springfield"
    assert person["telecom"] == [
        {"value": "+1 555 0100009", "use": "home", "system": "phone"},
        {"value": "+1 555 0100010", "system": "phone", "use": "work"}]
    assert person["period"] == {"start": "2020-01-01", "end": "2030-12-31"}
    assert person["gender"] == "male"
    assert person["birthDate"] == "1979-05-05"


def test_a01_encounter_class_status_period_and_identifiers(a01: Json) -> None:
    encounter = one(a01, "Encounter")
    assert encounter["subject"] == {"reference": ref(a01, one(a01, "Patient"))}
    assert encounter["class"] == {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                  "code": "IMP"}
    assert encounter["status"] == "in-progress"
    assert encounter["period"] == {"start": "2026-03-14T09:25:00+01:00"}
    assert authority(a01, encounter["identifier"][0])["identifier"][0]["value"] == "SYNTHHOSP"
    assert [plain(i) for i in encounter["identifier"]] == [{
        "value": "VN-300001", "system": OID, "assigner": {"display": "SYNTHHOSP"},
        "type": {"coding": [{"code": "VN", "system": V2_0203}]}}]  # one VN coding, not two
    assert encounter["hospitalization"]["preAdmissionIdentifier"]["value"] == "PRE-77"
    assert encounter["hospitalization"]["admitSource"]["coding"][0]["code"] == "7"
    assert encounter["type"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0007", "code": "E",
        "display": "Emergency"}
    assert encounter["serviceType"]["coding"][0]["code"] == "MED"
    assert entry_request(a01, encounter) == {
        "method": "PUT", "url": f"Encounter?identifier={OID}|VN-300001"}


def test_a01_encounter_participants(a01: Json) -> None:
    encounter = one(a01, "Encounter")
    found = {p["type"][0]["coding"][0]["code"]:
             resource_by_ref(a01, p["individual"]["reference"])["name"][0]["family"]
             for p in encounter["participant"]}
    assert found == {"ATND": "CANARYATTEND", "REF": "CANARYREFER", "ADM": "CANARYADMIT",
                     "CON": "CANARYCONSULT"}
    assert all(p["type"][0]["coding"][0]["system"] == PARTICIPATION
               for p in encounter["participant"])


def test_a01_encounter_locations_are_distinct_and_part_of_the_facility(a01: Json) -> None:
    current, prior = one(a01, "Encounter")["location"]
    assert current["status"] == "active"
    assert prior["status"] == "completed"
    bed = resource_by_ref(a01, current["location"]["reference"])
    emergency = resource_by_ref(a01, prior["location"]["reference"])
    # PV1-3 WARD1^101^A^SYNTHHOSP: bed A, part of room 101, of ward WARD1, of the site.
    assert hierarchy(a01, bed) == [("A", "bd"), ("101", "ro"), ("WARD1", "wa"),
                                   ("SYNTHHOSP", "si")]
    assert hierarchy(a01, emergency) == [("1", "bd"), ("1", "ro"), ("ER", "wa"),
                                         ("SYNTHHOSP", "si")]
    assert all(loc["mode"] == "instance" for loc in resources(a01, "Location")
               if "physicalType" in loc and loc["physicalType"]["coding"][0]["code"] != "si")
    ward = resource_by_ref(a01, resource_by_ref(a01, bed["partOf"]["reference"])[
        "partOf"]["reference"])
    er = resource_by_ref(a01, resource_by_ref(a01, emergency["partOf"]["reference"])[
        "partOf"]["reference"])
    assert er["partOf"] == ward["partOf"]  # one site Location, two wards


def test_a01_pv2_admit_reason_and_planned_dates(a01: Json) -> None:
    encounter = one(a01, "Encounter")
    assert encounter["reasonCode"][0]["coding"][0] == {"code": "CHEST", "display": "Chest pain",
                                                       "system": "L"}
    planned = {e["url"].rsplit(".", 1)[-1]: e["valueDateTime"] for e in encounter["extension"]}
    assert planned == {"plannedStartDate": "2026-03-14T09:00:00+01:00",
                       "plannedEndDate": "2026-03-18T12:00:00+01:00"}


def test_a01_allergies(a01: Json) -> None:
    penicillin, latex = resources(a01, "AllergyIntolerance")
    patient_ref = ref(a01, one(a01, "Patient"))
    assert penicillin["patient"] == {"reference": patient_ref}
    assert penicillin["encounter"] == {"reference": ref(a01, one(a01, "Encounter"))}
    assert penicillin["clinicalStatus"]["coding"] == [{
        "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
        "code": "active"}]
    assert penicillin["category"] == ["medication"]
    assert penicillin["type"] == "allergy"
    assert penicillin["code"]["coding"] == [{
        "code": "70618", "display": "Penicillin",
        "system": "http://www.nlm.nih.gov/research/umls/rxnorm"}]
    assert penicillin["criticality"] == "high"
    assert penicillin["reaction"] == [
        {"severity": "severe", "manifestation": [{"text": "Hives"}]},
        {"manifestation": [{"text": "Wheezing"}]}]
    # MA (miscellaneous) has no FHIR category, MO (moderate) no criticality: left out.
    assert "category" not in latex
    assert "criticality" not in latex
    assert latex["type"] == "allergy"


def test_a01_diagnosis_condition(a01: Json) -> None:
    condition = one(a01, "Condition")
    encounter = one(a01, "Encounter")
    assert condition["subject"] == {"reference": ref(a01, one(a01, "Patient"))}
    assert condition["encounter"] == {"reference": ref(a01, encounter)}
    assert encounter["diagnosis"] == [{"condition": {"reference": ref(a01, condition)}}]
    assert condition["category"][0]["coding"] == [{
        "system": "http://terminology.hl7.org/CodeSystem/condition-category",
        "code": "encounter-diagnosis"}]
    assert condition["code"]["coding"] == [{
        "code": "I21.9", "display": "Acute myocardial infarction, unspecified",
        "system": "http://hl7.org/fhir/sid/icd-10"}]
    assert condition["onsetDateTime"] == "2026-03-14T09:10:00+01:00"
    assert condition["recordedDate"] == "2026-03-14T09:15:00+01:00"
    assert condition["identifier"] == [{"value": "DX-1", "system": OID}]
    assert resource_by_ref(a01, condition["asserter"]["reference"])["name"][0]["family"] == \
        "CANARYDIAG"
    assert "verificationStatus" not in condition  # DG1-21 A(dd)


def test_a01_insurance_coverage(a01: Json) -> None:
    coverage = one(a01, "Coverage")
    patient_ref = ref(a01, one(a01, "Patient"))
    assert coverage["status"] == "active"
    assert coverage["beneficiary"] == {"reference": patient_ref}
    assert coverage["subscriber"] == {"reference": patient_ref}  # IN1-17 SEL
    assert coverage["subscriberId"] == "MEM-987654"
    assert coverage["period"] == {"start": "2026-01-01", "end": "2026-12-31"}
    assert coverage["relationship"]["coding"][0]["code"] == "self"
    assert coverage["type"]["coding"][0]["code"] == "HMO"
    plan, group = coverage["class"]
    assert (plan["type"]["coding"][0]["code"], plan["value"], plan["name"]) == (
        "plan", "PLAN-A", "Gold plan")
    assert (group["type"]["coding"][0]["code"], group["value"], group["name"]) == (
        "group", "GRP-42", "CANARY EMPLOYER GROUP")
    payer = resource_by_ref(a01, coverage["payor"][0]["reference"])
    assert payer["name"] == "CANARY INSURANCE CO"
    assert payer["identifier"][0]["value"] == "INSCO-1"
    holder = resource_by_ref(a01, coverage["policyHolder"]["reference"])
    assert holder["name"] == "CANARY EMPLOYER"


def test_a01_counts_only_what_has_no_fhir_code() -> None:
    # NET (e-mail) has no ContactPoint.use; MA no allergy category; MO no criticality.
    assert unmapped(message("a01")) == {"PID-13.2": 1, "AL1-2": 1, "AL1-4": 1}


def test_a01_coverage_for_another_insured_has_no_subscriber() -> None:
    data = message("a01").replace(b"SEL^Self^HL70063", b"SPO^Spouse^HL70063")
    coverage = one(translate(data), "Coverage")
    assert "subscriber" not in coverage
    assert coverage["relationship"]["coding"][0]["code"] == "spouse"


# -- trigger events -----------------------------------------------------------------------

@pytest.mark.parametrize(("event", "status"), [
    ("A01", "in-progress"), ("A02", "in-progress"), ("A03", "finished"),
    ("A04", "planned"), ("A05", "planned"), ("A06", "in-progress"), ("A07", "in-progress"),
    ("A08", "unknown"), ("A11", "cancelled"), ("A12", "in-progress"), ("A13", "in-progress"),
    ("A28", "unknown"), ("A31", "unknown"),
])
def test_encounter_status_follows_the_trigger_event(event: str, status: str) -> None:
    bundle = translate(with_event(message("visit"), event))
    encounter = one(bundle, "Encounter")
    assert encounter["status"] == status
    assert encounter["class"]["code"] == "AMB"
    assert encounter["subject"] == {"reference": ref(bundle, one(bundle, "Patient"))}
    assert one(bundle, "Patient")["birthDate"] == "1965-04-12"
    assert unmapped(with_event(message("visit"), event)) == {}


def test_every_adt_event_of_the_slice_is_supported() -> None:
    for event in ("A01", "A02", "A03", "A04", "A05", "A06", "A07", "A08", "A11", "A12",
                  "A13", "A28", "A31", "A40"):
        assert translator().supports(f"ADT^{event}")


def test_a02_transfer_new_and_prior_location() -> None:
    bundle = translate(message("a02"))
    encounter = one(bundle, "Encounter")
    assert encounter["status"] == "in-progress"
    current, prior = encounter["location"]
    now = resource_by_ref(bundle, current["location"]["reference"])
    before = resource_by_ref(bundle, prior["location"]["reference"])
    assert (current["status"], [n for n, _ in hierarchy(bundle, now)]
            ) == ("active", ["B", "201", "WARD2", "SYNTHHOSP"])
    assert (prior["status"], [n for n, _ in hierarchy(bundle, before)]
            ) == ("completed", ["A", "101", "WARD1", "SYNTHHOSP"])
    assert one(bundle, "Patient")["birthDate"] == "1980-01"  # year-month precision kept


def test_a02_structure_has_no_allergies() -> None:
    data = message("a02") + b"AL1|1|DA^Drug allergy^HL70127|70618^Penicillin^RXNORM\r"
    assert unmapped(data) == {"AL1": 1}


def test_a03_discharge() -> None:
    bundle = translate(message("a03"))
    encounter = one(bundle, "Encounter")
    assert encounter["status"] == "finished"
    assert encounter["period"] == {"start": "2026-03-14T09:25:00+01:00",
                                   "end": "2026-03-18T12:00:00+01:00"}
    assert encounter["hospitalization"]["dischargeDisposition"]["coding"][0] == {
        "code": "01", "display": "Discharged to home",
        "system": "http://terminology.hl7.org/CodeSystem/v2-0112"}
    destination = resource_by_ref(bundle, encounter["hospitalization"]["destination"][
        "reference"])
    assert destination["name"] == "Home"
    assert encounter["length"] == {"value": 4, "unit": "days",
                                   "system": "http://unitsofmeasure.org", "code": "d"}
    assert one(bundle, "Patient")["birthDate"] == "1980"  # year precision kept


def test_a08_with_a_discharge_date_is_finished() -> None:
    data = with_event(message("a03").replace(b"ADT^A03^ADT_A03", b"ADT^A01^ADT_A01"), "A08")
    assert one(translate(data), "Encounter")["status"] == "finished"


def test_a28_person_only_makes_no_encounter() -> None:
    bundle = translate(message("a28"))
    patient = one(bundle, "Patient")
    assert resources(bundle, "Encounter") == []
    assert patient["birthDate"] == "1991"
    assert patient["gender"] == "unknown"
    assert patient["telecom"] == [{"value": "robin.canary@example.invalid",
                                   "system": "email", "use": "home"}]
    assert patient["maritalStatus"]["coding"][0]["code"] == "S"
    assert unmapped(message("a28")) == {"PV1": 1}  # class N, no visit number


def test_a31_with_a_visit_keeps_it() -> None:
    data = with_event(message("visit"), "A31")
    assert one(translate(data), "Encounter")["status"] == "unknown"


def test_a40_merge_links_both_records() -> None:
    bundle = translate(message("a40"))
    survivor, retired = resources(bundle, "Patient")
    assert survivor["identifier"][0]["value"] == "MRN-400002"
    assert authority(bundle, retired["identifier"][0])["identifier"][0]["value"] == "SYNTHHOSP"
    assert plain(retired["identifier"][0]) == {
        "value": "MRN-400001", "system": OID, "assigner": {"display": "SYNTHHOSP"},
        "type": {"coding": [{"code": "MR", "system": V2_0203}]}}
    assert retired["name"] == [{"family": "CANARYRETIRED", "given": ["Patrick"]}]
    assert retired["active"] is False
    assert survivor["link"] == [{"other": {"reference": ref(bundle, retired)},
                                 "type": "replaces"}]
    assert retired["link"] == [{"other": {"reference": ref(bundle, survivor)},
                                "type": "replaced-by"}]
    assert "active" not in survivor
    assert entry_request(bundle, retired) == {
        "method": "PUT", "url": f"Patient?identifier={OID}|MRN-400001"}


def test_a40_two_merges_in_one_message() -> None:
    data = message("a40") + (
        b"PID|1||MRN-400004^^^SYNTHHOSP&1.2.3.4.5&ISO^MR||CANARYSECOND^Kim\r"
        b"MRG|MRN-400003^^^SYNTHHOSP&1.2.3.4.5&ISO^MR\r")
    bundle = translate(data)
    patients = resources(bundle, "Patient")
    assert [p["identifier"][0]["value"] for p in patients] == [
        "MRN-400002", "MRN-400001", "MRN-400004", "MRN-400003"]
    assert patients[2]["link"] == [{"other": {"reference": ref(bundle, patients[3])},
                                    "type": "replaces"}]
    assert patients[3]["link"][0]["other"] == {"reference": ref(bundle, patients[2])}


# -- bad input and resends ------------------------------------------------------------------

def test_invalid_birth_date_names_pid_7() -> None:
    data = message("visit").replace(b"|19650412|", b"|19651345|")
    with pytest.raises(TranslationError) as caught:
        translate(data)
    assert caught.value.location == "PID-7"
    assert "19651345" not in caught.value.safe_text


def test_invalid_admit_date_names_pv1_44() -> None:
    data = message("visit").replace(b"20260322103000+0100", b"2026032225")
    with pytest.raises(TranslationError) as caught:
        translate(data)
    assert caught.value.location == "PV1-44"


def test_unsupported_codes_are_left_out_and_counted() -> None:
    data = replace_segment(message("visit"),
                           "PID|1||MRN-600001^^^SYNTHHOSP&1.2.3.4.5&ISO^MR||CANARYVISIT^Alex"
                           "||19650412|M|||||^XYZ^PH^^^555^0100004")
    patient = one(translate(data), "Patient")
    assert patient["telecom"] == [{"value": "555 0100004", "system": "phone"}]
    assert unmapped(data) == {"PID-13.2": 1}


def test_unsupported_trigger_event_is_refused() -> None:
    with pytest.raises(TranslationError) as caught:
        translate(with_event(message("visit"), "A99"))
    assert caught.value.location == "MSH-9"


@pytest.mark.parametrize("name", ["a01", "a02", "a03", "a28", "a40", "visit"])
def test_resend_gives_identical_full_urls_and_requests(name: str) -> None:
    first, second = translate(message(name)), translate(message(name))
    assert [(e["fullUrl"], e["request"]) for e in first["entry"]] == [
        (e["fullUrl"], e["request"]) for e in second["entry"]]
    assert [e["resource"] for e in first["entry"][:-1]] == [
        e["resource"] for e in second["entry"][:-1]]


def test_update_of_the_same_patient_and_visit_keeps_their_ids(a01: Json) -> None:
    update = translate(message("a01").replace(b"ADT^A01^ADT_A01|CTRL-A01-0001",
                                              b"ADT^A08^ADT_A01|CTRL-A08-0001"))
    for resource_type in ("Patient", "Encounter", "Condition"):
        assert ref(update, one(update, resource_type)) == ref(a01, one(a01, resource_type))


def test_locations_without_identifiers_keep_their_ids_across_messages(a01: Json) -> None:
    # Another message (an A08, another control id) names the same ward and bed: the
    # Locations are the same records, not new ones per message; another bed is another.
    update = translate(message("a01").replace(b"ADT^A01^ADT_A01|CTRL-A01-0001",
                                              b"ADT^A08^ADT_A01|CTRL-A08-0001"))
    before = {r.get("name", "") + "/" + r.get("description", ""): ref(a01, r)
              for r in resources(a01, "Location")}
    after = {r.get("name", "") + "/" + r.get("description", ""): ref(update, r)
             for r in resources(update, "Location")}
    assert before and before == after
    for entry in update["entry"]:
        if entry["resource"]["resourceType"] == "Location":
            assert entry["request"]["url"] == "Location/" + entry["resource"]["id"]


def test_iam_allergy_with_identifier_and_dates() -> None:
    data = message("visit") + (
        b"IAM|1|FA^Food allergy^HL70127|PEANUT^Peanut^L|MI^Mild^HL70128|Rash|A|"
        b"ALG-9^SYNTHHOSP^1.2.3.4.5^ISO|||||Childhood|20260301101500+0100\r")
    bundle = translate(data)
    allergy = one(bundle, "AllergyIntolerance")
    assert allergy["patient"] == {"reference": ref(bundle, one(bundle, "Patient"))}
    assert allergy["identifier"] == [{"value": "ALG-9", "system": OID}]
    assert allergy["category"] == ["food"]
    assert allergy["criticality"] == "low"
    assert allergy["reaction"] == [{"severity": "mild", "manifestation": [{"text": "Rash"}]}]
    assert allergy["onsetString"] == "Childhood"
    assert allergy["recordedDate"] == "2026-03-01T10:15:00+01:00"
    assert allergy["clinicalStatus"]["coding"][0]["code"] == "active"
    assert entry_request(bundle, allergy) == {
        "method": "PUT", "url": f"AllergyIntolerance?identifier={OID}|ALG-9"}


def test_obx_in_adt_is_an_observation_of_the_patient_and_visit() -> None:
    data = message("visit") + (
        b"OBX|1|NM|29463-7^Body weight^LN||72.50|kg^kilogram^UCUM|||||F|||20260322103500+0100\r")
    bundle = translate(data)
    observation = one(bundle, "Observation")
    assert observation["subject"] == {"reference": ref(bundle, one(bundle, "Patient"))}
    assert observation["encounter"] == {"reference": ref(bundle, one(bundle, "Encounter"))}
    assert observation["code"]["coding"][0] == {"code": "29463-7", "display": "Body weight",
                                                "system": "http://loinc.org"}
    assert observation["valueQuantity"]["value"] == 72.5
    assert observation["status"] == "final"
    assert observation["effectiveDateTime"] == "2026-03-22T10:35:00+01:00"
