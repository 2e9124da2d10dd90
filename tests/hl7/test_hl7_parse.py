"""Parsing HL7 v2 messages: versions, delimiters, terminators, terser paths, set/encode,
laziness of the header-only parse, and how bad input is refused (HL7 table 0357 codes,
locations, and no PHI in the error text)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gateway.hl7.delimiters import Delimiters
from gateway.hl7.errors import ErrorCode, Hl7ParseError
from gateway.hl7.location import parse_location
from gateway.hl7.message import Message, check_header, parse_header, parse_message

MESSAGES = Path(__file__).parents[1] / "messages"


def fixture(name: str) -> bytes:
    return (MESSAGES / name).read_bytes()


def parsed(name: str) -> Message:
    return parse_message(fixture(name))


# -- every version -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "version", "message_type", "control_id"), [
    ("codec_v2.1_adt.hl7", "2.1", "ADT", "MSG21-0001"),
    ("codec_v2.2_adt_a04.hl7", "2.2", "ADT^A04", "MSG22-0001"),
    ("codec_v2.3_oru_r01.hl7", "2.3", "ORU^R01", "MSG23-0001"),
    ("codec_v2.3.1_orm_o01.hl7", "2.3.1", "ORM^O01", "MSG231-0001"),
    ("codec_v2.4_adt_a08.hl7", "2.4", "ADT^A08", "MSG24-0001"),
    ("codec_v2.5_siu_s12.hl7", "2.5", "SIU^S12", "MSG25-0001"),
    ("codec_v2.5.1_adt_a01_escapes.hl7", "2.5.1", "ADT^A01", "MSG251-0001"),
    ("codec_v2.6_oru_r01.hl7", "2.6", "ORU^R01", "MSG26-0001"),
    ("codec_v2.7_adt_a01_truncation.hl7", "2.7", "ADT^A01", "MSG27-0001"),
    ("codec_v2.8_vxu_v04.hl7", "2.8", "VXU^V04", "MSG28-0001"),
])
def test_every_hl7_version_parses_and_serialises_to_the_same_bytes(
        name: str, version: str, message_type: str, control_id: str) -> None:
    data = fixture(name)
    message = parse_message(data)
    check_header(message.header)
    assert message.header.version == version
    assert message.header.message_type == message_type
    assert message.header.control_id == control_id
    assert message.get("PID-5.1").startswith(("TESTPERSON", "O^BRIEN"))
    assert message.encode() == data


def test_header_reads_the_fields_the_gateway_acts_on() -> None:
    header = parsed("codec_v2.5.1_adt_a01_escapes.hl7").header
    assert (header.sending_application, header.sending_facility) == ("SYNTHADT", "NORTHWING")
    assert (header.receiving_application, header.receiving_facility) == ("ISTHMUS", "GATEWAY")
    assert (header.message_code, header.trigger_event, header.message_structure) == (
        "ADT", "A01", "ADT_A01")
    assert header.processing_id == "P"
    assert (header.accept_ack_type, header.application_ack_type) == ("AL", "NE")
    assert header.enhanced_mode
    assert header.charset == "UNICODE UTF-8"


def test_v21_message_without_trigger_event_has_plain_message_type() -> None:
    header = parsed("codec_v2.1_adt.hl7").header
    assert header.trigger_event == ""
    assert header.message_type == "ADT"
    assert not header.enhanced_mode


# -- delimiters ----------------------------------------------------------------------------


def test_msh1_is_the_field_separator_and_msh2_the_encoding_characters() -> None:
    message = parsed("codec_v2.5.1_adt_a01_escapes.hl7")
    assert message.get_raw("MSH-1") == message.get("MSH-1") == "|"
    assert message.get_raw("MSH-2") == message.get("MSH-2") == "^~\\&"
    # MSH-n for n >= 3 is the (n-1)th piece of the split line.
    assert message.get("MSH-3") == "SYNTHADT"
    assert message.get("MSH-7") == "20240115083000+0100"
    assert message.get("MSH-9.3") == "ADT_A01"
    assert message.get("MSH-10") == "MSG251-0001"
    assert message.get("MSH-12") == "2.5.1"
    msh = message.segment("MSH")
    assert msh is not None
    assert msh.field(1) == "|"
    assert msh.field(3) == "SYNTHADT"
    assert msh.get(9, component=2) == "A01"


def test_non_standard_delimiters_are_read_from_msh1_and_msh2() -> None:
    message = parsed("codec_nonstandard_delimiters.hl7")
    assert message.delimiters == Delimiters(
        field="!", component="@", repetition="*", escape="/", subcomponent="%")
    assert message.header.message_code == "ADT"
    # message_type is a routing key: written with '^' whatever the sender's delimiters.
    assert message.header.message_type == "ADT^A01"
    assert message.get_raw("MSH-9") == "ADT@A01@ADT_A01"
    assert message.get("PID-3.4.2") == "1.2.3"
    assert message.get("PID-3(2)") == "ALTNS001"
    assert message.get("PID-5.2") == "LIMA"
    # '|' is plain text with '!' as field separator; /F/ and /S/ are this message's escapes.
    assert message.get("NTE-3") == "Pipe | is plain here, bang ! is escaped, at @ too"


def test_v27_truncation_character_is_the_fifth_encoding_character() -> None:
    message = parsed("codec_v2.7_adt_a01_truncation.hl7")
    assert message.delimiters.truncation == "#"
    assert message.delimiters.encoding_characters == "^~\\&#"
    assert message.get("MSH-2") == "^~\\&#"
    assert message.get("NTE-3") == "Hash sign # written escaped"
    # The codec does not interpret truncation: the character is part of the value.
    assert message.get("PID-5.2") == "JULIETT#"
    message.set("NTE-3", "one # two")
    assert parse_message(message.encode()).get_raw("NTE-3") == "one \\P\\ two"


# -- segment terminators ---------------------------------------------------------------------


def test_cr_lf_and_crlf_terminators_may_be_mixed() -> None:
    data = fixture("codec_mixed_terminators.hl7")
    assert b"\r\n" in data and b"\n" in data.replace(b"\r\n", b"")
    message = parse_message(data)
    assert message.segment_ids == ["MSH", "EVN", "PID", "PV1"]
    assert message.get("PID-5.2") == "MIKE"
    assert message.get("PV1-3.2") == "202"
    assert message.encode() == data


def test_changing_a_field_keeps_every_segment_terminator() -> None:
    data = fixture("codec_mixed_terminators.hl7")
    message = parse_message(data)
    message.set("EVN-2", "20240115083001")
    assert message.encode() == data.replace(b"20240115082900", b"20240115083001")


@pytest.mark.parametrize("terminator", [b"\r", b"\n", b"\r\n"])
def test_blank_lines_between_segments_are_not_segments(terminator: bytes) -> None:
    data = terminator.join([b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|C1|P|2.5", b"",
                            b"PID|1||X1", b"  ", b"PV1|1|I", b""]) + terminator
    message = parse_message(data)
    assert message.segment_ids == ["MSH", "PID", "PV1"]
    assert len(message) == 3
    assert [s.id for s in message.segments()] == ["MSH", "PID", "PV1"]
    assert message.get("PV1-2") == "I"
    message.set("PID-3", "X2")
    assert message.encode() == data.replace(b"X1", b"X2")


def test_leading_blank_lines_and_missing_final_terminator_are_kept() -> None:
    data = b"\r\n\r\nMSH|^~\\&|A|B|C|D|20240101||ADT^A01|C1|P|2.5\rPID|1||X1"
    message = parse_message(data)
    assert message.encode() == data
    message.set("PID-3", "X2")
    assert message.encode() == data.replace(b"X1", b"X2")


# -- terser paths ------------------------------------------------------------------------------

ESCAPES = "codec_v2.5.1_adt_a01_escapes.hl7"


@pytest.mark.parametrize(("path", "raw", "value"), [
    ("PID-1", "1", "1"),
    # a whole field is every repetition; the value is the first leaf
    ("PID-3", "MRN251001^^^NORTHWING&1.2.3.4.5&ISO^MR~PAS251001^^^PAS&1.2.3.4.6&ISO^PI",
     "MRN251001"),
    ("PID-3(1)", "MRN251001^^^NORTHWING&1.2.3.4.5&ISO^MR", "MRN251001"),
    ("PID-3(2)", "PAS251001^^^PAS&1.2.3.4.6&ISO^PI", "PAS251001"),
    ("PID-3(2).4", "PAS&1.2.3.4.6&ISO", "PAS"),
    ("PID-3(2).4.2", "1.2.3.4.6", "1.2.3.4.6"),
    ("PID-3(2).5", "PI", "PI"),
    ("PID-3(3)", "", ""),
    ("PID-3.4.9", "", ""),
    ("PID-5", "O\\S\\BRIEN-TESTER^GOLF^G^^^^L~TESTER^GOLFIE^^^^^A", "O^BRIEN-TESTER"),
    ("PID-5.1", "O\\S\\BRIEN-TESTER", "O^BRIEN-TESTER"),
    ("PID-5(2).2", "GOLFIE", "GOLFIE"),
    ("PID-11.2", "Unit 2\\F\\B", "Unit 2|B"),
    ("PID[1]-7", "19760707", "19760707"),
    ("PID[2]-7", "", ""),
    ("PID-99", "", ""),
    ("NK1-3.2", "Spouse", "Spouse"),
    ("ZPI-2.2", "with component&sub", "with component"),
    ("ZPI-2.2.2", "sub", "sub"),
    ("ZPI-3", "\\XC3A9\\", "é"),
    ("AL1-3", "", ""),
    ("PID-0", "PID", "PID"),
])
def test_terser_paths_read_raw_text_and_values(path: str, raw: str, value: str) -> None:
    message = parsed(ESCAPES)
    assert message.get_raw(path) == raw
    assert message.get(path) == value


def test_occurrence_selects_the_nth_segment_of_an_id() -> None:
    message = parsed("codec_v2.6_oru_r01.hl7")
    assert message.get("OBX[3]-5") == "Amber"
    assert message.get("OBX[2]-3.2") == "Hematocrit"
    assert message.get("OBX-5") == "13.5"
    assert message.get("OBX[4]-5") == ""
    obx = [s for s in message.segments("OBX")]
    assert [(s.occurrence, s.get(5)) for s in obx] == [(1, "13.5"), (2, "41"), (3, "Amber")]
    third = message.segment("OBX", 3)
    assert third is not None and third.field(2) == "ST"
    assert message.segment("OBX", 4) is None


def test_segments_iterate_in_order_with_field_counts() -> None:
    message = parsed("codec_v2.6_oru_r01.hl7")
    segments = list(message.segments())
    assert [s.id for s in segments] == ["MSH", "PID", "OBR", "OBX", "OBX", "OBX"]
    assert segments[3].field_count == 11
    assert segments[0].field_count == 12  # MSH-1 .. MSH-12


@pytest.mark.parametrize("path", ["pid-5", "PID5", "PID-5.", "PID-(2)", "PI-5", "PID[0]-5",
                                  "PID-5(0)", "PID-5.0", "PID-5.1.0", "PID-5.1.1.1"])
def test_malformed_terser_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        parse_location(path)


# -- set and encode ----------------------------------------------------------------------------


def test_unchanged_message_serialises_to_its_own_bytes() -> None:
    for path in sorted(MESSAGES.glob("codec_v*.hl7")):
        data = path.read_bytes()
        message = parse_message(data)
        list(message.segments())
        message.get("PID-5")
        assert message.encode() == data


def test_changing_one_field_changes_only_that_field() -> None:
    data = fixture(ESCAPES)
    message = parse_message(data)
    message.set("PID-7", "19760708")
    assert message.encode() == data.replace(b"|19760707|", b"|19760708|")


@pytest.mark.parametrize(("path", "value", "wire"), [
    ("PID-5.2", "A|B", "O\\S\\BRIEN-TESTER^A\\F\\B^G^^^^L~TESTER^GOLFIE^^^^^A"),
    ("PID-5(2).7", "B", "O\\S\\BRIEN-TESTER^GOLF^G^^^^L~TESTER^GOLFIE^^^^^B"),
    ("PID-5(3).1", "NEW", "O\\S\\BRIEN-TESTER^GOLF^G^^^^L~TESTER^GOLFIE^^^^^A~NEW"),
    ("PID-5.1.2", "x&y", "O\\S\\BRIEN-TESTER&x\\T\\y^GOLF^G^^^^L~TESTER^GOLFIE^^^^^A"),
    ("PID-5", "ONLY^ONE", "ONLY\\S\\ONE~TESTER^GOLFIE^^^^^A"),
    ("PID-5.9", "Z", "O\\S\\BRIEN-TESTER^GOLF^G^^^^L^^Z~TESTER^GOLFIE^^^^^A"),
])
def test_set_escapes_the_value_and_grows_the_structure(path: str, value: str, wire: str) -> None:
    message = parsed(ESCAPES)
    message.set(path, value)
    reread = parse_message(message.encode())
    assert reread.get_raw("PID-5") == wire
    assert reread.get(path) == value


def test_set_beyond_the_last_field_adds_empty_fields() -> None:
    message = parse_message(b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|C1|P|2.5\rPID|1\r")
    message.set("PID-5.2", "JANE")
    assert message.encode().endswith(b"\rPID|1||||^JANE\r")


def test_set_on_msh_fields_uses_msh_numbering_and_refreshes_the_header() -> None:
    message = parsed(ESCAPES)
    assert message.header.control_id == "MSG251-0001"
    message.set("MSH-10", "MSG251-0002")
    message.set("MSH-9.2", "A08")
    assert message.header.control_id == "MSG251-0002"
    assert message.header.trigger_event == "A08"
    assert message.encode().startswith(
        b"MSH|^~\\&|SYNTHADT|NORTHWING|ISTHMUS|GATEWAY|20240115083000+0100||ADT^A08^ADT_A01|"
        b"MSG251-0002|P|2.5.1|")


@pytest.mark.parametrize("path", ["MSH-1", "MSH-2", "PID", "PID-0"])
def test_set_refuses_the_delimiters_and_segment_ids(path: str) -> None:
    with pytest.raises(ValueError):
        parsed(ESCAPES).set(path, "x")


def test_set_on_an_absent_segment_appends_it() -> None:
    data = b"MSH|^~\\&|A|B|C|D|20240101||ACK^A01|C1|P|2.5\r"
    message = parse_message(data)
    message.set("MSA-1", "AA")
    message.set("MSA-2", "C0")
    message.set("NTE[2]-3", "second note")
    assert message.encode() == data + b"MSA|AA|C0\rNTE\rNTE|||second note\r"
    assert message.segment_ids == ["MSH", "MSA", "NTE", "NTE"]


def test_segments_read_before_a_set_see_it_and_the_segments_it_appends() -> None:
    # Each segment's fields are split once and kept: a set changes them in place, an
    # appended segment is in the next walk.
    message = parse_message(b"MSH|^~\\&|A|B|C|D|20240101||ACK^A01|C1|P|2.5\rMSA|AA\r")
    msa = next(message.segments("MSA"))
    message.set("MSA-2", "C0")
    message.set("ERR-3", "x")
    assert msa.fields == ["MSA", "AA", "C0"] and msa.field(2) == "C0"
    assert [(s.id, s.occurrence, s.fields) for s in message.segments()][1:] == [
        ("MSA", 1, ["MSA", "AA", "C0"]), ("ERR", 1, ["ERR", "", "", "x"])]


def test_a_walked_message_holds_nothing_that_points_back_at_it() -> None:
    # Freed as soon as it is dropped, not by the cycle collector (a frame can be 10 MB).
    message = parse_message(fixture("codec_v2.6_oru_r01.hl7"))
    before = sys.getrefcount(message)
    segments = list(message.segments())
    assert message.header.message_code == "ORU" and segments[1].field(3)
    del segments
    assert sys.getrefcount(message) == before


def test_appended_segment_follows_the_message_terminator_style() -> None:
    message = parse_message(b"MSH|^~\\&|A|B|C|D|20240101||ACK^A01|C1|P|2.5\nMSA|AA|C0")
    message.set("ERR-3", "x")
    assert message.encode() == b"MSH|^~\\&|A|B|C|D|20240101||ACK^A01|C1|P|2.5\nMSA|AA|C0\nERR|||x"


def test_set_refuses_characters_the_message_charset_cannot_write() -> None:
    message = parsed("codec_8859_1.hl7")
    with pytest.raises(ValueError, match="PID-5.2") as refused:
        message.set("PID-5.2", "ZZCANARYQQ €")
    assert "ZZCANARYQQ" not in str(refused.value)
    assert message.encode() == fixture("codec_8859_1.hl7")


# -- laziness: the MLLP hot path reads only MSH -----------------------------------------------


def test_reading_the_header_does_not_split_the_other_segments() -> None:
    message = parse_message(fixture("codec_v2.6_oru_r01.hl7"))
    header = message.header
    check_header(header)
    assert message.get("MSH-10") == header.control_id
    assert message._segments is None  # the laziness contract
    assert message.encode() == fixture("codec_v2.6_oru_r01.hl7")
    assert message._segments is None


def test_reading_a_body_segment_splits_segments_but_not_their_fields() -> None:
    message = parse_message(fixture("codec_v2.6_oru_r01.hl7"))
    assert message.get("OBX[3]-5") == "Amber"
    assert message._segments is not None
    assert set(message._fields) == {5}  # only OBX[3] had its fields split


# -- bad input: code, location, and no PHI ------------------------------------------------------

GOOD_MSH = b"MSH|^~\\&|SNDAPP|SNDFAC|RCVAPP|RCVFAC|20240101120000||ADT^A01|CTRL1|P|2.5.1"
CANARY = b"ZZCANARYQQ"
PID = b"PID|1||MRN-ZZCANARYQQ^^^H^MR||ZZCANARYQQ^ZZCANARYQQ||19800101|F"


def with_msh(*replacements: tuple[int, bytes]) -> bytes:
    """GOOD_MSH with MSH-n replaced (MSH-n is split index n-1), followed by a canary PID."""
    fields = GOOD_MSH.split(b"|")
    for number, value in replacements:
        while len(fields) < number:
            fields.append(b"")
        fields[number - 1] = value
    return b"|".join(fields) + b"\r" + PID + b"\r"


BAD_INPUTS = [
    # (id, bytes, ErrorCode, location, refused by parse_message (else by check_header))
    ("empty", b"", ErrorCode.SEGMENT_SEQUENCE_ERROR, "MSH", True),
    ("only-blank-lines", b"\r\n \r\n", ErrorCode.SEGMENT_SEQUENCE_ERROR, "MSH", True),
    ("not-hl7", b"GET / HTTP/1.1\r\nHost: ZZCANARYQQ\r\n\r\n",
     ErrorCode.SEGMENT_SEQUENCE_ERROR, "MSH", True),
    ("binary", bytes(range(256)), ErrorCode.SEGMENT_SEQUENCE_ERROR, "MSH", True),
    ("no-msh", PID + b"\r" + GOOD_MSH + b"\r", ErrorCode.SEGMENT_SEQUENCE_ERROR, "MSH", True),
    ("json", b'{"resourceType": "Patient", "name": "ZZCANARYQQ"}',
     ErrorCode.SEGMENT_SEQUENCE_ERROR, "MSH", True),
    ("msh-only-id", b"MSH\r" + PID, ErrorCode.REQUIRED_FIELD_MISSING, "MSH-1", True),
    ("msh2-missing", b"MSH|\r" + PID, ErrorCode.REQUIRED_FIELD_MISSING, "MSH-2", True),
    ("msh2-too-short", with_msh((2, b"^~")), ErrorCode.DATA_TYPE_ERROR, "MSH-2", True),
    ("msh2-too-long", with_msh((2, b"^~\\&#$")), ErrorCode.DATA_TYPE_ERROR, "MSH-2", True),
    ("msh2-duplicate", with_msh((2, b"^~\\\\&")), ErrorCode.DATA_TYPE_ERROR, "MSH-2", True),
    ("msh2-duplicate-4", with_msh((2, b"^^\\&")), ErrorCode.DATA_TYPE_ERROR, "MSH-2", True),
    ("msh2-repeats-field-separator", with_msh((2, b"^~|&")),
     ErrorCode.DATA_TYPE_ERROR, "MSH-2", True),
    ("msh2-alphanumeric", with_msh((2, b"ABCD")), ErrorCode.DATA_TYPE_ERROR, "MSH-2", True),
    ("msh2-space", with_msh((2, b"^~ &")), ErrorCode.DATA_TYPE_ERROR, "MSH-2", True),
    ("msh1-alphanumeric", b"MSHX^~\\&XA\r" + PID, ErrorCode.DATA_TYPE_ERROR, "MSH-1", True),
    ("msh1-space", b"MSH ^~\\& A\r" + PID, ErrorCode.DATA_TYPE_ERROR, "MSH-1", True),
    ("msh18-unknown", with_msh((18, b"EBCDIC")), ErrorCode.TABLE_VALUE_NOT_FOUND, "MSH-18", True),
    ("msh18-canary", with_msh((18, CANARY)), ErrorCode.TABLE_VALUE_NOT_FOUND, "MSH-18", True),
    ("bytes-not-utf8", with_msh((18, b"UNICODE UTF-8")).replace(b"^ZZCANARYQQ|", b"^Ren\xe9|"),
     ErrorCode.DATA_TYPE_ERROR, "MSH-18", True),
    ("bytes-not-utf8-by-default", with_msh().replace(b"^ZZCANARYQQ|", b"^\xff\xfe|"),
     ErrorCode.DATA_TYPE_ERROR, "MSH-18", True),
    ("bytes-not-ascii", with_msh((18, b"ASCII")).replace(b"^ZZCANARYQQ|", b"^\xe9|"),
     ErrorCode.DATA_TYPE_ERROR, "MSH-18", True),
    ("msh9-missing", with_msh((9, b"")), ErrorCode.REQUIRED_FIELD_MISSING, "MSH-9", False),
    ("msh9-no-code", with_msh((9, b"^A01")), ErrorCode.REQUIRED_FIELD_MISSING, "MSH-9", False),
    ("msh10-missing", with_msh((10, b"")), ErrorCode.REQUIRED_FIELD_MISSING, "MSH-10", False),
    ("msh12-missing", with_msh((12, b"")), ErrorCode.REQUIRED_FIELD_MISSING, "MSH-12", False),
    ("header-cut-short", b"MSH|^~\\&|SNDAPP|SNDFAC\r" + PID,
     ErrorCode.REQUIRED_FIELD_MISSING, "MSH-9", False),
    ("version-unknown", with_msh((12, b"3.0")), ErrorCode.UNSUPPORTED_VERSION_ID, "MSH-12", False),
    ("version-2.6.1", with_msh((12, b"2.6.1")), ErrorCode.UNSUPPORTED_VERSION_ID, "MSH-12", False),
    ("version-canary", with_msh((12, CANARY)), ErrorCode.UNSUPPORTED_VERSION_ID, "MSH-12", False),
    ("accept-ack-unknown", with_msh((15, b"XX")), ErrorCode.TABLE_VALUE_NOT_FOUND, "MSH-15", False),
    ("app-ack-canary", with_msh((16, CANARY)), ErrorCode.TABLE_VALUE_NOT_FOUND, "MSH-16", False),
    # A sender that wrote "\r" as text: the MSH line runs on into PID, so PID's values sit
    # where MSH-12 and later are read. Nothing of them may reach the error text.
    ("run-on-header-version", GOOD_MSH.replace(b"|2.5.1", b"|" + PID),
     ErrorCode.UNSUPPORTED_VERSION_ID, "MSH-12", False),
    ("run-on-header-ack", GOOD_MSH + b"|||" + PID[4:], ErrorCode.TABLE_VALUE_NOT_FOUND,
     "MSH-15", False),
    ("run-on-header-charset", GOOD_MSH + b"|||AL|NE||MRN-ZZCANARYQQ|ZZCANARYQQ^ZZCANARYQQ",
     ErrorCode.TABLE_VALUE_NOT_FOUND, "MSH-18", True),
    ("run-on-header-language", GOOD_MSH + b"|||AL|NE||ZZCANARYQQ|ARABIC",
     ErrorCode.TABLE_VALUE_NOT_FOUND, "MSH-18", True),
]


@pytest.mark.parametrize(("data", "code", "location", "by_parse"),
                         [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_refused_with_code_and_location(
        data: bytes, code: ErrorCode, location: str, by_parse: bool) -> None:
    with pytest.raises(Hl7ParseError) as refused:
        message = parse_message(data)
        assert not by_parse, "parse_message should have refused this"
        check_header(message.header)
    error = refused.value
    assert error.code == code
    assert str(error.location) == location
    # No PHI: the canary (patient name and identifier) is nowhere in what the error says.
    for text in (str(error), error.reason, repr(error), repr(error.args)):
        assert "ZZCANARYQQ" not in text
        assert "CANARY" not in text
        assert "ARABIC" not in text


@pytest.mark.parametrize("blank", [b" ", b"  "])
def test_a_blank_acknowledgment_type_is_not_valued(blank: bytes) -> None:
    header = parse_message(with_msh((15, blank), (16, blank))).header
    check_header(header)  # not refused as an unknown code
    assert (header.accept_ack_type, header.application_ack_type) == ("", "")
    assert not header.enhanced_mode


def test_parse_refusals_ask_for_a_reject() -> None:
    """Bytes that are not a message at all get AR; a header problem is the ACK builder's call."""
    with pytest.raises(Hl7ParseError) as not_hl7:
        parse_message(b"hello")
    assert not_hl7.value.reject
    with pytest.raises(Hl7ParseError) as bad_ack_type:
        check_header(parse_message(with_msh((15, b"XX"))).header)
    assert not bad_ack_type.value.reject


