"""FHIR search: the parameter table, index rows from resources, and search request parsing.

One row, one expectation. Every refused request is checked for the rule it names and for
the value it must not echo (search values are PHI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from gateway.fhir.search import (
    MAX_INSTANT,
    MIN_INSTANT,
    TABLE,
    UNRESOLVED,
    Include,
    ParsedSearch,
    SearchError,
    SearchRegistry,
    SearchTableError,
    UnsupportedFormat,
)
from gateway.mapping.tables import SHIPPED
from gateway.store.fhir import (
    DateIndex,
    DateMatch,
    IdMatch,
    IndexEntry,
    LastUpdatedMatch,
    MissingMatch,
    QuantityIndex,
    QuantityMatch,
    ReferenceIndex,
    ReferenceMatch,
    SortKey,
    StringIndex,
    StringMatch,
    TokenIndex,
    TokenMatch,
)

Json = dict[str, Any]
SHIPPED_TABLE = SHIPPED / TABLE


@pytest.fixture(scope="module")
def registry() -> SearchRegistry:
    return SearchRegistry.load(SHIPPED_TABLE)


def rows(registry: SearchRegistry, resource_type: str, resource: Json,
         param: str) -> list[IndexEntry]:
    return [e for e in registry.index(resource_type, resource) if e.param == param]


def parse(registry: SearchRegistry, query: str, resource_type: str = "Patient", *,
          lenient: bool = False) -> ParsedSearch:
    pairs = [tuple(p.split("=", 1)) for p in query.split("&")] if query else []
    return registry.parse(resource_type, [(k, v) for k, v in pairs], default_count=20,
                          max_count=100, lenient=lenient)


# -- the table ------------------------------------------------------------------------------


def _table_rows() -> list[dict[str, str]]:
    import csv
    lines = [line for line in SHIPPED_TABLE.read_text(encoding="utf-8").splitlines()
             if not line.startswith("#")]
    return list(csv.DictReader(lines))


@pytest.mark.parametrize("row", _table_rows(), ids=lambda r: f"{r['resource']}.{r['name']}")
def test_every_path_starts_at_an_element_of_the_r4b_model(row: dict[str, str]) -> None:
    model = get_fhir_model_class(row["resource"])
    names = {f.alias or n for n, f in model.model_fields.items()}
    for alternative in row["path"].split("|"):
        first = alternative.split(".")[0].split("[")[0]
        assert first in names, f"{row['resource']}.{first} is not in the R4B model"


def test_shipped_table_loads_with_every_type_the_gateway_serves(
        registry: SearchRegistry) -> None:
    assert set(registry.types()) >= {
        "Patient", "Encounter", "Observation", "DiagnosticReport", "Appointment",
        "MedicationRequest", "Immunization", "AllergyIntolerance", "Condition",
        "DocumentReference", "ServiceRequest", "Practitioner", "Location", "Slot",
        "Schedule"}


@pytest.mark.parametrize(("resource_type", "names"), [
    ("Patient", {"identifier", "name", "family", "given", "birthdate", "gender", "phone",
                 "email", "telecom", "address", "address-city", "address-postalcode"}),
    ("Encounter", {"patient", "subject", "date", "status", "identifier", "class"}),
    ("Observation", {"patient", "subject", "date", "status", "code", "identifier",
                     "category", "value-quantity"}),
    ("DiagnosticReport", {"patient", "subject", "date", "status", "code", "identifier"}),
    ("Appointment", {"patient", "actor", "date", "status", "identifier"}),
    ("MedicationRequest", {"patient", "subject", "date", "authoredon", "status", "code",
                           "identifier"}),
    ("Immunization", {"patient", "date", "status", "vaccine-code", "identifier"}),
    ("AllergyIntolerance", {"patient", "code", "clinical-status", "date", "identifier"}),
    ("Condition", {"patient", "subject", "code", "clinical-status", "identifier"}),
    ("DocumentReference", {"patient", "subject", "date", "type", "status", "identifier"}),
    ("ServiceRequest", {"patient", "subject", "status", "code", "identifier"}),
    ("Practitioner", {"name", "family", "given", "identifier"}),
    ("Location", {"name", "identifier", "status"}),
    ("Slot", {"schedule", "start", "status"}),
    ("Schedule", {"actor", "active"}),
])
def test_table_defines_the_parameters_clients_use(registry: SearchRegistry,
                                                  resource_type: str, names: set[str]) -> None:
    assert names <= set(registry.params(resource_type))


@pytest.mark.parametrize(("resource_type", "expected"), [
    ("Patient", ()),
    ("Observation", ("subject", "performer")),
    ("Encounter", ("patient",)),
    ("Appointment", ("actor",)),
    ("Immunization", ("patient",)),
    ("AllergyIntolerance", ("patient", "recorder", "asserter")),
    ("Condition", ("patient", "asserter")),
    ("DocumentReference", ("subject", "author")),
    ("MedicationRequest", ("subject",)),
    ("DiagnosticReport", ("subject",)),
    ("ServiceRequest", ("subject", "performer")),
    ("Schedule", ("actor",)),
    ("Slot", ()),
    ("Practitioner", ()),
    ("Location", ()),
    ("Basic", ()),
])
def test_compartment_params_follow_r4_compartment_definition(
        registry: SearchRegistry, resource_type: str, expected: tuple[str, ...]) -> None:
    assert registry.compartment_params(resource_type) == expected


@pytest.mark.parametrize(("resource_type", "param", "roots"), [
    ("Patient", "phone", {"telecom"}),
    ("Patient", "birthdate", {"birthDate"}),
    ("Patient", "family", {"name"}),
    ("Patient", "_id", {"id"}),
    ("Patient", "_lastUpdated", {"meta"}),
    ("Observation", "date", {"effectiveDateTime", "effectivePeriod", "effectiveInstant"}),
    ("DocumentReference", "identifier", {"masterIdentifier", "identifier"}),
    ("Appointment", "patient", {"participant"}),
])
def test_element_roots(registry: SearchRegistry, resource_type: str, param: str,
                       roots: set[str]) -> None:
    assert registry.element_roots(resource_type, param) == roots


def test_params_carry_definition_for_capability_statement(registry: SearchRegistry) -> None:
    subject = registry.params("Observation")["subject"]
    assert (subject.type, subject.targets[0], subject.compartment) == (
        "reference", "Patient", True)
    assert registry.params("Basic") == {}


HEADER = "resource,name,type,path,targets,compartment\n"


@pytest.mark.parametrize(("row", "reason"), [
    ("Patientt,name,string,name,,", "not a FHIR R4 resource type"),
    ("Patient,name,string,nmae,,", "no element 'nmae'"),
    ("Patient,name,string,name.famly,,", "no element 'famly'"),
    ("Patient,birthdate,token,birthDate,,", "is a date; a token parameter reads"),
    ("Patient,name,text,name,,", "type 'text' is not one of"),
    ("Patient,Name,string,name,,", "lower-case letters"),
    ("Patient,organization,reference,managingOrganization,,", "lists its target types"),
    ("Patient,organization,reference,managingOrganization,Patient,", "cannot refer to"),
    ("Patient,gender,token,gender,Patient,", "for reference parameters only"),
    ("Encounter,location,reference,location.location,Location,1", "Patient compartment"),
    ("Patient,phone,token,telecom[sytem=phone],,", "no element 'sytem'"),
    ("Patient,phone,token,telecom[system],,", "element[child=value]"),
    ("Patient,gender,token,gender,,yes", "compartment is 1, 0 or empty"),
    ("Patient,_id,token,id,,", "built in"),
    ("Patient,gender,token,,,", "path is empty"),
    ("Patient,gender,token,gender,,,extra", "has 7 cells"),
])
def test_bad_table_row_names_file_and_line(tmp_path: Path, row: str, reason: str) -> None:
    table = tmp_path / TABLE
    table.write_text(HEADER + "# a comment row\nPatient,family,string,name.family,,\n"
                     + row + "\n", encoding="utf-8")
    with pytest.raises(SearchTableError) as caught:
        SearchRegistry.load(table)
    assert str(caught.value).startswith(f"{table}:4: ")
    assert reason in str(caught.value)


def test_duplicate_row_and_bad_header_are_refused(tmp_path: Path) -> None:
    table = tmp_path / TABLE
    table.write_text(HEADER + "Patient,gender,token,gender,,\nPatient,gender,token,gender,,\n")
    with pytest.raises(SearchTableError, match=r":3: Patient gender is defined twice"):
        SearchRegistry.load(table)
    table.write_text("resource,name,type\n")
    with pytest.raises(SearchTableError, match=r":1: header must be"):
        SearchRegistry.load(table)


# -- extraction -----------------------------------------------------------------------------

PATIENT: Json = {
    "resourceType": "Patient", "id": "p1",
    "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN-7"}, {"value": "nosystem"}],
    "name": [{"family": "Ångström", "given": ["Zoë", "Anne  Marie"], "prefix": ["Dr"],
              "suffix": ["III"], "text": "Dr Zoë Ångström"}],
    "birthDate": "1985",
    "gender": "female",
    "active": False,
    "telecom": [{"system": "phone", "value": "(555) 010-0199"},
                {"system": "email", "value": "Zoe.A@Example.ORG"},
                {"system": "fax", "value": "555.010.0100"}],
    "address": [{"line": ["1 Rue de l'Église"], "city": "Montréal", "state": "QC",
                 "postalCode": "H2X 1Y4", "country": "CA"}],
}


@pytest.mark.parametrize(("param", "expected"), [
    ("identifier", [TokenIndex("identifier", "urn:oid:1.2.3", "MRN-7"),
                    TokenIndex("identifier", None, "nosystem")]),
    ("gender", [TokenIndex("gender", None, "female")]),
    ("active", [TokenIndex("active", None, "false")]),
    ("phone", [TokenIndex("phone", None, "5550100199")]),
    ("email", [TokenIndex("email", None, "zoe.a@example.org")]),
    ("telecom", [TokenIndex("telecom", None, "5550100199"),
                 TokenIndex("telecom", None, "zoe.a@example.org"),
                 TokenIndex("telecom", None, "5550100100")]),
    ("family", [StringIndex("family", "angstrom", "Ångström")]),
    ("given", [StringIndex("given", "zoe", "Zoë"),
               StringIndex("given", "anne marie", "Anne  Marie")]),
    ("name", [StringIndex("name", "angstrom", "Ångström"), StringIndex("name", "zoe", "Zoë"),
              StringIndex("name", "anne marie", "Anne  Marie"),
              StringIndex("name", "dr", "Dr"), StringIndex("name", "iii", "III"),
              StringIndex("name", "dr zoe angstrom", "Dr Zoë Ångström")]),
    ("address", [StringIndex("address", "1 rue de l'eglise", "1 Rue de l'Église"),
                 StringIndex("address", "montreal", "Montréal"),
                 StringIndex("address", "qc", "QC"),
                 StringIndex("address", "h2x 1y4", "H2X 1Y4"),
                 StringIndex("address", "ca", "CA")]),
    ("address-city", [StringIndex("address-city", "montreal", "Montréal")]),
    ("address-postalcode", [StringIndex("address-postalcode", "h2x 1y4", "H2X 1Y4")]),
    ("birthdate", [DateIndex("birthdate", "1985-01-01T00:00:00.000000Z",
                             "1985-12-31T23:59:59.999999Z")]),
])
def test_patient_index_rows(registry: SearchRegistry, param: str,
                            expected: list[IndexEntry]) -> None:
    assert rows(registry, "Patient", PATIENT, param) == expected


@pytest.mark.parametrize(("value", "low", "high"), [
    ("1985", "1985-01-01T00:00:00.000000Z", "1985-12-31T23:59:59.999999Z"),
    ("1985-02", "1985-02-01T00:00:00.000000Z", "1985-02-28T23:59:59.999999Z"),
    ("1984-02", "1984-02-01T00:00:00.000000Z", "1984-02-29T23:59:59.999999Z"),
    ("1985-03-04", "1985-03-04T00:00:00.000000Z", "1985-03-04T23:59:59.999999Z"),
    ("0999-03-04", "0999-03-04T00:00:00.000000Z", "0999-03-04T23:59:59.999999Z"),
])
def test_date_covers_its_precision(registry: SearchRegistry, value: str, low: str,
                                   high: str) -> None:
    patient = {"resourceType": "Patient", "birthDate": value}
    assert rows(registry, "Patient", patient, "birthdate") == [
        DateIndex("birthdate", low, high)]


@pytest.mark.parametrize(("value", "low", "high"), [
    ("2020-06-01T10:30:00+02:00", "2020-06-01T08:30:00.000000Z",
     "2020-06-01T08:30:00.999999Z"),
    ("2020-06-01T23:30:00-05:00", "2020-06-02T04:30:00.000000Z",
     "2020-06-02T04:30:00.999999Z"),
    ("2020-06-01T10:30:00Z", "2020-06-01T10:30:00.000000Z", "2020-06-01T10:30:00.999999Z"),
    ("2020-06-01T10:30:00", "2020-06-01T10:30:00.000000Z", "2020-06-01T10:30:00.999999Z"),
    ("2020-06-01T10:30Z", "2020-06-01T10:30:00.000000Z", "2020-06-01T10:30:59.999999Z"),
    ("2020-06-01T10:30:00.5Z", "2020-06-01T10:30:00.500000Z",
     "2020-06-01T10:30:00.599999Z"),
    ("2020-06-01T10:30:00.123456789Z", "2020-06-01T10:30:00.123456Z",
     "2020-06-01T10:30:00.123456Z"),
    ("2020-12-31T23:00:00-01:00", "2021-01-01T00:00:00.000000Z",
     "2021-01-01T00:00:00.999999Z"),
    ("0001-01-01T00:00:00+01:00", MIN_INSTANT, MIN_INSTANT),
    ("2020", "2020-01-01T00:00:00.000000Z", "2020-12-31T23:59:59.999999Z"),
])
def test_date_time_converted_to_utc(registry: SearchRegistry, value: str, low: str,
                                    high: str) -> None:
    observation = {"resourceType": "Observation", "effectiveDateTime": value}
    assert rows(registry, "Observation", observation, "date") == [DateIndex("date", low, high)]


@pytest.mark.parametrize(("period", "low", "high"), [
    ({"start": "2020-01-01", "end": "2020-01-03T12:00:00Z"}, "2020-01-01T00:00:00.000000Z",
     "2020-01-03T12:00:00.999999Z"),
    ({"start": "2020-01-01"}, "2020-01-01T00:00:00.000000Z", MAX_INSTANT),
    ({"end": "2020-01-01"}, MIN_INSTANT, "2020-01-01T23:59:59.999999Z"),
])
def test_period_range_open_ends(registry: SearchRegistry, period: Json, low: str,
                                high: str) -> None:
    encounter = {"resourceType": "Encounter", "period": period}
    assert rows(registry, "Encounter", encounter, "date") == [DateIndex("date", low, high)]


@pytest.mark.parametrize(("resource_type", "resource", "param", "expected"), [
    ("Observation", {"code": {"coding": [{"system": "http://loinc.org", "code": "718-7"},
                                         {"code": "HGB"}, {"system": "x"}], "text": "Hb"}},
     "code", [TokenIndex("code", "http://loinc.org", "718-7"), TokenIndex("code", None, "HGB")]),
    ("Encounter", {"class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                             "code": "AMB"}},
     "class", [TokenIndex("class", "http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB")]),
    ("Observation", {"effectivePeriod": {"start": "2020-01-01"}}, "date",
     [DateIndex("date", "2020-01-01T00:00:00.000000Z", MAX_INSTANT)]),
    ("Observation", {"valueQuantity": {"value": 7.2, "system": "http://unitsofmeasure.org",
                                       "code": "mmol/L", "unit": "mmol/l"}},
     "value-quantity", [QuantityIndex("value-quantity", 7.2, "http://unitsofmeasure.org",
                                      "mmol/L"),
                        QuantityIndex("value-quantity", 7.2, None, "mmol/l")]),
    ("Observation", {"valueQuantity": {"value": 120, "unit": "mg"}}, "value-quantity",
     [QuantityIndex("value-quantity", 120.0, None, None),
      QuantityIndex("value-quantity", 120.0, None, "mg")]),
    ("MedicationRequest", {"authoredOn": "2021-05-05",
                           "dosageInstruction": [{"timing": {"event": ["2021-05-06",
                                                                       "2021-05-07"]}}]},
     "date", [DateIndex("date", "2021-05-06T00:00:00.000000Z", "2021-05-06T23:59:59.999999Z"),
              DateIndex("date", "2021-05-07T00:00:00.000000Z", "2021-05-07T23:59:59.999999Z")]),
    ("MedicationRequest", {"medicationCodeableConcept": {"coding": [{"code": "123"}]}},
     "code", [TokenIndex("code", None, "123")]),
    ("Immunization", {"occurrenceDateTime": "2021-03"}, "date",
     [DateIndex("date", "2021-03-01T00:00:00.000000Z", "2021-03-31T23:59:59.999999Z")]),
    ("AllergyIntolerance", {"code": {"coding": [{"code": "a"}]},
                            "reaction": [{"substance": {"coding": [{"code": "b"}]}}]},
     "code", [TokenIndex("code", None, "a"), TokenIndex("code", None, "b")]),
    ("Location", {"name": "Ward 3", "alias": ["Wärd Three"]}, "name",
     [StringIndex("name", "ward 3", "Ward 3"), StringIndex("name", "ward three", "Wärd Three")]),
    ("Schedule", {"active": True}, "active", [TokenIndex("active", None, "true")]),
    ("Patient", {"name": [{"given": ["Ann", "Ann"]}, {"given": ["Ann"]}]}, "given",
     [StringIndex("given", "ann", "Ann")]),
])
def test_index_rows_by_element_type(registry: SearchRegistry, resource_type: str,
                                    resource: Json, param: str,
                                    expected: list[IndexEntry]) -> None:
    assert rows(registry, resource_type, resource, param) == expected


@pytest.mark.parametrize(("reference", "target"), [
    ("Patient/123", "Patient/123"),
    ("https://ehr.example.org/fhir/R4/Patient/123", "Patient/123"),
    ("Patient/123/_history/4", "Patient/123"),
    ("http://x/fhir/Patient/a.b-c/_history/2", "Patient/a.b-c"),
    ("urn:uuid:6d3b0f4e-6a7b-4b1f-9c55-3a1e4c2f7d90", None),
    ("#contained1", None),
    ("Patient", None),
    ("Patient/", None),
    ("patient/123", None),
    ("", None),
    ("Group/9", "Group/9"),
])
def test_reference_forms(registry: SearchRegistry, reference: str, target: str | None) -> None:
    observation = {"resourceType": "Observation", "subject": {"reference": reference}}
    expected = [ReferenceIndex("subject", target)] if target else []
    assert rows(registry, "Observation", observation, "subject") == expected


@pytest.mark.parametrize(("param", "expected"), [
    ("patient", [ReferenceIndex("patient", "Patient/1")]),
    ("practitioner", [ReferenceIndex("practitioner", "Practitioner/2")]),
    ("actor", [ReferenceIndex("actor", "Patient/1"), ReferenceIndex("actor", "Practitioner/2"),
               ReferenceIndex("actor", "Location/3")]),
    ("location", [ReferenceIndex("location", "Location/3")]),
])
def test_reference_targets_are_honoured(registry: SearchRegistry, param: str,
                                        expected: list[IndexEntry]) -> None:
    appointment = {"resourceType": "Appointment", "participant": [
        {"actor": {"reference": "Patient/1"}}, {"actor": {"reference": "Practitioner/2"}},
        {"actor": {"reference": "Location/3"}}, {"actor": {"display": "someone"}}]}
    assert rows(registry, "Appointment", appointment, param) == expected


@pytest.mark.parametrize(("resource_type", "resource"), [
    ("Patient", {"name": "Smith"}),
    ("Patient", {"name": [None, 3, "Smith", {"given": "Ann", "family": ["x"]}]}),
    ("Patient", {"identifier": ["MRN"]}),
    ("Patient", {"identifier": {"value": 5}}),
    ("Patient", {"telecom": [{"system": "phone", "value": 5550100}, {"system": "phone"}]}),
    ("Patient", {"telecom": [{"system": "phone", "value": " - () "}]}),
    ("Patient", {"birthDate": 1985}),
    ("Patient", {"birthDate": "1985-13-01"}),
    ("Patient", {"birthDate": "0000"}),
    ("Patient", {"birthDate": "yesterday"}),
    ("Patient", {"gender": ["female"]}),
    ("Patient", {"gender": ""}),
    ("Patient", {"address": [{"line": [None, 7]}]}),
    ("Encounter", {"period": {"start": "not a date", "end": "2020"}}),
    ("Encounter", {"period": {}}),
    ("Encounter", {"period": "2020"}),
    ("Encounter", {"class": "AMB"}),
    ("Observation", {"code": {"coding": "x"}}),
    ("Observation", {"code": {"coding": [None, {"code": 1}]}}),
    ("Observation", {"subject": "Patient/1"}),
    ("Observation", {"subject": {"reference": 42}}),
    ("Observation", {"effectiveDateTime": "2020-01-01T25:00:00Z"}),
    ("Observation", {"effectiveDateTime": "2020-01-01T10:00:00+24:00"}),
    ("Observation", {"valueQuantity": {"value": "12"}}),
    ("Observation", {"valueQuantity": {"value": True}}),
    ("Observation", {"valueQuantity": {"value": float("nan")}}),
    ("Observation", {"valueQuantity": {"unit": "mg"}}),
    ("Appointment", {"participant": {"actor": {"reference": "Patient/1"}}}),
    ("Appointment", {"participant": [{"actor": None}]}),
    ("Coverage", {"status": "active"}),
])
def test_odd_data_is_skipped_not_raised(registry: SearchRegistry, resource_type: str,
                                        resource: Json) -> None:
    entries = registry.index(resource_type, {"resourceType": resource_type, **resource})
    for entry in entries:
        assert entry.param in registry.params(resource_type)
    odd_params = {"name", "identifier", "telecom", "phone", "birthdate", "gender", "date",
                  "class", "code", "subject", "patient", "value-quantity", "address"}
    # Only well-formed pieces survive (a valid string in an odd list, an unlisted repeat).
    survivors = {(e.param, getattr(e, "code", None) or getattr(e, "normalized", None)
                  or getattr(e, "target", None)) for e in entries if e.param in odd_params}
    assert survivors <= {("name", "x"), ("name", "ann"), ("gender", "female"),
                         ("subject", "Patient/1"), ("patient", "Patient/1")}


def test_index_of_non_dict_resource_is_empty(registry: SearchRegistry) -> None:
    assert registry.index("Patient", []) == []  # type: ignore[arg-type]


# -- parsing: values ------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "clauses"), [
    ("gender=female", ((TokenMatch("gender", None, "female"),),)),
    ("identifier=urn:oid:1.2.3|MRN-7",
     ((TokenMatch("identifier", "urn:oid:1.2.3", "MRN-7"),),)),
    ("identifier=|MRN-7", ((TokenMatch("identifier", "", "MRN-7"),),)),
    ("identifier=urn:oid:1.2.3|", ((TokenMatch("identifier", "urn:oid:1.2.3", None),),)),
    ("identifier=a\\|b", ((TokenMatch("identifier", None, "a|b"),),)),
    ("identifier=a\\,b", ((TokenMatch("identifier", None, "a,b"),),)),
    ("gender:not=male", ((TokenMatch("gender", None, "male", negate=True),),)),
    ("gender=male,female", ((TokenMatch("gender", None, "male"),
                             TokenMatch("gender", None, "female")),)),
    ("gender:not=male&gender:not=other", ((TokenMatch("gender", None, "male", True),),
                                          (TokenMatch("gender", None, "other", True),))),
    ("phone=(555) 010-0199", ((TokenMatch("phone", None, "5550100199"),),)),
    ("email=Zoe.A@Example.ORG", ((TokenMatch("email", None, "zoe.a@example.org"),),)),
    ("telecom=555.010.0199", ((TokenMatch("telecom", None, "5550100199"),),)),
    ("name=Zoë", ((StringMatch("name", "zoe"),),)),
    ("family=  ÅNGSTRÖM  ", ((StringMatch("family", "angstrom"),),)),
    ("name:exact=Zoë", ((StringMatch("name", "Zoë", "exact", ("zoe",)),),)),
    ("name:contains=ngstr", ((StringMatch("name", "ngstr", "contains"),),)),
    ("name=ann,zoe&family=smith", ((StringMatch("name", "ann"), StringMatch("name", "zoe")),
                                   (StringMatch("family", "smith"),))),
    ("birthdate:missing=true", ((MissingMatch("birthdate", True),),)),
    ("gender:missing=false", ((MissingMatch("gender", False),),)),
    ("_id=p1,p2", ((IdMatch("p1"), IdMatch("p2")),)),
    ("_id=p1&_id=p2", ((IdMatch("p1"),), (IdMatch("p2"),))),
    ("_lastUpdated=gt2024-01-01", ((LastUpdatedMatch("gt", "2024-01-01T00:00:00.000000Z",
                                                      "2024-01-01T23:59:59.999999Z"),),)),
    ("general-practitioner=Practitioner/7",
     ((ReferenceMatch("general-practitioner", "Practitioner/7"),),)),
    ("organization=7", ((ReferenceMatch("organization", "Organization/7"),),)),
    ("organization=https://ehr.example.org/fhir/Organization/7/_history/3",
     ((ReferenceMatch("organization", "Organization/7"),),)),
    ("general-practitioner:Practitioner=7",
     ((ReferenceMatch("general-practitioner", "Practitioner/7"),),)),
    ("general-practitioner=7", ((ReferenceMatch("general-practitioner", "Practitioner/7"),
                                 ReferenceMatch("general-practitioner", "Organization/7"),
                                 ReferenceMatch("general-practitioner", "PractitionerRole/7")),)),
    ("gender=", ()),
    ("gender=,", ()),
])
def test_patient_search_clauses(registry: SearchRegistry, query: str,
                                clauses: tuple[Any, ...]) -> None:
    assert parse(registry, query).query.clauses == clauses


@pytest.mark.parametrize(("value", "prefix", "low", "high"), [
    ("1985", "eq", "1985-01-01T00:00:00.000000Z", "1985-12-31T23:59:59.999999Z"),
    ("eq1985-02", "eq", "1985-02-01T00:00:00.000000Z", "1985-02-28T23:59:59.999999Z"),
    ("ne1985-02-03", "ne", "1985-02-03T00:00:00.000000Z", "1985-02-03T23:59:59.999999Z"),
    ("lt2000", "lt", "2000-01-01T00:00:00.000000Z", "2000-12-31T23:59:59.999999Z"),
    ("le2000", "le", "2000-01-01T00:00:00.000000Z", "2000-12-31T23:59:59.999999Z"),
    ("gt2000", "gt", "2000-01-01T00:00:00.000000Z", "2000-12-31T23:59:59.999999Z"),
    ("ge2000", "ge", "2000-01-01T00:00:00.000000Z", "2000-12-31T23:59:59.999999Z"),
    ("sa2000", "sa", "2000-01-01T00:00:00.000000Z", "2000-12-31T23:59:59.999999Z"),
    ("eb2000", "eb", "2000-01-01T00:00:00.000000Z", "2000-12-31T23:59:59.999999Z"),
    ("ap2000", "ap", "2000-01-01T00:00:00.000000Z", "2000-12-31T23:59:59.999999Z"),
    ("ge2020-06-01T10:30:00+02:00", "ge", "2020-06-01T08:30:00.000000Z",
     "2020-06-01T08:30:00.999999Z"),
    ("ge2020-06-01T10:30:00 02:00", "ge", "2020-06-01T08:30:00.000000Z",
     "2020-06-01T08:30:00.999999Z"),
    ("2020-06-01T10:30:00.25Z", "eq", "2020-06-01T10:30:00.250000Z",
     "2020-06-01T10:30:00.259999Z"),
    ("2020-06-01T10:30:00", "eq", "2020-06-01T10:30:00.000000Z",
     "2020-06-01T10:30:00.999999Z"),
])
def test_date_prefixes_and_precision(registry: SearchRegistry, value: str, prefix: str,
                                     low: str, high: str) -> None:
    assert registry.parse("Patient", [("birthdate", value)], default_count=20,
                          max_count=100).query.clauses == (
        (DateMatch("birthdate", prefix, low, high),),)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "match"), [
    ("5.4", QuantityMatch("value-quantity", "eq", 5.4)),
    ("gt5.4", QuantityMatch("value-quantity", "gt", 5.4)),
    ("le-1e2", QuantityMatch("value-quantity", "le", -100.0)),
    ("ap.5", QuantityMatch("value-quantity", "ap", 0.5)),
    ("5.4|http://unitsofmeasure.org|mg",
     QuantityMatch("value-quantity", "eq", 5.4, "http://unitsofmeasure.org", "mg")),
    ("5.4||mg", QuantityMatch("value-quantity", "eq", 5.4, None, "mg")),
])
def test_quantity_values(registry: SearchRegistry, value: str, match: QuantityMatch) -> None:
    parsed = registry.parse("Observation", [("value-quantity", value)], default_count=20,
                            max_count=100)
    assert parsed.query.clauses == ((match,),)


@pytest.mark.parametrize(("query", "clauses"), [
    ("patient=123", ((ReferenceMatch("patient", "Patient/123"),),)),
    ("subject=Patient/123", ((ReferenceMatch("subject", "Patient/123"),),)),
    ("subject:Patient=123", ((ReferenceMatch("subject", "Patient/123"),),)),
    ("subject:missing=true", ((MissingMatch("subject", True),),)),
    ("code=http://loinc.org|718-7,http://loinc.org|4548-4",
     ((TokenMatch("code", "http://loinc.org", "718-7"),
       TokenMatch("code", "http://loinc.org", "4548-4")),)),
    ("date=ge2020&date=lt2021", (
        (DateMatch("date", "ge", "2020-01-01T00:00:00.000000Z", "2020-12-31T23:59:59.999999Z"),),
        (DateMatch("date", "lt", "2021-01-01T00:00:00.000000Z", "2021-12-31T23:59:59.999999Z"),))),
])
def test_observation_search_clauses(registry: SearchRegistry, query: str,
                                    clauses: tuple[Any, ...]) -> None:
    assert parse(registry, query, "Observation").query.clauses == clauses


# -- parsing: result parameters -------------------------------------------------------------


@pytest.mark.parametrize(("query", "count", "offset"), [
    ("", 20, 0),
    ("_count=5", 5, 0),
    ("_count=0", 0, 0),
    ("_count=500", 100, 0),
    ("_count=99999999999999999999", 100, 0),
    ("_count=10&_offset=30", 10, 30),
    ("_summary=count&_count=10", 0, 0),
])
def test_paging(registry: SearchRegistry, query: str, count: int, offset: int) -> None:
    parsed = parse(registry, query)
    assert (parsed.query.count, parsed.query.offset) == (count, offset)


@pytest.mark.parametrize(("query", "sort"), [
    ("_sort=birthdate", (SortKey("birthdate"),)),
    ("_sort=-birthdate,family,-_lastUpdated,_id",
     (SortKey("birthdate", True), SortKey("family"), SortKey("_lastUpdated", True),
      SortKey("_id"))),
])
def test_sort(registry: SearchRegistry, query: str, sort: tuple[SortKey, ...]) -> None:
    assert parse(registry, query).query.sort == sort


@pytest.mark.parametrize(("query", "resource_type", "includes", "revincludes"), [
    ("_include=Observation:subject", "Observation",
     (Include("Observation", "subject"),), ()),
    ("_include=Observation:subject:Patient&_include=Observation:performer", "Observation",
     (Include("Observation", "subject", "Patient"), Include("Observation", "performer")), ()),
    ("_include=Appointment:patient&_include=Appointment:patient", "Appointment",
     (Include("Appointment", "patient"),), ()),
    ("_revinclude=Observation:subject&_revinclude=Encounter:patient:Patient", "Patient", (),
     (Include("Observation", "subject", "Patient"), Include("Encounter", "patient", "Patient"))),
    ("_revinclude=Slot:schedule", "Schedule", (), (Include("Slot", "schedule", "Schedule"),)),
])
def test_include_and_revinclude(registry: SearchRegistry, query: str, resource_type: str,
                                includes: tuple[Include, ...],
                                revincludes: tuple[Include, ...]) -> None:
    parsed = parse(registry, query, resource_type)
    assert (parsed.includes, parsed.revincludes) == (includes, revincludes)


@pytest.mark.parametrize(("query", "resource_type", "elements"), [
    ("", "Patient", None),
    ("_elements=name,birthDate,name", "Patient", ("name", "birthDate")),
    ("_elements=effective,status", "Observation",
     ("effectiveDateTime", "effectiveInstant", "effectivePeriod", "effectiveTiming", "status")),
    ("_elements=class", "Encounter", ("class",)),
])
def test_elements(registry: SearchRegistry, query: str, resource_type: str,
                  elements: tuple[str, ...] | None) -> None:
    assert parse(registry, query, resource_type).elements == elements


@pytest.mark.parametrize(("query", "summary_count", "total"), [
    ("", False, False),
    ("_summary=count", True, True),
    ("_summary=false", False, False),
    ("_total=accurate", False, True),
    ("_total=estimate", False, False),
    ("_total=none", False, False),
])
def test_summary_and_total(registry: SearchRegistry, query: str, summary_count: bool,
                           total: bool) -> None:
    parsed = parse(registry, query)
    assert (parsed.summary_count, parsed.total) == (summary_count, total)


@pytest.mark.parametrize("value", ["json", "application/json", "application/fhir+json",
                                   "application/fhir json", "application/fhir+json; charset=utf-8",
                                   "JSON"])
def test_json_formats_accepted(registry: SearchRegistry, value: str) -> None:
    assert parse(registry, f"_format={value}&_pretty=true").query.clauses == ()


@pytest.mark.parametrize(("query", "params", "shape"), [
    ("identifier=urn:x|MRN-7&_count=5", {"identifier"}, "identifier=*&_count=*"),
    ("name:contains=zoe&birthdate=ge1985&_sort=-gender&_id=p1&_lastUpdated=gt2020",
     {"name", "birthdate", "gender", "_id", "_lastUpdated"},
     "name:contains=*&birthdate=*&_sort=*&_id=*&_lastUpdated=*"),
    ("gender:missing=true&_include=Patient:organization&_format=json", {"gender"},
     "gender:missing=*&_include=*&_format=*"),
])
def test_params_and_shape_carry_no_values(registry: SearchRegistry, query: str,
                                          params: set[str], shape: str) -> None:
    parsed = parse(registry, query)
    assert parsed.params == params
    assert parsed.shape == shape


def test_lenient_ignores_unknown_parameters_without_naming_them(
        registry: SearchRegistry) -> None:
    parsed = parse(registry, "ssn=123-45-6789&gender=female", lenient=True)
    assert parsed.query.clauses == ((TokenMatch("gender", None, "female"),),)
    assert parsed.params == {"gender"}
    assert parsed.shape == "(unknown)=*&gender=*"


# -- refusals: the rule, never the value ----------------------------------------------------


@pytest.mark.parametrize(("query", "resource_type", "param", "rule", "secret"), [
    ("ssn=123-45-6789", "Patient", "ssn", "not a search parameter", "123-45-6789"),
    ("5550100199=x", "Patient", "(parameter)", "not a search parameter", "5550100199"),
    ("subject.name=Smith", "Observation", "subject.name", "chained", "Smith"),
    ("_has:Observation:patient:code=1234-5", "Patient", "_has", "reverse-chained",
     "1234-5"),
    ("name:text=Smith", "Patient", "name", "modifier not supported", "Smith"),
    ("gender:text=female", "Patient", "gender", "modifier not supported", "female"),
    ("gender:exact=female", "Patient", "gender", "modifier not supported", "female"),
    ("birthdate:exact=1985", "Patient", "birthdate", "modifier not supported", "1985"),
    ("subject:Organization=5", "Observation", "subject", "target type", "Organization/5"),
    ("subject:identifier=urn:x|MRN-7", "Observation", "subject", "modifier not supported",
     "MRN-7"),
    ("_id:not=p1", "Patient", "_id", "takes no modifier", "p1"),
    ("birthdate=1985-13-40", "Patient", "birthdate", "not a valid date", "1985-13-40"),
    ("birthdate=gt19850101", "Patient", "birthdate", "not a valid date", "19850101"),
    ("birthdate=zz1985", "Patient", "birthdate", "not a valid date", "zz1985"),
    ("birthdate=1985-02-30", "Patient", "birthdate", "not a valid date", "1985-02-30"),
    ("_lastUpdated=yesterday", "Patient", "_lastUpdated", "not a valid date", "yesterday"),
    ("gender:missing=maybe", "Patient", "gender:missing", "true or false", "maybe"),
    ("gender:not=male,female", "Patient", "gender:not", "one value", "male,female"),
    ("identifier=a|b|MRN-7", "Patient", "identifier", "not a valid token", "MRN-7"),
    ("identifier=|", "Patient", "identifier", "not a valid token", "identifier=|"),
    ("value-quantity=heavy", "Observation", "value-quantity", "not a valid quantity",
     "heavy"),
    ("value-quantity=5.4|mg", "Observation", "value-quantity", "not a valid quantity",
     "5.4|mg"),
    ("value-quantity=1e999", "Observation", "value-quantity", "not a finite number", "1e999"),
    ("subject=Patient/12 34", "Observation", "subject", "not a valid reference", "12 34"),
    ("subject=Organization/77", "Observation", "subject", "does not", "Organization/77"),
    ("subject=urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a", "Observation", "subject",
     "not a valid reference", "61ebe359"),
    ("_id=p1/../p2", "Patient", "_id", "not a valid id", "p1/../p2"),
    ("_count=-1", "Patient", "_count", "whole number", "-1"),
    ("_count=ten", "Patient", "_count", "whole number", "ten"),
    ("_count=5&_count=6", "Patient", "_count", "only once", "6"),
    ("_offset=-7", "Patient", "_offset", "whole number", "-7"),
    ("_offset=12345678901", "Patient", "_offset", "whole number", "12345678901"),
    ("_sort=ssn", "Patient", "_sort", "search parameters of Patient", "ssn"),
    ("_sort=birthdate,", "Patient", "_sort", "search parameters of Patient", "birthdate,"),
    ("_include=Patient:*", "Patient", "_include", "wildcard", "Patient:*"),
    ("_include=*", "Patient", "_include", "wildcard", "_include=*"),
    ("_include=Observation:subject", "Patient", "_include", "source type must be Patient",
     "Observation:subject"),
    ("_include=Patient:gender", "Patient", "_include", "not a reference", "Patient:gender"),
    ("_include=Patient", "Patient", "_include", "Type:parameter", "_include=Patient"),
    ("_include=Observation:subject:Organization", "Observation", "_include",
     "target type", "Subject:Organization"),
    ("_include:iterate=Observation:subject", "Observation", "_include", "no modifier",
     "Observation:subject"),
    ("_revinclude=Observation:encounter", "Patient", "_revinclude", "refer to Patient",
     "Observation:encounter"),
    ("_revinclude=Observation:subject:Group", "Patient", "_revinclude",
     "refer to Patient", "subject:Group"),
    ("_revinclude=Basic:subject", "Patient", "_revinclude", "not a reference",
     "Basic:subject"),
    ("_elements=ssn", "Patient", "_elements", "top-level elements", "ssn"),
    ("_elements=name.family", "Patient", "_elements", "top-level elements", "name.family"),
    ("_summary=true", "Patient", "_summary", "not supported", "_summary=true"),
    ("_summary=text", "Patient", "_summary", "not supported", "_summary=text"),
    ("_summary=data", "Patient", "_summary", "not supported", "_summary=data"),
    ("_summary=maybe", "Patient", "_summary", "count or false", "maybe"),
    ("_total=exact", "Patient", "_total", "none, estimate or accurate", "exact"),
    ("gender=female", "Basic", "_type", "not searchable", "female"),
])
def test_refused_search_names_rule_not_value(registry: SearchRegistry, query: str,
                                             resource_type: str, param: str, rule: str,
                                             secret: str) -> None:
    with pytest.raises(SearchError) as caught:
        parse(registry, query, resource_type)
    error = caught.value
    assert type(error) is SearchError and error.status == 400
    assert error.param == param
    assert str(error).startswith(f"{param}: ") and rule in str(error)
    assert secret.lower() not in str(error).lower()


@pytest.mark.parametrize("value", ["xml", "application/fhir+xml", "text/xml",
                                   "application/xml+fhir", "ttl", "text/html"])
def test_non_json_format_is_unsupported(registry: SearchRegistry, value: str) -> None:
    with pytest.raises(UnsupportedFormat) as caught:
        parse(registry, f"_format={value}")
    assert caught.value.status == 415 and caught.value.param == "_format"
    assert value not in str(caught.value)


@pytest.mark.parametrize("query", [
    "birthdate=1985-13-40",
    "gender:missing=maybe",
    "subject.name=Smith",
    "gender:text=female",
])
def test_lenient_still_refuses_malformed_known_parameters(registry: SearchRegistry,
                                                          query: str) -> None:
    with pytest.raises(SearchError):
        parse(registry, query, lenient=True)


@pytest.mark.parametrize(("resource_type", "resource", "expected"), [
    ("Patient", {"id": "p1"}, {"Patient/p1"}),
    ("Observation", {"subject": {"reference": "Patient/p1"},
                     "performer": [{"reference": "Patient/p2"},
                                   {"reference": "Practitioner/x"}]},
     {"Patient/p1", "Patient/p2"}),
    ("Observation", {"subject": {"reference": "Group/g1"}}, set()),
    ("Appointment", {"participant": [{"actor": {"reference": "Patient/p3"}},
                                     {"actor": {"reference": "Location/l1"}}]}, {"Patient/p3"}),
    ("Practitioner", {"id": "x"}, set()),
    ("Basic", {"subject": {"reference": "Patient/p1"}}, set()),
])
def test_patients_names_the_compartments_a_resource_is_in(
        registry: SearchRegistry, resource_type: str, resource: Json,
        expected: set[str]) -> None:
    assert registry.patients(resource_type, {"resourceType": resource_type,
                                             **resource}) == expected


@pytest.mark.parametrize(("resource_type", "resource", "expected"), [
    ("Patient", {"id": "p1"}, {"Patient/p1"}),
    # The patient a resource is about, never one who only took part in it.
    ("Observation", {"subject": {"reference": "Patient/p1"},
                     "performer": [{"reference": "Patient/p2"}]}, {"Patient/p1"}),
    ("Observation", {"performer": [{"reference": "Patient/p2"}]}, set()),
    ("Condition", {"subject": {"reference": "Patient/p1"},
                   "asserter": {"reference": "Patient/p2"}}, {"Patient/p1"}),
    ("DocumentReference", {"subject": {"reference": "https://other.example/fhir/Patient/p1"},
                           "author": [{"reference": "Patient/p2"}]}, {"Patient/p1"}),
    ("Appointment", {"participant": [{"actor": {"reference": "Patient/p1"}},
                                     {"actor": {"reference": "Patient/p2"}},
                                     {"actor": {"reference": "Practitioner/x"}}]},
     {"Patient/p1", "Patient/p2"}),
    ("Coverage", {"beneficiary": {"reference": "Patient/p1"},
                  "subscriber": {"reference": "Patient/p2"}}, {"Patient/p1"}),
    # Whom a reference names cannot be told: it could be anyone.
    ("Observation", {"subject": {"reference": "Group/g1"}}, {UNRESOLVED}),
    ("Observation", {"subject": {"identifier": {"value": "mrn-1"}}}, {UNRESOLVED}),
    ("Observation", {"subject": {"reference": "#p1"}}, {UNRESOLVED}),
    ("Observation", {"subject": {"reference": "urn:uuid:0d2b8ae4-6ba9-4c1c-9e1d-0a44"}},
     {UNRESOLVED}),
    ("Observation", {"subject": {"reference": "Device/d1"}}, set()),
])
def test_about_names_the_patients_a_resource_is_about(
        registry: SearchRegistry, resource_type: str, resource: Json,
        expected: set[str]) -> None:
    assert registry.about(resource_type, {"resourceType": resource_type,
                                          **resource}) == expected


def test_every_compartment_type_has_a_subject_parameter(registry: SearchRegistry) -> None:
    """A confined client's write must name its patient somewhere: a type in the Patient
    compartment without a subject parameter could never be written by one."""
    for resource_type in registry.types():
        if registry.compartment_params(resource_type):
            assert any(p.subject for p in registry.params(resource_type).values()), \
                resource_type


LAB = {"resourceType": "Observation", "id": "o1", "status": "final",
       "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                 "observation-category", "code": "laboratory"}]}],
       "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
       "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2026-01-02"}


@pytest.mark.parametrize(("query", "expected"), [
    ("category=laboratory", True),
    ("category=vital-signs", False),
    ("category=vital-signs,laboratory", True),
    ("category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory", True),
    ("category=urn:other|laboratory", False),
    ("category:not=laboratory", False),
    ("code=718-7&subject=Patient/p1", True),
    ("code=718-7&subject=Patient/p2", False),
    ("_id=o1", True),
    ("status:missing=false", True),
    ("date=2026", None),  # dates are not judged in memory: the caller refuses
])
def test_matches_judges_a_resource_against_a_search_in_memory(
        registry: SearchRegistry, query: str, expected: bool | None) -> None:
    from urllib.parse import parse_qsl

    parsed = registry.parse("Observation", parse_qsl(query), default_count=10, max_count=10)
    assert registry.matches("Observation", LAB, parsed.query.clauses) is expected
