"""Mapping tables: what the checker refuses (file:line: reason) and what the engine does.

Every test writes its own small table set to tmp_path, so tables other people add to
`mappings/` cannot change what is tested here; a few copy the shipped set and break one
thing in it, as an analyst would.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.fhir.bundle import dumps, to_bundle
from gateway.fhir.validate import validate_resource
from gateway.hl7.location import Location
from gateway.hl7.message import parse_message
from gateway.mapping.engine import Translator
from gateway.mapping.errors import TableErrors, TranslationError
from gateway.mapping.tables import SHIPPED
from support.builders import hl7

Json = dict[str, Any]

GENDER_ROW = "PID-8,,gender,code,,AdministrativeSex,,"
MAP_HEADER = "source,condition,target,type,map,vocabulary,value,note\n"
PID_TABLE = MAP_HEADER + (
    "PID-3,,identifier,Identifier,CX-Identifier,,,\n"
    "PID-5,,name,HumanName,XPN-HumanName,,,\n"
    "PID-7,,birthDate,date,,,,\n"
    "PID-7,PID-7 LENGTH GREATER THAN 8,birthDate.extension[1].url,uri,,,"
    "http://hl7.org/fhir/StructureDefinition/patient-birthTime,\n"
    "PID-7,PID-7 LENGTH GREATER THAN 8,birthDate.extension[1].valueDateTime,dateTime,,,,\n"
    f"{GENDER_ROW}\n"
    "PID-29,,deceasedDateTime,dateTime,,,,\n"
    "PID-1,,,,,,,set id: deliberately not mapped\n"
)
PID_GENDER_LINE = 7  # the PID-8 row above
SEX_TABLE = (
    "code,display,fhir_code,fhir_display,fhir_system,note\n"
    "F,Female,female,Female,http://hl7.org/fhir/administrative-gender,\n"
    "M,Male,male,Male,http://hl7.org/fhir/administrative-gender,\n"
    "U,Unknown,unknown,Unknown,http://hl7.org/fhir/administrative-gender,\n"
)
EVENTS = "message_type,map,note\nADT^A01,ADT_A01,\n"
ADT_A01 = (
    "segment,after,resource,instance,map,links,condition,note\n"
    "PID,,Patient,new,PID-Patient,,,\n"
    "PV1,,Encounter,new,PV1-Encounter,subject=Patient,,\n"
    "OBX,,Observation,new,OBX-Observation,subject=Patient,,\n"
)
TABLES: dict[str, str] = {
    "events.csv": EVENTS,
    "messages/ADT_A01.csv": ADT_A01,
    "segments/PID-Patient.csv": PID_TABLE,
    "segments/PV1-Encounter.csv": MAP_HEADER + (
        ",,status,code,,,in-progress,\n"
        ",,class.code,code,,,IMP,\n"
        ",,class.system,uri,,,http://terminology.hl7.org/CodeSystem/v3-ActCode,\n"
        "PV1-7,,participant.individual,Reference(Practitioner),XCN-Practitioner,,,\n"),
    "segments/OBX-Observation.csv": MAP_HEADER + (
        ",,status,code,,,final,\n"
        "OBX-3.2,,code.text,string,,,,\n"
        "OBX-5,,valueQuantity.value,decimal,,,,\n"),
    "datatypes/CX-Identifier.csv": MAP_HEADER + (
        "CX.1,,value,string,,,,\n"
        "CX.4,,system,uri,HD-uri,,,\n"),
    "datatypes/HD-uri.csv": MAP_HEADER + 'HD.2,HD.3 EQUALS "ISO",$value,uri,,,urn:oid:{HD.2},\n',
    "datatypes/XPN-HumanName.csv": MAP_HEADER + (
        "XPN.1.1,,family,string,,,,\n"
        "XPN.2,,given,string,,,,\n"),
    "datatypes/XCN-Practitioner.csv": MAP_HEADER + (
        "XCN.1,,identifier[1].value,string,,,,\n"
        "XCN.9,,identifier[1].system,uri,HD-uri,,,\n"
        "XCN.2.1,,name[1].family,string,,,,\n"),
    "vocabulary/AdministrativeSex.csv": SEX_TABLE,
}

MSH = "MSH|^~\\&|SENDAPP|SENDFAC|RCV|RCVFAC|20240102120000-0500||ADT^A01^ADT_A01|CTRL-1|P|2.5.1"
RECEIVED = datetime(2024, 1, 2, 17, 0, 5, tzinfo=UTC)


def write_tables(root: Path, changes: dict[str, str] | None = None) -> Path:
    """The small table set above, with some files replaced (or added), under root."""
    for relative, text in {**TABLES, **(changes or {})}.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def pid_with(*rows: str) -> dict[str, str]:
    """PID-Patient with rows appended (the first lands on line PID_NEXT)."""
    return {"segments/PID-Patient.csv": PID_TABLE + "".join(f"{r}\n" for r in rows)}


PID_NEXT = PID_TABLE.count("\n") + 1


def pid(**fields: str) -> str:
    """A PID segment with the given fields (pid(f3='A1', f8='F'))."""
    numbers = {int(name[1:]): value for name, value in fields.items()}
    values = [numbers.get(n, "") for n in range(1, max(numbers, default=1) + 1)]
    return "|".join(["PID", *values])


def message(*segments: str, msh: str = MSH) -> bytes:
    return hl7(msh, *segments)


def bundle(translator: Translator, data: bytes, received_at: datetime = RECEIVED) -> Json:
    """The Bundle as a FHIR server would read it (after the JSON round trip)."""
    translation = translator.translate(parse_message(data), received_at=received_at)
    document: Json = orjson.loads(dumps(to_bundle(translation)))
    return document


def of_type(document: Json, resource_type: str) -> list[Json]:
    return [e for e in document["entry"] if e["resource"]["resourceType"] == resource_type]


def patient(document: Json) -> Json:
    (entry,) = of_type(document, "Patient")
    resource: Json = entry["resource"]
    return resource


@pytest.fixture(scope="module")
def tables_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tables(tmp_path_factory.mktemp("tables"))


@pytest.fixture(scope="module")
def translator(tables_dir: Path) -> Translator:
    return Translator.load(tables_dir)


def table_problems(root: Path, site: Path | None = None) -> str:
    with pytest.raises(TableErrors) as caught:
        Translator.load(root, site)
    return str(caught.value)


# -- the checker: one kind of bad table per case, each named by file:line ----------------

BAD_TABLES = [
    pytest.param(pid_with("QQQ-1,,birthDate,date,,,,"), "segments/PID-Patient.csv", PID_NEXT,
                 "'QQQ-1': unknown segment QQQ", id="unknown segment in a source"),
    pytest.param({"messages/ADT_A01.csv": ADT_A01 + "QQQ,,Patient,new,PID-Patient,,,\n"},
                 "messages/ADT_A01.csv", 5, "unknown HL7 v2 segment 'QQQ'",
                 id="unknown segment in a message map"),
    pytest.param({"segments/QQQ-Patient.csv": MAP_HEADER}, "segments/QQQ-Patient.csv", 1,
                 "unknown HL7 v2 segment 'QQQ'", id="unknown segment as a table name"),
    pytest.param(pid_with("PID-99,,birthDate,date,,,,"), "segments/PID-Patient.csv",
                 PID_NEXT, "'PID-99': PID has no field 99", id="unknown field number"),
    pytest.param({"datatypes/CX-Identifier.csv": TABLES["datatypes/CX-Identifier.csv"]
                  + "CX.13,,value,string,,,,\n"}, "datatypes/CX-Identifier.csv", 4,
                 "'CX.13': CX has no component 13", id="unknown component number"),
    pytest.param(pid_with("PID-9,,foo,string,,,,"), "segments/PID-Patient.csv", PID_NEXT,
                 "'foo' is not an element of Patient", id="unknown FHIR path"),
    pytest.param(pid_with("PID-9,,name.nickname,string,,,,"), "segments/PID-Patient.csv",
                 PID_NEXT, "'name.nickname' is not an element of Patient",
                 id="unknown FHIR path below a data type"),
    pytest.param(pid_with("PID-9,,birthDate,string,,,,"), "segments/PID-Patient.csv",
                 PID_NEXT, "type mismatch: birthDate is date, the row says 'string'",
                 id="declared type is not the model's"),
    pytest.param(pid_with("PID-9,,name,HumanName,CX-Identifier,,,"),
                 "segments/PID-Patient.csv", PID_NEXT,
                 "type mismatch: map CX-Identifier makes Identifier; name is HumanName",
                 id="map makes the wrong type"),
    pytest.param(pid_with("PID-9,,name,HumanName,,,,"), "segments/PID-Patient.csv",
                 PID_NEXT, "name is a HumanName: name the data-type map",
                 id="complex target without a map"),
    pytest.param(pid_with("PID-9,,gender,code,,Nope,,"), "segments/PID-Patient.csv",
                 PID_NEXT, "unknown vocabulary 'Nope'", id="unknown vocabulary"),
    pytest.param(pid_with("PID-9,,name,HumanName,XPN-Nope,,,"), "segments/PID-Patient.csv",
                 PID_NEXT, "unknown data-type map 'XPN-Nope'", id="unknown data-type map"),
    pytest.param(pid_with("PID-7,,birthDate,date,,,,"), "segments/PID-Patient.csv",
                 PID_NEXT, "duplicate of line 4", id="duplicate row"),
    pytest.param(pid_with(",,active,boolean,,,true,", ",,active,boolean,,,false,"),
                 "segments/PID-Patient.csv", PID_NEXT + 1,
                 f"contradicts line {PID_NEXT}: both set active unconditionally",
                 id="contradictory rows for one single-valued target"),
    pytest.param(pid_with('PID-9,PID-9 EQUALZ "X",name,HumanName,XPN-HumanName,,,'),
                 "segments/PID-Patient.csv", PID_NEXT,
                 "condition: expected VALUED, EQUALS, IN or LENGTH after PID-9, found "
                 "'EQUALZ'", id="condition does not parse"),
    pytest.param(pid_with("PID-9,(PID-9 VALUED,name,HumanName,XPN-HumanName,,,"),
                 "segments/PID-Patient.csv", PID_NEXT,
                 "condition: the condition ends early (expected ))",
                 id="condition with an open parenthesis"),
    pytest.param(pid_with("PID-9,PID-99 VALUED,name,HumanName,XPN-HumanName,,,"),
                 "segments/PID-Patient.csv", PID_NEXT, "'PID-99': PID has no field 99",
                 id="condition reads an unknown field"),
    pytest.param({"segments/PID-Patient.csv": PID_TABLE.replace(",type,", ",kind,", 1)},
                 "segments/PID-Patient.csv", 1,
                 "header must be source,condition,target,type,map,vocabulary,value,note "
                 "(unknown: kind) (missing: type)", id="bad header row"),
    pytest.param({"vocabulary/AdministrativeSex.csv": SEX_TABLE.replace(",female,", ",woman,")},
                 "segments/PID-Patient.csv", PID_GENDER_LINE,
                 "type mismatch: vocabulary AdministrativeSex gives 'woman', which is not a "
                 "code of gender", id="vocabulary breaks a required binding"),
    pytest.param({"vocabulary/AdministrativeSex.csv": SEX_TABLE + "*,any other,woman,,,\n"},
                 "segments/PID-Patient.csv", PID_GENDER_LINE,
                 "vocabulary AdministrativeSex gives 'woman'",
                 id="wildcard vocabulary row breaks a required binding"),
    pytest.param({"vocabulary/AdministrativeSex.csv": SEX_TABLE + "F,Again,female,,,\n"},
                 "vocabulary/AdministrativeSex.csv", 5, "code 'F' is listed twice",
                 id="vocabulary code listed twice"),
    pytest.param(pid_with(",,gender,code,,,woman,"), "segments/PID-Patient.csv", PID_NEXT,
                 "type mismatch: 'woman' is not one of the codes of gender",
                 id="constant code breaks a required binding"),
    pytest.param(pid_with(",,deceasedDateTime,dateTime,,,yesterday,"),
                 "segments/PID-Patient.csv", PID_NEXT,
                 "value 'yesterday' is not a valid date/time", id="constant does not convert"),
    pytest.param({"datatypes/XPN-HumanName.csv": TABLES["datatypes/XPN-HumanName.csv"]
                  + "PID-99,,text,string,,,,\n"}, "datatypes/XPN-HumanName.csv", 4,
                 "'PID-99': PID has no field 99",
                 id="data-type table reads an unknown segment field"),
    pytest.param({"events.csv": EVENTS + "ADT^A04,ADT_A99,\n"}, "events.csv", 3,
                 "unknown message map 'ADT_A99'", id="event names an unknown message map"),
    pytest.param({"messages/ADT_A01.csv": ADT_A01 + "PD1,,Patient,current,PD1-Patient,,,\n"},
                 "messages/ADT_A01.csv", 5, "unknown segment map 'PD1-Patient'",
                 id="message map names an unknown segment map"),
]


@pytest.mark.parametrize(("changes", "file", "line", "reason"), BAD_TABLES)
def test_a_bad_table_is_refused_naming_file_line_and_reason(
        tmp_path: Path, changes: dict[str, str], file: str, line: int, reason: str) -> None:
    root = write_tables(tmp_path, changes)
    problems = table_problems(root).splitlines()
    expected = f"{root / file}:{line}: "
    assert any(p.startswith(expected) and reason in p for p in problems), problems


def test_the_small_table_set_itself_is_valid(translator: Translator) -> None:
    assert translator.message_types == ["ADT^A01"]


def test_every_problem_is_listed_in_one_run_even_unreadable_files(tmp_path: Path) -> None:
    root = write_tables(tmp_path, {
        **pid_with("PID-99,,birthDate,date,,,,"),
        "segments/PV1-Encounter.csv": "source,target\n",
        "vocabulary/Broken.csv": "code,fhir_code\n",
    })
    problems = table_problems(root).splitlines()
    assert len(problems) == 2, problems  # the unreadable files; rows wait until they are read
    assert problems[0].startswith(f"{root / 'segments/PV1-Encounter.csv'}:1: header must be")
    assert problems[1].startswith(f"{root / 'vocabulary/Broken.csv'}:1: header must be")


@pytest.mark.parametrize("broken", ["vocabulary", "events"])
def test_breaking_one_shipped_table_is_reported_at_its_line(tmp_path: Path,
                                                            broken: str) -> None:
    tables = tmp_path / "mappings"
    shutil.copytree(SHIPPED, tables)
    if broken == "vocabulary":
        sex = tables / "vocabulary/AdministrativeSex.csv"
        sex.write_text(sex.read_text().replace(",female,", ",woman,", 1))
        rows = (tables / "segments/PID-Patient.csv").read_text().splitlines()
        line = next(n for n, row in enumerate(rows, 1) if row.startswith("PID-8,"))
        expected = (f"{tables / 'segments/PID-Patient.csv'}:{line}: type mismatch: "
                    "vocabulary AdministrativeSex gives 'woman'")
    else:
        events = tables / "events.csv"
        text = events.read_text().rstrip("\n") + "\nADT^Z99,NO_SUCH_MAP,\n"
        events.write_text(text)
        expected = (f"{events}:{text.count(chr(10))}: unknown message map 'NO_SUCH_MAP'")
    assert any(p.startswith(expected) for p in table_problems(tables).splitlines())


# -- site overrides ---------------------------------------------------------------------


def test_site_tables_replace_by_path_and_add_new_ones(tmp_path: Path) -> None:
    base = write_tables(tmp_path / "base")
    site = tmp_path / "site"
    (site / "vocabulary").mkdir(parents=True)
    (site / "segments").mkdir()
    (site / "messages").mkdir()
    # Replaces the base vocabulary wholly: F now means "other", and M is gone.
    (site / "vocabulary/AdministrativeSex.csv").write_text(
        "code,display,fhir_code,fhir_display,fhir_system,note\nF,Site F,other,,,\n")
    (site / "segments/ZPI-Patient.csv").write_text(MAP_HEADER + (
        "ZPI-2,,extension[1].url,uri,,,http://example.org/fhir/favourite-colour,\n"
        "ZPI-2,,extension[1].valueString,string,,,,\n"
        "ZPI-1,,,,,,,set id\n"))
    (site / "messages/ADT_A01.csv").write_text(
        ADT_A01 + "ZPI,,Patient,current,ZPI-Patient,,,\n")
    data = message(pid(f3="A1", f8="F"), "ZPI|1|Blue")

    shipped = Translator.load(base)
    plain = shipped.translate(parse_message(data))
    assert plain.z_segments == 1
    assert patient(bundle(shipped, data))["gender"] == "female"

    with_site = Translator.load(base, site)
    translation = with_site.translate(parse_message(data))
    assert translation.z_segments == 0 and translation.unmapped == {}
    resource = patient(bundle(with_site, data))
    assert resource["gender"] == "other"
    assert resource["extension"] == [{"url": "http://example.org/fhir/favourite-colour",
                                      "valueString": "Blue"}]
    # M came from the replaced file; the site's file does not have it, so it is left out.
    male = with_site.translate(parse_message(message(pid(f3="A1", f8="M"))))
    assert "gender" not in male.resources[0].content
    assert male.unmapped == {"PID-8": 1}


def test_a_site_table_is_checked_like_a_shipped_one(tmp_path: Path) -> None:
    base = write_tables(tmp_path / "base")
    site = tmp_path / "site"
    (site / "segments").mkdir(parents=True)
    (site / "segments/ZPI-Patient.csv").write_text(MAP_HEADER + "ZPI-2,,colour,string,,,,\n")
    problems = table_problems(base, site)
    assert f"{site / 'segments/ZPI-Patient.csv'}:2: 'colour' is not an element of " \
           "Patient" in problems


# -- conditions ---------------------------------------------------------------------------

# (condition on the PID-8 -> gender row, PID fields, whether gender is written)
CONDITIONS = [
    ("PID-7 VALUED", {"f7": "1980"}, True),
    ("PID-7 VALUED", {}, False),
    ("PID-7 NOT VALUED", {}, True),
    ("PID-7 NOT VALUED", {"f7": "1980"}, False),
    ("PID-18 VALUED", {"f18": '""'}, False),  # the explicit null is no value
    ('PID-18 EQUALS "A1"', {"f18": "A1"}, True),
    ('PID-18 EQUALS "A1"', {"f18": "a1"}, False),
    ('PID-18 EQUALS "A|1"', {"f18": "A\\F\\1"}, True),  # compared unescaped
    ('PID-18 NOT EQUALS "A1"', {"f18": "A2"}, True),
    ('PID-18 IN ("A1", "A2")', {"f18": "A2"}, True),
    ('PID-18 IN ("A1", "A2")', {"f18": "A3"}, False),
    ('PID-18 NOT IN ("A1", "A2")', {"f18": "A3"}, True),
    ('PID-18 NOT IN ("A1", "A2")', {"f18": "A1"}, False),
    ('PID-18.2 EQUALS "B"', {"f18": "A^B"}, True),
    ("PID-7 LENGTH GREATER THAN 8", {"f7": "198001021230"}, True),
    ("PID-7 LENGTH GREATER THAN 8", {"f7": "19800102"}, False),
    ("PID-7 LENGTH LESS THAN 5", {"f7": "1980"}, True),
    ("PID-7 LENGTH LESS THAN 5", {"f7": "198001"}, False),
    ("PID-7 VALUED AND PID-18 VALUED", {"f7": "1980", "f18": "A1"}, True),
    ("PID-7 VALUED AND PID-18 VALUED", {"f7": "1980"}, False),
    ("PID-7 VALUED OR PID-18 VALUED", {"f18": "A1"}, True),
    ("PID-7 VALUED OR PID-18 VALUED", {}, False),
    ("NOT PID-18 VALUED", {}, True),
    ("NOT PID-18 VALUED", {"f18": "A1"}, False),
    # NOT binds tighter than OR; parentheses change that.
    ("NOT PID-7 VALUED OR PID-18 VALUED", {"f7": "1980", "f18": "A1"}, True),
    ("NOT (PID-7 VALUED OR PID-18 VALUED)", {"f7": "1980", "f18": "A1"}, False),
    ('PID-7 VALUED AND (PID-18 EQUALS "X" OR PID-18 EQUALS "A1")', {"f7": "1980", "f18": "A1"},
     True),
    ('PID-7 VALUED AND PID-18 EQUALS "X" OR PID-18 EQUALS "A1"', {"f18": "A1"}, True),
    ('PID-7 VALUED AND (PID-18 EQUALS "X" OR PID-18 EQUALS "A1")', {"f18": "A1"}, False),
    ("if PID-7 is valued", {"f7": "1980"}, True),  # keywords in any case
    ("PID-18(2) VALUED", {"f18": "A1~A2"}, True),  # a named repetition: the field repeats
    ("PID-18(2) VALUED", {"f18": "A1"}, False),
    ('PID-18(2) EQUALS "A2" AND PID-7 NOT VALUED', {"f18": "A1~A2"}, True),
    ('MSH-10 EQUALS "CTRL-1"', {}, True),  # another segment's field
    ('MSH-10 EQUALS "OTHER"', {}, False),
]


@pytest.mark.parametrize(("condition", "fields", "written"), CONDITIONS)
def test_a_condition_decides_whether_its_row_applies(
        tmp_path: Path, condition: str, fields: dict[str, str], written: bool) -> None:
    # The condition cell is quoted, as any CSV cell holding commas or quotes must be.
    quoted = condition.replace('"', '""')
    text = PID_TABLE.replace(GENDER_ROW, f'PID-8,"{quoted}",gender,code,,AdministrativeSex,,')
    translator = Translator.load(write_tables(tmp_path, {"segments/PID-Patient.csv": text}))
    resource = patient(bundle(translator, message(pid(f3="A1", f8="F", **fields))))
    assert ("gender" in resource) is written


def test_a_data_type_table_reads_another_segments_field(tmp_path: Path) -> None:
    # The practitioner a PV1-7 names, identified at the sending facility (MSH-4) too.
    xcn = TABLES["datatypes/XCN-Practitioner.csv"] + "MSH-4,,identifier[2].value,string,,,,\n"
    translator = Translator.load(write_tables(tmp_path, {
        "datatypes/XCN-Practitioner.csv": xcn}))
    document = bundle(translator, message(pid(f3="A1"), "PV1|1|I|||||1234^DOC"))
    [entry] = of_type(document, "Practitioner")
    assert [i["value"] for i in entry["resource"]["identifier"]] == ["1234", "SENDFAC"]


def test_a_condition_on_the_rows_own_field_reads_the_repetition_being_mapped(
        tmp_path: Path) -> None:
    root = write_tables(tmp_path, pid_with(
        'PID-3,PID-3.5 EQUALS "MR",identifier.use,code,,,usual,'))
    translator = Translator.load(root)
    resource = patient(bundle(translator, message(pid(f3="A1^^^^PI~A2^^^^MR~A3^^^^PI"))))
    assert [i.get("use") for i in resource["identifier"]] == [None, "usual", None]


def test_a_documentation_row_with_a_condition_leaves_the_field_out_only_when_it_holds(
        tmp_path: Path) -> None:
    root = write_tables(tmp_path, pid_with(
        'PID-18,PID-18.2 EQUALS "V",identifier.value,string,,,,',
        'PID-18,PID-18.2 EQUALS "X",,,,,,an X account is deliberately left out'))
    translator = Translator.load(root)
    left_out = translator.translate(parse_message(message(pid(f3="A1", f18="ACC^X"))))
    assert "PID-18" not in left_out.unmapped
    unknown = translator.translate(parse_message(message(pid(f3="A1", f18="ACC^Y"))))
    assert unknown.unmapped.get("PID-18") == 1


def test_a_template_goes_through_the_rows_vocabulary(tmp_path: Path) -> None:
    root = write_tables(tmp_path, {
        **pid_with("PID-18,,identifier.system,uri,,Systems,{PID-18.2},"),
        "vocabulary/Systems.csv": "code,display,fhir_code,fhir_display,fhir_system,note\n"
                                  "LN,LOINC,http://loinc.org,,,\n"})
    resource = patient(bundle(Translator.load(root), message(pid(f3="A1", f18="ACC^LN"))))
    assert {"system": "http://loinc.org"} in resource["identifier"]
    unknown = patient(bundle(Translator.load(root), message(pid(f3="A1", f18="ACC^XX"))))
    assert {"system": "XX"} in unknown["identifier"]  # no row: the text as quoted


# -- repetitions, extensions, values --------------------------------------------------------


def test_each_repetition_becomes_its_own_element(translator: Translator) -> None:
    data = message(pid(f3="A1^^^&1.2.3&ISO~A2^^^&1.2.4&ISO~A3", f5="Doe^Jane~Roe^Jo"))
    resource = patient(bundle(translator, data))
    assert resource["identifier"] == [
        {"value": "A1", "system": "urn:oid:1.2.3"},
        {"value": "A2", "system": "urn:oid:1.2.4"},
        {"value": "A3"},
    ]
    assert resource["name"] == [{"family": "Doe", "given": ["Jane"]},
                                {"family": "Roe", "given": ["Jo"]}]


@pytest.mark.parametrize(("source", "expected"), [
    ("PID-5(1).2", ["Jane"]),   # the first repetition only
    ("PID-5(2).2", ["Jo"]),     # the second only
    ("PID-5.2", ["Jane", "Jo"]),  # every repetition
])
def test_a_source_naming_a_repetition_reads_that_repetition_alone(
        tmp_path: Path, source: str, expected: list[str]) -> None:
    root = write_tables(tmp_path, pid_with(f"{source},,communication.language.text,string,,,,"))
    data = message(pid(f3="A1", f5="Doe^Jane~Roe^Jo"))
    resource = patient(bundle(Translator.load(root), data))
    assert [c["language"]["text"] for c in resource["communication"]] == expected


def test_a_primitive_extension_is_written_in_its_underscore_twin(
        translator: Translator) -> None:
    resource = patient(bundle(translator, message(pid(f3="A1", f7="198503121230"))))
    assert resource["birthDate"] == "1985-03-12"
    assert resource["_birthDate"] == {"extension": [{
        "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
        "valueDateTime": "1985-03-12T12:30:00-05:00"}]}
    validate_resource(resource)
    assert "_birthDate" not in patient(bundle(translator, message(pid(f3="A1", f7="1985"))))


@pytest.mark.parametrize(("field", "sent", "msh7", "expected"), [
    ("birthDate", "1985", "20240102", "1985"),
    ("birthDate", "198503", "20240102", "1985-03"),
    ("birthDate", "19850312", "20240102", "1985-03-12"),
    ("deceasedDateTime", "2020", "20240102", "2020"),
    ("deceasedDateTime", "202001", "20240102", "2020-01"),
    ("deceasedDateTime", "20200102", "20240102", "2020-01-02"),
    ("deceasedDateTime", "202001021230+0200", "20240102120000-0500",
     "2020-01-02T12:30:00+02:00"),
    ("deceasedDateTime", "20200102123045.25-0330", "20240102",
     "2020-01-02T12:30:45.25-03:30"),
    ("deceasedDateTime", "202001021230", "20240102120000-0500", "2020-01-02T12:30:00-05:00"),
    ("deceasedDateTime", "202001021230", "20240102120000", "2020-01-02T12:30:00+01:00"),
])
def test_dtm_keeps_precision_and_offset(tables_dir: Path, field: str, sent: str,
                                        msh7: str, expected: str) -> None:
    # A local time takes MSH-7's offset, else the site's default (here +01:00).
    site_zone = Translator.load(tables_dir, default_offset="+01:00")
    msh = MSH.replace("20240102120000-0500", msh7)
    number = "f7" if field == "birthDate" else "f29"
    resource = patient(bundle(site_zone, message(pid(f3="A1", **{number: sent}), msh=msh)))
    assert resource[field] == expected


def test_a_decimal_keeps_its_digits_in_the_json(translator: Translator) -> None:
    data = message(pid(f3="A1"), "OBX|1|NM|1^Weight||1.50")
    text = dumps(to_bundle(translator.translate(parse_message(data)))).decode()
    assert '"valueQuantity":{"value":1.50}' in text
    document = orjson.loads(text)
    (observation,) = of_type(document, "Observation")
    validate_resource(observation["resource"])


def test_the_hl7_explicit_null_produces_nothing(tmp_path: Path) -> None:
    root = write_tables(tmp_path, pid_with(
        "PID-9,,identifier[9].value,string,,,alias-{PID-18},"))
    translator = Translator.load(root)
    data = message(pid(f3='""~A2', f5='""', f7='""', f8='""', f9="X", f18='""',
                       f29='""'))
    resource = patient(bundle(translator, data))
    del resource["id"]
    assert resource == {"resourceType": "Patient", "identifier": [{"value": "A2"}]}


def test_escapes_are_decoded(translator: Translator) -> None:
    data = message(pid(f3="A1", f5="O\\T\\Brien\\F\\x\\S\\y\\R\\z\\E\\^Re\\X4E\\e"))
    name = patient(bundle(translator, data))["name"][0]
    assert name["family"] == "O&Brien|x^y~z\\"
    assert name["given"] == ["ReNe"]


def test_an_invalid_value_fails_the_message_naming_the_location(
        translator: Translator) -> None:
    with pytest.raises(TranslationError) as caught:
        translator.translate(parse_message(message(pid(f3="A1", f7="19851345"))))
    error = caught.value
    assert str(error) == "PID-7: '19851345' is not a valid date"
    assert error.location == "PID-7"
    assert "19851345" not in error.safe_text
    assert error.safe_text.startswith("PID-7: ")


def test_an_invalid_number_names_its_field(translator: Translator) -> None:
    data = message(pid(f3="A1"), "OBX|1|NM|1^Weight||1,5")
    with pytest.raises(TranslationError) as caught:
        translator.translate(parse_message(data))
    assert str(caught.value) == "OBX-5: '1,5' is not a valid number"
    assert "1,5" not in caught.value.safe_text


def test_unmapped_fields_and_segments_are_counted_by_location_only(
        translator: Translator) -> None:
    data = message(pid(f1="1", f3="A1", f9="SECRETALIAS", f8="X"), "NK1|1|SECRETKIN",
                   "ZXY|1|SECRETZ", "ZXY|2|SECRETZ")
    translation = translator.translate(parse_message(data))
    # PID-1 has a documentation row; PID-8 'X' is not a code the binding allows.
    assert translation.unmapped == {"PID-9": 1, "PID-8": 1, "NK1": 1}
    assert translation.z_segments == 2
    assert "SECRET" not in orjson.dumps(translation.unmapped).decode()
    assert "gender" not in translation.resources[0].content


# -- the Bundle -----------------------------------------------------------------------------

REFERRING = message(pid(f3="A\\F\\1^^^&1.2.3&ISO", f5="Doe^Jane"),
                    "PV1|1|I|||||D1^Doc^Dan^^^^^^&2.16.1&ISO")


def requests(document: Json) -> list[tuple[str, Json]]:
    return [(e["fullUrl"], e["request"]) for e in document["entry"]]


def test_resending_a_message_gives_the_same_ids_and_requests(translator: Translator) -> None:
    first = bundle(translator, REFERRING, RECEIVED)
    again = bundle(translator, REFERRING, datetime(2024, 5, 6, tzinfo=UTC))
    assert requests(first) == requests(again)
    assert [e["resource"] for e in first["entry"][:-1]] == \
        [e["resource"] for e in again["entry"][:-1]]
    # Another control id: the visit (no identifier) is another one; the patient is not.
    other = bundle(translator, REFERRING.replace(b"|CTRL-1|", b"|CTRL-2|"))
    assert of_type(other, "Patient")[0]["fullUrl"] == of_type(first, "Patient")[0]["fullUrl"]
    assert of_type(other, "Encounter")[0]["fullUrl"] != \
        of_type(first, "Encounter")[0]["fullUrl"]


def test_requests_are_conditional_on_business_identifiers(translator: Translator) -> None:
    document = bundle(translator, REFERRING)
    validate_resource(document)
    (patient_entry,) = of_type(document, "Patient")
    # The MRN "A|1": its "|" escaped as a search value (else it splits system from code),
    # then quoted.
    assert patient_entry["request"] == {"method": "PUT",
                                        "url": "Patient?identifier=urn:oid:1.2.3|A%5C%7C1"}
    assert "id" not in patient_entry["resource"]
    (practitioner,) = of_type(document, "Practitioner")
    assert practitioner["request"] == {"method": "POST", "url": "Practitioner",
                                       "ifNoneExist": "identifier=urn:oid:2.16.1|D1"}
    (encounter,) = of_type(document, "Encounter")
    encounter_id = encounter["resource"]["id"]
    assert encounter["request"] == {"method": "PUT", "url": f"Encounter/{encounter_id}"}
    assert encounter["fullUrl"] == f"urn:uuid:{encounter_id}"
    assert encounter["resource"]["subject"] == {"reference": patient_entry["fullUrl"]}
    assert encounter["resource"]["participant"] == [
        {"individual": {"reference": practitioner["fullUrl"]}}]
    for entry in document["entry"]:
        assert entry["fullUrl"].startswith("urn:uuid:")


def test_an_identifier_without_a_system_is_put_at_a_stable_id(translator: Translator) -> None:
    entry = of_type(bundle(translator, message(pid(f3="A1"))), "Patient")[0]
    resource_id = entry["resource"]["id"]
    assert entry["request"] == {"method": "PUT", "url": f"Patient/{resource_id}"}
    again = of_type(bundle(translator, message(pid(f3="A1")).replace(b"CTRL-1", b"CTRL-9")),
                    "Patient")[0]
    assert again["fullUrl"] == entry["fullUrl"]  # same identifier at the same sender


def test_the_provenance_names_the_source_message(translator: Translator) -> None:
    document = bundle(translator, REFERRING, RECEIVED)
    provenance_entry = document["entry"][-1]
    provenance = provenance_entry["resource"]
    assert provenance["resourceType"] == "Provenance"
    assert provenance_entry["request"] == {
        "method": "PUT", "url": f"Provenance/{provenance_entry['resource']['id']}"}
    what = provenance["entity"][0]["what"]
    assert what["identifier"]["value"] == "CTRL-1"
    assert what["display"] == "ADT^A01"
    assert provenance["agent"][0]["who"]["identifier"]["value"] == "SENDAPP^SENDFAC"
    assert provenance["recorded"] == "2024-01-02T17:00:05.000+00:00"
    assert provenance["target"] == [{"reference": e["fullUrl"]}
                                    for e in document["entry"][:-1]]


def test_a_translation_error_carries_its_v2_location_for_the_err_segment(
        translator: Translator) -> None:
    data = message(pid(f3="A1"), "OBX|1|NM|1^Weight||15", "OBX|2|NM|1^Weight||1,5")
    with pytest.raises(TranslationError) as caught:
        translator.translate(parse_message(data))
    assert caught.value.where == "OBX[2]-5"
    assert caught.value.v2_location == Location("OBX", 2, 5)
    assert TranslationError("resourceType", "is missing").v2_location is None