def test_error_reason_names_the_bad_header_value_when_it_is_only_a_code() -> None:
    with pytest.raises(Hl7ParseError, match="'3.0'"):
        check_header(parse_message(with_msh((12, b"3.0"))).header)
    with pytest.raises(Hl7ParseError, match="'XX'"):
        check_header(parse_message(with_msh((15, b"XX"))).header)
    with pytest.raises(Hl7ParseError, match="'UTF-8'"):  # a common mistake for UNICODE UTF-8
        parse_message(with_msh((18, b"UTF-8")))
    with pytest.raises(Hl7ParseError, match="'windows-1252'"):
        parse_message(with_msh((18, b"windows-1252")))


def test_empty_control_id_parses_and_only_the_header_check_refuses_it() -> None:
    message = parse_message(with_msh((10, b"")))
    assert message.get("PID-5.1") == "ZZCANARYQQ"
    with pytest.raises(Hl7ParseError) as refused:
        check_header(message.header)
    assert str(refused.value.location) == "MSH-10"


def test_leading_whitespace_before_msh_is_accepted() -> None:
    data = b"\r\n  \n" + GOOD_MSH + b"\r"
    message = parse_message(data)
    check_header(message.header)
    assert message.encode() == data


def test_segment_id_is_the_whole_text_before_the_separator() -> None:
    raw = b"MSH|^~\\&|A|B|C|D|20261126||ADT^A01|SEGID-1|P|2.5\rPIDX|1|nope\rPID|1|yes\r"
    msg = parse_message(raw)
    assert [s.get(2) for s in msg.segments("PID")] == ["yes"]
    assert msg.segment_ids == ["MSH", "PIDX", "PID"]
    assert msg.get("PID-2") == "yes"


