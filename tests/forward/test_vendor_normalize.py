"""Vendor normalisation tables: each rule on a synthetic quirky resource, bad rows named by
file:line, Bundles normalised entry by entry, the site's table winning over the shipped."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from gateway.forward.normalize import Normalizer, load_vendor
from gateway.mapping.errors import TableError
from gateway.mapping.tables import SHIPPED

HEADER = "resource,rule,path,from,to,note\n"
VENDOR_PHONE = "https://vendor.example/fhir/StructureDefinition/mobile-phone"
VENDOR_EMAIL = "https://vendor.example/fhir/StructureDefinition/email"
VENDOR_MRN = "urn:oid:2.999.1.1.1"
CANONICAL_MRN = "urn:isthmus:sid:mrn"


def table(tmp_path: Path, *rows: str, name: str = "vendor.csv") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + "".join(row + "\n" for row in rows), encoding="utf-8")
    return path


def normalizer(tmp_path: Path, *rows: str) -> Normalizer:
    return Normalizer.load(table(tmp_path, *rows))


def quirky_patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient", "id": "p1",
        "identifier": [{"system": VENDOR_MRN, "value": "SYN-1001"},
                       {"system": "urn:oid:2.999.9.9", "value": "other"}],
        "extension": [
            {"url": VENDOR_PHONE, "valueString": "+1 555 0100 001"},
            {"url": VENDOR_EMAIL, "valueContactPoint": {"value": "syn@example.invalid",
                                                       "use": "home"}},
            {"url": "https://vendor.example/sort-key", "valueString": "internal"},
        ],
        "telecom": [{"system": "phone", "value": "+1 555 0100 002", "use": "cell"}],
        "name": [{"family": "Synthetic", "given": ["Pat"]}],
    }


# -- each rule --------------------------------------------------------------------------------


def test_identifier_system_renames_only_the_vendor_system(tmp_path: Path) -> None:
    rules = normalizer(tmp_path, f"Patient,identifier-system,identifier,{VENDOR_MRN},"
                                 f"{CANONICAL_MRN},MRN")
    out = rules.apply(quirky_patient())
    assert out["identifier"] == [{"system": CANONICAL_MRN, "value": "SYN-1001"},
                                 {"system": "urn:oid:2.999.9.9", "value": "other"}]


def test_apply_returns_a_copy_and_leaves_the_input_alone(tmp_path: Path) -> None:
    rules = normalizer(tmp_path, f"*,identifier-system,identifier,{VENDOR_MRN},"
                                 f"{CANONICAL_MRN},")
    original = quirky_patient()
    before = copy.deepcopy(original)
    out = rules.apply(original)
    assert original == before
    assert out is not original and out["identifier"][0]["system"] == CANONICAL_MRN


def test_coding_system_renames_systems_at_the_path(tmp_path: Path) -> None:
    rules = normalizer(tmp_path, "Observation,coding-system,code.coding,"
                                 "urn:oid:2.16.840.1.113883.6.1,http://loinc.org,LOINC OID")
    observation = {"resourceType": "Observation", "status": "final", "code": {"coding": [
        {"system": "urn:oid:2.16.840.1.113883.6.1", "code": "2345-7"},
        {"system": "urn:oid:2.999.3", "code": "GLU"}]}}
    out = rules.apply(observation)
    assert [c["system"] for c in out["code"]["coding"]] == ["http://loinc.org",
                                                            "urn:oid:2.999.3"]


def test_code_maps_a_local_code_and_sets_the_display_when_given(tmp_path: Path) -> None:
    rules = normalizer(
        tmp_path,
        "Observation,code,code.coding,urn:oid:2.999.3|GLU,http://loinc.org|2345-7|Glucose,",
        "Observation,code,code.coding,urn:oid:2.999.3|NA,http://loinc.org|2951-2,")
    observation = {"resourceType": "Observation", "status": "final", "code": {"coding": [
        {"system": "urn:oid:2.999.3", "code": "GLU", "display": "gluc"},
        {"system": "urn:oid:2.999.3", "code": "NA", "display": "sodium"},
        {"system": "urn:oid:2.999.4", "code": "GLU"}]}}
    coding = rules.apply(observation)["code"]["coding"]
    assert coding == [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"},
                      {"system": "http://loinc.org", "code": "2951-2", "display": "sodium"},
                      {"system": "urn:oid:2.999.4", "code": "GLU"}]


def test_extension_to_telecom_moves_string_and_contact_point_values(tmp_path: Path) -> None:
    rules = normalizer(tmp_path,
                       f"Patient,extension-to-telecom,telecom,{VENDOR_PHONE},phone,",
                       f"Patient,extension-to-telecom,telecom,{VENDOR_EMAIL},email,")
    out = rules.apply(quirky_patient())
    assert out["telecom"] == [
        {"system": "phone", "value": "+1 555 0100 002", "use": "cell"},
        {"system": "phone", "value": "+1 555 0100 001"},
        {"system": "email", "value": "syn@example.invalid", "use": "home"}]
    assert [e["url"] for e in out["extension"]] == ["https://vendor.example/sort-key"]


def test_extension_to_telecom_does_not_repeat_a_number_and_removes_the_last_extension(
        tmp_path: Path) -> None:
    rules = normalizer(tmp_path, f"Patient,extension-to-telecom,telecom,{VENDOR_PHONE},"
                                 "phone,")
    patient = {"resourceType": "Patient",
               "extension": [{"url": VENDOR_PHONE, "valueString": "+1 555 0100 003"}],
               "telecom": [{"system": "phone", "value": "+1 555 0100 003"}]}
    out = rules.apply(patient)
    assert out["telecom"] == [{"system": "phone", "value": "+1 555 0100 003"}]
    assert "extension" not in out


def test_extension_to_telecom_at_a_nested_path(tmp_path: Path) -> None:
    rules = normalizer(tmp_path, f"Patient,extension-to-telecom,contact.telecom,"
                                 f"{VENDOR_PHONE},phone,")
    patient = {"resourceType": "Patient", "contact": [
        {"extension": [{"url": VENDOR_PHONE, "valueString": "+1 555 0100 004"}]},
        {"telecom": [{"system": "email", "value": "c@example.invalid"}]}]}
    out = rules.apply(patient)
    assert out["contact"] == [
        {"telecom": [{"system": "phone", "value": "+1 555 0100 004"}]},
        {"telecom": [{"system": "email", "value": "c@example.invalid"}]}]


def test_drop_extension_removes_only_that_url(tmp_path: Path) -> None:
    rules = normalizer(tmp_path, "*,drop-extension,extension,https://vendor.example/sort-key"
                                 ",,internal")
    out = rules.apply(quirky_patient())
    assert [e["url"] for e in out["extension"]] == [VENDOR_PHONE, VENDOR_EMAIL]


def test_telecom_use_maps_a_vendor_use(tmp_path: Path) -> None:
    rules = normalizer(tmp_path, "Patient,telecom-use,telecom,cell,mobile,")
    assert rules.apply(quirky_patient())["telecom"][0]["use"] == "mobile"


def test_a_rule_for_another_type_leaves_the_resource_alone(tmp_path: Path) -> None:
    rules = normalizer(tmp_path, f"Practitioner,identifier-system,identifier,{VENDOR_MRN},"
                                 f"{CANONICAL_MRN},")
    patient = quirky_patient()
    assert rules.apply(patient) == patient


def test_rules_apply_in_row_order(tmp_path: Path) -> None:
    rules = normalizer(
        tmp_path,
        "Observation,coding-system,code.coding,urn:oid:2.999.3,urn:oid:2.999.30,",
        "Observation,code,code.coding,urn:oid:2.999.30|GLU,http://loinc.org|2345-7,")
    observation = {"resourceType": "Observation", "status": "final",
                   "code": {"coding": [{"system": "urn:oid:2.999.3", "code": "GLU"}]}}
    assert rules.apply(observation)["code"]["coding"] == [
        {"system": "http://loinc.org", "code": "2345-7"}]


# -- Bundles ----------------------------------------------------------------------------------


def test_every_entry_of_a_bundle_is_normalised_by_its_own_type(tmp_path: Path) -> None:
    rules = normalizer(tmp_path,
                       f"Patient,identifier-system,identifier,{VENDOR_MRN},{CANONICAL_MRN},",
                       f"Patient,extension-to-telecom,telecom,{VENDOR_PHONE},phone,",
                       "Appointment,code,appointmentType.coding,urn:oid:2.999.2|FU,"
                       "http://terminology.hl7.org/CodeSystem/v2-0276|FOLLOWUP,")
    appointment = {"resourceType": "Appointment", "status": "booked", "participant": [],
                   "appointmentType": {"coding": [{"system": "urn:oid:2.999.2",
                                                   "code": "FU"}]},
                   "identifier": [{"system": VENDOR_MRN, "value": "not a patient"}]}
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": quirky_patient(), "search": {"mode": "match"}},
        {"resource": appointment, "search": {"mode": "include"}},
        {"search": {"mode": "match"}}]}
    out = rules.apply(bundle)
    patient, booked = out["entry"][0]["resource"], out["entry"][1]["resource"]
    assert patient["identifier"][0]["system"] == CANONICAL_MRN
    assert {"system": "phone", "value": "+1 555 0100 001"} in patient["telecom"]
    assert booked["appointmentType"]["coding"] == [
        {"system": "http://terminology.hl7.org/CodeSystem/v2-0276", "code": "FOLLOWUP"}]
    # a Patient rule does not touch an Appointment's identifier
    assert booked["identifier"][0]["system"] == VENDOR_MRN
    assert out["entry"][2] == {"search": {"mode": "match"}}


def test_contained_resources_are_normalised(tmp_path: Path) -> None:
    rules = normalizer(tmp_path, f"Patient,identifier-system,identifier,{VENDOR_MRN},"
                                 f"{CANONICAL_MRN},")
    request = {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
               "contained": [quirky_patient()], "subject": {"reference": "#p1"}}
    out = rules.apply(request)
    assert out["contained"][0]["identifier"][0]["system"] == CANONICAL_MRN


def test_an_empty_table_changes_nothing(tmp_path: Path) -> None:
    rules = normalizer(tmp_path)
    patient = quirky_patient()
    assert not rules
    assert rules.apply(patient) is patient


# -- bad rows ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("row", "reason"), [
    ("Patient,rename-everything,identifier,a,b,", "rule 'rename-everything' is not one of"),
    ("Patinet,identifier-system,identifier,a,b,", "resource 'Patinet' is not a FHIR R4"),
    ("Patient,identifier-system,,a,b,", "path must name elements"),
    ("Patient,identifier-system,identifer,a,b,", "path 'identifer' of Patient"),
    ("Patient,identifier-system,name,a,b,", "is a HumanName; this rule needs Identifier"),
    ("Observation,coding-system,code,a,b,", "is a CodeableConcept; this rule needs Coding"),
    ("Patient,telecom-use,identifier,cell,mobile,", "this rule needs ContactPoint"),
    ("Patient,identifier-system,identifier,,urn:x,", "'from' is empty"),
    ("Patient,identifier-system,identifier,urn:a,,", "'to' is empty"),
    ("Patient,identifier-system,identifier,urn:a,has space,", "'to' must be a URI"),
    ("Observation,code,code.coding,GLU,http://loinc.org|2345-7,", "'from' must be system|code"),
    ("Observation,code,code.coding,urn:a|GLU,2345-7,", "'to' must be system|code"),
    ("Patient,extension-to-telecom,telecom,urn:ext,telephone,", "ContactPoint.system"),
    ("Patient,telecom-use,telecom,cell,cellular,", "ContactPoint.use"),
    ("Patient,drop-extension,extension,urn:ext,urn:other,", "drop-extension takes no 'to'"),
    ("*,drop-extension,identifier,urn:ext,,", "ends in 'extension'"),
    ("Patient,identifier-system,identifier,a,b,x,y,z", "has 8 cells"),
    ("Slot,search-param,Location,reference,,", "the parameter's name"),
    ("Slot,search-param,-location,place,,", "search parameter type"),
    ("Slot,search-param,-location,reference,x,", "search-param takes no 'to'"),
    ("*,search-param,-location,reference,,", "names its resource type"),
    ("Appointment,operation,system,$find,search,", "type or instance"),
    ("Appointment,operation,type,find,search,", "the operation's name"),
    ("Appointment,operation,type,$find,book,", "whose scope the operation needs"),
    ("OperationOutcome,error-code,issue.details.coding,urn:e,x,", "takes no 'to'"),
    ("*,drop-empty,*,x,,", "drop-empty takes no 'from' or 'to'"),
    ("Observation,drop-empty,valueStrung,,,", "path 'valueStrung' of Observation"),
])
def test_a_bad_row_names_file_line_and_reason(tmp_path: Path, row: str, reason: str) -> None:
    path = table(tmp_path, "# a comment row", "Patient,telecom-use,telecom,cell,mobile,ok",
                 row)
    with pytest.raises(TableError) as caught:
        Normalizer.load(path)
    assert caught.value.file == str(path)
    assert caught.value.line == 4
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"{path}:4: ")


def test_a_repeated_rule_names_the_first_line(tmp_path: Path) -> None:
    path = table(tmp_path, "Patient,telecom-use,telecom,cell,mobile,",
                 "Patient,telecom-use,telecom,cell,home,")
    with pytest.raises(TableError, match=r":3: repeats the rule of line 2"):
        Normalizer.load(path)


def test_a_wrong_header_is_line_1(tmp_path: Path) -> None:
    path = tmp_path / "vendor.csv"
    path.write_text("resource,rule,path,source,target\n", encoding="utf-8")
    with pytest.raises(TableError, match=r"vendor.csv:1: header must be"):
        Normalizer.load(path)


# -- finding tables ---------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", ["epic", "cerner"])
def test_the_shipped_tables_load(vendor: str) -> None:
    rules = load_vendor(vendor, SHIPPED)
    assert rules.name == vendor and len(rules.rules) >= 5


@pytest.mark.parametrize("vendor", ["epic", "cerner"])
def test_every_shipped_row_cites_a_public_source(vendor: str) -> None:
    rules = load_vendor(vendor, SHIPPED)
    assert all(rule.cited.startswith(("https://", "http://")) for rule in rules.rules)


def test_the_shipped_epic_table_names_the_sandboxs_mrn() -> None:
    rules = load_vendor("epic", SHIPPED)
    patient = {"resourceType": "Patient", "id": "e1", "identifier": [
        {"system": "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14", "value": "SYN-7"}]}
    out = rules.apply(patient)
    assert out["identifier"] == [{"system": "urn:isthmus:sid:mrn", "value": "SYN-7"}]


def test_a_site_table_replaces_the_shipped_one(tmp_path: Path) -> None:
    shipped, site = tmp_path / "shipped", tmp_path / "site"
    (shipped / "vendors").mkdir(parents=True)
    (site / "vendors").mkdir(parents=True)
    table(shipped / "vendors", "Patient,telecom-use,telecom,cell,mobile,", name="acme.csv")
    table(site / "vendors", "Patient,telecom-use,telecom,cell,work,", name="acme.csv")
    patient = {"resourceType": "Patient", "telecom": [{"system": "phone", "value": "1",
                                                       "use": "cell"}]}
    assert load_vendor("acme", shipped).apply(patient)["telecom"][0]["use"] == "mobile"
    assert load_vendor("acme", shipped, site).apply(patient)["telecom"][0]["use"] == "work"
    # a site without its own copy keeps the shipped table
    assert load_vendor("acme", shipped, tmp_path / "elsewhere").rules


def test_an_unknown_vendor_is_a_table_error(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="no vendor table 'nobody'"):
        load_vendor("nobody", tmp_path)
    with pytest.raises(TableError, match="vendor table name"):
        load_vendor("../etc/passwd", tmp_path)


# -- rows for requests and refusals, repairs, hits --------------------------------------------


def test_token_values_are_run_back_to_every_vendor_system_and_code(tmp_path: Path) -> None:
    rules = normalizer(
        tmp_path,
        f"Patient,identifier-system,identifier,{VENDOR_MRN},{CANONICAL_MRN},",
        f"Patient,identifier-system,identifier,urn:oid:2.999.1.1.9,{CANONICAL_MRN},",
        "Observation,code,code.coding,urn:oid:2.999.3|GLU,http://loinc.org|2345-7,")
    roots = {"identifier": frozenset({"identifier"}), "code": frozenset({"code"})}
    sent = rules.to_vendor("Patient", [("identifier", f"{CANONICAL_MRN}|SYN-1"),
                                       ("family", "Synthetic")],
                           lambda name: roots.get(name, frozenset()))
    assert sent == [("identifier", f"{VENDOR_MRN}|SYN-1,urn:oid:2.999.1.1.9|SYN-1"),
                    ("family", "Synthetic")]
    code = rules.to_vendor("Observation", [("code", "http://loinc.org|2345-7,8867-4")],
                           lambda name: roots.get(name, frozenset()))
    assert code == [("code", "urn:oid:2.999.3|GLU,8867-4")]
    lines = {rule.line: rule.rule for rule in rules.rules}
    assert [rules.hits[line] for line in sorted(lines)] == [1, 1, 1]


def test_error_codes_keep_only_declared_systems_and_never_text(tmp_path: Path) -> None:
    rules = normalizer(tmp_path,
                       "OperationOutcome,error-code,issue.details.coding,urn:oid:2.999.7,,")
    outcome = {"resourceType": "OperationOutcome", "issue": [{
        "severity": "fatal", "code": "not-found", "diagnostics": "MRN-100001 unknown",
        "details": {"text": "MRN-100001", "coding": [
            {"system": "urn:oid:2.999.7", "code": "4102", "display": "MRN-100001"},
            {"system": "urn:oid:2.999.8", "code": "9"},
            {"system": "urn:oid:2.999.7", "code": "has space"}]}}]}
    assert rules.error_codes(outcome) == [{"system": "urn:oid:2.999.7", "code": "4102"}]


def test_drop_empty_repairs_only_when_asked(tmp_path: Path) -> None:
    rules = normalizer(tmp_path, "*,drop-empty,*,,,")
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                   "valueString": "", "note": [{"text": ""}], "category": []}
    assert rules.apply(observation) == observation
    repaired = rules.apply(observation, repair=True)
    assert repaired == {"resourceType": "Observation", "status": "final",
                        "code": {"text": "x"}}


def test_hits_on_reports_rows_without_touching_the_counters(tmp_path: Path) -> None:
    rules = normalizer(tmp_path,
                       f"Patient,identifier-system,identifier,{VENDOR_MRN},{CANONICAL_MRN},",
                       "Patient,telecom-use,telecom,cell,mobile,",
                       "Patient,telecom-use,telecom,car,mobile,")
    patient = quirky_patient()
    counts = rules.hits_on(patient)
    assert sorted(counts.values()) == [0, 1, 1]
    assert set(rules.hits.values()) == {0} and patient == quirky_patient()


def test_declarations_name_parameters_and_operations(tmp_path: Path) -> None:
    rules = normalizer(tmp_path, "Slot,search-param,-location,reference,,",
                       "Appointment,operation,type,$find,search,",
                       "Appointment,operation,type,$book,create,")
    assert list(rules.search_params("Slot")) == ["-location"]
    assert rules.declared_param("Slot", "-location") and not rules.declared_param(
        "Slot", "-colour")
    find = rules.operation("Appointment", "$find", "type")
    book = rules.operation("Appointment", "$book", "type")
    assert find is not None and find.methods == ("GET", "POST")
    assert book is not None and book.methods == ("POST",)
    assert rules.operation("Appointment", "$find", "instance") is None
