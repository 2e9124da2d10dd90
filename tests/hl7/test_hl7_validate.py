"""Validation against the HL7 definitions of a message's version (gateway.hl7.validate).

Every message here is synthetic (invented names, identifiers and dates). Cases are rows:
a message, a level, and the (HL7 table 0357 code, location) pairs expected back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REFERENCE
from gateway.hl7.batch import split_messages
from gateway.hl7.definitions import FieldDef, definitions, library_version
from gateway.hl7.errors import ErrorCode, Hl7Error
from gateway.hl7.message import Message, check_header, parse_message
from gateway.hl7.validate import MAX_ERRORS, validate
from support.builders import hl7

MESSAGES = Path(__file__).parents[1] / "messages"
CANARIES = ("CANARYSMITH", "19851345")


def _load(name: str) -> list[str]:
    return (MESSAGES / name).read_bytes().decode().rstrip("\r").split("\r")


ADT_A01 = _load("validate_adt_a01_v251.hl7")  # MSH EVN PID PD1 NK1 PV1 PV2 OBX AL1 DG1
ADT_V22 = _load("validate_adt_a01_v22.hl7")  # MSH-9 is "ADT" alone; the event is in EVN-1


def _edit(base: list[str], replace: dict[str, str] | None = None,
          after: dict[str, list[str]] | None = None) -> bytes:
    """`base` with whole segments replaced (by id) and extra segments after an id."""
    out: list[str] = []
    for segment in base:
        seg_id = segment[:3]
        out.append((replace or {}).get(seg_id, segment))
        out.extend((after or {}).get(seg_id, []))
    return hl7(*out)


def _msh(message_type: str, version: str = "2.5.1") -> str:
    return ("MSH|^~\\&|TESTAPP|TESTFAC|ISTHMUS|GATEWAY|20240102030405||"
            f"{message_type}|VAL0002|P|{version}")


def _parse(data: bytes) -> Message:
    message = parse_message(data)
    check_header(message.header)
    return message


def _found(errors: list[Hl7Error]) -> list[tuple[int, str]]:
    return [(int(error.code), str(error.location)) for error in errors]


PID_OK = ADT_A01[2]

CASES = [
    # -- standard: what the MLLP edge refuses ----------------------------------------------
    pytest.param(_edit(ADT_A01), "standard", [], id="valid-adt-a01-standard"),
    pytest.param(_edit(ADT_A01), "strict", [], id="valid-adt-a01-strict"),
    pytest.param(_edit(ADT_A01, {"MSH": _msh("XYZ^A01")}), "standard",
                 [(200, "MSH-9.1")], id="unknown-message-type-200"),
    pytest.param(_edit(ADT_A01, {"MSH": _msh("ADT^A99^ADT_A01")}), "standard",
                 [(201, "MSH-9.2")], id="unknown-event-201"),
    pytest.param(_edit(ADT_A01, {"MSH": _msh("XYZ^Q99")}), "standard",
                 [(200, "MSH-9.1"), (201, "MSH-9.2")], id="unknown-type-and-event"),
    pytest.param(_edit(ADT_A01, {"MSH": _msh("ZPI^Z01^ZPI_Z01")}), "standard", [],
                 id="z-message-type-allowed"),
    pytest.param(_edit(ADT_A01, {"MSH": _msh("ZPI^A99")}), "standard", [],
                 id="z-message-type-any-event"),
    pytest.param(_edit(ADT_A01, {"MSH": _msh("ADT^Z42")}), "standard", [],
                 id="z-event-allowed"),
    pytest.param(_edit(ADT_A01[:1], {"MSH": _msh("ACK")}), "standard", [],
                 id="ack-without-event"),
    pytest.param(_edit(ADT_A01[:1], {"MSH": _msh("ACK^Q99^ACK")},
                       after={"MSH": ["MSA|AA|X1"]}), "standard", [],
                 id="ack-with-any-event"),
    # -- required segments, by the message structure (hl7/structure.py) --------------------
    pytest.param(_edit([s for s in ADT_A01 if not s.startswith("PID")]), "standard",
                 [(100, "PID")], id="adt-a01-without-pid-100"),
    pytest.param(_edit([s for s in ADT_A01 if not s.startswith(("PID", "PV1"))]), "standard",
                 [(100, "PID"), (100, "PV1")], id="each-missing-segment-named"),
    pytest.param(_edit([s for s in ADT_A01 if not s.startswith("EVN")]), "standard", [],
                 id="evn-left-out-is-accepted"),
    pytest.param(_edit(ADT_A01[:1], {"MSH": _msh("ACK^A01^ACK")}), "standard",
                 [(100, "MSA")], id="ack-without-msa-100"),
    pytest.param(_edit(ADT_A01[:1], {"MSH": _msh("ORU^R01^ORU_R01")}), "standard",
                 [(100, "OBR")], id="oru-without-any-result-group-segment"),
    pytest.param(_edit(ADT_A01[:1], {"MSH": _msh("ORU^R01^ORU_R01")},
                       after={"MSH": [ADT_A01[2]]}), "standard", [],
                 id="a-group-is-there-when-one-of-its-segments-is"),
    pytest.param(_edit([s for s in ADT_A01 if not s.startswith("PID")],
                       {"MSH": _msh("ADT^A04")}), "standard", [],
                 id="structure-not-derivable-is-not-checked"),
    pytest.param(_edit(ADT_A01, after={"PID": ["ZPI|1|SITE DATA"]}), "standard", [],
                 id="z-segment-allowed"),
    pytest.param(_edit(ADT_A01, after={"PID": ["ZPI|1|SITE DATA"]}), "strict", [],
                 id="z-segment-allowed-strict"),
    pytest.param(_edit(ADT_A01, after={"PV1": ["XYZ|1"]}), "standard",
                 [(100, "XYZ")], id="unknown-segment-100"),
    pytest.param(_edit(ADT_A01, after={"PID": ["XYZ|1"], "PV1": ["XYZ|2"]}), "standard",
                 [(100, "XYZ"), (100, "XYZ[2]")], id="unknown-segment-sequence"),
    pytest.param(_edit(ADT_A01, after={"PV1": ["Pv1|1|I"]}), "standard",
                 [(100, "[7]")], id="malformed-segment-id-names-position"),
    pytest.param(_edit(ADT_A01, after={"PV1": ["free text broken over a line"]}), "standard",
                 [(100, "[7]")], id="text-line-is-not-a-segment"),
    pytest.param(_edit(ADT_A01, after={"PV1": ["", ""]}), "standard", [],
                 id="blank-lines-ignored"),
    pytest.param(_edit(ADT_A01, after={"PID": [""], "PV1": ["", "  ", "Pv1|1|I", "XYZ|1"]}),
                 "strict", [(100, "[7]"), (100, "XYZ")], id="blank-lines-do-not-count"),
    pytest.param(_edit(ADT_A01, after={"PV1": ["PRT|1|AD"]}), "standard", [],
                 id="later-version-segment-accepted"),
    pytest.param(_edit(ADT_A01, after={"PV1": ["PRT|1|AD"]}), "strict", [(100, "PRT")],
                 id="later-version-segment-strict-100"),
    pytest.param(_edit(ADT_A01, {"MSH": _msh("OML^O21^OML_O21", "2.3")}), "standard", [],
                 id="later-version-message-type-accepted"),
    pytest.param(_edit(ADT_A01, {"MSH": _msh("OML^O21^OML_O21", "2.3")}), "strict",
                 [(200, "MSH-9.1"), (201, "MSH-9.2")], id="later-version-message-type-strict"),
    pytest.param(_edit(ADT_A01, {"MSH": _msh("ADT^A01^ADT_A01", "2.7.1")}), "standard", [],
                 id="v2.7.1-reads-2.7-definitions"),
    # -- v2.1/v2.2: the trigger event lives in EVN-1 -----------------------------------------
    pytest.param(_edit(ADT_V22), "standard", [], id="v22-event-in-evn"),
    pytest.param(_edit(ADT_V22), "strict", [], id="v22-event-in-evn-strict"),
    pytest.param(_edit(ADT_V22, {"EVN": "EVN|A99|198801020304"}), "standard",
                 [(201, "EVN-1")], id="v22-unknown-event-in-evn-201"),
    pytest.param(_edit(ADT_V22, {"EVN": "EVN||198801020304"}), "strict", [(101, "EVN-1")],
                 id="v22-no-event-anywhere"),
    # -- strict: fields ----------------------------------------------------------------------
    pytest.param(_edit(ADT_A01, {"PID": PID_OK.replace("|TST0001^^^TESTHOSP^MR|", "||")}),
                 "strict", [(101, "PID-3")], id="required-field-missing-101"),
    pytest.param(_edit(ADT_A01, {"PID": PID_OK.replace("|TST0001^^^TESTHOSP^MR|", "||")}),
                 "standard", [], id="required-field-not-checked-by-standard"),
    pytest.param(_edit(ADT_A01, {"MSH": _msh("ADT")}), "strict", [(101, "MSH-9.2")],
                 id="event-required-from-v231"),
    pytest.param(_edit(ADT_A01, {"PID": PID_OK.replace("|19800101|", "|19800101~19800102|")}),
                 "strict", [(102, "PID-7(2)")], id="too-many-repetitions-102"),
    pytest.param(_edit(ADT_A01, {"PID": PID_OK.replace("PID|1|", "PID|A|")}),
                 "strict", [(102, "PID-1")], id="si-format-102"),
    pytest.param(_edit(ADT_A01, {"PID": PID_OK.replace("PID|1|", "PID|12345|")}),
                 "strict", [(102, "PID-1")], id="si-too-long-102"),
    pytest.param(_edit(ADT_A01, {"PID": PID_OK.replace("|19800101|", "|19801301|")}),
                 "strict", [(102, "PID-7.1")], id="ts-month-13-102"),
    pytest.param(_edit(ADT_A01, {"PID": PID_OK.replace("|19800101|", "|19800230|")}),
                 "strict", [(102, "PID-7.1")], id="ts-february-30-102"),
    pytest.param(_edit(ADT_A01, {"PID": PID_OK.replace("|19800101|", "|198001011230+0100^M|")}),
                 "strict", [], id="ts-with-zone-and-precision-ok"),
    pytest.param(_edit(ADT_A01, {"PID": PID_OK.replace("|19800101|", "|1980010112305.1|")}),
                 "strict", [(102, "PID-7.1")], id="ts-odd-digits-102"),
    pytest.param(_edit(ADT_A01, {"PID": PID_OK.replace("|19800101|", '|""|')}),
                 "strict", [], id="hl7-null-is-a-value"),
    pytest.param(_edit(ADT_A01, {"AL1": "AL1|1|DA|TST1^Test allergen|||2024-01-02"}),
                 "strict", [(102, "AL1-6")], id="dt-format-102"),
    pytest.param(_edit(ADT_A01, {"DG1": "DG1|1||TST9^Test^I10|||A||||||1.5.0"}),
                 "strict", [(102, "DG1-12")], id="nm-format-102"),
    pytest.param(_edit(ADT_A01, {"DG1": "DG1|1||TST9^Test^I10|||A||||||-12.5"}),
                 "strict", [], id="nm-signed-decimal-ok"),
    pytest.param(_edit(ADT_A01, after={"PV1": ["TQ1|1|||1230~2561"]}), "strict",
                 [(102, "TQ1-4(2)")], id="tm-format-102"),
    pytest.param(_edit(ADT_A01, {"PID": PID_OK.replace("|F|", "|X|")}),
                 "strict", [(103, "PID-8")], id="is-table-0001-103"),
    pytest.param(_edit(ADT_A01, {"PID": PID_OK + "|||||||||||Q"}),
                 "strict", [(103, "PID-24")], id="id-table-0136-103"),
    pytest.param(_edit(ADT_A01, {"PID": PID_OK.replace("|F|", "|X|")}),
                 "standard", [], id="table-values-not-checked-by-standard"),
    pytest.param(_edit(ADT_A01, {"MSH": _msh("ADT^A01^ADT_A01", "2.2")}), "standard", [],
                 id="v22-without-tables-standard"),
]


@pytest.mark.parametrize(("data", "level", "expected"), CASES)
def test_validate_finds_expected_errors(data: bytes, level: str,
                                        expected: list[tuple[int, str]]) -> None:
    assert _found(validate(_parse(data), level)) == expected


def test_unknown_type_and_event_reject_the_message() -> None:
    errors = validate(_parse(_edit(ADT_A01, {"MSH": _msh("XYZ^Q99")})), "standard")
    assert [(e.code, e.reject) for e in errors] == [
        (ErrorCode.UNSUPPORTED_MESSAGE_TYPE, True), (ErrorCode.UNSUPPORTED_EVENT_CODE, True)]


def test_field_errors_are_application_errors_not_rejects() -> None:
    errors = validate(_parse(_edit(ADT_A01, {"PID": PID_OK.replace("|F|", "|X|")})), "strict")
    assert [(e.code, e.reject) for e in errors] == [(ErrorCode.TABLE_VALUE_NOT_FOUND, False)]


def test_table_error_names_the_table_not_the_value() -> None:
    [error] = validate(_parse(_edit(ADT_A01, {"PID": PID_OK.replace("|F|", "|Q|")})), "strict")
    assert "HL7 table 0001" in error.reason
    assert "Q" not in error.reason.replace("HL7", "")


def test_unsupported_version_is_203_not_an_exception() -> None:
    message = parse_message(_edit(ADT_A01, {"MSH": _msh("ADT^A01", "9.9")}))
    assert _found(validate(message, "standard")) == [(203, "MSH-12")]


def test_header_level_checks_nothing_more() -> None:
    message = _parse(_edit(ADT_A01, {"MSH": _msh("XYZ^Q99")}, after={"PID": ["XYZ|1"]}))
    assert validate(message, "header") == []


def test_unknown_level_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="validation level"):
        validate(_parse(_edit(ADT_A01)), "lenient")


def test_errors_come_in_message_order_and_are_capped() -> None:
    extra = [f"XY{i % 10}|{i}" for i in range(MAX_ERRORS + 10)]
    message = _parse(_edit(ADT_A01, {"MSH": _msh("XYZ^A01")}, after={"DG1": extra}))
    errors = validate(message, "standard")
    assert len(errors) == MAX_ERRORS
    assert _found(errors[:3]) == [(200, "MSH-9.1"), (100, "XY0"), (100, "XY1")]


def test_strict_errors_follow_segment_then_field_order() -> None:
    pid = PID_OK.replace("PID|1|", "PID|A|").replace("|F|", "|X|")
    message = _parse(_edit(ADT_A01, {"PID": pid}, after={"PV1": ["XYZ|1"]}))
    assert _found(validate(message, "strict")) == [
        (102, "PID-1"), (103, "PID-8"), (100, "XYZ")]


@pytest.mark.parametrize("level", ["standard", "strict"])
def test_no_phi_canary_in_any_reason(level: str) -> None:
    message = _parse((MESSAGES / "validate_canary_v251.hl7").read_bytes())
    errors = validate(message, level)
    assert errors, "the canary message is built to fail"
    for error in errors:
        for canary in CANARIES:
            assert canary not in error.reason
            assert canary not in str(error)
            assert canary[:3] not in str(error.location)


@pytest.mark.parametrize("code", ["CANARYSMITH", "ADT\\T\\1", "A" * 40])
def test_odd_message_codes_are_described_not_quoted(code: str) -> None:
    [error] = validate(_parse(_edit(ADT_A01[:1], {"MSH": _msh(code + "^A01")})), "standard")
    assert error.code == ErrorCode.UNSUPPORTED_MESSAGE_TYPE
    assert code not in error.reason
    assert f"({len(code)} characters)" in error.reason


# -- definitions ---------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "segment", "number", "expected"), [
    ("2.5.1", "PID", 7, FieldDef(7, "PID_7", "DATE_TIME_OF_BIRTH", "TS", False, 1, None)),
    ("2.5.1", "PID", 3, FieldDef(3, "PID_3", "PATIENT_IDENTIFIER_LIST", "CX", True, None,
                                 None)),
    ("2.5.1", "PID", 8, FieldDef(8, "PID_8", "ADMINISTRATIVE_SEX", "IS", False, 1, "0001")),
    ("2.8.2", "PID", 7, FieldDef(7, "PID_7", "DATE_TIME_OF_BIRTH", "DTM", False, 1, None)),
    ("2.2", "EVN", 1, FieldDef(1, "EVN_1", "EVENT_TYPE_CODE", "ID", True, 1, "0003")),
])
def test_definitions_compile_field_definitions(version: str, segment: str, number: int,
                                               expected: FieldDef) -> None:
    assert definitions(version).segments[segment].field(number) == expected


@pytest.mark.parametrize(("version", "library"), [
    ("2.1", "2.1"), ("2.5.1", "2.5.1"), ("2.7.1", "2.7"), ("2.8.2", "2.8.2")])
def test_every_supported_version_has_definitions(version: str, library: str) -> None:
    defs = definitions(version)
    assert library_version(version) == library
    assert defs.version == version
    assert {"MSH", "PID"} <= defs.segment_ids
    assert {"ADT", "ACK"} <= defs.message_codes
    assert "A01" in defs.trigger_events


def test_definitions_are_compiled_once() -> None:
    assert definitions("2.5.1") is definitions("2.5.1")


def test_segments_withdrawn_outright_keep_their_field_numbers() -> None:
    # hl7apy's v2.8 SCH skips the withdrawn SCH-11: numbers come from names, not positions.
    sch = definitions("2.8").segments["SCH"]
    sch12 = sch.field(12)
    assert sch.field(11) is None
    assert sch12 is not None and sch12.name == "SCH_12"


# -- the shared reference corpus -------------------------------------------------------------


def _reference_messages() -> list[tuple[str, Message]]:
    found: list[tuple[str, Message]] = []
    for path in sorted(REFERENCE.rglob("*")):
        if not path.is_file() or path.suffix in (".json", ".xml", ".tsv"):
            continue
        for index, data in enumerate(split_messages(path.read_bytes())):
            try:
                message = parse_message(data)
                check_header(message.header)
            except Hl7Error:
                continue  # refused before validation runs
            found.append((f"{path.relative_to(REFERENCE)}#{index}", message))
    return found


# Messages of the reference corpus that standard validation flags, and why: genuinely
# unknown types, and test messages without a segment their structure requires at the top.
FLAGGED_REFERENCE = {
    "LinuxForHealth-hl7v2-fhir-converter/Hl7CustomMessageTest_L89_CUSTOM_PAT.hl7#0":
        [(200, "MSH-9.1"), (201, "MSH-9.2")],  # CUSTOM^PAT, a site type without a Z
    # A transport test: ADT^A01 with MSH, EVN and PID only; ADT_A01 requires PV1.
    "GoogleCloudPlatform-mllp/integration_test_L49_ADT_A01.hl7#0": [(100, "PV1")],
    # An identifier test: MDM^T02 ("notification and content") without the content OBX.
    "LinuxForHealth-hl7v2-fhir-converter/Hl7IdentifierFHIRConversionTest_L844_MDM_T02.hl7#0":
        [(100, "OBX")],
}


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared reference corpus not present")
def test_standard_validation_of_the_reference_corpus() -> None:
    flagged: dict[str, list[tuple[int, str]]] = {}
    messages = _reference_messages()
    assert messages
    for name, message in messages:
        errors = validate(message, "standard")
        assert isinstance(errors, list)
        if errors:
            flagged[name] = _found(errors)
    assert flagged == FLAGGED_REFERENCE
