"""Batches (FHS/BHS … BTS/FTS) unwrapped into messages, and character sets per MSH-18
(HL7 table 0211): ASCII, ISO 8859/1–9, UNICODE UTF-8, a leading byte-order mark, and the
configurable default for messages that leave MSH-18 empty."""

from __future__ import annotations

import pytest

from conftest import message as fixture
from gateway.hl7.batch import is_batch, split_messages
from gateway.hl7.charset import UTF8_BOM, codec_for
from gateway.hl7.errors import ErrorCode, Hl7ParseError
from gateway.hl7.message import check_header, parse_message


def msh(charset: str = "", version: str = "2.5.1") -> str:
    return f"MSH|^~\\&|SND|FAC|RCV|FAC|20240101120000||ADT^A08|C1|P|{version}||||||{charset}"


# -- batches --------------------------------------------------------------------------------


def test_file_batch_is_unwrapped_into_its_messages() -> None:
    data = fixture("codec_file_batch.hl7")
    assert is_batch(data)
    units = split_messages(data)
    assert len(units) == 3
    messages = [parse_message(unit) for unit in units]
    for message in messages:
        check_header(message.header)
    assert [m.header.control_id for m in messages] == ["MSGB-0001", "MSGB-0002", "MSGB-0003"]
    assert [m.get("PID-5.2") for m in messages] == ["NOVEMBER", "OSCAR", "PAPA"]
    # Envelope segments are dropped, Z-segments kept with their message.
    assert messages[1].segment_ids == ["MSH", "EVN", "PID", "ZPV"]
    assert messages[1].get("ZPV-2") == "Custom visit flag"
    assert all(not {"FHS", "BHS", "BTS", "FTS"} & set(m.segment_ids) for m in messages)


def test_batch_messages_keep_their_exact_bytes() -> None:
    data = fixture("codec_file_batch.hl7")
    units = split_messages(data)
    assert b"".join(units) in data
    assert all(parse_message(unit).encode() == unit for unit in units)


def test_batch_without_file_header_and_with_lf_terminators() -> None:
    data = fixture("codec_file_batch.hl7").replace(b"\r", b"\n")
    data = data[data.index(b"BHS"): data.index(b"FTS")]
    assert is_batch(data)
    assert [parse_message(u).header.control_id for u in split_messages(data)] == [
        "MSGB-0001", "MSGB-0002", "MSGB-0003"]


def test_concatenated_messages_without_envelope_are_split() -> None:
    a, b = fixture("codec_v2.6_oru_r01.hl7"), fixture("codec_mixed_terminators.hl7")
    assert not is_batch(a + b)
    assert split_messages(a + b) == [a, b]


def test_batch_with_a_byte_order_mark_and_blank_lines() -> None:
    body = fixture("codec_file_batch.hl7")
    data = UTF8_BOM + b"\r\n\r\n" + body + b"\r\n"
    assert is_batch(data)
    assert len(split_messages(data)) == 3


def test_bytes_before_the_first_header_are_kept_to_be_refused() -> None:
    units = split_messages(b"garbage line\r" + fixture("codec_v2.6_oru_r01.hl7"))
    assert len(units) == 2
    with pytest.raises(Hl7ParseError) as refused:
        parse_message(units[0])
    assert refused.value.code == ErrorCode.SEGMENT_SEQUENCE_ERROR


def test_a_line_that_only_begins_with_a_header_id_does_not_split() -> None:
    data = fixture("codec_v2.6_oru_r01.hl7") + b"MSHIP|not a header\rBTSX|nor a trailer\r"
    assert split_messages(data) == [data]


@pytest.mark.parametrize("data", [b"", b"\r\n", UTF8_BOM])
def test_empty_batch_has_no_messages(data: bytes) -> None:
    assert split_messages(data) == []


def test_empty_batch_envelope_has_no_messages() -> None:
    assert split_messages(b"BHS|^~\\&|A\rBTS|0\r") == []


# -- character sets ---------------------------------------------------------------------------


def test_8859_1_message_is_decoded_per_msh18() -> None:
    data = fixture("codec_8859_1.hl7")
    assert b"H\xc9BERT" in data  # one byte per accented letter
    message = parse_message(data)
    assert message.charset == "iso-8859-1"
    assert message.get("PID-5.1") == "HÉBERT-TESTÉ"
    assert message.get("PID-5.2") == "Zoë"
    assert message.get("PID-11.3") == "Montréal"
    assert message.encode() == data


def test_8859_1_message_is_written_back_in_8859_1() -> None:
    message = parse_message(fixture("codec_8859_1.hl7"))
    message.set("PID-5.2", "Françoise")
    data = message.encode()
    assert b"Fran\xe7oise" in data
    assert parse_message(data).get("PID-5.2") == "Françoise"


# A letter that exists in that part of ISO 8859 (and shows up wrong in the others).
ISO_8859 = [
    ("8859/1", "iso-8859-1", "Ñandú"),
    ("8859/2", "iso-8859-2", "Łódź"),
    ("8859/3", "iso-8859-3", "Ħal Għargħur"),
    ("8859/4", "iso-8859-4", "Ķekava"),
    ("8859/5", "iso-8859-5", "Жуковский"),
    ("8859/6", "iso-8859-6", "عمان"),
    ("8859/7", "iso-8859-7", "Ωμέγα"),
    ("8859/8", "iso-8859-8", "שלום"),
    ("8859/9", "iso-8859-9", "İğneada"),
]