@pytest.mark.parametrize("prefix", [b"", b"\xef\xbb\xbf", b"\r\n"])
def test_parse_header_reads_msh_as_the_whole_parse_does_and_nothing_after(
        prefix: bytes) -> None:
    raw = prefix + fixture("adt_a01.hl7")
    whole, head = parse_message(raw), parse_header(raw)
    assert head.header == whole.header
    assert (head.charset, head.delimiters) == (whole.charset, whole.delimiters)
    assert [s.id for s in head.segments()] == ["MSH"]


def test_parse_header_refuses_what_parse_message_refuses() -> None:
    with pytest.raises(Hl7ParseError):
        parse_header(b"PID|1||MRN-1\rMSH|^~\\&|A|B\r")


def test_a_segment_tells_whether_it_may_hold_an_escape_sequence() -> None:
    # The walk unescapes no value of a segment whose text has no escape character.
    message = parse_message(b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|C1|P|2.5\r"
                            b"PID|1||X||O\\S\\BRIEN^ANN\rPV1|1|I\rNK1|1|DOE\r")
    views = list(message.segments())
    assert [(s.id, s.escape) for s in views] == [
        ("MSH", "\\"), ("PID", "\\"), ("PV1", ""), ("NK1", "")]
    # A segment changed since it was parsed may now hold one, whatever its text was.
    message.set("PV1-3", "A^B")
    assert next(message.segments("PV1")).escape == "\\"
    # A view made on its own does not look: it says the message's escape character.
    nk1 = message.segment("NK1")
    assert nk1 is not None and nk1.escape == "\\"


@pytest.mark.parametrize("blank", [b"", b" ", b"\t \t", b"\xc2\xa0", b"\xe3\x80\x80"])
def test_blank_lines_between_segments_are_no_segments(blank: bytes) -> None:
    message = parse_message(b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|C1|P|2.5\r" + blank
                            + b"\rPID|1\r")
    assert [s.id for s in message.segments()] == ["MSH", "PID"]