@pytest.mark.parametrize(("charset", "codec", "text"), ISO_8859)
def test_every_iso_8859_part_is_decoded(charset: str, codec: str, text: str) -> None:
    data = f"{msh(charset)}\rPID|1||X1||{text}^Test\r".encode(codec)
    message = parse_message(data)
    assert message.charset == codec
    assert message.get("PID-5.1") == text
    assert message.encode() == data


def test_unicode_utf8_message_with_byte_order_mark() -> None:
    data = fixture("codec_utf8_bom.hl7")
    assert data.startswith(UTF8_BOM)
    message = parse_message(data)
    check_header(message.header)
    assert message.charset == "utf-8"
    assert message.header.charset == "UNICODE UTF-8"
    assert message.get("PID-5.1") == "試験"
    assert message.get("PID-11.1") == "1 Ōdōri"
    assert message.get("NTE-3") == "Temperature 37.5 °C — résumé ✓"
    assert message.encode() == data


def test_byte_order_mark_is_kept_when_a_field_changes() -> None:
    data = fixture("codec_utf8_bom.hl7")
    message = parse_message(data)
    message.set("PID-5.2", "桜")
    changed = message.encode()
    assert changed == data.replace("花子".encode(), "桜".encode())


def test_byte_order_mark_means_utf8_when_msh18_is_empty() -> None:
    data = UTF8_BOM + f"{msh()}\rPID|1||X1||Müller\r".encode()
    assert parse_message(data, default_charset="iso-8859-1").get("PID-5") == "Müller"


def test_default_charset_is_utf8() -> None:
    data = f"{msh()}\rPID|1||X1||Müller\r".encode()
    assert parse_message(data).get("PID-5") == "Müller"


def test_default_charset_is_configurable() -> None:
    data = f"{msh()}\rPID|1||X1||Müller\r".encode("iso-8859-1")
    with pytest.raises(Hl7ParseError) as refused:
        parse_message(data)
    assert refused.value.code == ErrorCode.DATA_TYPE_ERROR
    assert parse_message(data, default_charset="iso-8859-1").get("PID-5") == "Müller"
    # A table 0211 name works as the default too.
    assert parse_message(data, default_charset="8859/1").get("PID-5") == "Müller"


def test_msh18_overrides_the_default_charset() -> None:
    data = f"{msh('8859/1')}\rPID|1||X1||Müller\r".encode("iso-8859-1")
    assert parse_message(data, default_charset="utf-8").get("PID-5") == "Müller"


def test_msh18_first_repetition_is_the_message_charset() -> None:
    data = f"{msh('8859/1~ISO IR87')}\rPID|1||X1||Müller\r".encode("iso-8859-1")
    assert parse_message(data).charset == "iso-8859-1"


def test_ascii_declared_messages_are_read_as_utf8() -> None:
    """Senders that declare ASCII send UTF-8 punctuation; UTF-8 is a superset of ASCII."""
    data = f"{msh('ASCII')}\rNTE|1||“quoted” – dash\r".encode()
    assert parse_message(data).get("NTE-3") == "“quoted” – dash"


@pytest.mark.parametrize(("charset", "encoded"), [
    ("UNICODE UTF-8", "Müller".encode("iso-8859-1")),
    ("ASCII", b"M\xfcller"),
    ("", b"M\xfcller"),
])
def test_bytes_invalid_for_the_declared_charset_are_refused(charset: str, encoded: bytes) -> None:
    data = f"{msh(charset)}\rPID|1||X1||".encode() + encoded + b"\r"
    with pytest.raises(Hl7ParseError) as refused:
        parse_message(data)
    assert refused.value.code == ErrorCode.DATA_TYPE_ERROR
    assert str(refused.value.location) == "MSH-18"
    assert "segment 2" in refused.value.reason
    assert "ller" not in str(refused.value)


@pytest.mark.parametrize("charset", ["EBCDIC", "UNICODE UTF-16", "ISO IR87", "8859/99"])
def test_unsupported_charsets_are_refused(charset: str) -> None:
    with pytest.raises(Hl7ParseError) as refused:
        parse_message(f"{msh(charset)}\rPID|1\r".encode())
    assert refused.value.code == ErrorCode.TABLE_VALUE_NOT_FOUND
    assert str(refused.value.location) == "MSH-18"
    assert refused.value.reject


@pytest.mark.parametrize(("msh18", "codec"), [
    ("", "utf-8"), ("  ", "utf-8"), ("ASCII", "utf-8"), ("unicode utf-8", "utf-8"),
    ("UNICODE", "utf-8"), ("8859/15", "iso-8859-15"), ("ISO IR100", "iso-8859-1"),
    ("GB 18030-2000", "gb18030"), ("BIG-5", "big5"), ("KS X 1001", "euc-kr"),
])
def test_charset_table(msh18: str, codec: str) -> None:
    assert codec_for(msh18, "utf-8") == codec


def test_hex_escapes_decode_in_the_message_charset() -> None:
    latin = f"{msh('8859/1')}\rNTE|1||caf\\XE9\\\r".encode("iso-8859-1")
    utf8 = f"{msh('UNICODE UTF-8')}\rNTE|1||caf\\XC3A9\\\r".encode()
    assert parse_message(latin).get("NTE-3") == parse_message(utf8).get("NTE-3") == "café"
